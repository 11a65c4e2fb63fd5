"""BAGEL's generalized causal attention over packed interleaved sequences.

BAGEL's rules, per packed row:
  * tokens of different packed episodes (segment ids) never see each other;
  * text is causal;
  * each image copy (a "block") attends bidirectionally within itself and to what came before;
  * noisy latent tokens are invisible to every token outside their own block, so later
    tokens only ever see the clean copy.
Padding (segment 0) attends only to itself so its softmax stays finite.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from strokes_jax.sequence.layout import NOISY


def generalized_causal_mask(segment_ids: jax.Array, blocks: jax.Array, types: jax.Array) -> jax.Array:
    """Boolean [B, L, L] mask: True where query i may attend key j. Inputs are [B, L]."""
    idx = jnp.arange(segment_ids.shape[1])
    qi = idx
    seg_q, seg_k = segment_ids[:, :, None], segment_ids[:, None, :]
    blk_q, blk_k = blocks[:, :, None], blocks[:, None, :]
    same_seg = (seg_q == seg_k) & (seg_q > 0)
    causal = (idx[None, None, :] <= qi[None, :, None]) & (types[:, None, :] != NOISY)
    same_block = (blk_q == blk_k) & (blk_q > 0)
    self_only = qi[None, :, None] == idx[None, None, :]
    return (same_seg & (causal | same_block)) | self_only


def decode_mask(valid: jax.Array, blocks: jax.Array, types: jax.Array, lengths: jax.Array,
                capacity: int) -> jax.Array:
    """Mask [B, W, capacity + W] for W new tokens run against a KV cache of `capacity` slots,
    `lengths[b]` of them filled. The cache holds only clean tokens of one episode per row,
    all earlier than the new ones, so every cached key is visible; among the new tokens the
    generalized rules apply (text causal, a block bidirectional, noisy keys private to their
    block). valid: bool [B, W], False for slab padding."""
    cached = (jnp.arange(capacity)[None, None, :] < lengths[:, None, None]) & valid[:, :, None]
    slab = generalized_causal_mask(valid.astype(jnp.int32), blocks, types)
    return jnp.concatenate([cached, slab], axis=-1)


IMPLEMENTATIONS = ("xla", "dot_product", "cudnn")


def attend(q, k, v, mask, implementation: str = "xla"):
    """Attention with the generalized mask.

    xla: the einsum below (any backend). dot_product: `jax.nn.dot_product_attention`, which
    XLA lowers per backend. cudnn: the cuDNN fused kernel (GPU only); our mask is
    data-dependent (blocks, noisy copies), which is neither causal nor segment-only, so it
    is passed as an additive bias. Pallas flash/splash kernels take only causal + segment
    masks and are not wired in for that reason."""
    if implementation == "xla":
        return dot_product_attention(q, k, v, mask)
    if implementation == "dot_product":
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, :, :])
    if implementation == "cudnn":
        bias = jnp.where(mask[:, None, :, :], 0.0, -1e9).astype(q.dtype)
        return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation="cudnn")
    raise ValueError(f"unknown attention implementation {implementation!r}; expected {IMPLEMENTATIONS}")


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q: [B, Lq, H, D]; k, v: [B, Lk, KV, D] (grouped-query when KV < H); mask [B, Lq, Lk].
    Softmax in float32."""
    b, lq, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, lq, kv, h // kv, d)
    logits = jnp.einsum("bqkgd,bskd->bkgqs", q, k).astype(jnp.float32) / jnp.sqrt(d).astype(jnp.float32)
    logits = jnp.where(mask[:, None, None, :, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v)
    return out.reshape(b, lq, h, d)
