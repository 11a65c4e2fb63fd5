"""The unified model: interleaved sequence -> text logits and flow velocities.

Input tokens are text ids (understanding expert) or image latents (generation expert). A
latent token's input is vae2llm(x_t) + timestep_embedding(t) + 2-D sin-cos position (BAGEL);
clean copies use t = 0. For the shapes world the "VAE" is an identity patchify of pixels
scaled to [-1, 1] (our choice: 36x36 images, 6x6 patches -> 36 tokens of 108 values), which
keeps the flow target exact and the model tiny; the paper scale plugs the FLUX autoencoder
in here.

With `ModelConfig.vision` set, the model also takes ViT patches (BAGEL's understanding
encoder, model/vision.py): tokens of type VIT get connector(ViT(patches)) + 2-D sin-cos table
and go to the understanding expert, like text.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import flax.linen as nn

from strokes_jax.model import attention
from strokes_jax.model.layers import DenseGeneral, TimestepEmbedder, param_with_axes, sincos_2d
from strokes_jax.model.mot import DecoderConfig, MoTDecoder
from strokes_jax.model.vision import VisionConfig, VisionTower
from strokes_jax.sequence.layout import CLEAN, NOISY, VIT



@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    patch_dim: int  # values per latent token
    latent_grid: tuple[int, int]  # latent tokens per image, (rows, cols)
    decoder: DecoderConfig = DecoderConfig()
    vision: VisionConfig | None = None  # BAGEL's SigLIP + connector; None: no ViT tokens
    # BAGEL embeds raw t in [0, 1] (1.0). The sinusoids are then nearly linear in t; DiT's
    # convention multiplies by 1000, which a model trained from scratch may learn faster.
    time_scale: float = 1.0
    # What llm2vae outputs: "v" the velocity (BAGEL), or "x" the clean latent x_0, turned into
    # the velocity (x_t - x_0) / max(t, x_min_t) so losses and samplers are unchanged. With
    # pixel patches as latents (108 values per token at width 128) a v-head has to carry the
    # noise through a residual stream barely wider than it; an x-head only outputs the
    # low-dimensional image (JiT, Li & He 2025). Not in BAGEL, whose latents are 64-d at
    # width 3584.
    prediction: str = "v"
    x_min_t: float = 0.05
    # Not in BAGEL (which copies a context image through attention alone): each noisy token
    # also gets the same patch of the episode's previous clean image (the canvas it paints
    # on) as input, and the x-head predicts the change from it, as InstructPix2Pix feeds its
    # source image. See previous_canvas. At shapes scale attention cannot copy 108-d
    # patches through a width-128 stream: a second sketch loses the first's objects.
    canvas_skip: bool = False

    def __post_init__(self):
        if self.prediction not in ("v", "x"):
            raise ValueError(f"config key model.prediction: {self.prediction!r} not in ('v', 'x')")
        if self.canvas_skip and self.prediction != "x":
            raise ValueError("config key model.canvas_skip: needs model.prediction='x' (the "
                             "skip adds the canvas to the predicted clean image)")

    @classmethod
    def from_config(cls, cfg) -> "ModelConfig":
        """From an ml_collections `model` block; unknown keys fail with the key named."""
        d = dict(cfg)
        dec_keys = {f.name for f in dataclasses.fields(DecoderConfig)}
        top = {"vocab_size", "patch_dim", "latent_grid", "vision", "time_scale", "prediction",
               "x_min_t", "canvas_skip"}
        unknown = set(d) - dec_keys - top
        if unknown:
            raise ValueError(f"unknown config keys model.{sorted(unknown)}")
        vision = None
        if d.get("vision"):
            v = dict(d["vision"])
            vis_keys = {f.name for f in dataclasses.fields(VisionConfig)}
            if set(v) - vis_keys:
                raise ValueError(f"unknown config keys model.vision.{sorted(set(v) - vis_keys)}")
            vision = VisionConfig(**v)
        return cls(vocab_size=int(d["vocab_size"]), patch_dim=int(d["patch_dim"]),
                   latent_grid=tuple(d["latent_grid"]),
                   decoder=DecoderConfig(**{k: d[k] for k in dec_keys if k in d}), vision=vision,
                   time_scale=float(d.get("time_scale", 1.0)),
                   prediction=str(d.get("prediction", "v")),
                   x_min_t=float(d.get("x_min_t", 0.05)),
                   canvas_skip=bool(d.get("canvas_skip", False)))


def previous_canvas(types, patch_pos, segment_ids, latents):
    """For each NOISY token, the same patch of the last CLEAN image before it in its segment
    (sequence) [B, L, P]; zeros where there is none (the first image of an episode: in
    latent space 0 is a blank canvas, mid-grey for the shapes world's pixels) and for every
    other token. Clean blocks are contiguous in patch order (sequence/tokenizer.py), so the source is
    the block's first patch + patch_pos. A clean copy left out by CFG dropout makes the
    image before it the canvas."""
    b, l = types.shape
    idx = jnp.broadcast_to(jnp.arange(l), (b, l))
    starts = (types == CLEAN) & (patch_pos == 0)
    last = jax.lax.cummax(jnp.where(starts, idx, -1), axis=1)
    src = jnp.clip(last + patch_pos, 0, l - 1)
    take = lambda a: jnp.take_along_axis(a, src, axis=1)
    ok = ((types == NOISY) & (last >= 0) & (take(segment_ids) == segment_ids)
          & (take(types) == CLEAN) & (take(patch_pos) == patch_pos))
    return jnp.where(ok[..., None], jnp.take_along_axis(latents, src[..., None], axis=1), 0.0)


class UnifiedModel(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens, types, positions, segment_ids, blocks, patch_pos, latents,
                 timesteps, vit_patches=None, vit_pos=None, cache=None, canvas=None):
        """tokens/types/positions/segment_ids/blocks/patch_pos: int [B, L]; latents float
        [B, L, patch_dim] (x_t for noisy tokens, x_0 for clean, ignored for text);
        timesteps float [B, L]; with a vision config, vit_patches float [B, L, p*p*3] and
        vit_pos int [B, L] (row * max_side + col) for VIT tokens, each image one block.
        Returns logits [B, L, V] and velocities [B, L, patch_dim].

        Text only: latents=None and timesteps=None skip the latent path (vae2llm, the time
        embedding, the 2-D position table, llm2vae), so a decoder whose width the table
        cannot take (not divisible by 4) still runs, e.g. a converted plain Qwen2; every
        token goes to the understanding expert and the velocities returned are None.

        Decode mode (model/cache.py): with `cache` = {"k", "v": [depth, B, C, KV, D],
        "lengths": int [B]}, the L inputs are new tokens run against the cached prefix and
        segment_ids only marks which of them are real (> 0). Also returns their (k, v), each
        [depth, B, L, KV, D]; nothing is written here (cache.append decides what is kept).

        canvas [B, L, P] (with cfg.canvas_skip): each noisy token's previous-canvas patch.
        Derived from the sequence when None (previous_canvas); decode mode must pass it,
        since the cache holds no latents."""
        c, d = self.cfg, self.cfg.decoder
        dt = d.jdtype
        embed = param_with_axes(self, "embed", nn.initializers.normal(0.02),
                                (c.vocab_size, d.width), ("vocab", "embed"))
        text = jnp.take(embed, tokens, axis=0).astype(dt)
        if latents is None:
            is_gen, temb, x = jnp.zeros(types.shape, bool), None, text
        else:
            x, is_gen, temb = self._with_latents(text, types, segment_ids, patch_pos, latents, timesteps,
                                                 cache, canvas)
        if c.vision is not None and vit_patches is not None:
            is_vit = types == VIT
            vit = VisionTower(c.vision, d.width, dt, name="vision")(
                vit_patches, vit_pos, jnp.where(is_vit, blocks, 0))
            x = jnp.where(is_vit[..., None], vit.astype(dt), x)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        decoder = MoTDecoder(d, name="decoder")
        if cache is None:
            mask = attention.generalized_causal_mask(segment_ids, blocks, types)
            h = decoder(x, is_gen, positions, mask, temb=temb, valid=segment_ids > 0)
        else:
            mask = attention.decode_mask(segment_ids > 0, blocks, types, cache["lengths"],
                                         cache["k"].shape[2])
            h, new_kv = decoder(x, is_gen, positions, mask, (cache["k"], cache["v"]), temb)
        logits = DenseGeneral((c.vocab_size,), ("embed", "vocab"), dtype=dt, name="lm_head")(h).astype(jnp.float32)
        vel = None
        if latents is not None:
            vel = DenseGeneral((c.patch_dim,), ("embed", "patch"), use_bias=True, dtype=dt,
                               kernel_init=nn.initializers.zeros, name="llm2vae")(h)
            if c.prediction == "x":
                if c.canvas_skip:
                    canvas = self._canvas(types, patch_pos, segment_ids, latents, cache, canvas)
                    vel = vel + canvas.astype(vel.dtype)
                t = jnp.maximum(timesteps, c.x_min_t)[..., None].astype(vel.dtype)
                vel = (latents.astype(vel.dtype) - vel) / t
            vel = vel.astype(jnp.float32)
        if cache is None:
            return logits, vel
        return logits, vel, new_kv

    def _canvas(self, types, patch_pos, segment_ids, latents, cache, canvas):
        if canvas is None:
            if cache is not None:
                raise ValueError("decode mode with model.canvas_skip needs `canvas`")
            canvas = previous_canvas(types, patch_pos, segment_ids, latents)
        return jnp.where((types == NOISY)[..., None], canvas, 0.0).astype(jnp.float32)

    def _with_latents(self, text, types, segment_ids, patch_pos, latents, timesteps, cache, canvas):
        """(decoder input, is_gen, adaLN time embedding or None): latent tokens get vae2llm(x_t)
        + time embedding + 2-D position (+ the canvas patch), text tokens their embedding."""
        c, d = self.cfg, self.cfg.decoder
        dt = d.jdtype
        table = jnp.asarray(sincos_2d(*c.latent_grid, d.width))
        lat = DenseGeneral((d.width,), ("patch", "embed"), use_bias=True, dtype=dt,
                           name="vae2llm")(latents)
        temb = TimestepEmbedder(d.width, dtype=dt, name="time_embedder")(timesteps * c.time_scale)
        lat = lat + temb
        lat = lat + jnp.take(table, patch_pos, axis=0).astype(dt)
        if c.canvas_skip:
            lat = lat + DenseGeneral((d.width,), ("patch", "embed"), use_bias=False, dtype=dt, name="canvas2llm")(
                self._canvas(types, patch_pos, segment_ids, latents, cache, canvas))
        is_gen = (types == NOISY) | (types == CLEAN)
        return jnp.where(is_gen[..., None], lat, text), is_gen, temb if d.time_adaln else None


def dummy_inputs(batch: int, length: int, patch_dim: int, vision=None):
    """Init inputs; with a VisionConfig also ViT inputs, since the vision tower's params are
    only created when the model is called with them."""
    z = jnp.zeros((batch, length), jnp.int32)
    out = dict(tokens=z, types=z, positions=z, segment_ids=jnp.ones_like(z), blocks=z,
               patch_pos=z, latents=jnp.zeros((batch, length, patch_dim), jnp.float32),
               timesteps=jnp.zeros((batch, length), jnp.float32))
    if vision is not None:
        out.update(vit_patches=jnp.zeros((batch, length, vision.patch_dim), jnp.float32),
                   vit_pos=z)
    return out
