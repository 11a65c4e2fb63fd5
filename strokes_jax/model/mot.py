"""Mixture-of-Transformers decoder (BAGEL): two experts with their own copy of every block
weight, hard-routed by token type, sharing one joint attention.

Dense routing computes both experts on every token and selects per token. That costs twice
the dense FLOPs of the block projections; it is simple, static-shaped and shards trivially.
With cfg.sparse_routing the projections run each expert on its own tokens only (routing.py,
single-device); norms stay dense, they are cheap.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import flax.linen as nn

from strokes_jax.model import attention, routing
from strokes_jax.model.layers import DenseGeneral, RMSNorm, rope


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    width: int = 128
    depth: int = 4
    heads: int = 4
    kv_heads: int = 4
    head_dim: int = 32
    mlp: int = 512
    rope_theta: float = 10000.0
    qk_norm: bool = True
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    dtype: str = "float32"  # compute dtype; parameters stay float32
    scan_layers: bool = False  # nn.scan over the stack: one compiled layer, stacked params
    remat: str = "none"  # none | full | dots | dots_no_batch (what backward may keep)
    attention: str = "xla"  # xla | dot_product | cudnn (see attention.attend)
    # Not in BAGEL: the generation expert's norms also get a DiT-style shift/scale/gate from
    # the timestep embedding (zero-initialised, so training starts from the BAGEL network).
    # BAGEL only adds t to the input. It helps a v-head's flow loss but adds nothing to an
    # x-head's, so the shapes configs leave it off (docs/design.md).
    time_adaln: bool = False
    # (gen, und) capacity fractions for sparse routing in full-sequence mode, () for dense.
    # Set by the training step (routing.sparse), which falls back to dense where a batch
    # does not fit; a model built with it and applied directly has no such fallback.
    sparse_routing: tuple = ()

    def __post_init__(self):
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"config key model.remat: {self.remat!r} not in {sorted(REMAT_POLICIES)}")
        if self.attention not in attention.IMPLEMENTATIONS:
            raise ValueError(f"config key model.attention: {self.attention!r} not in "
                             f"{attention.IMPLEMENTATIONS}")
        if self.heads % self.kv_heads:
            raise ValueError(f"config key model.heads ({self.heads}) must be a multiple of "
                             f"model.kv_heads ({self.kv_heads})")

    @property
    def jdtype(self):
        return jnp.dtype(self.dtype)


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _modulated(norm, x, is_gen, mod):
    """Routed RMSNorm; the generation copy is shifted and scaled by `mod` (adaLN) if given."""
    if mod is None:
        return _routed(norm, x, is_gen)
    shift, scale = mod

    def make(tag):
        f = norm(tag)
        return f if tag == "und" else (lambda y: f(y) * (1.0 + scale) + shift)
    return _routed(make, x, is_gen)


def _project(make, x, is_gen, route):
    """_routed for the projections: sparse where a Route is given."""
    return _routed(make, x, is_gen) if route is None else routing.apply(make, x, route)


def _routed(make, x, is_gen):
    """Apply the understanding and generation copies of a sub-module and select per token."""
    und, gen = make("und")(x), make("gen")(x)
    sel = is_gen.reshape(is_gen.shape + (1,) * (und.ndim - is_gen.ndim))
    return jnp.where(sel, gen, und)


class MoTBlock(nn.Module):
    cfg: DecoderConfig

    @nn.compact
    def __call__(self, x, is_gen, positions, mask, kv=None, temb=None, route=None):
        """kv: None (training / full sequence), or the cached (k, v) [B, C, KV, D] of earlier
        tokens for decode mode; then `mask` is [B, L, C + L] and this also returns the new
        tokens' (k, v) so the caller decides which of them to keep. temb: the timestep
        embedding [B, L, width], used when cfg.time_adaln. route: a routing.Route for sparse
        routing of the projections (full-sequence mode only)."""
        c, dt = self.cfg, self.cfg.jdtype
        norm = lambda name: (lambda tag: RMSNorm(c.norm_eps, "embed", dt, name=f"{name}_{tag}"))
        mods = [None, None]
        gates = (0.0, 0.0)
        if c.time_adaln:
            m = DenseGeneral((6, c.width), ("embed", "adaln", "embed_out"), use_bias=True,
                             dtype=dt, kernel_init=nn.initializers.zeros,
                             name="adaln_gen")(nn.silu(temb))
            m = jnp.where(is_gen[..., None, None], m, 0.0)
            mods = [(m[..., 0, :], m[..., 1, :]), (m[..., 3, :], m[..., 4, :])]
            gates = (m[..., 2, :], m[..., 5, :])

        def proj(name, heads, bias):
            return lambda tag: DenseGeneral((heads, c.head_dim), ("embed", "heads", "head_dim"),
                                            use_bias=bias, dtype=dt, name=f"{name}_{tag}")

        h = _modulated(norm("input_norm"), x, is_gen, mods[0])
        q = _project(proj("q", c.heads, c.qkv_bias), h, is_gen, route)
        k = _project(proj("k", c.kv_heads, c.qkv_bias), h, is_gen, route)
        v = _project(proj("v", c.kv_heads, c.qkv_bias), h, is_gen, route)
        if c.qk_norm:  # QK-norm over the head dim, before RoPE
            q = _routed(lambda tag: RMSNorm(c.norm_eps, "head_dim", dt, name=f"q_norm_{tag}"), q, is_gen)
            k = _routed(lambda tag: RMSNorm(c.norm_eps, "head_dim", dt, name=f"k_norm_{tag}"), k, is_gen)
        q, k = rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta)
        if kv is None:
            a = attention.attend(q, k, v, mask, c.attention)
        else:  # keys are cached after RoPE, so cached positions need no recomputation
            a = attention.attend(q, jnp.concatenate([kv[0].astype(k.dtype), k], axis=1),
                                 jnp.concatenate([kv[1].astype(v.dtype), v], axis=1), mask,
                                 c.attention)
        a = a.reshape(a.shape[:2] + (c.heads * c.head_dim,))
        o = _project(lambda tag: DenseGeneral((c.width,), ("qkv", "embed"), dtype=dt,
                                              name=f"o_{tag}"), a, is_gen, route)
        x = x + o * (1.0 + gates[0])
        h = _modulated(norm("post_norm"), x, is_gen, mods[1])

        def mlp(tag):
            def f(y):
                g = DenseGeneral((c.mlp,), ("embed", "mlp"), dtype=dt, name=f"gate_{tag}")(y)
                u = DenseGeneral((c.mlp,), ("embed", "mlp"), dtype=dt, name=f"up_{tag}")(y)
                return DenseGeneral((c.width,), ("mlp", "embed"), dtype=dt,
                                    name=f"down_{tag}")(nn.silu(g) * u)
            return f

        x = x + _project(mlp, h, is_gen, route) * (1.0 + gates[1])
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return x if kv is None else (x, (k, v))


class _ScannedBlock(nn.Module):
    """MoTBlock in nn.scan's (carry, *broadcast) -> (carry, out) form."""

    cfg: DecoderConfig

    @nn.compact
    def __call__(self, x, is_gen, positions, mask, temb, route):
        block = _maybe_remat(MoTBlock, self.cfg, scanned=True)
        return block(self.cfg, name="block")(x, is_gen, positions, mask, None, temb, route), None


class _ScannedDecodeBlock(nn.Module):
    """Decode-mode MoTBlock under nn.scan: the layer's cache slice is scanned over and its new
    (k, v) stacked on the way out. Same module names as _ScannedBlock, so the same params."""

    cfg: DecoderConfig

    @nn.compact
    def __call__(self, x, kv, is_gen, positions, mask, temb):
        return MoTBlock(self.cfg, name="block")(x, is_gen, positions, mask, kv, temb)


def _maybe_remat(cls, cfg: DecoderConfig, scanned: bool):
    if cfg.remat == "none":
        return cls
    # Inside scan, CSE cannot merge the recomputation with the forward pass anyway.
    return nn.remat(cls, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not scanned)


class MoTDecoder(nn.Module):
    cfg: DecoderConfig

    @nn.compact
    def __call__(self, x, is_gen, positions, mask, kv=None, temb=None, valid=None):
        """kv: None, or the decode-mode cache (k, v), each [depth, B, C, KV, D]; then also
        returns the new tokens' (k, v), each [depth, B, L, KV, D]. temb: timestep embedding
        [B, L, width] for cfg.time_adaln. valid: bool [B, L], False for padding (used by
        sparse routing; None means every token is real)."""
        c = self.cfg
        if kv is not None:
            return self._decode(x, is_gen, positions, mask, kv, temb)
        route = None
        if c.sparse_routing:
            valid = jnp.ones_like(is_gen) if valid is None else valid
            route = routing.plan(is_gen, valid, c.sparse_routing)
        if c.scan_layers:
            stack = nn.scan(_ScannedBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=(nn.broadcast,) * 5, length=c.depth,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = stack(c, name="layers")(x, is_gen, positions, mask, temb, route)
        else:
            block = _maybe_remat(MoTBlock, c, scanned=False)
            for i in range(c.depth):
                x = block(c, name=f"layer_{i}")(x, is_gen, positions, mask, None, temb, route)
        return self._final_norm(x, is_gen)

    def _final_norm(self, x, is_gen):
        c = self.cfg
        return _routed(lambda tag: RMSNorm(c.norm_eps, "embed", c.jdtype,
                                           name=f"final_norm_{tag}"), x, is_gen)

    def _decode(self, x, is_gen, positions, mask, kv, temb):
        # No remat here: decoding never differentiates, and remat does not change param names.
        c = self.cfg
        if c.scan_layers:
            stack = nn.scan(_ScannedDecodeBlock, variable_axes={"params": 0},
                            split_rngs={"params": True},
                            in_axes=(0,) + (nn.broadcast,) * 4, length=c.depth,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x, new = stack(c, name="layers")(x, kv, is_gen, positions, mask, temb)
        else:
            outs = []
            for i in range(c.depth):
                x, o = MoTBlock(c, name=f"layer_{i}")(x, is_gen, positions, mask,
                                                      (kv[0][i], kv[1][i]), temb)
                outs.append(o)
            new = tuple(jnp.stack([o[j] for o in outs]) for j in range(2))
        return self._final_norm(x, is_gen), new


def stack_layers(decoder_params: dict, depth: int) -> dict:
    """Unscanned decoder params (layer_0 .. layer_{depth-1}) -> the scanned layout
    (layers/block/..., each leaf stacked on a leading axis). The converter writes unscanned."""
    layers = [decoder_params[f"layer_{i}"] for i in range(depth)]
    out = {k: v for k, v in decoder_params.items() if not k.startswith("layer_")}
    out["layers"] = {"block": jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)}
    return out


def unstack_layers(decoder_params: dict) -> dict:
    stacked = decoder_params["layers"]["block"]
    depth = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    out = {k: v for k, v in decoder_params.items() if k != "layers"}
    for i in range(depth):
        out[f"layer_{i}"] = jax.tree_util.tree_map(lambda x: x[i], stacked)
    return out
