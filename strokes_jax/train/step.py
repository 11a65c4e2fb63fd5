"""Pure training steps: train_step(state, batch) -> (state, metrics), jitted with explicit
in/out shardings on the mesh and a donated state."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from strokes_jax.model import flow
from strokes_jax.model.codec import to_latents
from strokes_jax.train import losses
from strokes_jax.model import routing
from strokes_jax.model.unified import UnifiedModel
from strokes_jax.sequence.layout import NOISY, CLEAN
from strokes_jax.train import sharding as shd

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


def to_vit_pixels(patches):
    """uint8 pixels -> [-1, 1], the ViT's input range: SigLIP normalises with mean = std =
    0.5 (BAGEL's ViT transform), i.e. x / 127.5 - 1, the same map as to_latents' for pixels."""
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


def vit_inputs(batch) -> dict:
    """The model's ViT keyword arguments for a packed batch ({} when it has no ViT copies)."""
    if "vit_patches" not in batch:
        return {}
    return dict(vit_patches=to_vit_pixels(batch["vit_patches"]), vit_pos=batch["vit_pos"])


def _per_token(params, batch, noised, model):
    xt, t, v_target = noised

    def forward(m):
        return m.apply({"params": params}, batch["tokens"], batch["types"], batch["positions"],
                       batch["segment_ids"], batch["blocks"], batch["patch_pos"], xt, t,
                       **vit_inputs(batch))
    fractions = model.cfg.decoder.sparse_routing
    if fractions:  # sparse routing where this batch's token counts fit, else dense
        fits = routing.batch_fits(batch["types"], batch["segment_ids"], fractions)
        logits, v = jax.lax.cond(fits, lambda: forward(model),
                                 lambda: forward(routing.dense(model)))
    else:
        logits, v = forward(model)
    ce, correct = losses.text_ce(logits, batch["targets"])
    valid = batch["segment_ids"] > 0
    return dict(ce=ce, ce_correct=correct, ce_mask=valid & (batch["targets"] > 0),
                ce_stages=batch["target_stages"], mse=losses.flow_mse(v, v_target),
                mse_mask=valid & (batch["types"] == NOISY), mse_stages=batch["stages"])


def token_counts(batch):
    valid = batch["segment_ids"] > 0
    return jnp.sum(valid & (batch["targets"] > 0)), jnp.sum(valid & (batch["types"] == NOISY))


def loss_fn(params, batch, rng, *, model: UnifiedModel, lc: LossConfig, noised=None, norms=None):
    """(loss, sums) of a (micro-)batch. `noised` (x_t, t, v) defaults to fresh draws from
    `rng`; `norms` (CE tokens, MSE tokens) default to this batch's own counts, and are the
    whole batch's counts when this is one micro-batch of it."""
    noised = noised_inputs(batch, rng, lc.shift) if noised is None else noised
    sums = losses.stage_sums(stage_weights=jnp.asarray(lc.stage_weights),
                             **_per_token(params, batch, noised, model))
    n_ce, n_mse = (sums["ce_n"], sums["mse_n"]) if norms is None else norms
    return losses.objective(sums, lc.ce_weight, lc.mse_weight, n_ce, n_mse), sums


def _split(tree, k: int):
    return jax.tree_util.tree_map(lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:]), tree)


def grads_and_sums(params, batch, rng, *, model, lc: LossConfig, accum_steps: int = 1):
    """Gradients and loss statistics of the whole batch. With accum_steps = k the batch is
    split into k micro-batches run one after another (lax.scan), each normalised by the
    whole batch's token counts and using its slice of the whole batch's noise, so the result
    equals the one-shot large-batch step up to float summation order."""
    grad_fn = jax.grad(loss_fn, has_aux=True)
    if accum_steps == 1:
        return grad_fn(params, batch, rng, model=model, lc=lc)
    noised = noised_inputs(batch, rng, lc.shift)
    norms = token_counts(batch)
    micro = _split((batch, noised), accum_steps)

    def body(acc, mb):
        b, nz = mb
        g, sums = grad_fn(params, b, None, model=model, lc=lc, noised=nz, norms=norms)
        return jax.tree_util.tree_map(jnp.add, acc, (g, sums)), None

    one = jax.tree_util.tree_map(lambda x: x[0], micro)
    shapes = jax.eval_shape(lambda mb: grad_fn(params, mb[0], None, model=model, lc=lc,
                                                noised=mb[1], norms=norms), one)
    zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    (grads, sums), _ = jax.lax.scan(body, zeros, micro)
    return grads, sums


def encoded(batch, codec_params, encode):
    """The batch with its pixel patches replaced by latent tokens when the codec encodes in
    the step (model/codec.py: AE latents not precomputed); otherwise the batch as it is."""
    if encode is None:
        return batch
    return dict(batch, patches=encode(codec_params, batch))


def train_step(state, batch, codec_params=None, *, model, tx, lc: LossConfig,
               accum_steps: int = 1, ema_decay: float = 0.0, encode=None):
    batch = encoded(batch, codec_params, encode)
    rng = jax.random.fold_in(state.rng, state.step)
    grads, sums = grads_and_sums(state.params, batch, rng, model=model, lc=lc,
                                 accum_steps=accum_steps)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = losses.finalize(sums, lc.ce_weight, lc.mse_weight)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["param_norm"] = optax.tree.norm(params)  # finite before a state may be saved
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    if ema_decay:
        new = new.replace(ema_params=jax.tree_util.tree_map(
            lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema_params, params))
    return new, metrics


def eval_step(state, batch, codec_params=None, *, model, lc: LossConfig, encode=None):
    batch = encoded(batch, codec_params, encode)
    rng = jax.random.fold_in(state.rng, 2**31 - 1)  # fixed noise: eval losses are comparable
    _, sums = loss_fn(state.params, batch, rng, model=model, lc=lc)
    return losses.finalize(sums, lc.ce_weight, lc.mse_weight)


def jit_steps(model, tx, lc: LossConfig, mesh, state_shardings, *, accum_steps: int = 1,
              ema_decay: float = 0.0, codec=None):
    """The sharded, jitted train and eval steps (state donated in training), each called as
    step(state, batch). A `codec` that encodes in the step gets its (replicated, frozen)
    parameters passed as an argument, not baked into the program as constants."""
    bs, rep = shd.batch_sharding(mesh), shd.replicated(mesh)
    # One sharding for every batch field (a pytree prefix), so batches with or without the
    # ViT copy's fields (layout.VIT_FIELDS) go through the same function.
    batch_sh = bs
    encode = codec.step_latents if codec is not None and codec.in_step else None
    train = jax.jit(functools.partial(train_step, model=model, tx=tx, lc=lc,
                                      accum_steps=accum_steps, ema_decay=ema_decay, encode=encode),
                    in_shardings=(state_shardings, batch_sh, rep),
                    out_shardings=(state_shardings, rep), donate_argnums=(0,))
    evaluate = jax.jit(functools.partial(eval_step, model=model, lc=lc, encode=encode),
                       in_shardings=(state_shardings, batch_sh, rep), out_shardings=rep)
    cparams = None if encode is None else jax.device_put(codec.params, rep)
    return BoundStep(train, cparams), BoundStep(evaluate, cparams)


class BoundStep:
    """A jitted step with the codec's parameters bound: step(state, batch), and
    step.lower(state, batch) for compiled-memory and cost analyses, and
    step.compile(state, batch) for a bound ahead-of-time executable."""

    def __init__(self, fn, codec_params):
        self.fn, self.codec_params = fn, codec_params

    def __call__(self, state, batch):
        return self.fn(state, batch, self.codec_params)

    def lower(self, state, batch):
        return self.fn.lower(state, batch, self.codec_params)

    def compile(self, state, batch):
        """Compiled once ahead of time, still called as step(state, batch)."""
        return BoundStep(self.lower(state, batch).compile(), self.codec_params)
