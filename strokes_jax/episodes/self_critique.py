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
from typing import TYPE_CHECKING, Iterable, Sequence

from strokes_jax.episodes import episode as ep
from strokes_jax.episodes import critique, mixer, trajectories as tr
from strokes_jax.worlds import checker, grammar, prompts, shapes
from strokes_jax.worlds.grammar import Command
from strokes_jax.worlds.shapes import Obj

if TYPE_CHECKING:  # the generator's output type only; inference builds on episodes
    from strokes_jax.inference.generator import Generated, SamplingOptions


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
        drawn = checker.drawn_scene(s.sketch)
        if drawn is None:
            return None, "undetectable"
        side, verdict, fix, why = checker.check_step(planned, drawn, prompt)
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


def side(e: ep.Episode) -> str:
    """'positive', or the side of a negative episode's critique: 'plan' or 'image'."""
    kinds = [critique.critique_kind(s) for s in e.steps if s.refine is not None]
    if not kinds:
        return "positive"
    return "image" if kinds[0].startswith("image:") else "plan"


def balance(episodes: Sequence[ep.Episode], max_positive_fraction: float
            ) -> tuple[list[ep.Episode], dict]:
    """The split with positives cut to at most `max_positive_fraction` of what is kept (the
    earliest kept, so a rerun keeps the same ones), and its make-up by side. A model that
    draws well yields almost only positives, and a split of 98% "ok" teaches the inspection
    to say "ok"; this bounds that, at the price of fewer episodes."""
    by = collections.defaultdict(list)
    for e in episodes:
        by[side(e)].append(e)
    negatives = len(by["plan"]) + len(by["image"])
    keep_pos = len(by["positive"])
    if max_positive_fraction < 1.0:
        keep_pos = min(keep_pos, int(max_positive_fraction * negatives
                                     / (1.0 - max_positive_fraction)))
    dropped = {id(e) for e in by["positive"][keep_pos:]}
    out = [e for e in episodes if id(e) not in dropped]
    made_up = {"positive": keep_pos, "negative_plan": len(by["plan"]),
               "negative_image": len(by["image"]), "positives_dropped": len(by["positive"]) - keep_pos}
    return out, made_up


def training_prompts(seed: int, num: int) -> list[prompts.Prompt]:
    """Prompts drawn like the training data's (tags cycled), from their own seed."""
    return [prompts.sample_prompt(mixer.episode_rng(seed, i), shapes.TAGS[i % len(shapes.TAGS)])
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
                        id_prefix: str, options: SamplingOptions | None = None):
    """Generate process-driven traces for the prompts and turn them into critique episodes;
    `options` samples them (None: the generator's own)."""
    pairs = []
    for i in range(0, len(prompt_list), batch_size):
        chunk = prompt_list[i:i + batch_size]
        pairs += list(zip(generator([p.text for p in chunk], "process", options=options), chunk))
    return critiques(pairs, id_prefix)
