"""GenEval's rule engine, applied to detections.

The same functions score the shapes world's exact detections and, later, real GenEval
detections (class -> list of detections sorted by confidence). Semantics follow GenEval's
`evaluate_images.py`: the first `count` detections of a class are the ones checked; colour
counts over those; position compares every checked object with every object of the
referenced clause; exclude fails when at least `count` objects of the class are found.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

POSITION_THRESHOLD = 0.1
# evaluate_images.py's defaults for a real detector's output (its --options threshold,
# counting_threshold, max_objects); max_overlap defaults to 1.0 there, i.e. no extra NMS.
THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16


@dataclasses.dataclass(frozen=True)
class Detection:
    """One detected object: class name, box (x0, y0, x1, y1), colour name, confidence."""

    cls: str
    box: tuple[float, float, float, float]
    color: str | None = None
    score: float = 1.0


def relative_position(box_a: Sequence[float], box_b: Sequence[float]) -> set[str]:
    """Relations of a relative to b: offset between centres, each axis shrunk by
    0.1 * (size_a + size_b), normalised by the unshrunk offset length; y grows downwards."""
    boxes = np.array([box_a, box_b], dtype=np.float64)[:, :4].reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def group_by_class(dets: Sequence[Detection]) -> dict[str, list[Detection]]:
    """class -> detections, highest confidence first (stable for ties)."""
    out: dict[str, list[Detection]] = {}
    for d in sorted(dets, key=lambda d: -d.score):
        out.setdefault(d.cls, []).append(d)
    return out


def filter_detections(dets: Sequence[Detection], tag: str, threshold: float = THRESHOLD,
                      counting_threshold: float = COUNTING_THRESHOLD,
                      max_objects: int = MAX_OBJECTS) -> dict[str, list[Detection]]:
    """evaluate_images.py's filter of a detector's output: per class, the detections with
    confidence strictly above the threshold (the stricter counting one for counting prompts,
    where one spurious low-confidence box breaks the exact count), highest first, at most
    max_objects. Ties keep input order; the official argsort leaves their order unspecified."""
    cut = counting_threshold if tag == "counting" else threshold
    out = group_by_class([d for d in dets if d.score > cut])
    return {cls: found[:max_objects] for cls, found in out.items()}


def evaluate_filtered(dets: Sequence[Detection], metadata: Mapping, **filter_kw) -> tuple[bool, str]:
    """GenEval's verdict on a real detector's raw output: the official filter, then the rules."""
    return evaluate(filter_detections(dets, metadata["tag"], **filter_kw), metadata)


def evaluate(objects: Mapping[str, Sequence[Detection]], metadata: Mapping) -> tuple[bool, str]:
    """GenEval's per-image verdict. `objects`: class -> detections sorted by confidence."""
    correct = True
    reasons: list[str] = []
    matched_groups: list[list[Detection] | None] = []
    for req in metadata.get("include", []):
        cls, count = req["class"], req["count"]
        matched = True
        found = list(objects.get(cls, []))[:count]
        if len(found) < count:
            correct = matched = False
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colors = [d.color for d in found]
                if colors.count(req["color"]) < count:
                    correct = matched = False
                    reasons.append(f"expected {req['color']} {cls}>={count}, found "
                                   f"{colors.count(req['color'])} {req['color']}")
            if "position" in req and matched:
                rel, target = req["position"]
                if target >= len(matched_groups):
                    raise ValueError(f"position clause of {cls!r} refers to clause {target}, "
                                     f"which is not an earlier include clause")
                if matched_groups[target] is None:
                    correct = matched = False
                    reasons.append(f"no target for {cls} to be {rel}")
                else:
                    for obj in found:
                        for tgt in matched_groups[target]:
                            rels = relative_position(obj.box, tgt.box)
                            if rel not in rels:
                                correct = matched = False
                                reasons.append(f"expected {cls} {rel} target, found "
                                               f"{' and '.join(sorted(rels)) or 'no relation'}")
                                break
                        if not matched:
                            break
        matched_groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        cls, count = req["class"], req["count"]
        if len(objects.get(cls, [])) >= count:
            correct = False
            reasons.append(f"expected {cls}<{count}, found {len(objects.get(cls, []))}")
    return correct, "\n".join(reasons)


def evaluate_detections(dets: Sequence[Detection], metadata: Mapping) -> tuple[bool, str]:
    return evaluate(group_by_class(dets), metadata)


def summarize(results: Sequence[tuple[str, bool]]) -> dict[str, float]:
    """Per-tag accuracy over images and GenEval's overall: the plain mean over tags present."""
    per: dict[str, list[bool]] = {}
    for tag, ok in results:
        per.setdefault(tag, []).append(bool(ok))
    scores = {tag: float(np.mean(v)) for tag, v in sorted(per.items())}
    scores["overall"] = float(np.mean(list(scores.values()))) if per else float("nan")
    return scores
