"""BAGEL's understanding encoder: a SigLIP(2) ViT, the MLP connector into the decoder's width,
and the fixed 2-D sin-cos table added after it.

Differences from a stock SigLIP, all BAGEL's: the patch embedding is a linear map over
flattened (row, col, channel) patches, so images of any size arrive as token lists; the
learned position table is indexed by row * max_side + col of the patch ("extrapolate" ids),
so a small image uses the top-left corner of the grid; there is no pooling head.

Images are handled inside packed rows: tokens attend only to tokens of the same image
(`image_ids`, 0 = not a ViT token), which is what BAGEL's varlen flash attention does.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import flax.linen as nn

from strokes_jax.model.layers import DenseGeneral, param_with_axes, sincos_2d


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    width: int = 1152
    depth: int = 26  # BAGEL keeps 26 of SigLIP2-so400m's 27 layers
    heads: int = 16
    mlp: int = 4304
    patch: int = 14
    channels: int = 3
    max_side: int = 70  # learned position table covers max_side x max_side patches
    norm_eps: float = 1e-6
    dtype: str = "float32"

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def patch_dim(self) -> int:
        return self.patch * self.patch * self.channels

    @property
    def jdtype(self):
        return jnp.dtype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with bias, statistics in float32 (two-pass variance, as torch computes it)."""

    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = param_with_axes(self, "scale", nn.initializers.ones, (d,), ("norm",))
        bias = param_with_axes(self, "bias", nn.initializers.zeros, (d,), ("norm",))
        x32 = x.astype(jnp.float32)
        mu = jnp.mean(x32, -1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mu), -1, keepdims=True)
        return ((x32 - mu) * jax.lax.rsqrt(var + self.eps) * scale + bias).astype(self.dtype)


def image_mask(image_ids: jax.Array) -> jax.Array:
    """[B, L] image ids -> [B, L, L]: same image only; non-ViT tokens see themselves so every
    softmax row stays finite."""
    same = (image_ids[:, :, None] == image_ids[:, None, :]) & (image_ids[:, :, None] > 0)
    eye = jnp.eye(image_ids.shape[1], dtype=bool)[None]
    return same | eye


class EncoderLayer(nn.Module):
    cfg: VisionConfig

    @nn.compact
    def __call__(self, x, mask):
        c, dt = self.cfg, self.cfg.jdtype
        h = LayerNorm(c.norm_eps, dt, name="ln1")(x)
        proj = lambda n: DenseGeneral((c.heads, c.head_dim), ("embed", "heads", "head_dim"),
                                      use_bias=True, dtype=dt, name=n)(h)
        q, k, v = proj("q"), proj("k"), proj("v")
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * c.head_dim ** -0.5
        logits = jnp.where(mask[:, None], logits, jnp.finfo(jnp.float32).min)
        a = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1).astype(dt), v)
        a = a.reshape(a.shape[:2] + (c.width,))
        x = x + DenseGeneral((c.width,), ("qkv", "embed"), use_bias=True, dtype=dt, name="o")(a)
        h = LayerNorm(c.norm_eps, dt, name="ln2")(x)
        h = DenseGeneral((c.mlp,), ("embed", "mlp"), use_bias=True, dtype=dt, name="fc1")(h)
        h = DenseGeneral((c.width,), ("mlp", "embed"), use_bias=True, dtype=dt,
                         name="fc2")(nn.gelu(h, approximate=True))
        return x + h


class SiglipViT(nn.Module):
    """patches [B, L, p*p*c] in [-1, 1], (row, col, channel) order; pos_ids [B, L] = row *
    max_side + col; image_ids [B, L] (0 = not an image token). Returns [B, L, width] after
    post_layernorm."""

    cfg: VisionConfig

    @nn.compact
    def __call__(self, patches, pos_ids, image_ids):
        c, dt = self.cfg, self.cfg.jdtype
        x = DenseGeneral((c.width,), ("patch", "embed"), use_bias=True, dtype=dt,
                         name="patch_embed")(patches)
        table = param_with_axes(self, "pos_embed", nn.initializers.normal(0.02),
                                (c.max_side * c.max_side, c.width), (None, "embed"))
        x = x + jnp.take(table, pos_ids, axis=0).astype(dt)
        mask = image_mask(image_ids)
        for j in range(c.depth):
            x = EncoderLayer(c, name=f"layer_{j}")(x, mask)
        return LayerNorm(c.norm_eps, dt, name="post_norm")(x)


class Connector(nn.Module):
    """ViT width -> decoder width: fc1 -> GELU(tanh) -> fc2 (BAGEL's MLPconnector)."""

    width: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = DenseGeneral((self.width,), ("vit_embed", "embed"), use_bias=True, dtype=self.dtype,
                         name="fc1")(x)
        return DenseGeneral((self.width,), ("embed", "embed_out"), use_bias=True,
                            dtype=self.dtype, name="fc2")(nn.gelu(h, approximate=True))


class VisionTower(nn.Module):
    """ViT -> connector -> + fixed 2-D sin-cos table (max_side x max_side, decoder width)."""

    cfg: VisionConfig
    llm_width: int
    llm_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, patches, pos_ids, image_ids):
        h = SiglipViT(self.cfg, name="vit")(patches, pos_ids, image_ids)
        h = Connector(self.llm_width, self.llm_dtype, name="connector")(h)
        table = jnp.asarray(sincos_2d(self.cfg.max_side, self.cfg.max_side, self.llm_width))
        return h + jnp.take(table, pos_ids, axis=0).astype(h.dtype)


def patch_positions(h_patches: int, w_patches: int, max_side: int):
    """BAGEL's "extrapolate" position ids of an h x w patch grid: row * max_side + col."""
    rows, cols = jnp.meshgrid(jnp.arange(h_patches), jnp.arange(w_patches), indexing="ij")
    if h_patches > max_side or w_patches > max_side:
        raise ValueError(f"image of {h_patches}x{w_patches} patches exceeds the "
                         f"{max_side}x{max_side} position table")
    return (rows * max_side + cols).reshape(-1)
