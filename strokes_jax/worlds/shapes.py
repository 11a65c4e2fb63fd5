"""The shapes world: scene graphs, GenEval-style prompts and an exact renderer.

Scenes live on a GRID x GRID board of CELL-pixel cells; each object sits centred in one
cell. The grid is a deliberate simplification of GenEval's free placement: it makes
positions nameable in plan text ("r0 c2") so the text stage can carry the layout, which is
the point of process-driven generation. The detector (`detect.py`) works on free pixels and
does not assume the grid.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

GRID = 3
CELL = 12
CANVAS = GRID * CELL
DEFAULT_SIZE = 10

SHAPES = ("square", "circle", "triangle", "cross")
PLURALS = {"square": "squares", "circle": "circles", "triangle": "triangles", "cross": "crosses"}

# GenEval's ten colour names; RGB values chosen far apart so nearest-palette segmentation is
# unambiguous, and a background (grey) distinct from black and white.
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
PALETTE = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (250, 230, 40),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "purple": (130, 40, 180),
    "pink": (255, 140, 210),
    "brown": (115, 65, 20),
    "black": (0, 0, 0),
    "white": (255, 255, 255),
}
BACKGROUND = (128, 128, 128)

RELATIONS = ("left of", "right of", "above", "below")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
NUMBERS = {2: "two", 3: "three", 4: "four"}


@dataclasses.dataclass(frozen=True, order=True)
class Obj:
    """One object of a scene: class, colour and the cell (row, col) it is centred in."""

    shape: str
    color: str
    row: int
    col: int
    size: int = DEFAULT_SIZE

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.color not in PALETTE:
            raise ValueError(f"unknown colour {self.color!r}; expected one of {COLORS}")
        if not (0 <= self.row < GRID and 0 <= self.col < GRID):
            raise ValueError(f"cell ({self.row}, {self.col}) is off the {GRID}x{GRID} grid")
        if not 3 <= self.size <= CELL:
            raise ValueError(f"size {self.size} must be in [3, {CELL}]")

    @property
    def cell(self) -> tuple[int, int]:
        return (self.row, self.col)

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in pixels, exclusive end, as GenEval boxes are."""
        off = (CELL - self.size) // 2
        x0, y0 = self.col * CELL + off, self.row * CELL + off
        return (float(x0), float(y0), float(x0 + self.size), float(y0 + self.size))

    def replace(self, **kw) -> "Obj":
        return dataclasses.replace(self, **kw)


Scene = tuple  # a tuple of Obj, in drawing order; at most one object per cell


def check_scene(scene: Sequence[Obj]) -> None:
    cells = [o.cell for o in scene]
    if len(set(cells)) != len(cells):
        raise ValueError(f"two objects share a cell in scene {scene}")


def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean size x size mask of a shape, rasterised at pixel centres."""
    c = (size - 1) / 2.0
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    if shape == "square":
        return np.ones((size, size), bool)
    if shape == "circle":
        return (x - c) ** 2 + (y - c) ** 2 <= (size / 2.0) ** 2
    if shape == "triangle":
        # Apex at the top, base on the bottom row: the box is full width and height. The
        # 0.5 floor keeps the apex row non-empty at even sizes (centre between two pixels),
        # so the pixels fill exactly the box that Obj.box and GenEval-style detection report.
        return np.abs(x - c) <= np.maximum((y + 0.5) / 2.0, 0.5)
    if shape == "cross":
        half = size / 6.0
        return (np.abs(x - c) <= half) | (np.abs(y - c) <= half)
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Sequence[Obj]) -> np.ndarray:
    """Exact, deterministic rendering: uint8 [CANVAS, CANVAS, 3]."""
    check_scene(scene)
    img = np.empty((CANVAS, CANVAS, 3), np.uint8)
    img[:] = BACKGROUND
    for o in scene:
        x0, y0, _, _ = (int(v) for v in o.box)
        m = shape_mask(o.shape, o.size)
        region = img[y0:y0 + o.size, x0:x0 + o.size]
        region[m] = PALETTE[o.color]
    return img


def cell_relations(a: Obj, b: Obj) -> set[str]:
    """GenEval's relations of a relative to b, from the scene's boxes (see geneval)."""
    from strokes_jax.worlds import geneval  # local import: geneval is the rule engine, world is data

    return geneval.relative_position(a.box, b.box)


def free_cells(scene: Sequence[Obj]) -> list[tuple[int, int]]:
    used = {o.cell for o in scene}
    return [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in used]
