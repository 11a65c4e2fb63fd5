"""The shapes world's small, parseable text grammar: scene descriptions, edit commands and
inspection verdicts. Plans and refinements are commands applied to the scene, so every text
the model writes can be parsed back and checked exactly.

  OBJ      := COLOR SHAPE "at" rR cC
  des      := OBJ ("," OBJ)* | "empty"
  command  := "add" OBJ | "remove" OBJ | "recolour" OBJ "to" COLOR
            | "move" OBJ "to" rR cC | "swap" OBJ "with" OBJ
  issue    := "missing" OBJ | "extra" OBJ | OBJ "should be" COLOR
            | OBJ "should be at" rR cC | OBJ "should be" REL OBJ
  verdict  := "plan" ("ok" | "wrong :" issue) ";" "image" ("ok" | "wrong :" issue)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

from strokes_jax.worlds import shapes
from strokes_jax.worlds.shapes import Obj


class GrammarError(ValueError):
    pass


def cell_words(row: int, col: int) -> str:
    return f"r{row} c{col}"


def obj_words(o: Obj) -> str:
    return f"{o.color} {o.shape} at {cell_words(o.row, o.col)}"


def describe(scene: Sequence[Obj]) -> str:
    return " , ".join(obj_words(o) for o in scene) if scene else "empty"


_COLOR = "|".join(shapes.COLORS)
_SHAPE = "|".join(shapes.SHAPES)
_REL = "|".join(shapes.RELATIONS)
_OBJ = rf"(?:{_COLOR}) (?:{_SHAPE}) at r\d c\d"
_OBJ_RE = re.compile(rf"^({_COLOR}) ({_SHAPE}) at r(\d) c(\d)$")


def parse_obj(text: str) -> Obj:
    m = _OBJ_RE.match(text.strip())
    if not m:
        raise GrammarError(f"not an object phrase: {text!r}")
    try:
        return Obj(m.group(2), m.group(1), int(m.group(3)), int(m.group(4)))
    except ValueError as e:
        raise GrammarError(f"bad object phrase {text!r}: {e}") from None


def parse_description(text: str) -> tuple[Obj, ...]:
    text = text.strip()
    if text == "empty":
        return ()
    scene = tuple(parse_obj(part) for part in text.split(" , "))
    try:
        shapes.check_scene(scene)
    except ValueError as e:
        raise GrammarError(f"description {text!r}: {e}") from None
    return scene


@dataclasses.dataclass(frozen=True)
class Command:
    op: str  # add | remove | recolour | move | swap
    obj: Obj
    color: str | None = None
    cell: tuple[int, int] | None = None
    other: Obj | None = None

    def text(self) -> str:
        o = obj_words(self.obj)
        if self.op in ("add", "remove"):
            return f"{self.op} {o}"
        if self.op == "recolour":
            return f"recolour {o} to {self.color}"
        if self.op == "move":
            return f"move {o} to {cell_words(*self.cell)}"
        if self.op == "swap":
            return f"swap {o} with {obj_words(self.other)}"
        raise GrammarError(f"unknown command op {self.op!r}")

    def apply(self, scene: Sequence[Obj]) -> tuple[Obj, ...]:
        """The scene after the command; raises GrammarError if it does not apply."""
        scene = tuple(scene)
        if self.op == "add":
            if self.obj.cell in {o.cell for o in scene}:
                raise GrammarError(f"cannot {self.text()!r}: the cell is taken")
            out = scene + (self.obj,)
        else:
            if self.obj not in scene:
                raise GrammarError(f"cannot {self.text()!r}: no such object in the scene")
            if self.op == "remove":
                out = tuple(o for o in scene if o != self.obj)
            elif self.op == "recolour":
                out = tuple(o.replace(color=self.color) if o == self.obj else o for o in scene)
            elif self.op == "move":
                if self.cell in {o.cell for o in scene if o != self.obj}:
                    raise GrammarError(f"cannot {self.text()!r}: the cell is taken")
                out = tuple(o.replace(row=self.cell[0], col=self.cell[1]) if o == self.obj else o
                            for o in scene)
            elif self.op == "swap":
                if self.other not in scene:
                    raise GrammarError(f"cannot {self.text()!r}: no such object in the scene")
                a, b = self.obj, self.other
                out = tuple(o.replace(row=b.row, col=b.col) if o == a else
                            o.replace(row=a.row, col=a.col) if o == b else o for o in scene)
            else:
                raise GrammarError(f"unknown command op {self.op!r}")
        shapes.check_scene(out)
        return out


_CMD_RE = re.compile(
    rf"^(?:(?P<op>add|remove) (?P<o1>{_OBJ})"
    rf"|recolour (?P<o2>{_OBJ}) to (?P<color>{_COLOR})"
    rf"|move (?P<o3>{_OBJ}) to r(?P<r>\d) c(?P<c>\d)"
    rf"|swap (?P<o4>{_OBJ}) with (?P<o5>{_OBJ}))$")


def parse_command(text: str) -> Command:
    m = _CMD_RE.match(text.strip())
    if not m:
        raise GrammarError(f"not a command: {text!r}")
    g = m.groupdict()
    if g["op"]:
        return Command(g["op"], parse_obj(g["o1"]))
    if g["o2"]:
        return Command("recolour", parse_obj(g["o2"]), color=g["color"])
    if g["o3"]:
        cell = (int(g["r"]), int(g["c"]))
        if not all(0 <= v < shapes.GRID for v in cell):
            raise GrammarError(f"cell {cell} is off the grid in {text!r}")
        return Command("move", parse_obj(g["o3"]), cell=cell)
    return Command("swap", parse_obj(g["o4"]), other=parse_obj(g["o5"]))


@dataclasses.dataclass(frozen=True)
class Issue:
    kind: str  # missing | extra | color | place | relation
    obj: Obj
    color: str | None = None
    cell: tuple[int, int] | None = None
    relation: str | None = None
    other: Obj | None = None

    def text(self) -> str:
        o = obj_words(self.obj)
        if self.kind in ("missing", "extra"):
            return f"{self.kind} {o}"
        if self.kind == "color":
            return f"{o} should be {self.color}"
        if self.kind == "place":
            return f"{o} should be at {cell_words(*self.cell)}"
        if self.kind == "relation":
            return f"{o} should be {self.relation} {obj_words(self.other)}"
        raise GrammarError(f"unknown issue kind {self.kind!r}")


_ISSUE_RE = re.compile(
    rf"^(?:(?P<kind>missing|extra) (?P<o1>{_OBJ})"
    rf"|(?P<o2>{_OBJ}) should be (?P<color>{_COLOR})"
    rf"|(?P<o3>{_OBJ}) should be at r(?P<r>\d) c(?P<c>\d)"
    rf"|(?P<o4>{_OBJ}) should be (?P<rel>{_REL}) (?P<o5>{_OBJ}))$")


def parse_issue(text: str) -> Issue:
    m = _ISSUE_RE.match(text.strip())
    if not m:
        raise GrammarError(f"not an issue: {text!r}")
    g = m.groupdict()
    if g["kind"]:
        return Issue(g["kind"], parse_obj(g["o1"]))
    if g["o2"]:
        return Issue("color", parse_obj(g["o2"]), color=g["color"])
    if g["o3"]:
        return Issue("place", parse_obj(g["o3"]), cell=(int(g["r"]), int(g["c"])))
    return Issue("relation", parse_obj(g["o4"]), relation=g["rel"], other=parse_obj(g["o5"]))


@dataclasses.dataclass(frozen=True)
class Verdict:
    plan_issue: Issue | None = None
    image_issue: Issue | None = None

    @property
    def ok(self) -> bool:
        return self.plan_issue is None and self.image_issue is None

    def text(self) -> str:
        p = "plan ok" if self.plan_issue is None else f"plan wrong : {self.plan_issue.text()}"
        i = "image ok" if self.image_issue is None else f"image wrong : {self.image_issue.text()}"
        return f"{p} ; {i}"


def parse_verdict(text: str) -> Verdict:
    parts = text.strip().split(" ; ")
    if len(parts) != 2 or not parts[0].startswith("plan ") or not parts[1].startswith("image "):
        raise GrammarError(f"not a verdict: {text!r}")

    def side(part: str, name: str) -> Issue | None:
        rest = part[len(name) + 1:]
        if rest == "ok":
            return None
        if rest.startswith("wrong : "):
            return parse_issue(rest[len("wrong : "):])
        raise GrammarError(f"bad {name} verdict {part!r}")

    return Verdict(side(parts[0], "plan"), side(parts[1], "image"))


def vocabulary() -> list[str]:
    """Every word the shapes grammar and prompts can produce (the word-level vocabulary)."""
    words = set("a an photo of and at to with add remove recolour move swap empty plan image ok "
                "wrong should be missing extra , ; :".split())
    words.update(shapes.SHAPES, shapes.PLURALS.values(), shapes.COLORS, shapes.NUMBERS.values())
    for rel in shapes.RELATIONS:
        words.update(rel.split())
    words.update(f"r{i}" for i in range(shapes.GRID))
    words.update(f"c{i}" for i in range(shapes.GRID))
    return sorted(words)
