"""Real-data episodes: the JSONL manifest parser, per-image shapes in records (SJEP2, with
SJEP1 unchanged), and the manifest -> ArrayRecord builder with its counted, bounded skips.
Every fixture (PNG and JPEG images of several sizes, the manifests) is written here."""

from __future__ import annotations

import base64
import io
import json
import os
import struct

import numpy as np
import pytest
from PIL import Image

from strokes_jax.data import manifest_builder as mb
from strokes_jax.data import pipeline as pl
from strokes_jax.episodes import episode as ep
from strokes_jax.episodes import jsonl, mixer

MIN_SIDE, MAX_TEXT = 32, 200


def _rng_image(rng, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(path, img: np.ndarray, fmt: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(img).save(path, fmt)


def _png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


def _step(image, ins="add the thing", des="the thing", inspect="plan ok ; image ok", **kw):
    return {"ins": ins, "des": des, "image": image, "inspect": inspect, **kw}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A folder with images and a manifest: good lines, then one bad line of each kind. The
    missing image sits on line 7, in step 2, so its message is the documented example."""
    root = tmp_path_factory.mktemp("real")
    rng = np.random.default_rng(0)
    px = {}  # file name -> the exact pixels written (PNG) or None (JPEG, lossy)
    for name, (h, w) in {"a/0.png": (48, 80), "a/1.png": (120, 64), "a/2.jpg": (96, 96),
                         "b/0.jpg": (64, 200), "b/1.png": (64, 200), "c/0.png": (40, 40)}.items():
        img = _rng_image(rng, h, w)
        _save(root / name, img, "PNG" if name.endswith("png") else "JPEG")
        px[name] = img if name.endswith("png") else None
    _save(root / "small.png", _rng_image(rng, 20, 100), "PNG")  # shorter side below MIN_SIDE
    _save(root / "full.jpg", _rng_image(rng, 80, 120), "JPEG")
    data = (root / "full.jpg").read_bytes()
    (root / "cut.jpg").write_bytes(data[:len(data) // 2])  # a truncated download
    inline = _rng_image(rng, 33, 57)
    good = [
        {"id": "g0", "prompt": "a red sofa, then a cat on it", "tag": "pets", "metadata": {"src": "t"},
         "steps": [_step("a/0.png"), _step("a/1.png", inspect="plan ok ; image wrong : the cat is blue",
                                           refine="make the cat grey", refined="a/2.jpg")]},
        {"id": "g1", "prompt": "a single picture", "steps": [_step({"bytes_b64": base64.b64encode(
            _png_bytes(inline)).decode()}, ins=None, des=None, inspect=None)]},
        {"id": "g2", "prompt": "a wide landscape", "kind": "critique",
         "steps": [_step("b/0.jpg", context_only=True), _step("b/1.png")]},
    ]
    lines = [json.dumps(g) for g in good]
    lines.insert(1, "")  # blank lines are not records
    lines += [
        "",
        '{"id": "m0", "prompt": "cut off',  # line 6: malformed JSON
        json.dumps({"id": "m1", "prompt": "x", "steps": [_step("c/0.png"), _step("c/0.png"),
                                                          _step("c/nope.png")]}),  # line 7
        json.dumps({"id": "m2", "prompt": "x", "steps": [_step("cut.jpg")]}),
        json.dumps({"id": "m3", "prompt": "x", "steps": [_step("small.png")]}),
        json.dumps({"id": "m4", "prompt": "x" * (MAX_TEXT + 1), "steps": [_step("c/0.png")]}),
    ]
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    (root / "good.jsonl").write_text("\n".join(json.dumps(g) for g in good) + "\n")
    (root / "eval.jsonl").write_text(json.dumps({"id": "e0", "prompt": "held out", "steps": [_step("c/0.png")]})
                                     + "\n" + json.dumps(good[0]) + "\n")  # g0 again: a duplicate id
    return {"root": root, "px": px, "inline": inline, "good": good,
            "bad": {"malformed": 6, "missing_image": 7, "corrupt_image": 8, "small_image": 9, "long_text": 10}}


LIMITS = jsonl.Limits(min_side=MIN_SIDE, max_text_chars=MAX_TEXT)


def assert_same(a: ep.Episode, b: ep.Episode) -> None:
    assert (a.id, a.prompt, a.tag, a.metadata, a.kind) == (b.id, b.prompt, b.tag, b.metadata, b.kind)
    assert len(a.steps) == len(b.steps)
    for s, t in zip(a.steps, b.steps):
        for k in ("ins", "des", "inspect", "refine", "sketch_target"):
            assert getattr(s, k) == getattr(t, k), k
        for x, y in ((s.sketch, t.sketch), (s.refined, t.refined)):
            assert (x is None) == (y is None)
            if x is not None:
                assert x.dtype == y.dtype == np.uint8 and np.array_equal(x, y)


# -- the parser ----------------------------------------------------------------------------
def test_good_lines_parse_to_episodes(world):
    root, px = world["root"], world["px"]
    g0, g1, g2 = jsonl.load_manifest(root / "good.jsonl", LIMITS)
    assert np.array_equal(g0.steps[0].sketch, px["a/0.png"]) and g0.steps[0].sketch.shape == (48, 80, 3)
    assert np.array_equal(g0.steps[1].sketch, px["a/1.png"])
    want = np.asarray(Image.open(root / "a/2.jpg").convert("RGB"))
    assert np.array_equal(g0.steps[1].refined, want)
    assert g0.steps[1].refine == "make the cat grey" and g0.metadata == {"src": "t"} and g0.tag == "pets"
    assert g0.kind == "additive"
    assert g1.kind == "single_pass" and g1.steps[0].ins is None and g1.tag == "" and g1.metadata == {}
    assert np.array_equal(g1.steps[0].sketch, world["inline"])
    assert g2.kind == "critique" and [s.sketch_target for s in g2.steps] == [False, True]


def test_each_bad_line_is_one_named_error(world):
    path = str(world["root"] / "manifest.jsonl")
    out = {n: e for n, e in jsonl.iter_manifest(path, LIMITS)}
    errors = {e.reason: (n, str(e)) for n, e in out.items() if isinstance(e, jsonl.ManifestError)}
    assert {r: n for r, (n, _) in errors.items()} == world["bad"]
    for n, msg in errors.values():
        assert msg.startswith(f"{path}:{n}: ") and "\n" not in msg
    assert errors["missing_image"][1] == f"{path}:7: step 2: image 'c/nope.png' not found"
    assert "'cut.jpg' is not a readable image" in errors["corrupt_image"][1]
    assert "100x20" in errors["small_image"][1] and "min_side 32" in errors["small_image"][1]
    assert "prompt is 201 characters" in errors["long_text"][1]
    assert "not valid JSON" in errors["malformed"][1]
    with pytest.raises(jsonl.ManifestError, match=r"manifest\.jsonl:6: not valid JSON"):
        jsonl.load_manifest(path, LIMITS)


@pytest.mark.parametrize("obj, message", [
    ({"prompt": "p", "steps": []}, "missing field 'id'"),
    ({"id": "x", "steps": []}, "missing field 'prompt'"),
    ({"id": "x", "prompt": "p", "steps": "a.png"}, "field 'steps' must be list"),
    ({"id": "x", "prompt": 3, "steps": []}, "field 'prompt' must be str, not 3"),
    ({"id": "x", "prompt": "p", "steps": [{"des": "d", "image": "c/0.png", "inspect": None}]},
     "step 0: missing field 'ins'"),
    ({"id": "x", "prompt": "p", "steps": [{"ins": "i", "des": "d", "inspect": None}]},
     "step 0: missing field 'image'"),
    ({"id": "x", "prompt": "p", "steps": [_step(7)]}, "step 0: image must be a path"),
    ({"id": "x", "prompt": "p", "steps": [_step({"bytes_b64": "!!"})]}, "not valid base64"),
    ({"id": "x", "prompt": "p", "steps": [_step({"bytes_b64": "aGVsbG8="})]}, "not a readable image"),
    ({"id": "x", "prompt": "p", "steps": [_step("c/0.png", context_only="yes")]},
     "field 'context_only' must be bool"),
    ({"id": "x", "prompt": "p", "steps": [_step("c/0.png", ins=None)]}, "needs both <ins> and <des>"),
    ({"id": "x", "prompt": "p", "steps": [_step("c/0.png", refine="fix it")]}, "come together"),
    ({"id": "x", "prompt": "p", "steps": []}, "no steps"),
    ({"id": "x", "prompt": "p", "kind": "photo", "steps": [_step("c/0.png")]}, "unknown kind"),
    ([1, 2], "must be a JSON object"),
])
def test_malformed_fields(world, obj, message):
    path = str(world["root"] / "x.jsonl")
    with pytest.raises(jsonl.ManifestError) as err:
        jsonl.parse_line(json.dumps(obj), path, 3, LIMITS)
    assert str(err.value).startswith(f"{path}:3: ") and message in str(err.value), str(err.value)


def test_images_become_uint8_rgb(world):
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (40, 50), dtype=np.uint8)
    rgba = np.dstack([_rng_image(rng, 40, 50), np.zeros((40, 50), np.uint8)])  # fully transparent
    deep = (rng.integers(0, 65536, (40, 50))).astype(np.uint16)
    for arr, want in ((grey, np.repeat(grey[..., None], 3, 2)), (rgba, np.full((40, 50, 3), 255)),
                      (deep, None)):
        img = jsonl.decode_image(_png_bytes(arr))
        assert img.dtype == np.uint8 and img.shape == (40, 50, 3)
        if want is not None:
            assert np.array_equal(img, want)
    assert abs(int(jsonl.decode_image(_png_bytes(deep))[0, 0, 0]) - int(deep[0, 0]) / 257) <= 1


# -- records -------------------------------------------------------------------------------
def _sjep1_reference(e: ep.Episode) -> bytes:
    """The SJEP1 writer as it was before per-image shapes, frozen here: shapes-world records
    must keep these exact bytes."""
    images, steps = [], []
    for s in e.steps:
        d = {k: getattr(s, k) for k in ("ins", "des", "inspect", "refine")}
        d["sketch"] = len(images)
        if not s.sketch_target:
            d["sketch_target"] = False
        images.append(np.ascontiguousarray(s.sketch, np.uint8))
        if s.refined is not None:
            d["refined"] = len(images)
            images.append(np.ascontiguousarray(s.refined, np.uint8))
        steps.append(d)
    header = json.dumps({"id": e.id, "prompt": e.prompt, "tag": e.tag, "metadata": e.metadata,
                         "kind": e.kind, "steps": steps, "image_shape": list(images[0].shape)}).encode()
    return b"SJEP1" + struct.pack("<I", len(header)) + header + b"".join(i.tobytes() for i in images)


def test_shapes_records_are_unchanged_sjep1():
    mix = {"additive": 1.0, "single_pass": 1.0, "edit": 1.0, "critique": 1.0}
    episodes = list(mixer.generate_episodes(0, 3, {"additive": 1.0})) + list(mixer.generate_episodes(1, 12, mix))
    for e in episodes:
        raw = e.to_bytes()
        assert raw[:5] == b"SJEP1" and raw == _sjep1_reference(e)
        assert ep.Episode.from_bytes(raw).to_bytes() == raw
        assert_same(ep.Episode.from_bytes(raw), e)


def test_mixed_shapes_write_sjep2_and_read_back(world):
    g0, g1, g2 = jsonl.load_manifest(world["root"] / "good.jsonl", LIMITS)
    assert g0.to_bytes()[:5] == b"SJEP2" and g2.to_bytes()[:5] == b"SJEP1"
    for e in (g0, g1, g2):
        assert_same(ep.Episode.from_bytes(e.to_bytes()), e)
    raw = g0.to_bytes()
    with pytest.raises(ep.EpisodeError, match=r"record r7 \(episode 'g0'\): image bytes"):
        ep.Episode.from_bytes(raw[:-10], record="r7")


def test_float_images_are_refused():
    e = ep.Episode("floaty", "a prompt", "", {}, [ep.Step(sketch=np.ones((8, 8, 3), np.float32))])
    with pytest.raises(ep.EpisodeError, match=r"episode 'floaty', step 0: sketch image is float32"):
        e.to_bytes()
    e.steps[0].sketch = np.zeros((8, 8, 3), np.uint8)
    e.steps[0].inspect, e.steps[0].refine, e.steps[0].refined = "wrong", "fix", np.zeros((8, 8, 3))
    with pytest.raises(ep.EpisodeError, match="refined image is float64"):
        e.to_bytes()


def test_validate_any_shape():
    step = lambda img: ep.Episode("v", "a prompt", "", {}, [ep.Step(sketch=img)], kind="single_pass")
    step(np.zeros((50, 70, 3), np.uint8)).validate(None)
    for bad in (np.zeros((50, 70), np.uint8), np.zeros((50, 70, 4), np.uint8),
                np.zeros((0, 70, 3), np.uint8), np.zeros((50, 70, 3), np.float32)):
        with pytest.raises(ep.EpisodeError, match="expected uint8"):
            step(bad).validate(None)
    with pytest.raises(ep.EpisodeError, match=r"expected uint8\[36, 36, 3\]"):
        step(np.zeros((50, 70, 3), np.uint8)).validate((36, 36, 3))


# -- the builder ---------------------------------------------------------------------------
def _config(world, name: str, **kw) -> mb.ManifestConfig:
    kw = {"manifest": str(world["root"] / "manifest.jsonl"), "min_side": MIN_SIDE,
          "max_text_chars": MAX_TEXT, "max_bad_fraction": 0.7, **kw}
    return mb.ManifestConfig(name=name, **kw)


def test_build_round_trips_and_counts_skips(world, tmp_path):
    cfg = _config(world, "photos", eval_manifest=str(world["root"] / "eval.jsonl"))
    s = mb.build(tmp_path, cfg, progress=False)
    assert s.written == {"train": 3, "eval": 1} and s.skipped == {"train": 5, "eval": 1}
    assert s.reasons == {r: 1 for r in list(world["bad"]) + ["duplicate_id"]}
    rows = [json.loads(x) for x in open(s.skipped_path)]
    path = str(world["root"] / "manifest.jsonl")
    assert {(r["reason"], r["line"]) for r in rows if r["split"] == "train"} == set(world["bad"].items())
    assert all(r["message"].startswith(f"{r['file']}:{r['line']}: ") for r in rows)
    assert any(r["message"] == f"{path}:7: step 2: image 'c/nope.png' not found" for r in rows)
    (dup,) = [r for r in rows if r["split"] == "eval"]
    assert dup["reason"] == "duplicate_id" and "'g0'" in dup["message"]
    assert os.path.dirname(s.skipped_path) == s.data_dir and "photos" in str(s) and "long_text 1" in str(s)

    want = jsonl.load_manifest(world["root"] / "good.jsonl", LIMITS)
    src = mb.data_source(tmp_path, cfg, "train")
    got = [pl.decode_item(src[i], record=f"#{i}") for i in range(len(src))]
    assert len(got) == 3
    for g, w in zip(got, want):
        assert_same(g, w)
    (e0,) = [pl.decode_item(x) for x in mb.data_source(tmp_path, cfg, "eval")]
    assert e0.id == "e0" and e0.steps[0].sketch.shape == (40, 40, 3)

    # Built once: building again reads the same counts back; other limits under the name raise.
    assert mb.build(tmp_path, cfg, progress=False) == s
    with pytest.raises(ValueError, match="give this config another name"):
        mb.build(tmp_path, _config(world, "photos", eval_manifest=cfg.eval_manifest, min_side=8))


def test_too_many_bad_records_stop_the_build(world, tmp_path):
    cfg = _config(world, "strict", max_bad_fraction=0.25)  # 8 records: 2 bad allowed, 5 found
    path = str(world["root"] / "manifest.jsonl")
    with pytest.raises(mb.TooManyBadRecords) as err:
        mb.build(tmp_path, cfg, progress=False)
    msg = str(err.value)
    assert msg.startswith(f"{path}: more than 2 of 8 records bad") and "\n" not in msg
    assert f"stopped at {path}:8: " in msg  # the third bad line
    assert not mb.builder(tmp_path, cfg).is_prepared()


def test_a_clean_manifest_skips_nothing(world, tmp_path):
    s = mb.build(tmp_path, _config(world, "clean", manifest=str(world["root"] / "good.jsonl"),
                                   max_bad_fraction=0.0), progress=False)
    assert s.written == {"train": 3} and s.skipped == {} and s.reasons == {}
    assert os.path.getsize(s.skipped_path) == 0
