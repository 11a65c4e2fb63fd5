"""Images in TensorBoard during training: at every periodic evaluation, the current
parameters paint a few fixed benchmark prompts (process-driven and single-pass), and each
episode goes to TensorBoard as a filmstrip next to the loss curves.

`train.tb_images` is the number of prompts (0 turns it off). The prompts, the seed and the
noise are the same at every evaluation, so the strips show what training changed. The
generator is built once and compiled once; each evaluation passes it the current parameters.
"""

from __future__ import annotations

import logging

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
    """An eval hook for `train.loop.train`: hook(setup, step, writer)."""

    def __init__(self, config):
        self.config = config
        self.seed = int(config.eval.seed)
        self.prompts = prompts(int(config.train.tb_images), self.seed)
        if self.prompts and jax.process_count() > 1:
            # Generation runs on one host's copy of the parameters; a multi-host run would
            # need every process in each call.
            logging.warning("train.tb_images: skipped in a %d-process run", jax.process_count())
            self.prompts = []
        self.gen = None

    def __call__(self, setup, step: int, writer) -> None:
        """Write the filmstrips of the current parameters for `step`."""
        if not self.prompts:
            return
        if self.gen is None:
            self.gen = job.make_generator(setup, self.config, self.seed, bind_params=False)
        params = setup.state.eval_params()
        images = {}
        for mode in MODES:
            outs = self.gen([p.text for p in self.prompts], mode, params=params,
                            rng=np.random.default_rng(self.seed))  # the same noise every time
            for i, (p, g) in enumerate(zip(self.prompts, outs)):
                strip = report.filmstrip(p.text, g.text, g.images, None, title=f"{mode} {p.tag}")
                images[f"train_samples/{mode}/{i}_{p.tag}"] = strip[None]
        writer.write_images(step, images)
