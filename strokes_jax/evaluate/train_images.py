"""Images in TensorBoard during training: at every periodic evaluation, the current
parameters paint a few fixed benchmark prompts (process-driven and single-pass), and each
episode goes to TensorBoard as a filmstrip next to the loss curves.

`train.tb_images` is the number of prompts (0 turns it off). The prompts, the seed and the
noise are the same at every evaluation, so the strips show what training changed. The
generator is built once and compiled once; later evaluations only swap its parameters in.
"""

from __future__ import annotations

import logging
import time

import jax
import numpy as np

from strokes_jax.evaluate import job, report, shapes_bench

MODES = ("process", "single_pass")


def prompts(n: int, seed: int):
    """n benchmark prompts spread over the six categories (one per category first)."""
    per_tag = -(-n // 6) if n > 0 else 0
    bench = shapes_bench.benchmark_prompts(seed, per_tag) if per_tag else []
    by_tag = {}
    for p in bench:
        by_tag.setdefault(p.tag, []).append(p)
    spread = [p for group in zip(*by_tag.values()) for p in group]
    return spread[:n]


class TrainImages:
    def __init__(self, setup, config):
        self.setup, self.config = setup, config
        self.seed = int(config.eval.seed)
        self.prompts = prompts(int(config.train.get("tb_images", 0)), self.seed)
        if self.prompts and jax.process_count() > 1:
            # Generation runs on one host's copy of the parameters; a multi-host run would
            # need every process in each call.
            logging.warning("train.tb_images: skipped in a %d-process run", jax.process_count())
            self.prompts = []
        self.gen = None

    def __call__(self, step: int, writer) -> float:
        """Write the filmstrips for `step`; returns the seconds it took (0 when off)."""
        if not self.prompts:
            return 0.0
        t0 = time.time()
        if self.gen is None:
            self.gen = job.make_generator(self.setup, self.config, self.seed)
        self.gen.params = self.setup.state.eval_params()
        images = {}
        for mode in MODES:
            self.gen.rng = np.random.default_rng(self.seed)  # the same noise every time
            for i, (p, g) in enumerate(zip(self.prompts, self.gen([p.text for p in self.prompts],
                                                                  mode))):
                strip = report.filmstrip(p.text, g.text, g.images, None, title=f"{mode} {p.tag}")
                images[f"train_samples/{mode}/{i}_{p.tag}"] = strip[None]
        if hasattr(self.gen, "cache"):
            self.gen.cache = None  # the KV cache is reallocated per call; free it meanwhile
        writer.write_images(step, images)
        return time.time() - t0
