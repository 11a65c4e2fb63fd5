"""The shapes world end to end: renderer -> pixel detector -> GenEval rule engine, plus the
text grammar and the partial-scene checker."""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path

import numpy as np
import pytest

from strokes_jax.worlds import geneval
from strokes_jax.worlds.geneval import Detection
from strokes_jax.worlds import detect, grammar, prompts, shapes
from strokes_jax.worlds.shapes import Obj

GENEVAL_META = Path(__file__).resolve().parents[2] / "shared/benchmarks/geneval/evaluation_metadata.jsonl"
N_PER_TAG = 50


def _samples(tag: str, n: int = N_PER_TAG, seed: int = 0):
    rng = np.random.default_rng([seed, shapes.TAGS.index(tag)])
    out = []
    for _ in range(n):
        p = prompts.sample_prompt(rng, tag)
        out.append((p, prompts.sample_scene(rng, p)))
    return out


def _key(dets):
    return sorted((d.cls, tuple(d.box), d.color) for d in dets)


def _other_color(c: str) -> str:
    return next(x for x in shapes.COLORS if x != c)


# ------------------------------------------------------------------------------ detector


@pytest.mark.parametrize("tag", shapes.TAGS)
def test_detector_exact_on_clean_renders(tag):
    for p, scene in _samples(tag):
        img = shapes.render(scene)
        dets = detect.detect(img)
        assert _key(dets) == _key(prompts.scene_detections(scene)), (p.text, scene)
        assert all(d.score == 1.0 for d in dets)
        ok, reason = detect.check_image(img, p)
        assert ok, (p.text, scene, reason)


def test_every_shape_fills_its_box():
    # Obj.box is what a detector reports, so each mask must touch all four sides of it.
    for shape in shapes.SHAPES:
        for size in range(3, shapes.CELL + 1):
            m = shapes.shape_mask(shape, size)
            assert m.shape == (size, size)
            assert m.any(axis=1).all() and m.any(axis=0).all(), (shape, size)


@pytest.mark.parametrize("shape", shapes.SHAPES)
def test_detector_each_shape_at_sizes_6_to_12(shape):
    for size in range(6, shapes.CELL + 1):
        for color in ("red", "black", "white"):
            obj = Obj(shape, color, 1, 2, size=size)
            dets = detect.detect(shapes.render((obj,)), min_side=6)
            assert len(dets) == 1, (shape, size, dets)
            d = dets[0]
            assert (d.cls, d.box, d.color, d.score) == (shape, obj.box, color, 1.0)


def test_detector_mixed_sizes_and_free_placement():
    scene = (Obj("square", "blue", 0, 0, size=8), Obj("circle", "blue", 0, 1, size=12),
             Obj("cross", "pink", 2, 2, size=7), Obj("triangle", "orange", 1, 1, size=9))
    assert _key(detect.detect(shapes.render(scene))) == _key(prompts.scene_detections(scene))
    # Touching objects of different colours stay apart, vertically and horizontally.
    touching = (Obj("square", "red", 0, 0, size=12), Obj("square", "blue", 1, 0, size=12),
                Obj("circle", "green", 0, 1, size=12))
    assert _key(detect.detect(shapes.render(touching))) == _key(prompts.scene_detections(touching))
    # Off the grid, on another canvas size: the detector must not assume either.
    img = np.full((41, 57, 3), shapes.BACKGROUND, np.uint8)
    placed = [("triangle", "green", 3, 5, 11), ("circle", "yellow", 30, 17, 9),
              ("cross", "purple", 44, 29, 12)]
    for shape, color, x, y, s in placed:
        img[y:y + s, x:x + s][shapes.shape_mask(shape, s)] = shapes.PALETTE[color]
    want = sorted((sh, (float(x), float(y), float(x + s), float(y + s)), c)
                  for sh, c, x, y, s in placed)
    assert _key(detect.detect(img)) == want


def test_detector_drops_small_components():
    img = shapes.render(())
    img[5:8, 5:8] = shapes.PALETTE["red"]  # 9 px: under the default minimum area
    assert detect.detect(img) == []
    assert [d.cls for d in detect.detect(img, min_area=9, min_side=3)] == ["square"]


def test_detector_ignores_blocky_colour_noise():
    """What an undertrained model draws: patches of palette colours a few pixels wide. Such
    blobs must not count as objects."""
    rng = np.random.default_rng(0)
    names = list(shapes.PALETTE)
    for _ in range(20):
        img = shapes.render(())
        for y in range(0, shapes.CANVAS, 6):
            for x in range(0, shapes.CANVAS, 6):
                h, w = rng.integers(3, 6, size=2)  # 1-px gaps: blobs never merge
                img[y:y + h, x:x + w] = shapes.PALETTE[names[rng.integers(len(names))]]
        assert detect.detect(img) == []
    # A real object among the noise is still found.
    obj = Obj("circle", "blue", 1, 1)
    img[obj.row * shapes.CELL:(obj.row + 1) * shapes.CELL,
        obj.col * shapes.CELL:(obj.col + 1) * shapes.CELL] = shapes.BACKGROUND
    img = np.where((shapes.render((obj,)) != shapes.BACKGROUND).any(-1, keepdims=True),
                   shapes.render((obj,)), img)
    assert ("circle", "blue") in [(d.cls, d.color) for d in detect.detect(img)]


def test_detector_robust_to_noise():
    rng = np.random.default_rng(123)
    for tag in shapes.TAGS:
        for p, scene in _samples(tag, n=10, seed=1):
            clean = shapes.render(scene).astype(np.float64)
            noisy = np.clip(clean + rng.normal(0, 10, clean.shape), 0, 255).round().astype(np.uint8)
            dets = detect.detect(noisy)
            assert _key(dets) == _key(prompts.scene_detections(scene)), (p.text, scene)
            assert detect.check_image(noisy, p)[0]
    noise_only = np.clip(128 + rng.normal(0, 10, (36, 36, 3)), 0, 255).astype(np.uint8)
    assert detect.detect(noise_only) == []


# ------------------------------------------------------------------ corruption is caught


def test_checker_catches_wrong_colour():
    n = 0
    for tag in ("colors", "color_attr"):
        for p, scene in _samples(tag, n=15):
            i = int(np.argmax([o.shape == p.metadata["include"][0]["class"] for o in scene]))
            want = p.metadata["include"][0]["color"]
            bad = list(scene)
            bad[i] = scene[i].replace(color=_other_color(want))
            ok, reason = detect.check_image(shapes.render(bad), p)
            assert not ok
            assert f"expected {want} {scene[i].shape}>=1, found 0 {want}" in reason
            n += 1
    assert n == 30


def test_checker_catches_wrong_place():
    for p, scene in _samples("position", n=20):
        rel, _ = p.metadata["include"][1]["position"]
        ref, obj = scene  # sample_scene keeps clause order: the reference object first
        cells = [c for c in shapes.free_cells(scene)
                 if rel not in geneval.relative_position(obj.replace(row=c[0], col=c[1]).box, ref.box)]
        moved = obj.replace(row=cells[0][0], col=cells[0][1])
        ok, reason = detect.check_image(shapes.render((ref, moved)), p)
        assert not ok
        assert f"expected {obj.shape} {rel} target" in reason


def test_checker_catches_missing_object():
    for tag in ("single_object", "two_object", "counting", "colors", "color_attr"):
        for p, scene in _samples(tag, n=10):
            dropped = scene[-1]
            ok, reason = detect.check_image(shapes.render(scene[:-1]), p)
            assert not ok
            assert f"expected {dropped.shape}>=" in reason and "found" in reason
    for p, scene in _samples("position", n=10):
        ref, obj = scene
        ok, reason = detect.check_image(shapes.render((obj,)), p)
        assert not ok
        assert f"expected {ref.shape}>=1, found 0" in reason
        assert f"no target for {obj.shape} to be" in reason


def test_checker_catches_extra_instance():
    rng = np.random.default_rng(7)
    for p, scene in _samples("counting", n=20):
        n = p.metadata["include"][0]["count"]
        r, c = shapes.free_cells(scene)[int(rng.integers(9 - n))]
        extra = scene + (Obj(scene[0].shape, "green", r, c),)
        ok, reason = detect.check_image(shapes.render(extra), p)
        assert not ok
        assert f"expected {scene[0].shape}<{n + 1}, found {n + 1}" in reason


def test_geneval_ignores_unrequested_classes_but_partial_check_does_not():
    p, scene = _samples("single_object", n=1)[0]
    other = next(s for s in shapes.SHAPES if s != scene[0].shape)
    r, c = shapes.free_cells(scene)[0]
    scene = scene + (Obj(other, "red", r, c),)
    assert detect.check_image(shapes.render(scene), p)[0]  # GenEval has no exclude here
    violations, missing = prompts.partial_check(scene, p)
    assert [(v.kind, v.obj) for v in violations] == [("extra", scene[1])] and missing == []


# ------------------------------------------------------------------ rule engine semantics


def test_relative_position():
    rp = geneval.relative_position
    assert rp((0, 0, 10, 10), (20, 0, 30, 10)) == {"left of"}
    assert rp((20, 0, 30, 10), (0, 0, 10, 10)) == {"right of"}
    assert rp((0, 0, 10, 10), (0, 20, 10, 30)) == {"above"}
    assert rp((0, 20, 10, 30), (0, 0, 10, 10)) == {"below"}
    assert rp((0, 0, 10, 10), (20, 20, 30, 30)) == {"left of", "above"}  # diagonal: both
    assert rp((0, 0, 10, 10), (5, 20, 15, 30)) == {"above"}  # mostly vertical: not left of
    assert rp((0, 0, 10, 10), (16, 25, 26, 35)) == {"above"}  # dx = -0.47: just not left of
    assert rp((0, 0, 10, 10), (18, 25, 28, 35)) == {"left of", "above"}  # dx = -0.52
    assert rp((0, 0, 10, 10), (1, 1, 11, 11)) == set()  # shrunk offset vanishes
    # Size matters: big boxes need a larger gap (0.1 * (w_a + w_b) per axis is removed).
    assert rp((0, 0, 40, 10), (8, 0, 48, 10)) == set()
    assert rp((0, 0, 4, 10), (8, 0, 12, 10)) == {"left of"}


def _det(cls, x, y=0.0, color=None, score=1.0, s=10.0):
    return Detection(cls, (x, y, x + s, y + s), color, score)


def test_evaluate_counting_include_and_exclude():
    meta = {"include": [{"class": "cup", "count": 2}], "exclude": [{"class": "cup", "count": 3}]}
    assert geneval.evaluate_detections([_det("cup", 0), _det("cup", 20)], meta) == (True, "")
    ok, reason = geneval.evaluate_detections([_det("cup", 0)], meta)
    assert not ok and reason == "expected cup>=2, found 1"
    ok, reason = geneval.evaluate_detections([_det("cup", x) for x in (0, 20, 40)], meta)
    assert not ok and reason == "expected cup<3, found 3"
    assert geneval.evaluate_detections([_det("cup", 0), _det("cup", 20), _det("dog", 40)], meta)[0]


def test_evaluate_colour_checks_first_count_by_confidence():
    meta = {"include": [{"class": "car", "count": 2, "color": "red"}]}
    dets = [_det("car", 0, color="red", score=0.9), _det("car", 20, color="blue", score=0.8),
            _det("car", 40, color="red", score=0.7)]
    ok, reason = geneval.evaluate_detections(dets, meta)
    assert not ok and reason.startswith("expected red car>=2, found 1 red")
    dets[2] = _det("car", 40, color="red", score=0.85)  # now the two reds are the top two
    assert geneval.evaluate_detections(dets, meta) == (True, "")


def test_evaluate_position_and_no_target():
    meta = {"include": [{"class": "dog", "count": 1},
                        {"class": "cat", "count": 1, "position": ["left of", 0]}]}
    assert geneval.evaluate_detections([_det("dog", 50), _det("cat", 0)], meta)[0]
    ok, reason = geneval.evaluate_detections([_det("dog", 0), _det("cat", 50)], meta)
    assert not ok and reason == "expected cat left of target, found right of"
    ok, reason = geneval.evaluate_detections([_det("cat", 0)], meta)
    assert not ok and reason.split("\n") == ["expected dog>=1, found 0",
                                             "no target for cat to be left of"]
    # A colour failure of the target also leaves "no target".
    meta_c = {"include": [{"class": "dog", "count": 1, "color": "red"},
                          {"class": "cat", "count": 1, "position": ["left of", 0]}]}
    ok, reason = geneval.evaluate_detections([_det("dog", 50, color="blue"), _det("cat", 0)], meta_c)
    assert not ok and "no target for cat to be left of" in reason
    with pytest.raises(ValueError):
        geneval.evaluate_detections([_det("cat", 0)], {"include": [
            {"class": "cat", "count": 1, "position": ["left of", 0]}]})


def test_summarize_is_mean_over_tags():
    s = geneval.summarize([("a", True), ("a", False), ("b", True)])
    assert s == {"a": 0.5, "b": 1.0, "overall": 0.75}  # not 2/3: tags weigh equally
    assert math.isnan(geneval.summarize([])["overall"])


# --------------------------------------------------------------- real GenEval metadata


def _perfect_detections(meta: dict) -> list[list[Detection]]:
    """Per include clause, detections that satisfy it: unconstrained clauses on a row, a
    position clause far from its target in the relation's direction."""
    step = {"left of": (-1, 0), "right of": (1, 0), "above": (0, -1), "below": (0, 1)}
    groups: list[list[Detection]] = []
    x = 0.0
    for clause in meta["include"]:
        color = clause.get("color", "white")
        if "position" in clause:
            rel, tgt = clause["position"]
            ref = groups[tgt][0].box
            dx, dy = step[rel]
            dets = [_det(clause["class"], ref[0] + 1000 * dx + 10 * k * dy,
                         ref[1] + 1000 * dy + 10 * k * dx, color) for k in range(clause["count"])]
        else:
            dets = []
            for _ in range(clause["count"]):
                dets.append(_det(clause["class"], x, 0.0, color))
                x += 50
        groups.append(dets)
    return groups


def test_geneval_metadata():
    if not GENEVAL_META.exists():
        pytest.skip(f"{GENEVAL_META} not present")
    lines = [json.loads(l) for l in GENEVAL_META.read_text().splitlines() if l.strip()]
    assert len(lines) == 553
    ps = [prompts.Prompt.from_geneval(l) for l in lines]
    assert collections.Counter(p.tag for p in ps) == {
        "single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100,
        "color_attr": 100}
    for p in ps:
        groups = _perfect_detections(p.metadata)
        flat = [d for g in groups for d in g]
        ok, reason = geneval.evaluate_detections(flat, p.metadata)
        assert ok, (p.text, reason)
        for i, g in enumerate(groups):  # drop one object of each clause in turn
            cls = p.metadata["include"][i]["class"]
            ok, reason = geneval.evaluate_detections([d for d in flat if d is not g[-1]], p.metadata)
            assert not ok and f"expected {cls}>=" in reason, (p.text, i)
        if p.tag == "counting":  # one more than asked trips the exclude clause
            ok, _ = geneval.evaluate_detections(flat + [_det(flat[0].cls, -500)], p.metadata)
            assert not ok
    assert sum(p.tag == "counting" and "exclude" in p.metadata for p in ps) == 80


def test_shapes_prompts_use_geneval_schema():
    for tag in shapes.TAGS:
        for p, _ in _samples(tag, n=5):
            assert prompts.Prompt.from_geneval(json.loads(p.to_json())) == p


# ----------------------------------------------------------------------------- grammar


def test_describe_round_trip():
    assert grammar.parse_description(grammar.describe(())) == ()
    vocab = set(grammar.vocabulary())
    for tag in shapes.TAGS:
        for p, scene in _samples(tag, n=5):
            text = grammar.describe(scene)
            assert grammar.parse_description(text) == scene
            assert set(text.split()) <= vocab and set(p.text.split()) <= vocab
    with pytest.raises(grammar.GrammarError):
        grammar.parse_description("red square at r0 c0 , blue circle at r0 c0")  # same cell
    for bad in ("red hexagon at r0 c0", "red square at r3 c0", "red square r0 c0"):
        with pytest.raises(grammar.GrammarError):
            grammar.parse_obj(bad)


A = Obj("square", "red", 0, 0)
B = Obj("circle", "blue", 1, 1)


def test_commands_text_parse_apply():
    scene = (A, B)
    cases = [
        (grammar.Command("add", Obj("cross", "green", 2, 2)), "add green cross at r2 c2",
         (A, B, Obj("cross", "green", 2, 2))),
        (grammar.Command("remove", A), "remove red square at r0 c0", (B,)),
        (grammar.Command("recolour", A, color="pink"), "recolour red square at r0 c0 to pink",
         (A.replace(color="pink"), B)),
        (grammar.Command("move", B, cell=(2, 0)), "move blue circle at r1 c1 to r2 c0",
         (A, B.replace(row=2, col=0))),
        (grammar.Command("swap", A, other=B), "swap red square at r0 c0 with blue circle at r1 c1",
         (A.replace(row=1, col=1), B.replace(row=0, col=0))),
    ]
    for cmd, text, after in cases:
        assert cmd.text() == text
        assert grammar.parse_command(text) == cmd
        assert cmd.apply(scene) == after
    errors = [
        grammar.Command("add", Obj("cross", "green", 0, 0)),  # taken cell
        grammar.Command("remove", Obj("cross", "green", 2, 2)),  # absent
        grammar.Command("remove", A.replace(color="blue")),  # right cell, wrong colour
        grammar.Command("recolour", Obj("cross", "green", 2, 2), color="red"),
        grammar.Command("move", A, cell=(1, 1)),  # taken cell
        grammar.Command("swap", A, other=Obj("cross", "green", 2, 2)),
    ]
    for cmd in errors:
        with pytest.raises(grammar.GrammarError):
            cmd.apply(scene)
    for bad in ("add red square", "paint red square at r0 c0", "move red square at r0 c0 to r5 c0"):
        with pytest.raises(grammar.GrammarError):
            grammar.parse_command(bad)


def test_issues_and_verdicts():
    issues = [grammar.Issue("missing", A), grammar.Issue("extra", B),
              grammar.Issue("color", A, color="yellow"), grammar.Issue("place", A, cell=(2, 1)),
              grammar.Issue("relation", A, relation="right of", other=B)]
    texts = ["missing red square at r0 c0", "extra blue circle at r1 c1",
             "red square at r0 c0 should be yellow", "red square at r0 c0 should be at r2 c1",
             "red square at r0 c0 should be right of blue circle at r1 c1"]
    for issue, text in zip(issues, texts):
        assert issue.text() == text
        assert grammar.parse_issue(text) == issue
    for plan in (None, *issues):
        for image in (None, *issues):
            v = grammar.Verdict(plan, image)
            assert grammar.parse_verdict(v.text()) == v
            assert v.ok == (plan is None and image is None)
    assert grammar.Verdict().text() == "plan ok ; image ok"
    for bad in ("plan ok", "image ok ; plan ok", "plan fine ; image ok",
                "plan ok ; image wrong : red square at r0 c0 should be huge"):
        with pytest.raises(grammar.GrammarError):
            grammar.parse_verdict(bad)


def test_partial_check_missing_vs_violations():
    pos = prompts.Prompt("a photo of a square left of a circle", "position", {"include": [
        {"class": "circle", "count": 1}, {"class": "square", "count": 1, "position": ["left of", 0]}]})
    circle = Obj("circle", "blue", 1, 1)
    assert prompts.partial_check((), pos) == ([], [{"class": "circle", "color": None},
                                                   {"class": "square", "color": None}])
    # Drawn so far is right, the square is just not drawn yet: missing, not a violation.
    assert prompts.partial_check((circle,), pos) == ([], [{"class": "square", "color": None}])
    assert prompts.partial_check((circle, Obj("square", "red", 1, 0)), pos) == ([], [])
    wrong = Obj("square", "red", 1, 2)
    violations, missing = prompts.partial_check((circle, wrong), pos)
    assert missing == [] and len(violations) == 1
    v = violations[0]
    assert (v.kind, v.obj, v.relation, v.other) == ("place", wrong, "left of", circle)
    fixed = wrong.replace(row=v.cell[0], col=v.cell[1])
    assert prompts.check_scene((circle, fixed), pos)[0]

    col = prompts.Prompt("a photo of a red cross", "colors",
                         {"include": [{"class": "cross", "count": 1, "color": "red"}]})
    violations, missing = prompts.partial_check((Obj("cross", "green", 0, 0),), col)
    assert [(v.kind, v.color) for v in violations] == [("color", "red")] and missing == []
    assert prompts.partial_check((), col) == ([], [{"class": "cross", "color": "red"}])

    cnt = prompts.sample_prompt(np.random.default_rng(0), "counting")
    n, cls = cnt.metadata["include"][0]["count"], cnt.metadata["include"][0]["class"]
    objs = [Obj(cls, "black", i // 3, i % 3) for i in range(n + 1)]
    assert prompts.partial_check(objs[:1], cnt) == ([], [{"class": cls, "color": None}] * (n - 1))
    violations, missing = prompts.partial_check(objs, cnt)
    assert [(v.kind, v.obj) for v in violations] == [("extra", objs[-1])] and missing == []


def test_prompts_use_genevals_articles():
    """GenEval writes "an orange cow": a colour that starts with a vowel takes "an"."""
    rng = np.random.default_rng(0)
    texts = [prompts.sample_prompt(rng, tag).text for tag in ("colors", "color_attr")
             for _ in range(300)]
    orange = [t for t in texts if "orange" in t]
    assert orange and all(" an orange" in t and " a orange" not in t for t in orange)
    assert all(" an red" not in t for t in texts)
    vocab = set(grammar.vocabulary())
    assert all(w in vocab for t in texts for w in t.split())
