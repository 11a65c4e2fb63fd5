"""The FLUX autoencoder (BAGEL's generation path) in Flax, NHWC.

Module names mirror the original FLUX names of `ae.safetensors` (encoder.down.{i}.block.{j},
encoder.mid.attn_1, decoder.up.{i}.upsample, ...) with dots of list indices flattened into
`down_{i}_block_{j}` so the converter's key map reads one-to-one. Everything that decides
numerics is as in FLUX: GroupNorm(32, eps 1e-6) + SiLU ResNet blocks, one single-head
attention block in the middle, downsampling by a stride-2 3x3 conv after padding only the
bottom/right edge, nearest-neighbour upsampling, and BAGEL's latent scale/shift.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import flax.linen as nn


@dataclasses.dataclass(frozen=True)
class AEConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    in_channels: int = 3
    out_ch: int = 3
    groups: int = 32
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    dtype: str = "float32"

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def jdtype(self):
        return jnp.dtype(self.dtype)


def _norm(cfg: AEConfig, name: str):
    # Two-pass variance in float32, as torch's GroupNorm.
    return nn.GroupNorm(num_groups=cfg.groups, epsilon=1e-6, use_fast_variance=False,
                        dtype=jnp.float32, name=name)


def _conv(features: int, name: str, k: int = 3, stride: int = 1, pad: int = 1, dtype=jnp.float32):
    return nn.Conv(features, (k, k), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   dtype=dtype, name=name)


class ResnetBlock(nn.Module):
    cfg: AEConfig
    out: int

    @nn.compact
    def __call__(self, x):
        dt = self.cfg.jdtype
        h = _conv(self.out, "conv1", dtype=dt)(nn.silu(_norm(self.cfg, "norm1")(x)).astype(dt))
        h = _conv(self.out, "conv2", dtype=dt)(nn.silu(_norm(self.cfg, "norm2")(h)).astype(dt))
        if x.shape[-1] != self.out:
            x = _conv(self.out, "nin_shortcut", k=1, pad=0, dtype=dt)(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels (1x1 convs stored as Dense)."""

    cfg: AEConfig

    @nn.compact
    def __call__(self, x):
        b, hh, ww, c = x.shape
        dt = self.cfg.jdtype
        h = _norm(self.cfg, "norm")(x).astype(dt).reshape(b, hh * ww, c)
        q, k, v = (nn.Dense(c, dtype=dt, name=n)(h) for n in ("q", "k", "v"))
        logits = jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32) * c ** -0.5
        a = jnp.einsum("bqk,bkc->bqc", jax.nn.softmax(logits, -1).astype(dt), v)
        return x + nn.Dense(c, dtype=dt, name="proj_out")(a).reshape(b, hh, ww, c)


class Downsample(nn.Module):
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))  # FLUX pads bottom/right only
        return _conv(x.shape[-1], "conv", stride=2, pad=0, dtype=self.dtype)(x)


class Upsample(nn.Module):
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest
        return _conv(x.shape[-1], "conv", dtype=self.dtype)(x)


def _mid(cfg: AEConfig, x, width: int):
    x = ResnetBlock(cfg, width, name="mid_block_1")(x)
    x = AttnBlock(cfg, name="mid_attn_1")(x)
    return ResnetBlock(cfg, width, name="mid_block_2")(x)


class Encoder(nn.Module):
    """images [B, H, W, 3] in [-1, 1] -> moments [B, H/f, W/f, 2*z] (mean, then log-variance)."""

    cfg: AEConfig

    @nn.compact
    def __call__(self, x):
        c, dt = self.cfg, self.cfg.jdtype
        h = _conv(c.ch, "conv_in", dtype=dt)(x.astype(dt))
        for i, mult in enumerate(c.ch_mult):
            for j in range(c.num_res_blocks):
                h = ResnetBlock(c, c.ch * mult, name=f"down_{i}_block_{j}")(h)
            if i != len(c.ch_mult) - 1:
                h = Downsample(dt, name=f"down_{i}_downsample")(h)
        h = _mid(c, h, h.shape[-1])
        h = nn.silu(_norm(c, "norm_out")(h)).astype(dt)
        return _conv(2 * c.z_channels, "conv_out", dtype=dt)(h)


class Decoder(nn.Module):
    """latents [B, h, w, z] (unscaled) -> images [B, h*f, w*f, 3]."""

    cfg: AEConfig

    @nn.compact
    def __call__(self, z):
        c, dt = self.cfg, self.cfg.jdtype
        width = c.ch * c.ch_mult[-1]
        h = _conv(width, "conv_in", dtype=dt)(z.astype(dt))
        h = _mid(c, h, width)
        for i in reversed(range(len(c.ch_mult))):  # FLUX's up.{i}: i = 0 is the finest level
            for j in range(c.num_res_blocks + 1):
                h = ResnetBlock(c, c.ch * c.ch_mult[i], name=f"up_{i}_block_{j}")(h)
            if i != 0:
                h = Upsample(dt, name=f"up_{i}_upsample")(h)
        h = nn.silu(_norm(c, "norm_out")(h)).astype(dt)
        return _conv(c.out_ch, "conv_out", dtype=dt)(h)


class AutoEncoder(nn.Module):
    """`encode`: posterior mean, then BAGEL's z = scale * (z - shift); `decode` inverts the
    scale/shift then runs the decoder. Params: {'encoder': ..., 'decoder': ...}."""

    cfg: AEConfig

    def setup(self):
        self.encoder = Encoder(self.cfg)
        self.decoder = Decoder(self.cfg)

    def encode(self, x):
        mean = self.encoder(x)[..., : self.cfg.z_channels].astype(jnp.float32)
        return self.cfg.scale_factor * (mean - self.cfg.shift_factor)

    def decode(self, z):
        z = z.astype(jnp.float32) / self.cfg.scale_factor + self.cfg.shift_factor
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x):
        return self.decode(self.encode(x))


def patchify_latents(z: jax.Array, p: int = 2) -> jax.Array:
    """[B, h, w, C] -> [B, h/p * w/p, p*p*C], BAGEL's (row, col, channel) order inside a token
    ("chpwq->hwpqc")."""
    b, h, w, c = z.shape
    z = z.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return z.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify_latents(tokens: jax.Array, hw: tuple[int, int], p: int = 2) -> jax.Array:
    b = tokens.shape[0]
    h, w = hw
    c = tokens.shape[-1] // (p * p)
    z = tokens.reshape(b, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return z.reshape(b, h, w, c)
