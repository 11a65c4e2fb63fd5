"""Shapes-GenEval: a fixed, seeded prompt set in GenEval's six categories, several images per
prompt, scored by the exact detector and GenEval's rule engine, for single-pass and
process-driven generation with the same model."""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import numpy as np

from strokes_jax.worlds import geneval
from strokes_jax.inference.generator import Generated, Generator, SamplingOptions
from strokes_jax.worlds import detect, prompts, shapes

MODES = ("single_pass", "process")


def benchmark_prompts(seed: int, per_tag: int) -> list[prompts.Prompt]:
    """Distinct prompts per tag from a seed reserved for evaluation."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7919]))
    out = []
    for tag in shapes.TAGS:
        seen: set[str] = set()
        for _ in range(per_tag * 50):
            p = prompts.sample_prompt(rng, tag)
            if p.text not in seen:
                seen.add(p.text)
                out.append(p)
            if len(seen) == per_tag:
                break
    return out


@dataclasses.dataclass
class Sample:
    tag: str
    prompt: str
    mode: str
    index: int
    correct: bool
    reason: str
    nfe: int
    evals: int  # model evaluations for denoising (NFE x CFG contexts)
    images: int
    well_formed: bool
    hit_cap: bool
    error: str | None
    result: Generated = dataclasses.field(repr=False)

    def row(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("result")
        d["text"] = self.result.text
        return d


def score(result: Generated, prompt: prompts.Prompt) -> tuple[bool, str]:
    img = result.final_image
    if img is None:
        return False, "no image generated"
    return detect.check_image(img, prompt)


def run(generator: Generator, bench: Sequence[prompts.Prompt], images_per_prompt: int,
        mode: str, batch_size: int, options: SamplingOptions | None = None
        ) -> tuple[list[Sample], float]:
    """Generate and score every (prompt, image index); returns samples and wall seconds.
    `options`: the sampling of every call (None: the generator's own)."""
    jobs = [(p, k) for p in bench for k in range(images_per_prompt)]
    samples: list[Sample] = []
    t0 = time.time()
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i:i + batch_size]
        results = generator([p.text for p, _ in chunk], mode, options=options)
        for (p, k), r in zip(chunk, results):
            ok, why = score(r, p)
            samples.append(Sample(p.tag, p.text, mode, k, ok, why, r.nfe, r.nfe_evals,
                                  len(r.images), r.episode is not None, r.hit_cap, r.error, r))
    return samples, time.time() - t0


def summarize(samples: Sequence[Sample]) -> dict:
    scores = geneval.summarize([(s.tag, s.correct) for s in samples])
    n = max(len(samples), 1)
    return {"scores": scores,
            "images": len(samples),
            "nfe_per_image": float(np.mean([s.nfe / max(s.images, 1) for s in samples])) if samples else 0.0,
            "nfe_per_sample": float(np.mean([s.nfe for s in samples])) if samples else 0.0,
            "evals_per_sample": float(np.mean([s.evals for s in samples])) if samples else 0.0,
            "images_per_sample": float(np.mean([s.images for s in samples])) if samples else 0.0,
            "well_formed": sum(s.well_formed for s in samples) / n,
            "hit_cap": sum(s.hit_cap for s in samples) / n}
