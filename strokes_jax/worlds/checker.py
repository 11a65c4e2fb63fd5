"""The exact checker of the shapes world, the one source of truth for inspection: what a
drawing shows (the detector's objects on the grid), how a plan's scene description stands
against the prompt (text side) and how the drawing stands against the plan (image side), and
the single fix that repairs a step. Self-sampled critiques and the inspection scores both
ask it.

  text side   the plan's scene description against the full prompt (prompts.partial_check:
              "not drawn yet" is fine, a contradiction is an error);
  image side  the detected drawing against the plan's description.
"""

from __future__ import annotations

from typing import Sequence

from strokes_jax.worlds import detect, grammar, prompts, shapes
from strokes_jax.worlds.grammar import Command, Issue, Verdict
from strokes_jax.worlds.shapes import Obj


class Unfixable(ValueError):
    """A violation that no single command repairs (e.g. no free cell satisfies a relation)."""


def drawn_scene(image) -> tuple[Obj, ...] | None:
    """The detected objects as grid objects (cell from the box centre); None when two
    detections share a cell, which no plan can describe."""
    objs = []
    for d in detect.detect(image):
        cx, cy = (d.box[0] + d.box[2]) / 2, (d.box[1] + d.box[3]) / 2
        r, c = int(cy // shapes.CELL), int(cx // shapes.CELL)
        if not (0 <= r < shapes.GRID and 0 <= c < shapes.GRID):
            return None
        objs.append(Obj(d.cls, d.color, r, c))
    if len({o.cell for o in objs}) != len(objs):
        return None
    return tuple(objs)


def image_issue(drawn: Sequence[Obj], planned: Sequence[Obj]) -> tuple[Issue, Command] | None:
    """The single difference between what was drawn and what the plan describes, as the
    checker's issue and the refine command that turns `drawn` into `planned`. None when they
    match; ValueError when they differ in more than one way (one <refine> fixes one thing)."""
    extra = [o for o in drawn if o not in planned]
    missing = [o for o in planned if o not in drawn]
    if not extra and not missing:
        return None
    if len(extra) == 1 and len(missing) == 1:
        e, m = extra[0], missing[0]
        if e.shape == m.shape and e.cell == m.cell:
            return Issue("color", e, color=m.color), Command("recolour", e, color=m.color)
        if e.shape == m.shape and e.color == m.color and m.cell not in {o.cell for o in drawn}:
            return Issue("place", e, cell=m.cell), Command("move", e, cell=m.cell)
    if len(extra) + len(missing) == 1:
        if missing:
            return Issue("missing", missing[0]), Command("add", missing[0])
        return Issue("extra", extra[0]), Command("remove", extra[0])
    raise ValueError(f"drawing differs from the plan in {len(extra) + len(missing)} ways")


def check_step(planned: Sequence[Obj], drawn: Sequence[Obj], prompt: prompts.Prompt):
    """The exact checker on one step: (side, verdict, fix, why). side is 'ok', 'plan' (the
    description contradicts the prompt) or 'image' (the drawing differs from it); verdict and
    fix are None, and why says so ('multi_error' | 'unfixable'), when no single issue can be
    named and fixed. Shared by self-sampled critiques and the inspection scoring."""
    violations, _ = prompts.partial_check(planned, prompt)
    if violations:
        if len(violations) > 1:
            return "plan", None, None, "multi_error"
        try:
            issue, fix = violation_fix(violations[0])
        except Unfixable:
            return "plan", None, None, "unfixable"
        return "plan", Verdict(plan_issue=issue), fix, None
    try:
        found = image_issue(drawn, planned)
    except ValueError:
        return "image", None, None, "multi_error"
    if found is None:
        return "ok", Verdict(), None, None
    return "image", Verdict(image_issue=found[0]), found[1], None


def violation_fix(v: prompts.Violation) -> tuple[Issue, Command]:
    """What the checker says about a partial_check violation, and the command that fixes it."""
    if v.kind == "color":
        return Issue("color", v.obj, color=v.color), Command("recolour", v.obj, color=v.color)
    if v.kind == "place":
        if v.cell is None:
            raise Unfixable(f"no free cell puts {v.obj} {v.relation} {v.other}")
        return (Issue("relation", v.obj, relation=v.relation, other=v.other),
                Command("move", v.obj, cell=v.cell))
    if v.kind == "extra":
        return Issue("extra", v.obj), Command("remove", v.obj)
    raise ValueError(f"unknown violation kind {v.kind!r}")


def expected_verdict(step, prompt: prompts.Prompt) -> tuple[str, Verdict | None]:
    """('ok' | 'plan_wrong' | 'image_wrong' | skip reason, the checker's verdict where it can
    name one)."""
    try:
        planned = grammar.parse_description(step.des)
    except grammar.GrammarError:
        return "unparseable_plan", None
    drawn = drawn_scene(step.sketch)
    if drawn is None:
        return "undetectable", None
    side, verdict, _, _ = check_step(planned, drawn, prompt)
    return ("ok" if side == "ok" else f"{side}_wrong"), verdict
