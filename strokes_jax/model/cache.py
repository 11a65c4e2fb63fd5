"""Functional KV cache for UnifiedModel's decode mode.

A cache is a dict of arrays with static shapes: "k", "v" [depth, B, capacity, kv_heads,
head_dim] (keys after RoPE) and "lengths" int32 [B] (filled slots per row). Rows are
independent episodes at different lengths and phases, so every call runs a fixed-width slab
of new tokens per row (padding marked invalid) and keeps a per-row prefix of it:

  * text tokens and clean image blocks (<|vision_start|> latents <|vision_end|>) are written;
  * a noisy block is run against the cache but not written, since nothing later may see it
    (as in BAGEL, the cache keeps only clean latents, ViT and text tokens).

Writes are a scatter at lengths[b] + j for j < n_write[b]; other slab slots go to an
out-of-range index and are dropped, so no slot past a row's length is ever touched.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def init_cache(model_cfg, batch: int, capacity: int, dtype=None) -> dict:
    d = model_cfg.decoder
    shape = (d.depth, batch, capacity, d.kv_heads, d.head_dim)
    dtype = dtype or d.jdtype
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "lengths": jnp.zeros((batch,), jnp.int32)}


def append(cache: dict, new_kv, n_write) -> dict:
    """Keep the first n_write[b] of row b's new (k, v) [depth, B, W, KV, D] at its end."""
    k_new, v_new = new_kv
    b, w = k_new.shape[1], k_new.shape[2]
    cap = cache["k"].shape[2]
    j = jnp.arange(w)[None, :]
    idx = jnp.where(j < n_write[:, None], cache["lengths"][:, None] + j, cap)  # cap: dropped
    rows = jnp.arange(b)[:, None]

    def put(c, new):
        return c.at[:, rows, idx].set(new.astype(c.dtype), mode="drop")

    return {"k": put(cache["k"], k_new), "v": put(cache["v"], v_new),
            "lengths": jnp.minimum(cache["lengths"] + n_write, cap)}


def decode_step(apply_fn, params, cache: dict, slab: dict, n_write, q_index):
    """Run a slab of new tokens against the cache, keep the written prefix.

    apply_fn: UnifiedModel.apply (or a stand-in with the same decode-mode signature). slab:
    tokens/types/positions/valid/blocks/patch_pos [B, W], latents [B, W, P], timesteps
    [B, W], with ViT copies vit_patches [B, W, p*p*3] and vit_pos [B, W], with
    model.canvas_skip canvas [B, W, P]. Returns (logits at q_index [B, V], velocities
    [B, W, P], the new cache)."""
    vit = {k: slab[k] for k in ("vit_patches", "vit_pos", "canvas") if k in slab}
    logits, vel, new_kv = apply_fn(
        {"params": params}, slab["tokens"], slab["types"], slab["positions"],
        slab["valid"].astype(jnp.int32), slab["blocks"], slab["patch_pos"], slab["latents"],
        slab["timesteps"], cache=cache, **vit)
    rows = jnp.arange(logits.shape[0])
    return logits[rows, q_index], vel, append(cache, new_kv, n_write)


def make_decode_step(apply_fn):
    """decode_step jitted with the cache donated (updated in place where the backend can)."""
    return jax.jit(lambda p, c, s, n, q: decode_step(apply_fn, p, c, s, n, q), donate_argnums=(1,))
