"""Pure training steps: train_step(state, batch) -> (state, metrics), jitted with explicit
in/out shardings on the mesh and a donated state."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from strokes_jax import flow, losses
from strokes_jax.model.unified import UnifiedModel
from strokes_jax.tokenizer import NOISY, CLEAN
from strokes_jax.train import sharding as shd

BATCH_KEYS = ("tokens", "types", "stages", "targets", "target_stages", "positions", "blocks",
              "patch_pos", "patches", "segment_ids")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    stage_weights: tuple[float, ...]
    ce_weight: float
    mse_weight: float
    shift: float

    @classmethod
    def from_config(cls, cfg) -> "LossConfig":
        w = losses.stage_weight_vector(dict(cfg.losses.stage_weights))
        return cls(tuple(float(x) for x in w), float(cfg.losses.ce_weight),
                   float(cfg.losses.mse_weight), float(cfg.flow.train_shift))


def to_latents(patches):
    """uint8 pixels -> [-1, 1]: the shapes world's identity "VAE"."""
    return patches.astype(jnp.float32) / 127.5 - 1.0


def noised_inputs(batch, rng, shift: float):
    """Per-image t (one per noisy block), noise, x_t for noisy tokens and x_0 for clean."""
    x0 = to_latents(batch["patches"])
    r_t, r_n = jax.random.split(rng)
    b, l = batch["tokens"].shape
    t_blocks = flow.sample_t(r_t, (b, l + 1), shift)  # block ids are < L + 1
    noisy = batch["types"] == NOISY
    t = jnp.where(noisy, jnp.take_along_axis(t_blocks, batch["blocks"], axis=1), 0.0)
    noise = jax.random.normal(r_n, x0.shape)
    xt = jnp.where(noisy[..., None], flow.interpolate(x0, noise, t), x0)
    xt = jnp.where((noisy | (batch["types"] == CLEAN))[..., None], xt, 0.0)
    return xt, t, flow.velocity_target(x0, noise)


def loss_fn(params, batch, rng, *, model: UnifiedModel, lc: LossConfig):
    xt, t, v_target = noised_inputs(batch, rng, lc.shift)
    logits, v = model.apply({"params": params}, batch["tokens"], batch["types"],
                            batch["positions"], batch["segment_ids"], batch["blocks"],
                            batch["patch_pos"], xt, t)
    ce, correct = losses.text_ce(logits, batch["targets"])
    mse = losses.flow_mse(v, v_target)
    valid = batch["segment_ids"] > 0
    return losses.compose(
        ce=ce, ce_correct=correct, ce_mask=valid & (batch["targets"] > 0),
        ce_stages=batch["target_stages"], mse=mse,
        mse_mask=valid & (batch["types"] == NOISY), mse_stages=batch["stages"],
        stage_weights=jnp.asarray(lc.stage_weights), ce_weight=lc.ce_weight,
        mse_weight=lc.mse_weight)


def train_step(state, batch, *, model, tx, lc: LossConfig):
    rng = jax.random.fold_in(state.rng, state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, metrics), grads = grad_fn(state.params, batch, rng, model=model, lc=lc)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree_util.tree_map(lambda p, u: p + u, state.params, updates)
    metrics["grad_norm"] = jax.tree_util.tree_reduce(
        lambda a, g: a + jnp.sum(jnp.square(g)), grads, 0.0) ** 0.5
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(state, batch, *, model, lc: LossConfig):
    rng = jax.random.fold_in(state.rng, 2**31 - 1)  # fixed noise: eval losses are comparable
    _, metrics = loss_fn(state.params, batch, rng, model=model, lc=lc)
    return metrics


def jit_steps(model, tx, lc: LossConfig, mesh, state_shardings):
    """The sharded, jitted train and eval steps (state donated in training)."""
    bs, rep = shd.batch_sharding(mesh), shd.replicated(mesh)
    batch_sh = {k: bs for k in BATCH_KEYS}
    train = jax.jit(functools.partial(train_step, model=model, tx=tx, lc=lc),
                    in_shardings=(state_shardings, batch_sh), out_shardings=(state_shardings, rep),
                    donate_argnums=(0,))
    evaluate = jax.jit(functools.partial(eval_step, model=model, lc=lc),
                       in_shardings=(state_shardings, batch_sh), out_shardings=rep)
    return train, evaluate
