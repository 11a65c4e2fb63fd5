"""Episode generators for the shapes world: scene-graph subsampling (additive paths), paths
rewritten with modify / swap edits, single-pass episodes, and the seeded episode stream.

A path is a list of grammar Commands; applying them from the empty canvas gives the visual
states the model sketches. Every state on a plan path is checked with prompts.partial_check:
it may only be "not drawn yet", never "drawn wrong", because the plan is what the inspect
stage calls correct.
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from strokes_jax import episode as ep
from strokes_jax.worlds import grammar, prompts, shapes
from strokes_jax.worlds.grammar import Command
from strokes_jax.worlds.prompts import Prompt
from strokes_jax.worlds.shapes import Obj

EDIT_OPS = ("recolour", "move", "swap")
MIX_KEYS = ("single_pass", "additive", "edit", "critique")
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


def episode_rng(seed: int, i: int) -> np.random.Generator:
    """Episode i's generator: SeedSequence(seed).spawn(n)[i] without depending on n."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(i,)))


def make_one(seed: int, i: int, mix: Mapping[str, float],
             tags: Sequence[str] = shapes.TAGS,
             fits: Callable[[ep.Episode], bool] | None = None) -> ep.Episode:
    """Episode i of the stream (tag cycled, kind drawn by `mix`), validated and checked.

    `fits` (e.g. "tokenizes to at most seq_len tokens"): an edit or critique episode that does
    not fit falls back to the additive path of the same scene, which always fits the default
    length; this happens only for the longest (4-object) scenes."""
    from strokes_jax.data import critique  # local: critique builds on this module

    keys = [k for k in MIX_KEYS if mix.get(k, 0) > 0]
    unknown = set(mix) - set(MIX_KEYS)
    if unknown or not keys:
        raise ValueError(f"mix {dict(mix)} must weight some of {MIX_KEYS}, nothing else")
    p = np.array([mix[k] for k in keys], np.float64)
    rng = episode_rng(seed, i)
    tag = tags[i % len(tags)]
    kind = keys[int(rng.choice(len(keys), p=p / p.sum()))]
    prompt = prompts.sample_prompt(rng, tag)
    scene = prompts.sample_scene(rng, prompt)
    eid = f"{seed}-{i}"
    if kind == "single_pass":
        e, final = single_pass_episode(eid, prompt, scene), scene
    elif kind == "critique":
        e, final = critique.critique_episode(rng, eid, prompt, scene, return_final=True)
    else:
        cmds = additive_steps(scene) if kind == "additive" else edit_steps(rng, prompt, scene)
        final = check_path(cmds, prompt, scene)[-1]
        # An edit prompt with no applicable edit is, honestly, an additive episode.
        kind = "edit" if any(c.op != "add" for c in cmds) else "additive"
        e = make_episode(eid, prompt, cmds, kind)
    if fits is not None and kind not in ("single_pass", "additive") and not fits(e):
        cmds = additive_steps(scene)
        final = check_path(cmds, prompt, scene)[-1]
        e = make_episode(eid, prompt, cmds, "additive")
    e.validate(IMAGE_SHAPE)
    ok, why = prompts.check_scene(final, prompt)
    if not ok or not np.array_equal(e.final_image(), shapes.render(final)):
        raise TrajectoryError(f"episode {eid}: final state fails the prompt ({why})")
    return e


def generate_episodes(seed: int, num: int, mix: Mapping[str, float],
                      tags: Sequence[str] = shapes.TAGS,
                      fits: Callable[[ep.Episode], bool] | None = None) -> Iterator[ep.Episode]:
    """Deterministic stream: episode i depends only on (seed, i, mix, tags, fits)."""
    for i in range(num):
        yield make_one(seed, i, mix, tags, fits)
