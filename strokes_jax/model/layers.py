"""Small building blocks: fp32 RMSNorm, RoPE (rotate-half), timestep embedding, 2-D sin-cos
tables, and a Dense that carries logical axis names on its kernel."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

Initializer = nn.initializers.Initializer


def param_with_axes(module: nn.Module, name: str, init: Initializer, shape: Sequence[int],
                    axes: Sequence[str | None], dtype=jnp.float32):
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


class DenseGeneral(nn.Module):
    """x[..., in] @ W[in, *out] (+ b[*out]); W carries logical axis names for sharding."""

    features: tuple[int, ...]
    axes: tuple[str | None, ...]  # (in_axis, *out_axes)
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        fin = x.shape[-1]
        init = self.kernel_init
        if len(self.features) > 1:
            # Fan-in scaling as for the flattened matrix.
            flat = lambda k, s, d: init(k, (s[0], int(np.prod(s[1:]))), d).reshape(s)
        else:
            flat = init
        w = param_with_axes(self, "kernel", flat, (fin,) + tuple(self.features), self.axes,
                            self.param_dtype)
        y = jnp.tensordot(x.astype(self.dtype), w.astype(self.dtype), axes=1)
        if self.use_bias:
            b = param_with_axes(self, "bias", nn.initializers.zeros, self.features, self.axes[1:],
                                self.param_dtype)
            y = y + b.astype(self.dtype)
        return y


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 whatever the compute dtype (as Qwen2 does)."""

    eps: float = 1e-6
    axis_name: str = "norm"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = param_with_axes(self, "scale", nn.initializers.ones, (x.shape[-1],),
                                (self.axis_name,))
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale).astype(self.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, rotate-half layout. x: [B, L, H, D]; positions: [B, L]."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    ang = positions.astype(jnp.float32)[..., None] * inv  # [B, L, D/2]
    cos = jnp.concatenate([jnp.cos(ang)] * 2, -1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(ang)] * 2, -1)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rot = jnp.concatenate([-x2, x1], axis=-1)
    return (x.astype(jnp.float32) * cos + rot * sin).astype(x.dtype)


def timestep_features(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """BAGEL's sinusoidal features of raw t in [0, 1], cosine half first."""
    half = dim // 2
    freqs = jnp.exp(-np.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedder(nn.Module):
    """256 sinusoidal features -> Linear -> SiLU -> Linear."""

    width: int
    freq_dim: int = 256
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, t):
        h = DenseGeneral((self.width,), ("freq", "embed"), use_bias=True, dtype=self.dtype,
                         name="mlp_0")(timestep_features(t, self.freq_dim))
        return DenseGeneral((self.width,), ("embed", "embed_out"), use_bias=True,
                            dtype=self.dtype, name="mlp_2")(nn.silu(h))


def sincos_2d(grid_h: int, grid_w: int, dim: int) -> np.ndarray:
    """Fixed 2-D sin-cos table [grid_h * grid_w, dim], row-major over positions; the first half
    of the channels encodes the column, the second the row (MAE / BAGEL convention)."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos table needs a width divisible by 4, got {dim}")

    def one(pos, d):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gh, gw = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64),
                         indexing="ij")
    return np.concatenate([one(gw, dim // 2), one(gh, dim // 2)], axis=1).astype(np.float32)
