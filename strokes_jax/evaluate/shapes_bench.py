"""Shapes-GenEval: a fixed, seeded prompt set in GenEval's six categories (and, on request,
the harder `hard` split, scored apart), several images per prompt, scored by the exact
detector and GenEval's rule engine, for single-pass and process-driven generation with the
same model. Summaries carry 95% bootstrap intervals over prompts (evaluate/intervals.py)."""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import numpy as np

from strokes_jax.evaluate import intervals
from strokes_jax.worlds import geneval
from strokes_jax.inference.generator import Generated, Generator, SamplingOptions
from strokes_jax.worlds import detect, prompts, shapes

MODES = ("single_pass", "process")


HARD = prompts.HARD_TAG


def _distinct(rng: np.random.Generator, tag: str, n: int) -> list[prompts.Prompt]:
    seen: set[str] = set()
    out = []
    for _ in range(n * 50):
        if len(seen) == n:
            break
        p = prompts.sample_prompt(rng, tag)
        if p.text not in seen:
            seen.add(p.text)
            out.append(p)
    return out


def benchmark_prompts(seed: int, per_tag: int, hard: int = 0) -> list[prompts.Prompt]:
    """Distinct prompts per tag from a seed reserved for evaluation, then `hard` distinct
    prompts of the hard split (3 to HARD_MAX_OBJECTS objects, whatever bound training used).
    The hard split draws from its own stream, so asking for it leaves the six categories'
    prompts exactly as they were."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7919]))
    out = [p for tag in shapes.TAGS for p in _distinct(rng, tag, per_tag)]
    if hard:
        out += _distinct(np.random.default_rng(np.random.SeedSequence([seed, 7919, 1])), HARD, hard)
    return out


def config_prompts(eval_config) -> list[prompts.Prompt]:
    """The benchmark prompts an eval config asks for; eval.hard_prompts (absent: 0) adds the
    hard split."""
    return benchmark_prompts(eval_config.seed, eval_config.prompts_per_tag,
                             int(eval_config.get("hard_prompts", 0)))


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
    objects: int = 0  # objects the prompt asks for: the hard split is also read by size

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
                                  len(r.images), r.episode is not None, r.hit_cap, r.error, r,
                                  prompts.object_count(p)))
    return samples, time.time() - t0


def _usage(samples: Sequence[Sample]) -> dict:
    n = max(len(samples), 1)
    mean = lambda xs: float(np.mean(xs)) if samples else 0.0  # noqa: E731
    return {"images": len(samples),
            "nfe_per_image": mean([s.nfe / max(s.images, 1) for s in samples]),
            "nfe_per_sample": mean([s.nfe for s in samples]),
            "evals_per_sample": mean([s.evals for s in samples]),
            "images_per_sample": mean([s.images for s in samples]),
            "well_formed": sum(s.well_formed for s in samples) / n,
            "hit_cap": sum(s.hit_cap for s in samples) / n}


def summarize(samples: Sequence[Sample], resamples: int = intervals.RESAMPLES,
              seed: int = intervals.SEED) -> dict:
    """GenEval's scores over the six categories, with 95% intervals over prompts; the hard
    split's score sits beside them (scores["hard"]), outside the overall, with its own usage
    and, by object count, [score, low, high, prompts] under "hard". Usage figures (NFE,
    images) are the six categories', so asking for the hard split changes none of the
    existing numbers. "per_prompt" keeps the outcomes that paired comparisons resample."""
    six = [s for s in samples if s.tag != HARD]
    hard = [s for s in samples if s.tag == HARD]
    scores = geneval.summarize([(s.tag, s.correct) for s in six])
    out = intervals.outcomes((s.tag, s.prompt, s.correct) for s in samples)
    ivals = intervals.bootstrap(out, shapes.TAGS, resamples, seed)
    if hard:
        scores[HARD] = float(np.mean([s.correct for s in hard]))
    res = {"scores": scores, "intervals": ivals, **_usage(six or hard),
           "bootstrap": {"resamples": resamples, "seed": seed, "level": intervals.LEVEL,
                         "unit": "prompt, resampled within each category"},
           "per_prompt": intervals.rows(out)}
    if hard:
        # Read by size, the sizes training never saw (data.hard_max_objects) stand apart.
        by_size = intervals.outcomes((str(s.objects), s.prompt, s.correct) for s in hard)
        iv = intervals.bootstrap(by_size, (), resamples, seed)
        res["hard"] = {**_usage(hard), "by_objects": {
            k: [float(p.sum() / n.sum()), *iv[k], len(names)]
            for k, (names, p, n) in by_size.items()}}
    return res
