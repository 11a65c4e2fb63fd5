"""Episode generators for the shapes world: scene-graph subsampling (additive paths), paths
rewritten with modify / swap edits, and single-pass episodes (the seeded stream that mixes
them with critiques is `episodes/mixer.py`).

A path is a list of grammar Commands; applying them from the empty canvas gives the visual
states the model sketches. Every state on a plan path is checked with prompts.partial_check:
it may only be "not drawn yet", never "drawn wrong", because the plan is what the inspect
stage calls correct.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from strokes_jax.episodes import episode as ep
from strokes_jax.worlds import grammar, prompts, shapes
from strokes_jax.worlds.grammar import Command
from strokes_jax.worlds.prompts import Prompt
from strokes_jax.worlds.shapes import Obj

EDIT_OPS = ("recolour", "move", "swap")
IMAGE_SHAPE = (shapes.CANVAS, shapes.CANVAS, 3)


class TrajectoryError(AssertionError):
    """A generated path broke an invariant (a bug in the generator, never bad user input)."""


def additive_steps(scene: Sequence[Obj]) -> list[Command]:
    """One `add` per object in scene order; sample_scene's clause order already puts a position
    clause's reference first, so the relation is checkable the moment its subject appears."""
    return [Command("add", o) for o in scene]


def states(commands: Sequence[Command], start: Sequence[Obj] = ()) -> list[tuple[Obj, ...]]:
    """The state after each command (not including `start`)."""
    out, cur = [], tuple(start)
    for c in commands:
        cur = c.apply(cur)
        out.append(cur)
    return out


def violations_along(path_states: Sequence[Sequence[Obj]], prompt: Prompt) -> list:
    """Every partial_check violation on any state of a path (empty = a valid plan path)."""
    return [v for s in path_states for v in prompts.partial_check(s, prompt)[0]]


def check_path(commands: Sequence[Command], prompt: Prompt, scene: Sequence[Obj],
               start: Sequence[Obj] = ()) -> list[tuple[Obj, ...]]:
    """Raise unless the path is violation-free and ends exactly in `scene`."""
    st = states(commands, start)
    bad = violations_along(st, prompt)
    if bad:
        raise TrajectoryError(f"{prompt.text!r}: path {[c.text() for c in commands]} has "
                              f"violations {bad}")
    if (st[-1] if st else tuple(start)) != tuple(scene):
        raise TrajectoryError(f"{prompt.text!r}: path ends in {st[-1] if st else start}, "
                              f"not {tuple(scene)}")
    return st


# -- edit paths --------------------------------------------------------------------------

def _rewrite(scene, k: int, early: Obj, edit: Command, at: int, l: int | None = None,
             early_l: Obj | None = None) -> list[Command]:
    """Additive path in which object k (and l, for swap) is first added as `early`, and `edit`
    is inserted after the first `at` adds."""
    cmds = []
    for i, o in enumerate(scene):
        cmds.append(Command("add", early if i == k else early_l if i == l else o))
    return cmds[:at] + [edit] + cmds[at:]


def _edit_candidates(op: str, scene: tuple[Obj, ...]) -> Iterator[list[Command]]:
    """Every single-edit rewrite of the additive path using `op` (unchecked)."""
    n, used = len(scene), {o.cell for o in scene}
    for k, o in enumerate(scene):
        if op == "recolour":
            for c in shapes.COLORS:
                if c != o.color:
                    early = o.replace(color=c)
                    for at in range(k + 1, n + 1):
                        yield _rewrite(scene, k, early, Command("recolour", early, color=o.color), at)
        elif op == "move":
            # Cells outside the final scene stay free throughout, so no later add collides.
            for r in range(shapes.GRID):
                for col in range(shapes.GRID):
                    if (r, col) not in used:
                        early = o.replace(row=r, col=col)
                        for at in range(k + 1, n + 1):
                            yield _rewrite(scene, k, early, Command("move", early, cell=o.cell), at)
        elif op == "swap":
            for l in range(k + 1, n):
                b = scene[l]
                if (o.shape, o.color) == (b.shape, b.color):
                    continue  # swapping look-alikes changes no pixel: not an edit
                ek, el = o.replace(row=b.row, col=b.col), b.replace(row=o.row, col=o.col)
                for at in range(l + 1, n + 1):
                    yield _rewrite(scene, k, ek, Command("swap", ek, other=el), at, l, el)
        else:
            raise ValueError(f"unknown edit op {op!r}; expected one of {EDIT_OPS}")


def _valid(cmds: list[Command], prompt: Prompt, scene) -> bool:
    try:
        check_path(cmds, prompt, scene)
    except (TrajectoryError, grammar.GrammarError, ValueError):
        return False
    return True


def edit_steps(rng: np.random.Generator, prompt: Prompt, scene: Sequence[Obj],
               ops: Sequence[str] = EDIT_OPS) -> list[Command]:
    """A path ending in `scene` that rewrites one add into add-then-edit (recolour, move or
    swap, chosen at random among the ops that apply); falls back to the additive path.

    Applicability is decided by partial_check on every intermediate state rather than by
    per-tag rules: e.g. a recolour of a colour-constrained object or a move that breaks a
    relation with an already drawn reference shows up as a violation and is rejected. This
    admits the brief's cases (recolour of unconstrained colours, moves without position
    clauses, swaps) plus moves in position prompts that keep the relation at every state.
    """
    scene = tuple(scene)
    for op in [ops[i] for i in rng.permutation(len(ops))]:
        cands = list(_edit_candidates(op, scene))
        for j in rng.permutation(len(cands)):
            if _valid(cands[j], prompt, scene):
                return cands[j]
    cmds = additive_steps(scene)
    check_path(cmds, prompt, scene)
    return cmds


# -- episodes ----------------------------------------------------------------------------

POSITIVE = grammar.Verdict().text()


def plan_steps(commands: Sequence[Command], start: Sequence[Obj] = ()) -> list[ep.Step]:
    """One correct iteration per command: plan, faithful sketch, positive inspection."""
    out = []
    for c, s in zip(commands, states(commands, start)):
        out.append(ep.Step(sketch=shapes.render(s), ins=c.text(), des=grammar.describe(s),
                           inspect=POSITIVE))
    return out


def make_episode(id: str, prompt: Prompt, commands: Sequence[Command], kind: str) -> ep.Episode:
    return ep.Episode(id=id, prompt=prompt.text, tag=prompt.tag, metadata=prompt.metadata,
                      steps=plan_steps(commands), kind=kind)


def single_pass_episode(id: str, prompt: Prompt, scene: Sequence[Obj]) -> ep.Episode:
    return ep.Episode(id=id, prompt=prompt.text, tag=prompt.tag, metadata=prompt.metadata,
                      steps=[ep.Step(sketch=shapes.render(scene))], kind="single_pass")
