"""Per-stage losses composed by config.

L = ce_weight * sum_t w[stage(t)] CE_t / N_ce  +  mse_weight * sum_t w[stage(t)] MSE_t / N_mse

CE is per text target (the stage of the *predicted* token decides its weight, so the
modality switch <|vision_start|> counts with its image's stage and the end marker with the
plan stage); MSE is the flow loss per noisy latent token, averaged over channels. With all
stage weights 1 this is BAGEL's token-mean CE and MSE; a stage with weight 0 contributes no
gradient. Metrics report each stage's own mean so stages can be compared.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import optax

from strokes_jax.episode import STAGE_NAMES


def stage_weight_vector(weights: Mapping[str, float]) -> jnp.ndarray:
    unknown = set(weights) - set(STAGE_NAMES)
    if unknown:
        raise ValueError(f"unknown stage names in losses.stage_weights: {sorted(unknown)}; "
                         f"expected {STAGE_NAMES}")
    return jnp.asarray([float(weights.get(s, 0.0)) for s in STAGE_NAMES], jnp.float32)


def text_ce(logits, targets):
    """Per-token CE and correctness; targets 0 means 'no target' (masked by the caller)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return ce, (jnp.argmax(logits, -1) == targets)


def flow_mse(v_pred, v_target):
    return jnp.mean((v_pred - v_target) ** 2, axis=-1)


def _per_stage(values, mask, stages, name, out):
    for i, s in enumerate(STAGE_NAMES):
        m = mask & (stages == i)
        n = jnp.sum(m)
        out[f"{s}/{name}"] = jnp.sum(jnp.where(m, values, 0.0)) / jnp.maximum(n, 1)
        out[f"{s}/{name}_tokens"] = n


def compose(*, ce, ce_correct, ce_mask, ce_stages, mse, mse_mask, mse_stages,
            stage_weights: jnp.ndarray, ce_weight: float, mse_weight: float):
    """Returns (loss, metrics). All per-token arrays are [B, L]."""
    w_ce = jnp.where(ce_mask, stage_weights[ce_stages], 0.0)
    w_mse = jnp.where(mse_mask, stage_weights[mse_stages], 0.0)
    n_ce = jnp.maximum(jnp.sum(ce_mask), 1)
    n_mse = jnp.maximum(jnp.sum(mse_mask), 1)
    ce_term = jnp.sum(w_ce * ce) / n_ce
    mse_term = jnp.sum(w_mse * mse) / n_mse
    loss = ce_weight * ce_term + mse_weight * mse_term
    metrics = {"loss": loss, "ce": ce_term, "mse": mse_term,
               "text_accuracy": jnp.sum(jnp.where(ce_mask, ce_correct, 0)) / n_ce}
    _per_stage(ce, ce_mask, ce_stages, "ce", metrics)
    _per_stage(ce_correct.astype(jnp.float32), ce_mask, ce_stages, "accuracy", metrics)
    _per_stage(mse, mse_mask, mse_stages, "mse", metrics)
    # Drop per-stage entries that can never be non-zero (no images in prompt/plan/inspect,
    # no text targets in the prompt under the default layout is still reported).
    for s in ("prompt", "plan", "inspect"):
        metrics.pop(f"{s}/mse", None)
        metrics.pop(f"{s}/mse_tokens", None)
    return loss, metrics
