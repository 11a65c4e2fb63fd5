"""Does the input pipeline keep up? Times the real pipeline (decode records, resize, attach
precomputed latents, tokenize, pack) batch by batch against the training step it feeds.

  python -m strokes_jax bench-input --config shapes_tiny:images --workdir runs/bench_input

The step is timed on the same batches with the config's model. Where the config's model
cannot run here (BAGEL-7B on a CPU), pass a small stand-in with --config.model.* overrides:
the JSON then also gives the analytic lower bound of the real model's step on a named
accelerator (its model FLOPs at the accelerator's peak), which the input time must stay under.
"""

from __future__ import annotations

import os
import re
import time

import jax
import numpy as np
import flax.linen as nn

from strokes_jax import files, provenance
from strokes_jax.data import pipeline
from strokes_jax.model import routing
from strokes_jax.train import flops as fl
from strokes_jax.train import loop
from strokes_jax.train import sharding as shd
from strokes_jax.train import step as sp


def _timed(it, n: int) -> tuple[list[dict], list[float]]:
    out, secs = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        out.append(next(it))
        secs.append(time.perf_counter() - t0)
    return out, secs


def run(config, config_name: str, workdir: str, batches: int = 20, steps: int = 5,
        bound_model=None, bound_device: str = "H100") -> dict:
    """Input seconds per batch (after one warm-up batch) and step seconds on those batches.
    `bound_model` (a ModelConfig): also the analytic step-time bound of that model per
    device on `bound_device`, for the same rows."""
    files.makedirs(workdir)
    train_src, _ = loop.prepare_data(config, workdir)
    s = loop.setup(config)
    skips = pipeline.SkipCounter(max_skip_fraction=config.data.max_skip_fraction)
    it = loop.train_iterator(config, s.etok, train_src, skips)
    _timed(it, 1)  # threads, caches and the first read
    host, input_secs = _timed(it, batches)
    step_secs, compile_s = [], None
    if steps:
        step_secs, compile_s = _step_times(config, s, host, steps)
    d = config.data
    tokens = [int((b["segment_ids"] > 0).sum()) for b in host]
    out = {
        "config": config_name, "commit": provenance.git_commit(), "device": provenance.device_info(),
        "batch_size": d.batch_size, "seq_len": d.seq_len, "source": d.source,
        "latents": config.world["latents"], "precompute_latents": bool(d.precompute_latents),
        "image_size": config.world["image_size"], "resize": bool(config.world["resize"]),
        "batches_timed": batches, "input_s_per_batch": float(np.mean(input_secs)),
        "input_s_per_batch_p90": float(np.percentile(input_secs, 90)),
        "real_tokens_per_batch": float(np.mean(tokens)),
        "steps_timed": len(step_secs), "step_s": float(np.mean(step_secs)) if step_secs else None,
        "compile_s": compile_s, "records_skipped": skips.skipped,
    }
    if out["step_s"]:
        out["input_over_step"] = out["input_s_per_batch"] / out["step_s"]
    if bound_model is not None:
        peak = fl.peak_tflops(bound_device)
        per_row = fl.train_step_flops(bound_model, 1, d.seq_len).model
        out["bound"] = {"device": bound_device, "peak_tflops": peak,
                        "model_tflop_per_row": per_row / 1e12,
                        "step_s_per_row_at_peak": per_row / (peak * 1e12) if peak else None}
    name = re.sub(r"[^A-Za-z0-9]+", "_", config_name.replace(".py", "")).strip("_")
    path = os.path.join(workdir, f"input_bench_{name}.json")
    files.write_json(path, out)
    out["path"] = path
    return out


def _step_times(config, s, host: list[dict], steps: int) -> tuple[list[float], float]:
    """Seconds per training step of the config's model on the timed batches, and the first
    (compiling) step's."""
    lc = sp.LossConfig.from_config(config)
    train_step, _ = sp.jit_steps(routing.sparse(s.model, tuple(config.train.sparse_routing)),
                                 s.tx, lc, s.mesh, s.shardings, codec=s.etok.codec)
    step_secs = []
    with jax.set_mesh(s.mesh), nn.logical_axis_rules(shd.rules_tuple(config.rules)):
        t0 = time.perf_counter()
        s.state, m = train_step(s.state, loop._batch(host[0], s.mesh))
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        for b in host[1:steps + 1]:
            t0 = time.perf_counter()
            s.state, m = train_step(s.state, loop._batch(b, s.mesh))
            jax.block_until_ready(m)
            step_secs.append(time.perf_counter() - t0)
    return step_secs, compile_s


def summary(out: dict) -> str:
    line = f"input {out['input_s_per_batch']:.3f} s/batch (p90 {out['input_s_per_batch_p90']:.3f})"
    if out["step_s"]:
        line += f", step {out['step_s']:.3f} s: input/step {out['input_over_step']:.2f}"
    b = out.get("bound")
    if b and b["step_s_per_row_at_peak"]:
        per_row = out["input_s_per_batch"] / out["batch_size"]
        line += (f"; {per_row:.3f} s of input per row against a {b['step_s_per_row_at_peak']:.2f} s "
                 f"step per row on one {b['device']} at peak")
    return line + f" ({out['path']})"
