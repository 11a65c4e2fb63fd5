"""Error injection: does the model's inspection catch a mistake it did not make, and does its
refinement repair it?

A model that draws well makes few mistakes of its own, so its traces say little about the
critique half of the method. Here every benchmark prompt is generated twice with the same
noise: once as it is (the baseline), once with one known mistake put in at iteration `at`:

  image:color / image:place / image:missing / image:extra
      the model's own plan stands; its sketch is replaced by the exact render of that plan
      drawn wrong (critique.py's kinds: the planned object in another colour or cell, left
      out, or drawn with one more object);
  text:color / text:relation / text:extra
      the plan is imposed, token by token, as one that contradicts the prompt (the baseline's
      planned object in a colour or cell the prompt forbids, or an object it does not ask
      for); the model then draws that plan itself.

The model goes on from there as from its own work: inspect, refine, continue. Per kind:

  caught    the inspection after the mistake names an issue on the mistake's side
  repaired  a refined image follows, and it is what the step should have been: the plan
            (image side), or a state the prompt allows so far (text side)
  correct   the episode's final image passes the prompt (GenEval's rules)
  extra NFE NFE of the injected episode minus the baseline's, same prompt and noise

Rates are over the episodes where a mistake could be put in (the model reached iteration
`at` with a parseable `add` plan, and the kind has an option there); the rest are counted as
`not_injected` with the reason. Final accuracy carries a 95% bootstrap interval over prompts.
Models trained without critiques are the control: they have no reason to refine anything.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Sequence

import numpy as np

from strokes_jax.episodes import critique
from strokes_jax.episodes.episode import plan_text
from strokes_jax.evaluate import intervals, shapes_bench
from strokes_jax.inference.generator import PLAN_RE
from strokes_jax.worlds import checker, grammar, pictures, prompts, shapes
from strokes_jax.worlds.shapes import Obj

KINDS = critique.KINDS


class InjectionError(ValueError):
    pass


def check_kinds(kinds: Sequence[str], key: str = "eval.inject_kinds") -> tuple[str, ...]:
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise InjectionError(f"config key {key}: unknown kind(s) {bad}; known: {list(KINDS)}")
    return tuple(kinds)


def read_plan(ins: str, des: str) -> tuple[tuple[Obj, ...], Obj] | None:
    """(the state before the plan, the object it adds) for an `add` plan whose description
    is that state plus the object; None for anything else (a plan this cannot build on)."""
    try:
        cmd, planned = grammar.parse_command(ins), grammar.parse_description(des)
    except grammar.GrammarError:
        return None
    if cmd.op != "add" or cmd.obj not in planned:
        return None
    before = tuple(o for o in planned if o != cmd.obj)
    return (before, cmd.obj) if len(before) == len(planned) - 1 else None


def wrong_drawing(kind: str, before: tuple, x: Obj, rng: np.random.Generator):
    """The drawn state of `add x` on `before` made wrong one way, or None if it cannot be."""
    options = critique.image_options(kind, before, x)
    if not options:
        return None
    choice = options[int(rng.integers(len(options)))]
    if kind == "image:missing":
        return before
    if kind == "image:extra":
        return before + (x, choice)
    return before + (choice,)


def wrong_plan(kind: str, prompt: prompts.Prompt, before: tuple, x: Obj,
               rng: np.random.Generator) -> str | None:
    """The text of a plan on `before` that contradicts the prompt one way (in place of
    `add x`, or for text:extra an object the prompt does not ask for), or None."""
    options = critique.text_options(kind, prompt, before, None if kind == "text:extra" else x, ())
    if not options:
        return None
    w = options[int(rng.integers(len(options)))]
    return plan_text(grammar.Command("add", w).text(), grammar.describe(before + (w,)))


class Injector:
    """generator.Injector for one batch: one kind, at iteration `at`, per example i."""

    def __init__(self, kind: str, at: int, bench: Sequence[prompts.Prompt], baseline,
                 seed: int):
        self.kind, self.at, self.bench = kind, at, list(bench)
        self.rngs = [np.random.default_rng([seed, 4711, i]) for i in range(len(bench))]
        self.what: dict[int, dict] = {}  # i -> what was put in
        self.plans: dict[int, str] = {}
        if kind in critique.TEXT_KINDS:
            for i, (p, b) in enumerate(zip(bench, baseline)):
                step = _step(b.episode, at)
                got = step and read_plan(step.ins, step.des)
                if got:
                    text = wrong_plan(kind, p, *got, self.rngs[i])
                    if text:
                        self.plans[i] = text

    def plan(self, i: int, k: int) -> str | None:
        if k != self.at or i not in self.plans:
            return None
        self.what[i] = {"plan": self.plans[i]}
        return self.plans[i]

    def sketch(self, i: int, k: int, plan: str, img: np.ndarray) -> np.ndarray | None:
        if k != self.at or self.kind not in critique.IMAGE_KINDS:
            return None
        m = PLAN_RE.fullmatch(plan.strip())
        got = m and read_plan(m.group(1).strip(), m.group(2).strip())
        if not got:
            return None
        before, x = got
        drawn = wrong_drawing(self.kind, before, x, self.rngs[i])
        if drawn is None:
            return None
        self.what[i] = {"planned": before + (x,), "drawn": drawn}
        canvas = shapes.render(drawn)
        size = np.asarray(img).shape[0]
        return canvas if size == shapes.CANVAS else pictures.to_picture(canvas, size)


def _step(episode, at: int):
    if episode is None or len(episode.steps) <= at or episode.steps[at].ins is None:
        return None
    return episode.steps[at]


def outcome(kind: str, at: int, prompt: prompts.Prompt, result, what: dict | None) -> dict:
    """One injected episode read by the exact checker."""
    ok, _ = shapes_bench.score(result, prompt)
    out = {"caught": False, "repaired": False, "correct": bool(ok), "nfe": int(result.nfe)}
    step = _step(result.episode, at)
    if step is None:  # the stream broke down after the mistake
        return out
    try:
        verdict = grammar.parse_verdict(step.inspect) if step.inspect else None
    except grammar.GrammarError:
        verdict = None
    image_side = kind in critique.IMAGE_KINDS
    if verdict is not None:
        out["caught"] = (verdict.image_issue if image_side else verdict.plan_issue) is not None
    if step.refined is not None:
        fixed = checker.drawn_scene(step.refined)
        if fixed is not None and image_side:
            out["repaired"] = set(fixed) == set(what["planned"])
        elif fixed is not None:
            out["repaired"] = not prompts.partial_check(fixed, prompt)[0]
    return out


def run(generator, bench: Sequence[prompts.Prompt], kinds: Sequence[str], at: int,
        batch_size: int, seed: int, on_result=None) -> dict:
    """Baseline and injected generation of every prompt, per kind; returns the summary
    (rates per kind, with the baseline's accuracy on the same prompts) and the rows.
    on_result(row, generated) sees every injected episode (for filmstrips)."""
    check_kinds(kinds)
    rows, base_rows = [], []
    for b in range(0, len(bench), batch_size):
        chunk = list(bench[b:b + batch_size])
        texts = [p.text for p in chunk]
        base = generator(texts, "process", rng=np.random.default_rng([seed, b]))
        for p, r in zip(chunk, base):
            base_rows.append({"tag": p.tag, "prompt": p.text,
                              "correct": shapes_bench.score(r, p)[0], "nfe": r.nfe})
        for kind in kinds:
            inj = Injector(kind, at, chunk, base, seed + b)
            got = generator(texts, "process", rng=np.random.default_rng([seed, b]), inject=inj)
            for i, (p, r, br) in enumerate(zip(chunk, got, base_rows[-len(chunk):])):
                row = {"kind": kind, "tag": p.tag, "prompt": p.text}
                if i not in inj.what:
                    row["not_injected"] = _why_not(kind, at, base[i])
                else:
                    row.update(outcome(kind, at, p, r, inj.what[i]))
                    row["extra_nfe"] = row["nfe"] - br["nfe"]
                    row["injected"] = {k: _words(v) for k, v in inj.what[i].items()}
                    if on_result is not None:
                        on_result(row, r)
                rows.append(row)
    return {"at": at, "kinds": summarize(rows, base_rows), "rows": rows,
            "baseline": {"correct": float(np.mean([r["correct"] for r in base_rows])),
                         "prompts": len(base_rows)}}


def _why_not(kind: str, at: int, base) -> str:
    step = _step(base.episode, at)
    if step is None:
        return f"no plan at iteration {at}"
    if read_plan(step.ins, step.des) is None:
        return "plan is not an add on its description"
    return "no option of this kind there"


def _words(v):
    if isinstance(v, str):
        return v
    return grammar.describe(v) if v else "empty"


def summarize(rows: Sequence[dict], base_rows: Sequence[dict]) -> dict:
    by_kind = collections.defaultdict(list)
    for r in rows:
        by_kind[r["kind"]].append(r)
    base = {r["prompt"]: r for r in base_rows}
    out = {}
    for kind, rs in by_kind.items():
        done = [r for r in rs if "not_injected" not in r]
        skipped = collections.Counter(r["not_injected"] for r in rs if "not_injected" in r)
        mean = lambda key: float(np.mean([r[key] for r in done])) if done else None  # noqa: E731
        res = {"injected": len(done), "not_injected": dict(skipped), "caught": mean("caught"),
               "repaired": mean("repaired"), "correct": mean("correct"),
               "extra_nfe": mean("extra_nfe")}
        if done:
            inj = intervals.outcomes((kind, r["prompt"], r["correct"]) for r in done)
            res["correct_interval"] = list(intervals.bootstrap(inj, ())[kind])
            res["baseline_correct"] = float(np.mean([base[r["prompt"]]["correct"] for r in done]))
        out[kind] = res
    return out


def side_summary(summary: dict) -> dict:
    """Image-side and text-side rates, pooled over kinds (weighted by injected episodes)."""
    out = {}
    for side, ks in (("image", critique.IMAGE_KINDS), ("text", critique.TEXT_KINDS)):
        rs = [summary["kinds"][k] for k in ks if summary["kinds"].get(k, {}).get("injected")]
        n = sum(r["injected"] for r in rs)
        if n:
            out[side] = {key: sum(r[key] * r["injected"] for r in rs) / n
                         for key in ("caught", "repaired", "correct", "extra_nfe")}
            out[side]["injected"] = n
    return out


def line(summary: dict) -> str:
    pct = lambda v: "n/a" if v is None else f"{100 * v:.0f}%"  # noqa: E731
    parts = [f"{side} errors at iteration {summary['at']} ({s['injected']}): caught "
             f"{pct(s['caught'])}, repaired {pct(s['repaired'])}, final {pct(s['correct'])}, "
             f"+{s['extra_nfe']:.1f} NFE" for side, s in side_summary(summary).items()]
    return "injected mistakes: " + ("; ".join(parts) if parts else "none could be put in")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What eval.inject_kinds / eval.inject_at ask of an evaluation."""

    kinds: tuple[str, ...]
    at: int

    @classmethod
    def from_config(cls, ec) -> "Plan":
        return cls(check_kinds(tuple(ec.get("inject_kinds", ()))), int(ec.get("inject_at", 0)))


def table(payload: dict) -> str:
    """Per kind: injected, caught, repaired, final accuracy [95%], baseline, extra NFE."""
    pct = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    lines = [f"| kind (at iteration {payload['at']}) | injected | caught | repaired | final "
             "| baseline | extra NFE |", "|---|---|---|---|---|---|---|"]
    for kind, k in payload["kinds"].items():
        final = intervals.fmt(k["correct"], k.get("correct_interval"))
        nfe = "-" if k["extra_nfe"] is None else f"{k['extra_nfe']:+.1f}"
        lines.append(f"| {kind} | {k['injected']} | {pct(k['caught'])} | {pct(k['repaired'])} "
                     f"| {final} | {pct(k.get('baseline_correct'))} | {nfe} |")
    return "\n".join(lines)
