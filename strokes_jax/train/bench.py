"""Training-throughput benchmark: a named config, synthetic interleaved batches (or the real
shapes pipeline), N timed steps; writes JSON with device, config, commit, step time,
tokens/s, TFLOP/s per device, MFU, peak memory and compile time.

  python -m strokes_jax bench --config mot_1b --workdir runs/bench
"""

from __future__ import annotations

import json
import os
import re
import resource
import time

import jax
import numpy as np
import flax.linen as nn

from strokes_jax.data import pipeline
from strokes_jax import provenance
from strokes_jax.model import routing
from strokes_jax.model.unified import ModelConfig
from strokes_jax.sequence.layout import CLEAN, NOISY, TEXT
from strokes_jax.train import flops as fl
from strokes_jax.train import sharding as shd
from strokes_jax.train import loop
from strokes_jax.train import state as st
from strokes_jax.train import step as sp
from strokes_jax.sequence import layout


def synthetic_batch(rows: int, seq_len: int, vocab: int, patch_dim: int, num_patches: int,
                    text_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows of repeated [text_len text tokens, noisy image, <vs> clean image <ve>] laid out
    exactly like real episodes (stages, targets, blocks, positions), one segment per row."""
    rng = np.random.default_rng(seed)
    cols = {k: np.zeros((rows, seq_len), np.int32) for k in
            ("tokens", "types", "stages", "targets", "target_stages", "positions", "blocks",
             "patch_pos", "segment_ids")}
    cols["patches"] = rng.integers(0, 256, (rows, seq_len, patch_dim), dtype=np.uint8)
    pos, block = 0, 0
    layout = []  # (type, block, patch_pos, position)
    while True:
        seg = [(TEXT, 0, 0, pos + j) for j in range(text_len)]
        pos += text_len
        img = ([(NOISY, block + 1, j, pos) for j in range(num_patches)]
               + [(TEXT, block + 2, 0, pos)] + [(CLEAN, block + 2, j, pos) for j in range(num_patches)]
               + [(TEXT, block + 2, 0, pos)])
        if len(layout) + len(seg) + len(img) > seq_len:
            break
        layout += seg + img
        pos, block = pos + 1, block + 2
    n = len(layout)
    arr = np.asarray(layout, np.int32)
    for r in range(rows):
        cols["types"][r, :n], cols["blocks"][r, :n] = arr[:, 0], arr[:, 1]
        cols["patch_pos"][r, :n], cols["positions"][r, :n] = arr[:, 2], arr[:, 3]
        cols["segment_ids"][r, :n] = 1
        text = arr[:, 0] == TEXT
        cols["tokens"][r, :n] = np.where(text, rng.integers(1, vocab, n), 0)
        nxt = np.append(cols["tokens"][r, 1:n], 0)
        has = text & (np.append(arr[1:, 0], NOISY) == TEXT) & (arr[:, 1] == 0)
        cols["targets"][r, :n] = np.where(has, nxt, 0)
        cols["stages"][r, :n] = np.where(arr[:, 0] == TEXT, 1, 2)
        cols["target_stages"][r, :n] = 1
    return cols


def _conventions(mc, local: dict, global_batch: int, L: int) -> dict:
    """flops.conventions for the timed batch: its mask's kept pairs and its heads' tokens,
    counted on this process's rows and scaled to the global batch."""
    from strokes_jax.model import attention
    rows = local["tokens"].shape[0]
    pairs = sum(int(np.asarray(attention.generalized_causal_mask(
        local["segment_ids"][r:r + 1], local["blocks"][r:r + 1], local["types"][r:r + 1])).sum())
        for r in range(rows))
    scale = global_batch / rows
    return fl.conventions(mc, global_batch, L, visible_pairs=int(pairs * scale),
                          text_targets=int((local["targets"] > 0).sum() * scale),
                          noisy_tokens=int((local["types"] == NOISY).sum() * scale))


def peak_memory() -> dict:
    stats = jax.local_devices()[0].memory_stats() or {}
    out = {"host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if "peak_bytes_in_use" in stats:
        out["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
    return out


def run(config, config_name: str, workdir: str) -> dict:
    b = config.bench
    mc = ModelConfig.from_config({**config.model.to_dict(), "vocab_size": b.vocab_size,
                                  "patch_dim": b.patch_dim, "latent_grid": tuple(b.latent_grid)})
    t0 = time.time()
    s = loop.setup(config, model_cfg=mc)  # the training path's checks and sharded init
    init_s = time.time() - t0
    mesh, state, accum = s.mesh, s.state, config.train.accum_steps
    ratio = shd.sharded_fraction(state.params, mesh)
    lc = sp.LossConfig.from_config(config)
    fractions = tuple(config.train.sparse_routing)
    train_step, _ = sp.jit_steps(routing.sparse(s.model, fractions), s.tx, lc, mesh, s.shardings,
                                 accum_steps=accum, ema_decay=config.optim.ema_decay)
    rows, L = config.data.batch_size // jax.process_count(), config.data.seq_len
    num_patches = mc.latent_grid[0] * mc.latent_grid[1]
    local = synthetic_batch(rows, L, mc.vocab_size, mc.patch_dim, num_patches, b.text_len)
    is_gen = np.isin(local["types"], (NOISY, CLEAN))
    # Whether the timed step routed sparsely (the synthetic batch fits the capacities).
    sparse = bool(fractions) and bool(routing.counts_fit(is_gen, local["segment_ids"] > 0,
                                                          fractions))
    batch = pipeline.to_global({k: local[k] for k in layout.ROW_FIELDS}, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(shd.rules_tuple(config.rules)):
        t0 = time.time()
        compiled = train_step.compile(state, batch)
        compile_s = time.time() - t0
        times = []
        for i in range(b.warmup + b.steps):
            t0 = time.time()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics["loss"])
            if i >= b.warmup:
                times.append(time.time() - t0)
    step_s = float(np.median(times))
    n_dev = jax.device_count()
    f = fl.train_step_flops(mc, config.data.batch_size, L)
    dev = provenance.device_info()
    peak = fl.peak_tflops(dev["device_kind"])
    model_tflops = f.model / step_s / n_dev / 1e12
    conv = _conventions(mc, local, config.data.batch_size, L)
    xla = fl.xla_flops(compiled.fn)
    out = {
        "config": config_name, "commit": provenance.git_commit(), "device": dev,
        "mesh": dict(mesh.shape), "dtype": mc.decoder.dtype, "remat": mc.decoder.remat,
        "scan_layers": mc.decoder.scan_layers, "attention": mc.decoder.attention,
        "sparse_routing": {"capacity": list(fractions), "used": sparse,
                           "gen_fill": float(is_gen.mean())} if fractions else None,
        "params": st.param_count(state.params), "global_batch": config.data.batch_size,
        "seq_len": L, "accum_steps": accum, "steps_timed": b.steps,
        "step_time_s": step_s, "step_time_min_s": float(np.min(times)),
        "tokens_per_s": config.data.batch_size * L / step_s,
        "model_tflop_per_step": f.model / 1e12, "executed_tflop_per_step": f.executed / 1e12,
        "model_tflops_per_device": model_tflops,
        "executed_tflops_per_device": f.executed / step_s / n_dev / 1e12,
        "peak_tflops_per_device": peak, "mfu": (model_tflops / peak) if peak else None,
        # The same step in three FLOP conventions (flops.conventions), and XLA's own count
        # of the compiled per-device program.
        "mfu_conventions": {k: {"tflop_per_step": v / 1e12,
                                "mfu": v / step_s / n_dev / 1e12 / peak if peak else None}
                            for k, v in conv.items()},
        "xla_tflop_per_step_per_device": None if xla is None else xla / 1e12,
        "xla_over_model": None if xla is None else xla * n_dev / f.model,
        "xla_counts_loop_body_once": bool(mc.decoder.scan_layers),  # a scanned stack: one layer
        "compile_s": compile_s, "init_s": init_s, "sharded_ratio": ratio,
        "final_loss": float(metrics["loss"]), **peak_memory(),
    }
    os.makedirs(workdir, exist_ok=True)
    # The attention kernel is in the name so that an xla and a cudnn run sit side by side.
    attn = "" if mc.decoder.attention == "xla" else f"_{mc.decoder.attention}"
    name = f"bench_{config_name.removesuffix('.py')}{attn}_{dev['device_kind']}"
    path = os.path.join(workdir, re.sub(r"[^A-Za-z0-9._-]", "_", name) + ".json")
    with open(path, "w") as fh:
        json.dump(out, fh, indent=1)
    out["path"] = path
    return out
