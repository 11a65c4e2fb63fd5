"""TrainState pytree, the optimizer, and state creation already sharded on the mesh
(eval_shape -> shardings -> jitted init, the Flax lm1b recipe)."""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
import flax.linen as nn

from strokes_jax.model.unified import UnifiedModel, dummy_inputs  # noqa: F401  (re-exported: callers build init inputs here)
from strokes_jax.train import sharding as shd


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # base key; per-step keys are fold_in(rng, step), so resumes are exact
    ema_params: Any = None  # exponential moving average of params, when optim.ema_decay > 0

    def eval_params(self):
        """The weights to generate with: the EMA when kept, else the live params."""
        return self.params if self.ema_params is None else self.ema_params


def schedule(cfg, train_steps: int) -> optax.Schedule:
    """Linear warm-up then cosine decay over `optim.total_steps` (None: the run's
    `train_steps`, so shortening a run shortens its schedule)."""
    total = train_steps if cfg.total_steps is None else cfg.total_steps
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
        decay_steps=max(total, cfg.warmup_steps + 1), end_value=cfg.lr * cfg.end_lr_factor)


# train.freeze names: parameter groups by path ('/'-joined Flax names). Any other entry is a
# regular expression matched against the whole path.
FREEZE_GROUPS = {
    "vit": r"vision/vit/.*",  # the SigLIP tower (its connector stays trainable)
    "vision": r"vision/.*",  # the tower and its connector
    "und": r"decoder/.*_und(/.*)?",  # the understanding expert: attention, MLP, norms
    "gen": r"decoder/.*_gen(/.*)?",  # the generation expert
    "embeddings": r"embed|lm_head/.*",  # the token embedding and the text head
}


def param_path(path) -> str:
    """'/'-joined dict keys of a tree path (box wrappers such as nn.Partitioned add none)."""
    return "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def freeze_labels(params, freeze: Sequence[str], key: str = "train.freeze"):
    """A tree like `params` of 'frozen' / 'train'. An entry that matches no parameter is an
    error: a typo would otherwise train what the user meant to freeze."""
    patterns = [(f, re.compile(FREEZE_GROUPS.get(f, f))) for f in freeze]
    paths = [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    for name, pat in patterns:
        if not any(pat.fullmatch(p) for p in paths):
            raise ValueError(f"config key {key}: {name!r} matches no parameter (groups: "
                             f"{', '.join(FREEZE_GROUPS)}; or a regular expression over paths "
                             f"such as {paths[0]!r})")
    return jax.tree_util.tree_map_with_path(
        lambda p, _: "frozen" if any(pat.fullmatch(param_path(p)) for _, pat in patterns)
        else "train", params)


def make_optimizer(cfg, train_steps: int, freeze: Sequence[str] = ()) -> optax.GradientTransformation:
    """AdamW on `schedule`, after global-norm clipping. Parameters that `freeze` names get no
    update and no optimizer state (optax.multi_transform), and leave the clipping norm."""
    sched = schedule(cfg, train_steps)
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
    if not freeze:
        return tx
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                                 lambda params: freeze_labels(params, tuple(freeze)))


def _unbox_masked(opt_state):
    """Frozen parameters' optimizer slots are optax MaskedNodes (no arrays); inside a Flax
    partitioning box they would look like a sharded array to the sharding derivation."""
    return jax.tree_util.tree_map(
        lambda x: x.value if isinstance(x, nn.Partitioned) and isinstance(x.value, optax.MaskedNode)
        else x, opt_state, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def init_fn(model: UnifiedModel, tx, patch_dim: int, ema: bool = False):
    """rng -> the boxed (logically partitioned) TrainState."""

    def init(rng):
        params_rng, state_rng = jax.random.split(rng)
        params = model.init(params_rng, **dummy_inputs(1, 8, patch_dim, model.cfg.vision))["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=_unbox_masked(tx.init(params)), rng=state_rng,
                          ema_params=params if ema else None)
    return init


def create_state(model: UnifiedModel, tx, mesh, rules, seed: int, patch_dim: int,
                 ema: bool = False):
    """Returns (state, state_shardings), with every array created on its final shards.

    init builds boxed (logically partitioned) params; their axis names give the shardings,
    and the state itself holds plain arrays so Orbax and optax see ordinary pytrees."""

    init = init_fn(model, tx, patch_dim, ema)
    rng = jax.random.PRNGKey(seed)
    abstract = jax.eval_shape(init, rng)
    shd.check_divisible(abstract, mesh, rules)
    shardings = shd.state_shardings(abstract, mesh, rules)
    with jax.set_mesh(mesh):
        state = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(rng)
    return state, shardings


def param_count(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
