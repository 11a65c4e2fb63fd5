"""How well the model inspects its own steps: every <inspect> verdict of the process-driven
samples against the exact checker's verdict on the same step.

Truth per step (worlds/checker.py, the same rules as self-sampled critiques):
  plan side   the step's scene description contradicts the prompt (prompts.partial_check);
  image side  the detected drawing differs from the description.
A step is right when both sides are. The model's verdict is right on the ok / wrong call when
it says ok exactly for the right steps; `exact` also asks for the checker's issue word for
word, where the checker can name one (a drawing that differs in one way).

A false alarm is what costs a process-driven model most: its <refine> redraws a right
canvas. A miss leaves a wrong one.
"""

from __future__ import annotations

import collections
from typing import Sequence

from strokes_jax.worlds import checker, grammar, prompts


def confusion(samples: Sequence, bench: Sequence[prompts.Prompt]) -> dict:
    """Counts and rates over every inspected step of the process-mode samples."""
    by_text = {p.text: p for p in bench}
    n = collections.Counter()
    for s in samples:
        e = s.result.episode
        if s.mode != "process" or e is None:
            continue
        prompt = by_text[s.prompt]
        for step in e.steps:
            if step.inspect is None or step.sketch is None:
                continue
            truth, want = checker.expected_verdict(step, prompt)
            if truth not in ("ok", "plan_wrong", "image_wrong"):
                n[truth] += 1
                continue
            if truth != "ok":
                n[truth] += 1
                truth = "wrong"
            try:
                said = grammar.parse_verdict(step.inspect)
            except grammar.GrammarError:
                n["unparseable_verdict"] += 1
                continue
            n[f"{truth}_said_{'ok' if said.ok else 'wrong'}"] += 1
            if want is not None:
                n["exact_checked"] += 1
                n["exact"] += said == want
    right, wrong = n["ok_said_ok"] + n["ok_said_wrong"], n["wrong_said_wrong"] + n["wrong_said_ok"]
    rate = lambda a, b: (a / b) if b else None  # noqa: E731
    # Steps the checker cannot judge (a plan that does not parse, two objects in one cell,
    # a verdict that does not parse) are left out of the rates, but counted.
    judged = {"ok_said_ok", "ok_said_wrong", "wrong_said_ok", "wrong_said_wrong",
              "exact_checked", "exact", "plan_wrong", "image_wrong"}
    skipped = sum(v for k, v in n.items() if k not in judged)
    return {"counts": dict(n), "steps_right": right, "steps_wrong": wrong,
            "steps_not_judged": skipped,
            "false_alarm_rate": rate(n["ok_said_wrong"], right),
            "miss_rate": rate(n["wrong_said_ok"], wrong),
            "call_accuracy": rate(n["ok_said_ok"] + n["wrong_said_wrong"], right + wrong),
            "exact_accuracy": rate(n["exact"], n["exact_checked"])}


def line(c: dict) -> str:
    """One sentence for tables and logs."""
    pct = lambda v: "n/a" if v is None else f"{100 * v:.0f}%"  # noqa: E731
    skipped = c.get("steps_not_judged", 0)
    return (f"{c['steps_right'] + c['steps_wrong']} inspected steps ({c['steps_wrong']} wrong"
            + (f"; {skipped} more not judged" if skipped else "") + "): "
            f"false alarms {pct(c['false_alarm_rate'])}, misses {pct(c['miss_rate'])}, "
            f"verdict exact {pct(c['exact_accuracy'])}")
