"""Shapes-world prompts in GenEval's six categories, with GenEval-style metadata, and scenes
that satisfy them; plus a harder category, `hard`, reported apart from GenEval's six.

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


def sample_prompt(rng: np.random.Generator, tag: str, max_objects: int | None = None) -> Prompt:
    """A random prompt of one GenEval category, phrased with GenEval's templates, or of the
    `hard` category (sample_hard_prompt). `max_objects` bounds the hard category only (GenEval's
    six never ask for more than four objects); None: HARD_MAX_OBJECTS."""
    S, C = shapes.SHAPES, shapes.COLORS
    if tag == HARD_TAG:
        return sample_hard_prompt(rng, HARD_MAX_OBJECTS if max_objects is None else max_objects)
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
    raise ValueError(f"unknown tag {tag!r}; expected one of {shapes.TAGS + (HARD_TAG,)}")


# The harder split: several coloured objects, some counted, one or two relations. It is a
# category of its own, never averaged into GenEval's overall. Every clause names a distinct
# shape because GenEval's rules check a class's first `count` detections: two clauses of one
# class would judge the same objects. With four shapes that caps a prompt at four clauses, and
# the counts (at most "four", the largest number word of the vocabulary) carry the rest.
HARD_TAG = "hard"
HARD_MIN_OBJECTS = 3
HARD_MAX_OBJECTS = 6
_MIN_CLAUSES = 3
_MAX_COUNT = max(shapes.NUMBERS)


def object_count(prompt: Prompt) -> int:
    """How many objects the prompt asks for (its include clauses' counts)."""
    return sum(c["count"] for c in prompt.metadata.get("include", []))


def _phrase(shape: str, color: str, count: int) -> str:
    if count == 1:
        return f"{_a(color)} {shape}"
    return f"{shapes.NUMBERS[count]} {color} {shapes.PLURALS[shape]}"


def _split_count(rng: np.random.Generator, total: int, parts: int) -> list[int]:
    counts = [1] * parts
    for _ in range(total - parts):
        open_ = [i for i, c in enumerate(counts) if c < _MAX_COUNT]
        counts[open_[int(rng.integers(len(open_)))]] += 1
    return counts


def _shared_relations(subj: Sequence[Obj], ref: Sequence[Obj]) -> list[str]:
    """Relations that hold from every subject object to every reference object (GenEval's
    position rule for counted groups), in RELATIONS order."""
    rels = set(shapes.RELATIONS)
    for a in subj:
        for b in ref:
            rels &= geneval.relative_position(a.box, b.box)
    return [r for r in shapes.RELATIONS if r in rels]


def sample_hard_prompt(rng: np.random.Generator, max_objects: int = HARD_MAX_OBJECTS,
                       placements: int = 50) -> Prompt:
    """A `hard` prompt: 3 to `max_objects` objects over 3 or 4 distinct shapes, every clause
    coloured, counts up to four, and one relation (two when there are four clauses) between
    disjoint clause pairs, e.g. "a photo of two red squares left of a blue circle and a green
    cross": each "and"-separated item is one clause or one "SUBJECT REL REFERENCE" pair, so a
    relation binds only the two noun phrases beside it. Metadata as GenEval's: each
    relation's reference clause comes before its subject, and every clause also gets an
    exclude at count + 1, so the counts are exact.

    The relations are read off a random placement of the objects, so every prompt has a
    scene on the 3x3 grid that satisfies it (sample_scene finds one)."""
    if not HARD_MIN_OBJECTS <= max_objects <= HARD_MAX_OBJECTS:
        raise ValueError(f"max_objects {max_objects} must be in "
                         f"[{HARD_MIN_OBJECTS}, {HARD_MAX_OBJECTS}]")
    cells = [(r, c) for r in range(shapes.GRID) for c in range(shapes.GRID)]
    # Two objects in different cells always share a relation, so only crowded groups retry.
    for _ in range(1000):
        total = int(rng.integers(HARD_MIN_OBJECTS, max_objects + 1))
        k = int(rng.integers(_MIN_CLAUSES, min(len(shapes.SHAPES), total) + 1))
        counts = _split_count(rng, total, k)
        classes = _pick(rng, shapes.SHAPES, k)
        colors = _pick(rng, shapes.COLORS, k, distinct=False)
        order = [int(i) for i in rng.permutation(k)]
        pairs = [(order[0], order[1])] + ([(order[2], order[3])] if k == 4 and rng.random() < 0.5
                                          else [])  # (subject, reference)
        for _ in range(placements):
            at = iter(rng.permutation(len(cells))[:total])
            groups = [[Obj(classes[i], colors[i], *cells[next(at)]) for _ in range(counts[i])]
                      for i in range(k)]
            shared = [_shared_relations(groups[s], groups[r]) for s, r in pairs]
            if all(shared):
                rels = [sh[int(rng.integers(len(sh)))] for sh in shared]
                return _hard_prompt(rng, classes, colors, counts, pairs, rels)
    raise RuntimeError(f"no placeable hard prompt with at most {max_objects} objects")


def _hard_prompt(rng, classes, colors, counts, pairs, rels) -> Prompt:
    """Text items joined by "and": "SUBJECT REL REFERENCE" per relation, then the other
    clauses, in a random order; include clauses follow the text, references first."""
    related = {i for p in pairs for i in p}
    items = [("rel", p, r) for p, r in zip(pairs, rels)]
    items += [("one", i, None) for i in range(len(classes)) if i not in related]
    texts, include, exclude = [], [], []

    def clause(i, position=None):
        c = {"class": classes[i], "count": counts[i], "color": colors[i]}
        if position:
            c["position"] = position
        include.append(c)
        exclude.append({"class": classes[i], "count": counts[i] + 1})

    for j in rng.permutation(len(items)):
        kind, what, rel = items[int(j)]
        if kind == "rel":
            s, r = what
            texts.append(f"{_phrase(classes[s], colors[s], counts[s])} {rel} "
                         f"{_phrase(classes[r], colors[r], counts[r])}")
            clause(r)
            clause(s, [rel, len(include) - 1])
        else:
            texts.append(_phrase(classes[what], colors[what], counts[what]))
            clause(what)
    return Prompt("a photo of " + " and ".join(texts), HARD_TAG,
                  {"include": include, "exclude": exclude})


def scene_detections(scene: Sequence[Obj]) -> list[geneval.Detection]:
    """The exact detections a perfect detector returns for a scene."""
    return [geneval.Detection(o.shape, o.box, o.color) for o in scene]


def check_scene(scene: Sequence[Obj], prompt: Prompt) -> tuple[bool, str]:
    return geneval.evaluate_detections(scene_detections(scene), prompt.metadata)


def sample_scene(rng: np.random.Generator, prompt: Prompt, max_tries: int = 200) -> tuple[Obj, ...]:
    """A scene with exactly the prompt's objects, in clause order (so a position clause's
    reference object comes first), that GenEval's rules accept."""
    if prompt.tag == HARD_TAG:
        return _sample_constrained_scene(rng, prompt, max_tries)
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


def _sample_constrained_scene(rng: np.random.Generator, prompt: Prompt,
                              max_tries: int) -> tuple[Obj, ...]:
    """sample_scene for crowded prompts, where a blind placement rarely holds every relation:
    each object goes to a random free cell among those that keep its relation to the
    (already placed) reference clause. Only the hard category uses it, so the six
    categories' scenes, and the training streams built from them, stay as they were."""
    for _ in range(max_tries):
        objs: list[Obj] = []
        groups: list[list[Obj]] = []
        for clause in prompt.metadata["include"]:
            group: list[Obj] = []
            for _ in range(clause["count"]):
                color = clause.get("color") or _pick(rng, shapes.COLORS)[0]
                cands = [Obj(clause["class"], color, r, c) for r, c in shapes.free_cells(objs)]
                if "position" in clause:
                    rel, tgt = clause["position"]
                    cands = [o for o in cands if all(
                        rel in geneval.relative_position(o.box, ref.box) for ref in groups[tgt])]
                if not cands:
                    break
                group.append(cands[int(rng.integers(len(cands)))])
                objs.append(group[-1])
            groups.append(group)
            if len(group) < clause["count"]:
                break
        else:
            if check_scene(objs, prompt)[0]:
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
