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

import jax.numpy as jnp
import optax

from strokes_jax.episodes.episode import STAGE_NAMES


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


IMAGE_STAGES = ("sketch", "refine")  # the only stages that hold images


def stage_sums(*, ce, ce_correct, ce_mask, ce_stages, mse, mse_mask, mse_stages,
               stage_weights: jnp.ndarray) -> dict:
    """Additive statistics of a (micro-)batch: weighted loss numerators and per-stage sums
    and counts. Sums of micro-batches equal the sums of the whole batch, which is what makes
    gradient accumulation exact."""
    w_ce = jnp.where(ce_mask, stage_weights[ce_stages], 0.0)
    w_mse = jnp.where(mse_mask, stage_weights[mse_stages], 0.0)
    trained = ce_mask & (w_ce > 0)  # accuracy over the text the loss actually trains
    out = {"ce_num": jnp.sum(w_ce * ce), "mse_num": jnp.sum(w_mse * mse),
           "ce_n": jnp.sum(ce_mask), "mse_n": jnp.sum(mse_mask),
           "correct": jnp.sum(jnp.where(trained, ce_correct, 0)), "trained_n": jnp.sum(trained)}
    for i, s in enumerate(STAGE_NAMES):
        m = ce_mask & (ce_stages == i)
        out[f"{s}/ce_sum"] = jnp.sum(jnp.where(m, ce, 0.0))
        out[f"{s}/correct"] = jnp.sum(jnp.where(m, ce_correct, 0))
        out[f"{s}/ce_tokens"] = jnp.sum(m)
        if s in IMAGE_STAGES:
            m = mse_mask & (mse_stages == i)
            out[f"{s}/mse_sum"] = jnp.sum(jnp.where(m, mse, 0.0))
            out[f"{s}/mse_tokens"] = jnp.sum(m)
    return out


def objective(sums: dict, ce_weight: float, mse_weight: float, n_ce, n_mse):
    """The loss from (micro-)batch sums, normalised by the *whole* batch's token counts."""
    return (ce_weight * sums["ce_num"] / jnp.maximum(n_ce, 1)
            + mse_weight * sums["mse_num"] / jnp.maximum(n_mse, 1))


def finalize(sums: dict, ce_weight: float, mse_weight: float) -> dict:
    """Metrics from whole-batch sums."""
    n_ce, n_mse = jnp.maximum(sums["ce_n"], 1), jnp.maximum(sums["mse_n"], 1)
    ce_term, mse_term = sums["ce_num"] / n_ce, sums["mse_num"] / n_mse
    m = {"loss": ce_weight * ce_term + mse_weight * mse_term, "ce": ce_term, "mse": mse_term,
         "text_accuracy": sums["correct"] / jnp.maximum(sums["trained_n"], 1)}
    for s in STAGE_NAMES:
        n = sums[f"{s}/ce_tokens"]
        m[f"{s}/ce"] = sums[f"{s}/ce_sum"] / jnp.maximum(n, 1)
        m[f"{s}/accuracy"] = sums[f"{s}/correct"] / jnp.maximum(n, 1)
        m[f"{s}/ce_tokens"] = n
        if s in IMAGE_STAGES:
            n = sums[f"{s}/mse_tokens"]
            m[f"{s}/mse"] = sums[f"{s}/mse_sum"] / jnp.maximum(n, 1)
            m[f"{s}/mse_tokens"] = n
    return m


def compose(*, stage_weights, ce_weight: float, mse_weight: float, **per_token):
    """(loss, metrics) of one batch. All per-token arrays are [B, L]."""
    sums = stage_sums(stage_weights=stage_weights, **per_token)
    loss = objective(sums, ce_weight, mse_weight, sums["ce_n"], sums["mse_n"])
    return loss, finalize(sums, ce_weight, mse_weight)
