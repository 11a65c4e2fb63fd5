"""Shapes-world prompts in GenEval's six categories, with GenEval-style metadata, and scenes
that satisfy them.

Metadata has GenEval's exact schema (`include` clauses with `class`, `count`, optional
`color` and `position: [relation, clause index]`; `exclude` clauses), so the same rule
engine scores shapes and real GenEval images.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Sequence

import numpy as np

from strokes_jax.worlds import geneval
from strokes_jax.worlds import shapes
from strokes_jax.worlds.shapes import Obj


@dataclasses.dataclass(frozen=True)
class Prompt:
    text: str
    tag: str
    metadata: dict

    def to_json(self) -> str:
        return json.dumps({"tag": self.tag, "prompt": self.text, **self.metadata}, sort_keys=True)

    @classmethod
    def from_geneval(cls, line: dict) -> "Prompt":
        meta = {k: line[k] for k in ("include", "exclude") if k in line}
        return cls(text=line["prompt"], tag=line["tag"], metadata=meta)


def _pick(rng: np.random.Generator, seq: Sequence, n: int = 1, distinct: bool = True):
    idx = rng.choice(len(seq), size=n, replace=not distinct)
    return [seq[i] for i in idx]


def _a(word: str) -> str:
    """GenEval's article: "an orange cross", "a red square"."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def sample_prompt(rng: np.random.Generator, tag: str) -> Prompt:
    """A random prompt of one GenEval category, phrased with GenEval's templates."""
    S, C = shapes.SHAPES, shapes.COLORS
    if tag == "single_object":
        (a,) = _pick(rng, S)
        return Prompt(f"a photo of a {a}", tag, {"include": [{"class": a, "count": 1}]})
    if tag == "two_object":
        a, b = _pick(rng, S, 2)
        return Prompt(f"a photo of a {a} and a {b}", tag,
                      {"include": [{"class": a, "count": 1}, {"class": b, "count": 1}]})
    if tag == "counting":
        (a,) = _pick(rng, S)
        n = int(rng.integers(2, 5))
        return Prompt(f"a photo of {shapes.NUMBERS[n]} {shapes.PLURALS[a]}", tag,
                      {"include": [{"class": a, "count": n}],
                       "exclude": [{"class": a, "count": n + 1}]})
    if tag == "colors":
        (a,), (c,) = _pick(rng, S), _pick(rng, C)
        return Prompt(f"a photo of {_a(c)} {a}", tag,
                      {"include": [{"class": a, "count": 1, "color": c}]})
    if tag == "position":
        a, b = _pick(rng, S, 2)
        (rel,) = _pick(rng, shapes.RELATIONS)
        return Prompt(f"a photo of a {a} {rel} a {b}", tag,
                      {"include": [{"class": b, "count": 1},
                                   {"class": a, "count": 1, "position": [rel, 0]}]})
    if tag == "color_attr":
        a, b = _pick(rng, S, 2)
        c1, c2 = _pick(rng, C, 2)
        return Prompt(f"a photo of {_a(c1)} {a} and {_a(c2)} {b}", tag,
                      {"include": [{"class": a, "count": 1, "color": c1},
                                   {"class": b, "count": 1, "color": c2}]})
    raise ValueError(f"unknown tag {tag!r}; expected one of {shapes.TAGS}")


def scene_detections(scene: Sequence[Obj]) -> list[geneval.Detection]:
    """The exact detections a perfect detector returns for a scene."""
    return [geneval.Detection(o.shape, o.box, o.color) for o in scene]


def check_scene(scene: Sequence[Obj], prompt: Prompt) -> tuple[bool, str]:
    return geneval.evaluate_detections(scene_detections(scene), prompt.metadata)


def sample_scene(rng: np.random.Generator, prompt: Prompt, max_tries: int = 200) -> tuple[Obj, ...]:
    """A scene with exactly the prompt's objects, in clause order (so a position clause's
    reference object comes first), that GenEval's rules accept."""
    for _ in range(max_tries):
        objs: list[Obj] = []
        cells = [tuple(c) for c in rng.permutation(
            [(r, c) for r in range(shapes.GRID) for c in range(shapes.GRID)])]
        for clause in prompt.metadata["include"]:
            for _ in range(clause["count"]):
                color = clause.get("color") or _pick(rng, shapes.COLORS)[0]
                r, c = cells.pop()
                objs.append(Obj(clause["class"], color, int(r), int(c)))
        ok, _ = check_scene(objs, prompt)
        if ok:
            return tuple(objs)
    raise RuntimeError(f"could not place a scene for prompt {prompt.text!r}")


@dataclasses.dataclass(frozen=True)
class Violation:
    """Something in a (partial) scene that contradicts the prompt, with the object to fix.

    kind: 'color' (fix: recolour to `color`), 'place' (fix: move to `cell`, so that the
    `relation` to `other` holds) or 'extra' (fix: remove).
    """

    kind: str
    obj: Obj
    color: str | None = None
    relation: str | None = None
    other: Obj | None = None
    cell: tuple[int, int] | None = None


def _fix_cell(obj: Obj, rel: str, ref: Obj, scene: Sequence[Obj]) -> tuple[int, int] | None:
    others = [o for o in scene if o != obj]
    for cell in shapes.free_cells(others):
        cand = obj.replace(row=cell[0], col=cell[1])
        if rel in geneval.relative_position(cand.box, ref.box):
            return cell
    return None


def partial_check(scene: Sequence[Obj], prompt: Prompt) -> tuple[list[Violation], list[dict]]:
    """Tell "drawn wrong" from "not drawn yet" on a partial scene.

    Returns (violations, missing): violations are objects that contradict the prompt whatever
    is added later (wrong colour, wrong relative place, an object the prompt does not ask for
    or one too many); missing lists the clauses (class, colour) still to draw. Our choice,
    stricter than GenEval: the prompt names every object of the scene, so any object of an
    unrequested class is 'extra'.
    """
    include = prompt.metadata["include"]
    by_class: dict[str, list[Obj]] = {}
    for o in scene:
        by_class.setdefault(o.shape, []).append(o)
    violations: list[Violation] = []
    missing: list[dict] = []
    wanted = {}
    for clause in include:
        wanted[clause["class"]] = wanted.get(clause["class"], 0) + clause["count"]
    for cls, objs in by_class.items():
        for o in objs[wanted.get(cls, 0):]:
            violations.append(Violation("extra", o))
    groups: list[list[Obj]] = []
    for clause in include:
        objs = by_class.get(clause["class"], [])[:clause["count"]]
        groups.append(objs)
        want = clause.get("color")
        for o in objs:
            if want and o.color != want:
                violations.append(Violation("color", o, color=want))
        if len(objs) < clause["count"]:
            missing.extend([{"class": clause["class"], "color": want}] * (clause["count"] - len(objs)))
        if "position" in clause and objs:
            rel, tgt = clause["position"]
            for o in objs:
                for ref in groups[tgt]:
                    if rel not in geneval.relative_position(o.box, ref.box):
                        violations.append(Violation("place", o, relation=rel, other=ref,
                                                    cell=_fix_cell(o, rel, ref, scene)))
    return violations, missing
