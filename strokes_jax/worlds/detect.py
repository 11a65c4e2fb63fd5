"""A pixel-level detector for the shapes world, so images (rendered or generated) can be
scored with GenEval's rule engine (`geneval`) instead of trusting the scene they came from.

Pipeline:
  1. every pixel goes to its nearest colour among `shapes.PALETTE` and `shapes.BACKGROUND`
     (Euclidean RGB). The palette colours are far apart (>= ~100 in RGB), so mild noise or
     slight blur in a generated image does not change the assignment of most pixels;
  2. 4-connected components of equal colour (background excluded) become candidates;
  3. components under `min_area` pixels are dropped: these are speckles from noise and the
     thin mixed-colour fringes that blur leaves around object edges;
  4. each component's class is the shape whose template (`shapes.shape_mask` at the size of
     the component's bounding box, centred) has the best IoU with the component; that IoU is
     the detection's score, so GenEval's "first `count` by confidence" picks the cleanest
     objects. Components matching no template well (IoU < `min_score`, e.g. a blur ring
     around an object) are dropped.

Nothing here assumes the grid or where objects sit; square images of another size are
pictures of the canvas (`pictures`) and are read at the canvas size. Known limits: two
touching objects of the same colour merge into one component (in the shapes world this
needs size 12 objects in adjacent cells), and objects under ~6 px are too small to tell
apart by shape.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from strokes_jax.worlds import geneval
from strokes_jax.worlds import pictures
from strokes_jax.worlds import shapes

MIN_AREA = 12
MIN_SCORE = 0.5
# Objects of the benchmark are at least 8 px wide (10 by default); smaller boxes are blobs of
# colour noise that a template would otherwise happily call a square (an undertrained model
# draws such 4x4 to 6x6 blobs, and counting them would inflate its scores).
MIN_SIDE = 7

_NAMES = tuple(shapes.PALETTE) + ("background",)
_COLOURS = np.array([shapes.PALETTE[n] for n in shapes.PALETTE] + [shapes.BACKGROUND],
                    np.float64)
_BG = len(_NAMES) - 1


def quantize(image: np.ndarray) -> np.ndarray:
    """[H, W] index into `_NAMES` of each pixel's nearest palette/background colour."""
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an [H, W, 3] image, got shape {image.shape}")
    px = image.astype(np.float64)[..., None, :]
    return np.argmin(((px - _COLOURS) ** 2).sum(-1), axis=-1)


def label(idx: np.ndarray) -> np.ndarray:
    """4-connected components of equal `idx` (background gets -1), as the smallest flat pixel
    index in each component. Min-label propagation, vectorised: a few dozen sweeps on
    shapes-sized images, and numpy only (no scipy dependency for one call)."""
    h, w = idx.shape
    fg = idx != _BG
    big = h * w
    lab = np.where(fg, np.arange(big).reshape(h, w), big)
    same_v = (idx[1:] == idx[:-1]) & fg[1:] & fg[:-1]  # pixel (y, x) joins (y+1, x)
    same_h = (idx[:, 1:] == idx[:, :-1]) & fg[:, 1:] & fg[:, :-1]
    while True:
        new = lab.copy()
        np.minimum(new[1:], np.where(same_v, lab[:-1], big), out=new[1:])
        np.minimum(new[:-1], np.where(same_v, lab[1:], big), out=new[:-1])
        np.minimum(new[:, 1:], np.where(same_h, lab[:, :-1], big), out=new[:, 1:])
        np.minimum(new[:, :-1], np.where(same_h, lab[:, 1:], big), out=new[:, :-1])
        if np.array_equal(new, lab):
            return np.where(fg, lab, -1)
        lab = new


def classify(mask: np.ndarray) -> tuple[str, float]:
    """(shape, IoU) of the best template for a component mask cropped to its bounding box."""
    h, w = mask.shape
    s = max(h, w)
    # Centre the crop in an s x s square, so a shape that does not fill its box in one
    # direction is compared with the template it would be at its full size.
    canvas = np.zeros((s, s), bool)
    oy, ox = (s - h) // 2, (s - w) // 2
    canvas[oy:oy + h, ox:ox + w] = mask
    best, best_iou = shapes.SHAPES[0], -1.0
    for shape in shapes.SHAPES:
        t = shapes.shape_mask(shape, s)
        iou = float((t & canvas).sum() / (t | canvas).sum())
        if iou > best_iou:  # strict: ties keep the earlier shape, so results are stable
            best, best_iou = shape, iou
    return best, best_iou


def detect(image: np.ndarray, min_area: int = MIN_AREA, min_score: float = MIN_SCORE,
           min_side: int = MIN_SIDE) -> list[geneval.Detection]:
    """Objects in a uint8 [H, W, 3] image, best score first, then top-to-bottom, left-to-right.

    A square image of another size (a 96x96 picture, an autoencoder's reconstruction) is a
    picture of the canvas: it is read at the canvas size (`pictures.to_canvas`), where the
    pixel thresholds were set, and boxes are in canvas pixels, as the checker's grid expects.
    Any other image (free placement on a canvas of its own) is read pixel for pixel."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] == image.shape[1] != shapes.CANVAS:
        image = pictures.to_canvas(image)
    idx = quantize(image)
    lab = label(idx)
    ids, counts = np.unique(lab[lab >= 0], return_counts=True)
    dets = []
    for comp, area in zip(ids, counts):
        if area < min_area:
            continue
        ys, xs = np.nonzero(lab == comp)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        if min(y1 - y0, x1 - x0) < min_side:
            continue
        shape, iou = classify(lab[y0:y1, x0:x1] == comp)
        if iou < min_score:
            continue
        color = _NAMES[idx.flat[comp]]  # the label is the component's first pixel
        dets.append(geneval.Detection(shape, (float(x0), float(y0), float(x1), float(y1)),
                                    color, iou))
    dets.sort(key=lambda d: (-d.score, d.box[1], d.box[0]))
    return dets


def check_image(image: np.ndarray, prompt, **kw) -> tuple[bool, str]:
    """GenEval's verdict on an image for a `prompts.Prompt` (or anything with .metadata)."""
    return geneval.evaluate_detections(detect(image, **kw), prompt.metadata)


def detections_equal(a: Sequence[geneval.Detection], b: Sequence[geneval.Detection]) -> bool:
    """Same multiset of (class, box, colour), ignoring scores and order."""
    key = lambda d: (d.cls, tuple(d.box), d.color)  # noqa: E731
    return sorted(map(key, a)) == sorted(map(key, b))
