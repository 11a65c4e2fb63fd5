"""Sparse Mixture-of-Transformers routing: each expert's projections run only on its own
tokens, with static shapes and the same result as dense routing.

Dense routing (mot._routed) runs both experts on every token and selects, so the block
projections cost twice their FLOPs; on the shapes configs that is a large share of a CPU
training step (scripts/step_breakdown.py times it). Here the flattened batch is sorted
once per forward into [generation | padding | understanding]; the generation expert runs on
the first `gen` sorted tokens and the understanding expert on the last `und`, and each
token takes its own expert's output back. Padding tokens (segment 0) see only themselves
and carry no loss, so they may fall in neither window. Static capacities need a fallback:
`fits` says whether this batch's counts fit, and step._per_token runs the dense model when
they do not (lax.cond). Sparse and dense agree to float rounding (a token's projection is
the same product, on a differently blocked matmul), so the capacities decide the speed; over
a long training run the rounding can still flip single evaluation prompts.

The sort is over the whole flattened batch, so on a data-sharded mesh XLA would gather the
batch: this is a single-device lever (CPU, one GPU), off by default (train.sparse_routing).
"""

from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp

from strokes_jax.sequence.layout import CLEAN, NOISY

# Capacities are rounded up to this many tokens so similar fractions share one shape.
_ROUND = 64


@flax.struct.dataclass
class Route:
    gen_idx: jax.Array  # [G] flat token indices the generation expert runs on
    und_idx: jax.Array  # [U] flat token indices the understanding expert runs on
    from_gen: jax.Array  # [T] where each token's output sits in the generation output
    from_und: jax.Array  # [T] where each token's output sits in the understanding output
    is_gen: jax.Array  # [T]


def capacities(num_tokens: int, fractions) -> tuple[int, int]:
    """(gen, und) capacities in tokens for a batch of `num_tokens` tokens."""
    gen_f, und_f = fractions
    cap = lambda f: min(num_tokens, _ROUND * math.ceil(f * num_tokens / _ROUND))
    return cap(gen_f), cap(und_f)


def counts_fit(is_gen, valid, fractions):
    """Whether the batch's generation and understanding token counts fit the capacities
    (works on numpy and jax arrays alike, so the training loop can count fallbacks)."""
    g_cap, u_cap = capacities(is_gen.size, fractions)
    return ((is_gen & valid).sum() <= g_cap) & ((~is_gen & valid).sum() <= u_cap)


def batch_fits(types, segment_ids, fractions):
    """counts_fit from a batch's token types and segment ids (the training step and loop)."""
    return counts_fit((types == NOISY) | (types == CLEAN), segment_ids > 0, fractions)


def plan(is_gen: jax.Array, valid: jax.Array, fractions) -> Route:
    """The route for a batch; is_gen, valid: bool [B, L]. Only exact where counts_fit."""
    g, v = is_gen.reshape(-1), valid.reshape(-1)
    t = g.size
    g_cap, u_cap = capacities(t, fractions)
    key = jnp.where(g, 0, jnp.where(v, 2, 1))  # generation, padding, understanding
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    rank = jnp.zeros(t, jnp.int32).at[order].set(jnp.arange(t, dtype=jnp.int32))
    return Route(gen_idx=order[:g_cap], und_idx=order[t - u_cap:],
                 from_gen=jnp.minimum(rank, g_cap - 1),
                 from_und=jnp.clip(rank - (t - u_cap), 0, u_cap - 1), is_gen=g)


def apply(make, x: jax.Array, route: Route) -> jax.Array:
    """mot._routed with a Route: x [B, L, ...] -> each token through its own expert."""
    lead = x.shape[:2]
    xf = x.reshape((-1,) + x.shape[2:])
    gen = make("gen")(jnp.take(xf, route.gen_idx, axis=0))
    und = make("und")(jnp.take(xf, route.und_idx, axis=0))
    sel = route.is_gen.reshape((-1,) + (1,) * (gen.ndim - 1))
    out = jnp.where(sel, jnp.take(gen, route.from_gen, axis=0),
                    jnp.take(und, route.from_und, axis=0))
    return out.reshape(lead + out.shape[1:])


def sparse(model, fractions):
    """A copy of a UnifiedModel whose decoder routes sparsely with these capacity fractions
    ((gen, und) of the batch's tokens); the parameters are the same. () gives the model back."""
    if not fractions:
        return model
    if len(fractions) != 2 or not all(0.0 < f <= 1.0 for f in fractions):
        raise ValueError(f"config key train.sparse_routing: {tuple(fractions)!r} must be () or "
                         "(gen, und) fractions of the batch's tokens, each in (0, 1]")
    dec = dataclasses.replace(model.cfg.decoder, sparse_routing=tuple(float(f) for f in fractions))
    return model.clone(cfg=dataclasses.replace(model.cfg, decoder=dec))


def dense(model):
    dec = dataclasses.replace(model.cfg.decoder, sparse_routing=())
    return model.clone(cfg=dataclasses.replace(model.cfg, decoder=dec))
