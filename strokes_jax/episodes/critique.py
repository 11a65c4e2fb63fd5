"""Symbolic critiques derived from the scene graph (the paper's ablation "critique derived
symbolically", our stand-in for self-sampled traces).

Two sides, as in the paper's inspect stage:
  image-side  the plan is right (`add X`) but the sketch disagrees with it: X in the wrong
              colour or cell, X missing, or X plus an extra object;
  text-side   the plan itself contradicts the prompt (wrong colour for a coloured clause,
              a cell that breaks a position clause, an object the prompt does not ask for);
              the sketch draws the wrong plan faithfully.
Either way the inspection names one issue and <refine> carries the command that turns the
drawn state into the fixed one; the fixed state is re-drawn and the episode continues from it.
An image-side wrong sketch is context only (no flow loss); a text-side one is a flow target,
since it draws its (wrong) plan right.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from strokes_jax.episodes import episode as ep
from strokes_jax.episodes import trajectories as tr
from strokes_jax.worlds import checker, grammar, prompts, shapes
from strokes_jax.worlds.grammar import Command, Issue, Verdict
from strokes_jax.worlds.prompts import Prompt
from strokes_jax.worlds.shapes import Obj

IMAGE_KINDS = ("image:color", "image:place", "image:missing", "image:extra")
TEXT_KINDS = ("text:color", "text:relation", "text:extra")
KINDS = IMAGE_KINDS + TEXT_KINDS


def _free(scene: Sequence[Obj]) -> list[tuple[int, int]]:
    return shapes.free_cells(scene)


def _critiqued_step(ins: Command, des_state, drawn, verdict: Verdict, refine: Command,
                    fixed) -> ep.Step:
    """A step whose inspection finds `verdict`; asserts the refine really yields `fixed`."""
    got = grammar.parse_command(refine.text()).apply(drawn)
    if got != tuple(fixed):
        raise tr.TrajectoryError(f"refine {refine.text()!r} on {drawn} gives {got}, not {fixed}")
    if grammar.parse_verdict(verdict.text()) != verdict:
        raise tr.TrajectoryError(f"verdict {verdict.text()!r} does not round-trip")
    return ep.Step(sketch=shapes.render(drawn), ins=ins.text(), des=grammar.describe(des_state),
                   inspect=verdict.text(), refine=refine.text(), refined=shapes.render(fixed))


def image_options(kind: str, state: tuple, x: Obj) -> list:
    """The drawn-state perturbations of `add x` on `state` for one image-side kind."""
    intended = state + (x,)
    if kind == "image:color":
        return [x.replace(color=c) for c in shapes.COLORS if c != x.color]
    if kind == "image:place":
        return [x.replace(row=r, col=c) for r, c in _free(intended)]
    if kind == "image:missing":
        return [None]
    if kind == "image:extra":
        return [Obj(s, c, r, col) for s in shapes.SHAPES for c in shapes.COLORS
                for r, col in _free(intended)]
    raise ValueError(f"unknown image-side critique {kind!r}")


def image_step(kind: str, state: tuple, x: Obj, drawn_obj: Obj | None) -> tuple[ep.Step, tuple]:
    """The image-side critiqued step for `add x` on `state`, and the fixed (= intended) state."""
    intended = state + (x,)
    if kind == "image:color":
        drawn = state + (drawn_obj,)
        issue = Issue("color", drawn_obj, color=x.color)
        fix = Command("recolour", drawn_obj, color=x.color)
    elif kind == "image:place":
        drawn = state + (drawn_obj,)
        issue = Issue("place", drawn_obj, cell=x.cell)
        fix = Command("move", drawn_obj, cell=x.cell)
    elif kind == "image:missing":
        drawn, issue, fix = state, Issue("missing", x), Command("add", x)
    elif kind == "image:extra":
        drawn = intended + (drawn_obj,)
        issue, fix = Issue("extra", drawn_obj), Command("remove", drawn_obj)
    else:
        raise ValueError(f"unknown image-side critique {kind!r}")
    step = _critiqued_step(Command("add", x), intended, drawn, Verdict(image_issue=issue), fix,
                           intended)
    # The drawing disagrees with its own plan: as a flow target it would teach drawing the
    # wrong thing for a right plan (the model learns to turn its sketches into blobs; see
    # docs/design.md). It is context for the inspection only, like the model's own drawings
    # in self-critique.
    step.sketch_target = False
    return step, intended


def _only(violations, kind: str, obj: Obj):
    """The single violation of the wrong object, or None if the plan is not wrong that way."""
    if len(violations) == 1 and violations[0].kind == kind and violations[0].obj == obj:
        return violations[0]
    return None


def text_options(kind: str, prompt: Prompt, state: tuple, x: Obj | None,
                 later: Sequence[Obj]) -> list:
    """Wrong plan objects for one text-side kind, each with exactly one partial_check violation.
    `x` is the object the correct plan adds (None when the wrong step is inserted: extra);
    `later` are the objects still to add after the fix, whose cells the fix must not take."""
    out = []
    if kind == "text:color":
        for c in shapes.COLORS:
            w = x.replace(color=c)
            v = c != x.color and _only(prompts.partial_check(state + (w,), prompt)[0], "color", w)
            if v and v.color == x.color:
                out.append(w)
    elif kind == "text:relation":
        blocked = {o.cell for o in later}
        for r, c in _free(state):
            w = x.replace(row=r, col=c)
            v = _only(prompts.partial_check(state + (w,), prompt)[0], "place", w)
            if v and v.cell is not None and v.cell not in blocked:
                out.append(w)
    elif kind == "text:extra":
        for s in shapes.SHAPES:
            for c in shapes.COLORS:
                for r, col in _free(state):
                    w = Obj(s, c, r, col)
                    if _only(prompts.partial_check(state + (w,), prompt)[0], "extra", w):
                        out.append(w)
    else:
        raise ValueError(f"unknown text-side critique {kind!r}")
    return out


def text_step(kind: str, prompt: Prompt, state: tuple, wrong: Obj) -> tuple[ep.Step, tuple]:
    """The text-side critiqued step whose plan adds `wrong`, and the fixed state; the issue and
    fix come from partial_check's Violation, so they match what the checker would say."""
    drawn = state + (wrong,)
    (v,) = prompts.partial_check(drawn, prompt)[0]
    if kind not in ("text:color", "text:relation", "text:extra"):
        raise ValueError(f"unknown text-side critique {kind!r}")
    try:
        issue, fix = checker.violation_fix(v)
    except checker.Unfixable as e:
        raise tr.TrajectoryError(str(e)) from e
    fixed = fix.apply(drawn)
    if prompts.partial_check(fixed, prompt)[0]:
        raise tr.TrajectoryError(f"fix {fix.text()!r} leaves violations in {fixed}")
    step = _critiqued_step(Command("add", wrong), drawn, drawn, Verdict(plan_issue=issue), fix,
                           fixed)
    return step, fixed


def applicable(prompt: Prompt, scene: Sequence[Obj]) -> dict[str, list[tuple[int, list]]]:
    """kind -> [(position, options)]: position i replaces the add of scene[i] (or, for
    text:extra, inserts a wrong step after the first i adds)."""
    scene = tuple(scene)
    out: dict[str, list[tuple[int, list]]] = {k: [] for k in KINDS}
    for i in range(len(scene) + 1):
        state = scene[:i]
        if i < len(scene):
            for k in IMAGE_KINDS:
                out[k].append((i, image_options(k, state, scene[i])))
            for k in ("text:color", "text:relation"):
                opts = text_options(k, prompt, state, scene[i], scene[i + 1:])
                if opts:
                    out[k].append((i, opts))
        opts = text_options("text:extra", prompt, state, None, scene[i:])
        if opts:
            out["text:extra"].append((i, opts))
    return {k: v for k, v in out.items() if v}


def critique_episode(rng: np.random.Generator, id: str, prompt: Prompt, scene: Sequence[Obj],
                     kind: str | None = None, return_final: bool = False):
    """An additive episode with one critiqued step. The side (image / text) is drawn uniformly
    among those that apply, then the kind within the side, then the step and the wrong object,
    so rarer kinds (text:relation exists only in position prompts) are not drowned out.
    `kind` forces one (for tests). With return_final, returns (episode, final state)."""
    scene = tuple(scene)
    tr.check_path(tr.additive_steps(scene), prompt, scene)
    app = applicable(prompt, scene)
    if kind is None:
        sides = sorted({k.split(":")[0] for k in app})
        side = sides[int(rng.integers(len(sides)))]
        kinds = [k for k in KINDS if k in app and k.startswith(side)]
        kind = kinds[int(rng.integers(len(kinds)))]
    elif kind not in app:
        raise ValueError(f"critique {kind!r} does not apply to {prompt.text!r}; "
                         f"applicable: {sorted(app)}")
    i, opts = app[kind][int(rng.integers(len(app[kind])))]
    choice = opts[int(rng.integers(len(opts)))]
    if kind in IMAGE_KINDS:
        step, fixed = image_step(kind, scene[:i], scene[i], choice)
        rest = scene[i + 1:]
    else:
        step, fixed = text_step(kind, prompt, scene[:i], choice)
        rest = scene[i:] if kind == "text:extra" else scene[i + 1:]
    prefix = tr.additive_steps(scene[:i])
    suffix = tr.additive_steps(rest)
    # The fixed state may differ from `scene` (a relation fix takes partial_check's first valid
    # cell), so the tail is checked against the prompt, not against the sampled scene.
    after = tr.states(suffix, fixed)
    if tr.violations_along(after, prompt):
        raise tr.TrajectoryError(f"{prompt.text!r}: the tail after the critique has violations")
    final = after[-1] if after else fixed
    ok, why = prompts.check_scene(final, prompt)
    if not ok:
        raise tr.TrajectoryError(f"{prompt.text!r}: critique episode ends wrong ({why})")
    steps = tr.plan_steps(prefix) + [step] + tr.plan_steps(suffix, fixed)
    e = ep.Episode(id=id, prompt=prompt.text, tag=prompt.tag, metadata=prompt.metadata,
                   steps=steps, kind="critique")
    return (e, final) if return_final else e


def critique_kind(step: ep.Step) -> str | None:
    """The critique kind of a step from its verdict text (None for a positive inspection)."""
    if step.inspect is None:
        return None
    v = grammar.parse_verdict(step.inspect)
    if v.image_issue is not None:
        return f"image:{v.image_issue.kind}"
    if v.plan_issue is not None:
        return f"text:{v.plan_issue.kind}"
    return None
