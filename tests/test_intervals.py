"""Bootstrap intervals over prompts in every Shapes-GenEval table: they hold the point
estimate, narrow with more prompts, collapse when every image passes, repeat with the seed,
and a paired comparison of a row with itself is exactly zero."""

from __future__ import annotations

import numpy as np
import pytest

from strokes_jax.evaluate import intervals, report, reproduce, shapes_bench
from strokes_jax.worlds import geneval, prompts, shapes


def _results(copies: int = 1, seed: int = 0, rate: float = 0.7, images: int = 2):
    """(tag, prompt, passed) per image: 6 prompts per category, `copies` times over."""
    rng = np.random.default_rng(seed)
    return [(tag, f"{tag} {k}", bool(rng.random() < rate))
            for tag in shapes.TAGS for k in range(6 * copies) for _ in range(images)]


def _samples(bench, passed, images: int = 2):
    return [shapes_bench.Sample(p.tag, p.text, "process", k, bool(passed(p, k)), "", 20, 20, 1,
                                True, False, None, None, prompts.object_count(p))
            for p in bench for k in range(images)]


def test_intervals_hold_the_point_estimate_and_overall_is_the_mean_of_categories():
    res = _results()
    out = intervals.outcomes(res)
    iv = intervals.bootstrap(out, shapes.TAGS)
    point = geneval.summarize([(t, ok) for t, _, ok in res])
    assert set(iv) == set(point)
    for k, (lo, hi) in iv.items():
        assert lo <= point[k] <= hi, k
    # the statistic resampled is GenEval's overall: the mean of the category means
    stats = intervals._stats(out, shapes.TAGS, 100, 0)
    assert stats["overall"][0] == pytest.approx(point["overall"])
    assert np.allclose(stats["overall"][1], np.mean([stats[t][1] for t in shapes.TAGS], axis=0))


def test_intervals_shrink_with_more_prompts():
    def width(copies):
        iv = intervals.bootstrap(intervals.outcomes(_results(copies)), shapes.TAGS)
        return iv["overall"][1] - iv["overall"][0]
    assert width(16) < width(4) < width(1)


def test_all_pass_is_degenerate_and_the_seed_repeats():
    res = _results(rate=1.0)
    assert all(v == [1.0, 1.0] for v in intervals.bootstrap(intervals.outcomes(res),
                                                               shapes.TAGS).values())
    out = intervals.outcomes(_results())
    assert intervals.bootstrap(out, shapes.TAGS, seed=3) == intervals.bootstrap(out, shapes.TAGS, seed=3)
    assert intervals.bootstrap(out, shapes.TAGS, seed=3) != intervals.bootstrap(out, shapes.TAGS, seed=4)
    # sample order does not matter: prompts line up by name
    assert intervals.bootstrap(intervals.outcomes(reversed(_results())), shapes.TAGS) == \
        intervals.bootstrap(out, shapes.TAGS)


def test_a_category_interval_does_not_depend_on_the_others():
    out = intervals.outcomes(_results())
    alone = intervals.bootstrap({"counting": out["counting"]}, shapes.TAGS)
    assert alone["counting"] == intervals.bootstrap(out, shapes.TAGS)["counting"]


def test_paired_difference():
    a = intervals.outcomes(_results(seed=0))
    d = intervals.paired_difference(a, a, shapes.TAGS)
    assert all(v == [0.0, 0.0, 0.0] for v in d.values())
    b = intervals.outcomes(_results(seed=1, rate=0.2))
    d = intervals.paired_difference(a, b, shapes.TAGS)
    iv_a, iv_b = intervals.bootstrap(a, shapes.TAGS), intervals.bootstrap(b, shapes.TAGS)
    assert d["overall"][1] <= d["overall"][0] <= d["overall"][2]
    assert d["overall"][0] == pytest.approx(
        intervals._stats(a, shapes.TAGS, 1, 0)["overall"][0]
        - intervals._stats(b, shapes.TAGS, 1, 0)["overall"][0])
    assert iv_a["overall"][0] > iv_b["overall"][1] and d["overall"][1] > 0
    # JSON rows round-trip; other prompts cannot be paired
    assert intervals.paired_difference(intervals.from_rows(intervals.rows(a)), a, shapes.TAGS) == \
        intervals.paired_difference(a, a, shapes.TAGS)
    other = intervals.outcomes([(t, p + "!", ok) for t, p, ok in _results()])
    with pytest.raises(ValueError, match="different prompts"):
        intervals.paired_difference(a, other, shapes.TAGS)


def test_formatting():
    assert intervals.fmt(0.9917, [0.98, 1.0], 3) == "0.992 [0.98, 1.00]"
    assert intervals.fmt(0.5, None) == "0.50" and intervals.fmt(None, None) == "-"
    assert intervals.fmt_difference([0.925, 0.871, 0.98]) == "+0.925 [+0.87, +0.98]"


def test_summary_keeps_the_six_and_adds_the_hard_split_apart():
    six = shapes_bench.benchmark_prompts(1234, 3)
    both = shapes_bench.benchmark_prompts(1234, 3, hard=6)
    assert [p.text for p in both[:len(six)]] == [p.text for p in six]
    assert [p.tag for p in both[len(six):]] == [prompts.HARD_TAG] * 6

    def passed(p, k):
        return k == 0 or p.tag == "counting"
    plain = shapes_bench.summarize(_samples(six, passed))
    full = shapes_bench.summarize(_samples(both, lambda p, k: p.tag != prompts.HARD_TAG and passed(p, k)))
    assert full["scores"][prompts.HARD_TAG] == 0.0
    # the hard split is not in overall
    assert {k: v for k, v in full["scores"].items() if k != prompts.HARD_TAG} == plain["scores"]
    assert {k: full["intervals"][k] for k in plain["intervals"]} == plain["intervals"]
    assert full["intervals"][prompts.HARD_TAG] == [0.0, 0.0]
    assert full["nfe_per_sample"] == plain["nfe_per_sample"] and full["images"] == plain["images"]
    by = full["hard"]["by_objects"]
    assert sum(v[3] for v in by.values()) == 6 and all(3 <= int(k) <= 6 for k in by)

    table = report.score_table({"process": full, "single_pass": plain})
    head, _, row, row2 = table.split("\n")
    assert head.split(" | ")[7:9] == ["overall", "hard"]
    cells = row.split(" | ")
    assert cells[7] == intervals.fmt(full["scores"]["overall"], full["intervals"]["overall"], 3)
    assert cells[8] == "0.00 [0.00, 0.00]" and "[" in cells[1] and row2.split(" | ")[8] == "-"
    assert "not part of overall" in report.interval_note({"process": full})
    assert report.interval_note({"process": {"scores": {}}}) == ""


def test_reproduction_table_shows_intervals_and_paired_differences():
    bench = shapes_bench.benchmark_prompts(1234, 3, hard=3)
    rows = {}
    for row, rate in (("single_pass", 0.0), ("additive", 1.0), ("self_critique", 1.0)):
        s = shapes_bench.summarize(_samples(bench, lambda p, k, r=rate: r > 0))
        rows[row] = dict(s, mode="process", episodes=8, wall_s=1.0)
    out = {"commit": "abc", "config": "c", "device": {"device_kind": "cpu", "cpu_count": 2},
           "steps_per_row": 4, "rows": rows}
    table = reproduce.table(out)
    assert "| overall | hard |" in table and "| 1.000 [1.00, 1.00] | 1.00 [1.00, 1.00] |" in table
    assert "- additive - single_pass: overall +1.000 [+1.00, +1.00]; hard +1.000" in table
    assert "- self_critique - single_pass: overall +1.000" in table
    rows["additive"] = {k: v for k, v in rows["additive"].items() if k != "per_prompt"}
    assert "- additive - single_pass: not paired" in reproduce.table(out)
