"""Self-sampled critiques (the paper's key data idea): the trained model samples its own
plans and sketches on training prompts, the exact checker inspects each step, and the
verdicts become new training episodes.

For each generated step, both kinds of inspection:
  text side   the plan's scene description against the full prompt (prompts.partial_check:
              "not drawn yet" is fine, a contradiction is an error);
  image side  the detected drawing against the plan's description.
The first wrong step of a trace becomes a negative episode: the model's own trace up to it
(its plans, its drawings as context-only sketches), the checker's verdict, a <refine> fix and
the exactly rendered corrected state, then the additive completion to the prompt's scene.
A trace whose steps are all right becomes a positive episode ("plan ok ; image ok" at every
step). Traces whose text does not parse, or whose drawing differs from its plan in more
than one way, are counted and skipped.
"""

from __future__ import annotations

import collections
import itertools
from typing import Iterable, Sequence

from strokes_jax import episode as ep
from strokes_jax.data import critique, trajectories as tr
from strokes_jax.generate import Generated
from strokes_jax.worlds import detect, grammar, prompts, shapes
from strokes_jax.worlds.grammar import Command, Issue, Verdict
from strokes_jax.worlds.shapes import Obj


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
            issue, fix = critique.violation_fix(violations[0])
        except tr.TrajectoryError:
            return "plan", None, None, "unfixable"
        return "plan", Verdict(plan_issue=issue), fix, None
    try:
        found = image_issue(drawn, planned)
    except ValueError:
        return "image", None, None, "multi_error"
    if found is None:
        return "ok", Verdict(), None, None
    return "image", Verdict(image_issue=found[0]), found[1], None


def critique_trace(gen: Generated, prompt: prompts.Prompt, id: str) -> tuple[ep.Episode | None, str]:
    """One self-sampled critique episode from a generated trace, and what happened."""
    if gen.episode is None:
        return None, "malformed"
    steps: list[ep.Step] = []
    state: tuple[Obj, ...] = ()
    for s in gen.episode.steps:
        if s.ins is None:
            return None, "no_plan"
        try:
            planned = grammar.parse_description(s.des)
            if set(grammar.parse_command(s.ins).apply(state)) != set(planned):
                return None, "inconsistent_plan"  # <ins> does not lead to <des>
        except grammar.GrammarError:
            return None, "unparseable"
        drawn = drawn_scene(s.sketch)
        if drawn is None:
            return None, "undetectable"
        side, verdict, fix, why = check_step(planned, drawn, prompt)
        if side == "plan" and why == "multi_error":
            return None, why
        if side == "plan" and set(drawn) != set(planned):  # one <refine> cannot fix both
            return None, "two_errors"
        if why:
            return None, why
        fixed = fix.apply(planned) if side == "plan" else planned
        step = ep.Step(sketch=s.sketch, ins=s.ins, des=s.des, inspect=verdict.text(),
                       sketch_target=False)
        if fix is None:
            steps.append(step)
            state = planned
            continue
        if set(fix.apply(drawn)) != set(fixed):
            return None, "unfixable"
        step.refine, step.refined = fix.text(), shapes.render(fixed)
        steps.append(step)
        return _complete(id, prompt, steps, tuple(fixed)), "negative"
    ok, _ = prompts.check_scene(state, prompt)
    if not ok:
        return None, "incomplete"  # every step right but the model stopped early
    return ep.Episode(id, prompt.text, prompt.tag, prompt.metadata, steps, "self_critique"), "positive"


def _complete(id: str, prompt: prompts.Prompt, steps: list[ep.Step], state: tuple) -> ep.Episode:
    """Finish a negative episode from the corrected state with exact additive steps."""
    _, missing = prompts.partial_check(state, prompt)
    try:
        target = _complete_scene(state, prompt, missing)
    except RuntimeError:
        target = state
    cmds = [Command("add", o) for o in target[len(state):]]
    steps = steps + tr.plan_steps(cmds, start=state)
    return ep.Episode(id, prompt.text, prompt.tag, prompt.metadata, steps, "self_critique")


def _complete_scene(state: tuple, prompt: prompts.Prompt, missing: list[dict]) -> tuple:
    """state plus the missing clause objects in free cells, checked by GenEval's rules."""
    free = shapes.free_cells(state)
    # Unconstrained colours: any is right; cycle so completions are not all one colour.
    colors = [m["color"] or shapes.COLORS[(len(state) + i) % len(shapes.COLORS)]
              for i, m in enumerate(missing)]
    for cells in itertools.permutations(free, len(missing)):
        cand = state + tuple(Obj(m["class"], col, r, c)
                             for m, col, (r, c) in zip(missing, colors, cells))
        if prompts.check_scene(cand, prompt)[0]:
            return cand
    raise RuntimeError(f"cannot complete {state} for {prompt.text!r}")


def critiques(generated: Iterable[tuple[Generated, prompts.Prompt]], id_prefix: str):
    """(episodes, counts by outcome) for a batch of generated traces."""
    out, counts = [], collections.Counter()
    for i, (gen, prompt) in enumerate(generated):
        e, what = critique_trace(gen, prompt, f"{id_prefix}-{i}")
        counts[what] += 1
        if e is not None:
            e.validate((shapes.CANVAS, shapes.CANVAS, 3), max_steps=16)
            out.append(e)
    return out, dict(counts)


def training_prompts(seed: int, num: int) -> list[prompts.Prompt]:
    """Prompts drawn like the training data's (tags cycled), from their own seed."""
    return [prompts.sample_prompt(tr.episode_rng(seed, i), shapes.TAGS[i % len(shapes.TAGS)])
            for i in range(num)]


def write_array_record(episodes: Sequence[ep.Episode], path: str) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter
    w = ArrayRecordWriter(path, "group_size:1")
    try:
        for e in episodes:
            w.write(e.to_bytes())
    finally:
        w.close()


def sample_and_critique(generator, prompt_list: Sequence[prompts.Prompt], batch_size: int,
                        id_prefix: str):
    """Generate process-driven traces for the prompts and turn them into critique episodes."""
    pairs = []
    for i in range(0, len(prompt_list), batch_size):
        chunk = prompt_list[i:i + batch_size]
        pairs += list(zip(generator([p.text for p in chunk], "process"), chunk))
    return critiques(pairs, id_prefix)
