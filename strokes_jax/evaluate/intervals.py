"""95% bootstrap intervals for Shapes-GenEval scores, over prompts.

The unit resampled is the prompt, not the image: a prompt's images share its difficulty, so
resampling images would pretend they are independent and make the intervals too narrow.
Prompts are resampled with replacement within each category (stratified), each keeping all
its images, and the statistic recomputed exactly as the point estimate is: a category's
accuracy over images, and GenEval's overall as the plain mean of the category accuracies
(geneval.summarize). The interval is the percentile one.

Each category draws from its own generator, seeded by (seed, category name): a category's
interval does not depend on which other categories are present, so adding the hard split
leaves the six categories' intervals as they were. A paired comparison of two rows scored
on the same prompts reuses the same draws for both, so their difference's interval leaves
out the prompt-to-prompt variation they share.
"""

from __future__ import annotations

import zlib
from typing import Iterable, Mapping, Sequence

import numpy as np

RESAMPLES = 2000
SEED = 0
LEVEL = 0.95

# tag -> (prompt texts, sorted; passes per prompt; images per prompt)
Outcomes = Mapping[str, tuple[tuple[str, ...], np.ndarray, np.ndarray]]


def outcomes(results: Iterable[tuple[str, str, bool]]) -> dict:
    """(tag, prompt, passed) per image -> Outcomes."""
    tally: dict[tuple[str, str], list[int]] = {}
    for tag, prompt, ok in results:
        t = tally.setdefault((tag, prompt), [0, 0])
        t[0] += bool(ok)
        t[1] += 1
    return from_rows([[tag, p, k, n] for (tag, p), (k, n) in tally.items()])


def from_rows(per_prompt: Iterable[Sequence]) -> dict:
    """Outcomes from per-prompt rows [tag, prompt, passes, images] (the JSON form summaries
    keep, see rows()). Prompts are sorted so that two rows over the same prompts line up
    index for index, whatever order their samples came in."""
    tally: dict[str, dict[str, tuple[int, int]]] = {}
    for tag, prompt, passes, images in per_prompt:
        tally.setdefault(tag, {})[prompt] = (int(passes), int(images))
    out = {}
    for tag in sorted(tally):
        names = tuple(sorted(tally[tag]))
        counts = np.array([tally[tag][p] for p in names], np.int64).reshape(-1, 2)
        out[tag] = (names, counts[:, 0], counts[:, 1])
    return out


def rows(out: Outcomes) -> list[list]:
    """Outcomes as JSON-able per-prompt rows [tag, prompt, passes, images]."""
    return [[tag, p, int(k), int(n)] for tag, (names, passes, images) in out.items()
            for p, k, n in zip(names, passes, images)]


def _draws(passes: np.ndarray, images: np.ndarray, tag: str, resamples: int,
           seed: int) -> np.ndarray:
    """The category's accuracy over images under `resamples` resamplings of its prompts."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(tag.encode())]))
    idx = rng.integers(0, len(passes), size=(resamples, len(passes)))
    return passes[idx].sum(axis=1) / images[idx].sum(axis=1)


def _stats(out: Outcomes, overall_tags: Sequence[str], resamples: int,
           seed: int) -> dict[str, tuple[float, np.ndarray]]:
    """stat -> (point estimate, bootstrap draws) for every category and the overall."""
    res = {tag: (float(p.sum() / n.sum()), _draws(p, n, tag, resamples, seed))
           for tag, (_, p, n) in out.items()}
    present = [t for t in overall_tags if t in res]
    if present:
        res["overall"] = (float(np.mean([res[t][0] for t in present])),
                          np.mean([res[t][1] for t in present], axis=0))
    return res


def _percentile(draws: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap(out: Outcomes, overall_tags: Sequence[str], resamples: int = RESAMPLES,
              seed: int = SEED, level: float = LEVEL) -> dict[str, list[float]]:
    """stat -> [low, high] for every category and "overall" (the mean over the categories
    of `overall_tags` that are present; the others get intervals but stay out of it)."""
    return {k: list(_percentile(d, level))
            for k, (_, d) in _stats(out, overall_tags, resamples, seed).items()}


def paired_difference(a: Outcomes, b: Outcomes, overall_tags: Sequence[str],
                      resamples: int = RESAMPLES, seed: int = SEED,
                      level: float = LEVEL) -> dict[str, list[float]]:
    """stat -> [a - b, low, high]: the difference of two rows scored on the same prompts,
    each resample drawing the same prompts for both. Raises if the prompts differ, since
    unpaired rows would need an unpaired comparison."""
    if {t: v[0] for t, v in a.items()} != {t: v[0] for t, v in b.items()}:
        raise ValueError("paired comparison of rows scored on different prompts")
    sa = _stats(a, overall_tags, resamples, seed)
    sb = _stats(b, overall_tags, resamples, seed)
    return {k: [sa[k][0] - sb[k][0], *_percentile(sa[k][1] - sb[k][1], level)] for k in sa}


def fmt(value: float, interval: Sequence[float] | None, digits: int = 2) -> str:
    """"0.992 [0.98, 1.00]"; the bare value when there is no interval (older results)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    s = f"{value:.{digits}f}"
    return s if not interval else f"{s} [{interval[0]:.2f}, {interval[1]:.2f}]"


def fmt_difference(d: Sequence[float]) -> str:
    """"+0.925 [0.87, 0.98]" for a paired_difference entry."""
    return f"{d[0]:+.3f} [{d[1]:+.2f}, {d[2]:+.2f}]"
