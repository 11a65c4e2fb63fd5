"""Peak host memory of `convert bagel` on a synthetic BAGEL-named checkpoint, as JSON.

The converter streams: it reads one tensor at a time, transforms it and writes it into its
place in the Orbax checkpoint (convert/writer.py), so its peak should stay well below the
output's size rather than hold the output (and, as Orbax's save used to, a second copy of it).
This measures it at a size where the difference is visible, without the real 14B checkpoint:

  python -m strokes_jax bench-convert --width 1024 --depth 16 --mlp 4096 \\
      --vocab 32768 --out results/convert_memory_cpu.json

The checkpoint is written in bfloat16 with the real key names (the key map's inverse: every
rule's source name and shape), then converted to float32 in a fresh process whose memory is
sampled every 20 ms from /proc (getrusage's peak would include the parent's, inherited through
fork + exec) and compared with its value after imports: RssAnon (the process's own memory)
and RSS = RssAnon + RssFile. The safetensors file is mmapped, so the pages read show up as
RssFile, which the kernel can drop; they are part of RSS, bounded by the source's size (half
the float32 output).

`peak_rss_growth_over_output` and `anon_growth_over_output` are the figures to read: at or
below 1 the conversion never holds more than the output (the in-memory path plus Orbax's save
needed about 2x: ~115 GB for BAGEL-7B-MoT in float32).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import tempfile
import time


def _config(width: int, depth: int, mlp: int, vocab: int, heads: int):
    from strokes_jax.configs import bagel7b_process
    from strokes_jax.convert.cli import configs_of
    c = bagel7b_process.get_config("test")
    c.model.update(width=width, depth=depth, mlp=mlp, vocab_size=vocab, heads=heads,
                   kv_heads=max(1, heads // 4), head_dim=width // heads)
    return configs_of(c)


def write_synthetic(cfg, ae_cfg, d: str) -> tuple[str, str]:
    """Random bfloat16 tensors under every source key the key map expects."""
    import ml_dtypes
    import numpy as np
    from safetensors import numpy as st_numpy
    from strokes_jax.convert import bagel

    rng = np.random.default_rng(0)
    rules, _ = bagel.model_rules(cfg)

    def tensors(rs):
        return {r.src: rng.standard_normal(r.shape, np.float32).astype(ml_dtypes.bfloat16)
                for r in rs}

    ema = tensors(rules)
    for t in bagel.fixed_tables(cfg):
        ema[t.src] = np.asarray(t.value, ml_dtypes.bfloat16)
    paths = os.path.join(d, "ema.safetensors"), os.path.join(d, "ae.safetensors")
    st_numpy.save_file(ema, paths[0])
    del ema
    st_numpy.save_file(tensors(bagel.vae_rules(ae_cfg)), paths[1])
    return paths


def _status_mb() -> dict[str, float]:
    """RssAnon (the process's own memory) and RssFile (mapped file pages, e.g. safetensors'
    mmap, which the kernel may drop at will) from /proc/self/status."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) / 1024.0
    out["Rss"] = out["RssAnon"] + out["RssFile"]  # summed from one read, so their peaks line up
    return out


class _Sampler:
    """Peak RssAnon / RssFile, sampled every 20 ms on a thread."""

    def __init__(self):
        import threading
        self.peak = _status_mb()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.wait(0.02):
            now = _status_mb()
            self.peak = {k: max(v, now.get(k, 0.0)) for k, v in self.peak.items()}

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._t.join()
        return self.peak


def _convert_child(args, q):
    import jax  # noqa: F401  (imports are part of the baseline, not of the conversion)
    import numpy as np
    import orbax.checkpoint  # noqa: F401
    from strokes_jax.convert.bagel import convert_bagel
    cfg, ae_cfg = _config(*args["shape"])
    base_status = _status_mb()
    sampler = _Sampler()
    t0 = time.time()
    convert_bagel(args["ema"], args["ae"], args["out"], cfg, ae_cfg, dtype=np.float32, progress=None)
    seconds = time.time() - t0
    peak = sampler.stop()
    q.put({"anon_after_imports_mb": base_status["RssAnon"], "peak_anon_mb": peak["RssAnon"],
           "rss_after_imports_mb": base_status["RssAnon"] + base_status["RssFile"],
           "peak_rss_mb": peak["Rss"], "peak_file_mapped_mb": peak["RssFile"], "convert_seconds": seconds})


def _result(p, q) -> dict:
    """The child's result; a child that dies without one (killed, or an error before it could
    report) is an error here rather than a wait forever."""
    import queue
    while True:
        alive = p.is_alive()
        try:
            res = q.get(timeout=1.0 if alive else 5.0)  # once it has exited, a last look
            break
        except queue.Empty:
            if not alive:
                raise RuntimeError(f"conversion process exited with {p.exitcode} before reporting") from None
    p.join()
    if p.exitcode:
        raise RuntimeError(f"conversion process exited with {p.exitcode}")
    return res


def run(width: int, depth: int, mlp: int, vocab: int, heads: int) -> dict:
    from strokes_jax import provenance
    from strokes_jax.model.counts import param_counts
    cfg, ae_cfg = _config(width, depth, mlp, vocab, heads)
    with tempfile.TemporaryDirectory() as d:
        ema, ae = write_synthetic(cfg, ae_cfg, d)
        src_mb = (os.path.getsize(ema) + os.path.getsize(ae)) / 2 ** 20
        ctx = mp.get_context("spawn")  # a fresh process: its peak RSS is the conversion's
        q = ctx.Queue()
        p = ctx.Process(target=_convert_child, args=(dict(
            shape=(width, depth, mlp, vocab, heads), ema=ema, ae=ae,
            out=os.path.join(d, "out")), q))
        p.start()
        res = _result(p, q)
    counts = param_counts(cfg, ae_cfg)
    out_mb = src_mb * 2  # bfloat16 source -> float32 params
    anon = res["peak_anon_mb"] - res["anon_after_imports_mb"]
    rss = res["peak_rss_mb"] - res["rss_after_imports_mb"]
    return {"bench": "convert_memory", "commit": provenance.git_commit(),
            "device": provenance.device_info(),
            "config": dict(width=width, depth=depth, mlp=mlp, vocab=vocab, heads=heads),
            "params": counts, "source_mb_bf16": src_mb, "output_mb_f32": out_mb, **res,
            "conversion_rss_growth_mb": rss, "peak_rss_growth_over_output": rss / out_mb,
            "conversion_anon_growth_mb": anon, "anon_growth_over_output": anon / out_mb,
            "anon_growth_over_source_plus_output": anon / (src_mb + out_mb)}


def main(argv=None, prog: str = "python -m strokes_jax bench-convert") -> int:
    ap = argparse.ArgumentParser(prog=prog)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--mlp", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    res = run(a.width, a.depth, a.mlp, a.vocab, a.heads)
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0
