"""The training lifecycle: data -> sharded state (fresh or resumed) -> jitted steps ->
metrics (clu writers: TensorBoard + logs) -> Orbax checkpoints (state + input state).

SIGTERM asks the loop to save and stop at the next step boundary; a non-finite loss stops
the run with an error and leaves the last good checkpoint as the newest one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from typing import Callable, Sequence

import jax
import numpy as np
import flax.linen as nn
from clu import metric_writers, periodic_actions

from strokes_jax import files
from strokes_jax.sequence import tokenizer as tk
from strokes_jax.configs import schema
from strokes_jax.data import pipeline
from strokes_jax.train.inputs import episode_tokenizer, resolve_paths, vit_packing  # noqa: F401
from strokes_jax.train.prepare import data_config, data_dir, prepare_data  # noqa: F401 (callers)
from strokes_jax.model import routing
from strokes_jax.model.unified import ModelConfig, UnifiedModel
from strokes_jax.train import checkpoint as ckpt
from strokes_jax.train import init_weights
from strokes_jax.train import run_info
from strokes_jax.train import flops as fl
from strokes_jax.train import sharding as shd
from strokes_jax.train import state as st
from strokes_jax.train import step as sp
from strokes_jax.sequence import layout


@dataclasses.dataclass
class Setup:
    """Everything built from a config that both training and generation use."""

    config: object
    etok: tk.EpisodeTokenizer
    model: UnifiedModel
    mesh: jax.sharding.Mesh
    tx: object
    state: st.TrainState
    shardings: object


# Called at every periodic evaluation: hook(setup, step, metric_writer).
EvalHook = Callable[[Setup, int, object], None]


def model_config(config, etok: tk.EpisodeTokenizer) -> ModelConfig:
    """The model for the world's tokenizer and images. model.vocab_size, when set (converted
    weights), keeps the embedding's rows; the tokenizer must fit in them."""
    grid = etok.image_shape[0] // etok.patch
    vocab = int(config.model.vocab_size) or etok.tok.vocab_size
    if etok.tok.vocab_size > vocab:
        raise schema.ConfigKeyError(f"config key model.vocab_size: {vocab} rows, but the "
                                    f"tokenizer has {etok.tok.vocab_size} ids")
    return ModelConfig.from_config({**config.model.to_dict(), "vocab_size": vocab,
                                    "patch_dim": etok.codec.token_dim, "latent_grid": (grid, grid)})


def setup(config, devices=None, model_cfg: ModelConfig | None = None) -> Setup:
    """Validate the config against the mesh, then create the state already sharded.
    `model_cfg` replaces the one derived from the world's tokenizer (the benchmark's
    synthetic vocabularies and latent sizes)."""
    schema.check(config)
    etok = episode_tokenizer(config)
    model = UnifiedModel(model_cfg or model_config(config, etok))
    mesh = shd.make_mesh(config.mesh["shape"], devices)
    shd.check_batch(config.data.batch_size, mesh, config.train.accum_steps, jax.process_count())
    tx = st.make_optimizer(config.optim, config.train.steps, tuple(config.train.freeze))
    state, shardings = st.create_state(model, tx, mesh, config.rules, config.seed,
                                       model.cfg.patch_dim, ema=config.optim.ema_decay > 0)
    shd.check_sufficiently_sharded(state.params, mesh, config.train.shard_tolerance)
    return Setup(config, etok, model, mesh, tx, state, shardings)


class _Preemption:
    """Turns SIGTERM into a flag checked at step boundaries (single process, main thread).
    With several processes the notice must reach every host at the same step, which JAX's
    preemption sync point does (see _preemption_sync), so no handler is installed."""

    def __init__(self, enabled: bool = True):
        self.requested = False
        self.enabled = enabled
        self._old = None

    def __enter__(self):
        if not self.enabled:
            return self
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._old = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _preemption_sync(mgr, step: int) -> bool:
    """Orbax/JAX preemption notice, agreed on by all hosts; False without jax.distributed."""
    try:
        return bool(mgr.reached_preemption(step))
    except (RuntimeError, ValueError):
        return False


def _mean_metrics(history: list[dict]) -> dict[str, float]:
    keys = history[0].keys()
    return {k: float(np.mean([float(h[k]) for h in history])) for k in keys}


def evaluate_loss(s: Setup, eval_step, source, config) -> dict[str, float]:
    it = pipeline.make_eval_iter(source, s.etok, seq_len=config.data.seq_len,
                                 global_batch_size=config.data.batch_size)
    out = [jax.device_get(eval_step(s.state, _batch(b, s.mesh))) for b in it]
    if not out:  # every eval record was skipped: a run without eval metrics would look fine
        raise ValueError(f"the eval split ({len(source)} records) gave no batch: every record "
                         f"was skipped (config keys data.num_eval, data.seq_len)")
    return {f"eval/{k}": v for k, v in _mean_metrics(out).items()}


def _episodes_in(segment_ids) -> int:
    """Packed episodes in a (host-local) batch: distinct non-zero segment ids per row."""
    seg = np.asarray(segment_ids)
    return int(sum(len(np.unique(row[row > 0])) for row in seg))


def _batch(b, mesh):
    return pipeline.to_global({k: b[k] for k in layout.batch_keys(b)}, mesh)


def train_iterator(config, etok, source, skips):
    """The input iterator for this process.

    data.process_split = 'records': each process reads its own shard of the records
    (scalable). 'rows': every process runs the whole single-process pipeline and keeps its
    rows of each global batch, so the global batches are identical for any process count
    (exact multi-host reproducibility checks; every host decodes everything)."""
    d = config.data
    split = d.process_split
    dropout = dict(d.cfg_dropout)
    if split == "records":
        return pipeline.make_train_iter(source, etok, seq_len=d.seq_len,
                                        global_batch_size=d.batch_size,
                                        seed=d.shuffle_buffer_seed, skips=skips,
                                        cond_dropout=dropout)
    if split != "rows":
        raise ValueError(f"config key data.process_split: {split!r} not in ('records', 'rows')")
    it = pipeline.make_train_iter(source, etok, seq_len=d.seq_len, global_batch_size=d.batch_size,
                                  seed=d.shuffle_buffer_seed, skips=skips, process_index=0,
                                  process_count=1, cond_dropout=dropout)
    return pipeline.RowSlice(it, jax.process_index(), jax.process_count())


def with_extra_sources(config, train_src):
    """data.extra_sources: [{'path': ArrayRecord file, 'weight': w}, ...] mixed with the main
    split (weight data.main_weight), e.g. phase 2 on self-sampled critiques."""
    extra = list(config.data.extra_sources)
    if not extra:
        return train_src
    import grain
    parts = [(train_src, float(config.data.main_weight))]
    for i, e in enumerate(extra):
        if not os.path.exists(e["path"]):
            raise FileNotFoundError(f"config key data.extra_sources[{i}].path: {e['path']} not found")
        src = grain.sources.ArrayRecordDataSource(e["path"])
        if len(src) == 0:
            raise ValueError(f"config key data.extra_sources[{i}].path: {e['path']} holds no records")
        if not float(e["weight"]) > 0:
            raise ValueError(f"config key data.extra_sources[{i}].weight: {e['weight']!r} is not > 0")
        parts.append((src, float(e["weight"])))
    return parts


def _ema_copy(state, params):
    """The EMA's own copy of starting params: one buffer in both would be donated twice by
    the train step (XLA refuses, or crashes)."""
    if state.ema_params is None:
        return None
    return jax.tree_util.tree_map(lambda x: x.copy(), params)


def _init_from(s: Setup, config) -> None:
    """train.init_from: start from another run's newest params; train.init_converted: from
    converted weights. Either way with a fresh optimizer and step."""
    src, conv = config.train.init_from, config.train.init_converted
    if src and conv:
        raise ValueError("config keys train.init_from and train.init_converted: set one, "
                         "not both")
    if conv:
        params, fresh = init_weights.restore(conv, s.state.params, s.shardings.params,
                                             dataclasses.asdict(s.model.cfg))
        s.state = s.state.replace(params=params,
                                  ema_params=_ema_copy(s.state, params))
        logging.info("initialised from converted weights %s", conv)
        if fresh:  # parts leave these (the generation heads, after a Qwen2 start) as initialised
            print(f"train.init_converted: {len(fresh)} parameters no part holds keep their "
                  f"initialisation: {init_weights.listing(fresh)}", flush=True)
        return
    if not src:
        return
    mgr = ckpt.manager(src, keep=1, save_every=1)
    restored = ckpt.restore_latest(mgr, s.state, s.shardings)
    if restored is None:
        raise FileNotFoundError(f"config key train.init_from: no checkpoint under {src}")
    params = restored[1].params
    s.state = s.state.replace(params=params,
                              ema_params=_ema_copy(s.state, params))
    logging.info("initialised from %s step %d", src, restored[0])


def train(config, workdir: str, sources=None, devices=None,
          eval_hooks: Sequence[EvalHook] = (), allow_config_change: bool = False
          ) -> tuple[Setup, dict]:
    """Train (or resume) in `workdir`; returns the final Setup and a summary dict.

    `eval_hooks` run at every periodic evaluation after the eval loss, with the current
    Setup, the step and the metric writer (e.g. `evaluate.train_images.TrainImages`, which
    paints filmstrips into TensorBoard); the seconds they take are summed in the summary's
    `hook_seconds`. Resuming under a config that differs from the workdir's run_info.json
    (beyond how long to train and how often to log, save and evaluate) is refused, naming the
    keys, unless `allow_config_change`."""
    files.makedirs(workdir)
    train_src, eval_src = sources if sources is not None else prepare_data(config, workdir)
    train_src = with_extra_sources(config, train_src)
    s = setup(config, devices)
    lc = sp.LossConfig.from_config(config)
    fractions = tuple(config.train.sparse_routing)
    train_step, eval_step = sp.jit_steps(routing.sparse(s.model, fractions), s.tx, lc, s.mesh,
                                         s.shardings,
                                         accum_steps=config.train.accum_steps,
                                         ema_decay=config.optim.ema_decay, codec=s.etok.codec)
    tc = config.train
    mgr = ckpt.manager(workdir, keep=tc.keep_checkpoints, save_every=tc.checkpoint_every)
    if mgr.latest_step() is not None and not allow_config_change:
        run_info.check(workdir, config)
    run_info.write(workdir, config, s.mesh.devices.shape)
    skips = pipeline.SkipCounter(max_skip_fraction=config.data.max_skip_fraction)
    it = train_iterator(config, s.etok, train_src, skips)
    restored = ckpt.restore_latest(mgr, s.state, s.shardings, it, set_aside=True)
    start = 0
    if restored is not None:
        start, s.state = restored
        logging.info("resumed from step %d", start)
    else:
        _init_from(s, config)
    writer = metric_writers.create_default_writer(
        os.path.join(workdir, "tb"), just_logging=jax.process_index() > 0)
    if start == 0:
        writer.write_hparams({k: str(v) for k, v in config.to_dict().items()})
    report = periodic_actions.ReportProgress(num_train_steps=tc.steps, writer=writer)
    step_flops = fl.train_step_flops(s.model.cfg, config.data.batch_size, config.data.seq_len)
    peak = fl.peak_tflops(jax.devices()[0].device_kind)
    history, losses, t0 = [], [], time.time()
    summary = {"params": st.param_count(s.state.params), "start_step": start}
    step, t_window, dense_steps, seen = start, time.time(), 0, 0
    hook_seconds = 0.0
    # The mesh and rules make the model's logical activation constraints concrete.
    with _Preemption(jax.process_count() == 1) as pre, jax.set_mesh(s.mesh), \
            nn.logical_axis_rules(shd.rules_tuple(config.rules)):
        while step < tc.steps:
            host = next(it)
            if fractions:  # the step ran dense routing (the counts did not fit)
                dense_steps += not routing.batch_fits(host["types"], host["segment_ids"],
                                                      fractions)
            seen += _episodes_in(host["segment_ids"])
            batch = _batch(host, s.mesh)
            s.state, metrics = train_step(s.state, batch)
            step += 1
            report(step)
            history.append(metrics)
            stop = pre.requested or _preemption_sync(mgr, step)
            saving = stop or step == tc.steps or mgr.should_save(step)
            logging_step = step % tc.log_every == 0 or step == tc.steps
            if saving or logging_step:
                # Every window that ends in a save is checked, so a NaN state is never saved.
                m = _mean_metrics(jax.device_get(history))
                elapsed, n = time.time() - t_window, len(history)
                history, t_window = [], time.time()
                if not (np.isfinite(m["loss"]) and np.isfinite(m["param_norm"])):
                    ckpt.confirm(mgr)
                    good = ckpt.verified_steps(mgr)
                    raise FloatingPointError(
                        f"non-finite loss {m['loss']} or parameters (norm {m['param_norm']}) "
                        f"by step {step}; " + (f"the newest verified checkpoint (step {good[-1]}) "
                                               "is the last good one" if good else
                                               "no checkpoint was saved before it"))
                tflops = step_flops.model * n / elapsed / jax.device_count() / 1e12
                m.update(tflops_per_device=tflops, steps_per_s=n / elapsed)
                if peak:
                    m["mfu"] = tflops / peak
                losses.append((step, float(m["loss"])))
                writer.write_scalars(step, {f"train/{k}": v for k, v in m.items()})
                # Skipped records so far (the packer counts them), next to the losses.
                writer.write_scalars(step, {"data/records_seen": skips.seen,
                                            "data/records_skipped": skips.skipped,
                                            **{f"data/skipped_{r}": n
                                               for r, n in skips.by_reason.items()}})
                if logging_step:
                    print(f"step {step}/{tc.steps} loss {m['loss']:.4f} ce {m['ce']:.4f} "
                          f"mse {m['mse']:.4f} text_acc {m['text_accuracy']:.3f} "
                          f"{tflops * 1e3:.1f} GFLOP/s/device ({time.time() - t0:.0f}s)"
                          + (f" skipped {skips.skipped}/{skips.seen} records" if skips.skipped
                             else ""), flush=True)
            if tc.eval_every and (step % tc.eval_every == 0 or step == tc.steps):
                writer.write_scalars(step, evaluate_loss(s, eval_step, eval_src, config))
                if not stop:  # a preemption notice: save first, run no hook
                    t_hook = time.time()
                    for hook in eval_hooks:
                        hook(s, step, writer)
                    hook_seconds += time.time() - t_hook
            if saving:
                ckpt.save(mgr, step, s.state, it, force=True)
            if stop:
                logging.warning("preemption: saved step %d, stopping", step)
                break
    ckpt.confirm(mgr)
    writer.flush()
    if jax.process_count() > 1:  # each process counted its own rows of the global batch
        from jax.experimental import multihost_utils
        seen = int(np.sum(multihost_utils.process_allgather(np.asarray(seen))))
    summary.update(end_step=step, train_seconds=time.time() - t0,
                   losses=losses, skipped=skips.get_state(),
                   preempted=step < tc.steps, hook_seconds=hook_seconds,
                   episodes_seen=seen)
    if fractions:
        summary["sparse_routing"] = dict(capacity=list(fractions), dense_steps=dense_steps)
    update_record(workdir, summary)
    return s, summary


RECORD = "train_record.json"


def training_record(workdir: str) -> dict | None:
    """The workdir's training so far, over every resumed run: params, first start step, end
    step, seconds, losses by step, episodes seen (None before any training)."""
    return files.read_json(os.path.join(workdir, RECORD))


def update_record(workdir: str, summary: dict, **extra) -> dict:
    """Folds one run's summary into the workdir's record: a run that resumed where the record
    ends continues it, a run that trained nothing leaves it as it was, anything else (a
    fresh start) replaces it. `extra` entries are merged in (dicts key by key); with an
    empty summary only `extra` is merged."""
    old = training_record(workdir)
    new = {k: v for k, v in summary.items()}
    if old and (not summary or summary["start_step"] == summary.get("end_step")):
        rec = dict(old)
    elif old and summary["start_step"] > 0 and old.get("end_step") == summary["start_step"]:
        rec = dict(new, start_step=old["start_step"],
                   train_seconds=old["train_seconds"] + new["train_seconds"],
                   losses=list(old["losses"]) + list(new["losses"]),
                   episodes_seen=old.get("episodes_seen", 0) + new.get("episodes_seen", 0))
    else:
        rec = new
    for k, v in extra.items():
        rec[k] = {**rec.get(k, {}), **v} if isinstance(v, dict) else v
    if jax.process_index() == 0:
        files.write_json(os.path.join(workdir, RECORD), rec, default=float)
    return rec


def restore_for_eval(config, workdir: str, allow_config_change: bool = False
                     ) -> tuple[Setup, dict]:
    """Setup with the newest checkpoint's state (the input state is not needed). A workdir
    whose run had another world or model config is refused, naming the keys. A workdir
    with no checkpoint evaluates the converted weights train.init_converted names, as they
    are (a converted BAGEL paints without a training step)."""
    if not allow_config_change:
        run_info.check(workdir, config, for_eval=True)
    s = setup(config)
    mgr = ckpt.manager(workdir, keep=config.train.keep_checkpoints,
                       save_every=config.train.checkpoint_every)
    restored = ckpt.restore_latest(mgr, s.state, s.shardings)
    if restored is None and config.train.init_converted:
        _init_from(s, config)
        return s, {"params": st.param_count(s.state.params), "start_step": 0, "end_step": 0,
                   "init_converted": config.train.init_converted}
    if restored is None:
        raise FileNotFoundError(f"no checkpoint under {os.path.join(workdir, 'checkpoints')}")
    step, s.state = restored
    rec = training_record(workdir)
    if rec is None or rec.get("end_step") != step:  # trained elsewhere, or by an older version
        rec = {"params": st.param_count(s.state.params), "start_step": step, "end_step": step}
    return s, rec
