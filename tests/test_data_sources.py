"""Text-to-image sources: BAGEL-layout parquet files and webdataset tars become the same typed
episodes in ArrayRecord as a manifest, with named, counted and bounded skips; `train` reads a
parquet source like any other. Every fixture (PNG and JPEG images of several sizes, the
parquet files, the tars) is written here."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from strokes_jax.configs import schema, shapes_tiny
from strokes_jax.data import manifest_builder as mb
from strokes_jax.data import pipeline as pl
from strokes_jax.data import t2i_builders as tb
from strokes_jax.episodes import jsonl, mixer, sources

MIN_SIDE, MAX_TEXT = 32, 200
LIMITS = jsonl.Limits(min_side=MIN_SIDE, max_text_chars=MAX_TEXT)


def _encode(img: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, fmt)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    rng = np.random.default_rng(0)
    px = {k: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
          for k, (h, w) in {"wide": (48, 80), "tall": (120, 64), "square": (64, 64), "small": (20, 100),
                            "s0": (40, 40), "s1": (40, 56)}.items()}
    # BAGEL's layout: raw bytes in `image`, a JSON object of named captions in `captions`.
    bagel = pa.table({"image": [_encode(px["wide"], "PNG"), b"\xff\xd8 not a jpeg", _encode(px["tall"], "JPEG")],
                      "captions": [json.dumps({"short": "a red sofa", "long": "a red sofa by a window"}),
                                   json.dumps({"short": "broken"}), "a tall tower"],
                      "width": [80, 0, 64]})  # other columns are not read
    pq.write_table(bagel, root / "bagel.parquet")
    # Hugging Face's image struct and a plain `caption`: a good row, then one bad row of each kind.
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    hf = pa.table({"img": pa.array([{"bytes": _encode(px["square"], "PNG"), "path": "a.png"},
                                    {"bytes": _encode(px["small"], "PNG"), "path": None},
                                    {"bytes": _encode(px["square"], "PNG"), "path": None},
                                    {"bytes": None, "path": "elsewhere.jpg"},
                                    {"bytes": _encode(px["square"], "PNG"), "path": None}], struct),
                   "caption": ["a square", "too small", "x" * (MAX_TEXT + 1), "no bytes", None]})
    pq.write_table(hf, root / "hf.parquet", row_group_size=2)  # rows span row groups
    episode = {"id": "ep-2", "prompt": "a hat, then a scarf", "steps": [
        {"ins": "draw a hat", "des": "a hat", "image": "0.png", "inspect": None},
        {"ins": "add a scarf", "des": "a hat and a scarf", "image": "0002.1.png", "inspect": "plan ok ; image ok"}]}
    with tarfile.open(root / "shard-0.tar", "w") as tar:
        _add(tar, "0000.jpg", _encode(px["square"], "JPEG"))
        _add(tar, "0000.json", json.dumps({"caption": "a square photo", "url": "u"}).encode())
        _add(tar, "0001.json", json.dumps({"caption": "its image is missing"}).encode())
        _add(tar, "0002.0.png", _encode(px["s0"], "PNG"))
        _add(tar, "0002.1.png", _encode(px["s1"], "PNG"))
        _add(tar, "0002.json", json.dumps(episode).encode())
    with tarfile.open(root / "shard-1.tar", "w") as tar:
        _add(tar, "0003.png", _encode(px["wide"], "PNG"))
        _add(tar, "0003.json", b'{"caption": "cut off')
        _add(tar, "0004.png", _encode(px["wide"], "PNG"))  # no json member
        _add(tar, "0005.png", _encode(px["wide"], "PNG"))
        _add(tar, "0005.json", json.dumps({"captions": ["", "a wide one"]}).encode())
    return {"root": root, "px": px}


# -- the readers ------------------------------------------------------------------------------
def test_bagel_parquet_rows_become_one_step_episodes(files):
    path = str(files["root"] / "bagel.parquet")
    out = dict(sources.iter_parquet(path, limits=LIMITS))
    a, bad, c = out[0], out[1], out[2]
    assert (a.id, a.prompt, a.kind, a.tag) == ("bagel:0", "a red sofa", "single_pass", "")
    assert a.metadata == {"source": "bagel.parquet", "row": 0, "captions": ["a red sofa", "a red sofa by a window"]}
    (step,) = a.steps
    assert step.ins is step.des is step.inspect is step.refine is None and step.sketch_target
    assert np.array_equal(step.sketch, files["px"]["wide"])
    want = np.asarray(Image.open(io.BytesIO(_encode(files["px"]["tall"], "JPEG"))).convert("RGB"))
    assert c.prompt == "a tall tower" and np.array_equal(c.steps[0].sketch, want)
    assert isinstance(bad, sources.RecordError) and bad.reason == "corrupt_image" and bad.line == 1
    assert str(bad) == f"{path}:row 1: image is not a readable image (not an image format Pillow knows)"


def test_parquet_columns_and_bad_rows(files):
    path = str(files["root"] / "hf.parquet")
    cols = sources.Columns(image="img", caption="caption")
    out = dict(sources.iter_parquet(path, cols, LIMITS))
    assert np.array_equal(out[0].steps[0].sketch, files["px"]["square"]) and out[0].prompt == "a square"
    errors = {n: (e.reason, str(e)) for n, e in out.items() if isinstance(e, sources.RecordError)}
    assert {n: r for n, (r, _) in errors.items()} == {1: "small_image", 2: "long_text", 3: "missing_image",
                                                      4: "malformed"}
    assert errors[1][1] == f"{path}:row 1: image is 100x20, shorter side below min_side 32"
    assert errors[2][1] == f"{path}:row 2: caption is 201 characters, more than max_text_chars 200"
    assert "image has no bytes (path 'elsewhere.jpg' only)" in errors[3][1]
    with pytest.raises(sources.ColumnError, match=r"has no column 'image' \(its columns: img, caption\)"):
        sources.check_columns(path, sources.Columns())
    assert sources.count_rows(path) == 5


@pytest.mark.parametrize("value, prompt", [
    ("a cat", "a cat"), ('{"a": "", "b": "a dog"}', "a dog"), (["", " a fox "], "a fox"),
    ({"k": "an owl"}, "an owl"), ("[not json] a bird", "[not json] a bird"), (b"a cow", "a cow")])
def test_caption_forms(value, prompt):
    assert sources.captions(value)[0] == prompt


@pytest.mark.parametrize("value, reason", [(None, "malformed"), ('{"a": ', "malformed"), ("  ", "invalid"),
                                           ({"a": 3}, "malformed"), ({}, "invalid")])
def test_bad_captions(value, reason):
    with pytest.raises(jsonl.BadRecord) as err:
        sources.captions(value)
    assert err.value.reason == reason


def test_tar_samples_captions_and_episodes(files):
    root = files["root"]
    path = str(root / "shard-0.tar")
    assert sources.count_samples(path) == 3
    out = dict(sources.iter_tar(path, LIMITS))
    cap, missing, full = out["0000"], out["0001"], out["0002"]
    assert (cap.id, cap.prompt, cap.kind, cap.metadata) == ("shard-0:0000", "a square photo", "single_pass",
                                                             {"source": "shard-0.tar", "key": "0000"})
    assert cap.steps[0].sketch.shape == (64, 64, 3)
    assert str(missing) == f"{path}:0001: no image member (the sample has: json)"
    assert missing.reason == "missing_image" and missing.locator == "key"
    # A json with steps is a manifest episode; its images name members by extension or name.
    assert (full.id, full.kind, [s.ins for s in full.steps]) == ("ep-2", "additive", ["draw a hat", "add a scarf"])
    assert np.array_equal(full.steps[0].sketch, files["px"]["s0"])
    assert np.array_equal(full.steps[1].sketch, files["px"]["s1"])

    other = str(root / "shard-1.tar")
    out = dict(sources.iter_tar(other, LIMITS))
    assert out["0005"].prompt == "a wide one"
    assert (out["0003"].reason, out["0004"].reason) == ("malformed", "malformed")
    assert str(out["0003"]).startswith(f"{other}:0003: 0003.json is not valid JSON")
    assert str(out["0004"]) == f"{other}:0004: no 0004.json member (the sample has: png)"


def test_episode_json_naming_a_missing_member(tmp_path):
    path = str(tmp_path / "s.tar")
    with tarfile.open(path, "w") as tar:
        _add(tar, "k.json", json.dumps({"id": "e", "prompt": "p", "steps": [
            {"ins": None, "des": None, "image": "0.png", "inspect": None}]}).encode())
    ((_, e),) = sources.iter_tar(path, LIMITS)
    assert str(e) == f"{path}:k: step 0: image '0.png' is not a member of the sample"
    assert e.reason == "missing_image"


def test_a_file_that_is_no_tar_stops_with_one_line(tmp_path):
    path = tmp_path / "x.tar"
    path.write_bytes(b"not a tar" * 100)
    with pytest.raises(sources.ShardError, match=r"x\.tar: not a readable tar"):
        sources.count_samples(str(path))


# -- the builders -----------------------------------------------------------------------------
def _parquet(files, name: str, **kw) -> tb.ParquetConfig:
    kw = {"path": str(files["root"] / "bagel.parquet"), "min_side": MIN_SIDE, "max_text_chars": MAX_TEXT,
          "max_bad_fraction": 0.5, **kw}
    return tb.ParquetConfig(name=name, **kw)


def test_parquet_build_round_trips_and_counts_skips(files, tmp_path):
    root = files["root"]
    cfg = _parquet(files, "bagel", path=f"{root}/bagel.parquet")
    s = tb.build(tmp_path, cfg, progress=False)
    assert s.written == {"train": 2} and s.skipped == {"train": 1} and s.reasons == {"corrupt_image": 1}
    (row,) = [json.loads(x) for x in open(s.skipped_path)]
    assert row == {"split": "train", "file": str(root / "bagel.parquet"), "row": 1, "reason": "corrupt_image",
                   "message": f"{root}/bagel.parquet:row 1: image is not a readable image (not an image "
                              "format Pillow knows)"}
    got = [pl.decode_item(x) for x in tb.data_source(tmp_path, cfg, "train")]
    want = [e for _, e in sources.iter_parquet(str(root / "bagel.parquet"), limits=LIMITS)
            if not isinstance(e, sources.RecordError)]
    assert [e.to_bytes() for e in got] == [e.to_bytes() for e in want]
    # Reopened: the same counts; other limits under the name raise.
    assert tb.build(tmp_path, cfg, progress=False) == s
    with pytest.raises(ValueError, match="give this config another name"):
        tb.build(tmp_path, _parquet(files, "bagel", min_side=8))


def test_parquet_column_config_errors(files, tmp_path):
    cfg = _parquet(files, "cols", image_column="img")
    with pytest.raises(sources.ColumnError, match=r"has no column 'img'"):
        tb.build(tmp_path, cfg, progress=False)
    with pytest.raises(FileNotFoundError, match=r"train input: '.*nope\*\.parquet' matches no file"):
        tb.build(tmp_path, _parquet(files, "none", path=str(files["root"] / "nope*.parquet")))


def test_inputs_are_hashed_with_the_data(files, tmp_path):
    src = files["root"] / "bagel.parquet"
    copy = tmp_path / "in" / "bagel.parquet"
    copy.parent.mkdir()
    copy.write_bytes(src.read_bytes())
    cfg = _parquet(files, "hashed", path=str(copy.parent))  # a folder: its *.parquet files
    tb.build(tmp_path, cfg, progress=False)
    pq.write_table(pq.read_table(src).slice(0, 1), copy)  # other contents, same path
    with pytest.raises(ValueError, match="give this config another name"):
        tb.build(tmp_path, cfg, progress=False)


def test_too_many_bad_rows_stop_the_build(files, tmp_path):
    root = files["root"]
    cfg = _parquet(files, "strict", path=str(root / "hf.parquet"), image_column="img", caption_column="caption",
                   max_bad_fraction=0.4)  # 5 rows: 2 bad allowed, 4 found
    with pytest.raises(mb.TooManyBadRecords) as err:
        tb.build(tmp_path, cfg, progress=False)
    msg = str(err.value)
    assert msg.startswith(f"{root}/hf.parquet: more than 2 of 5 records bad (max_bad_fraction 0.4)")
    assert f"stopped at {root}/hf.parquet:row 3: image has no bytes" in msg and "\n" not in msg
    assert not tb.builder(tmp_path, cfg).is_prepared()


def test_webdataset_build_counts_skips(files, tmp_path):
    root = files["root"]
    cfg = tb.WebDatasetConfig(name="shards", pattern=f"{root}/shard-*.tar", min_side=MIN_SIDE,
                              max_text_chars=MAX_TEXT, max_bad_fraction=0.5)
    s = tb.build(tmp_path, cfg, progress=False)
    assert s.written == {"train": 3} and s.skipped == {"train": 3}
    assert s.reasons == {"missing_image": 1, "malformed": 2}
    rows = [json.loads(x) for x in open(s.skipped_path)]
    assert [(os.path.basename(r["file"]), r["key"]) for r in rows] == [
        ("shard-0.tar", "0001"), ("shard-1.tar", "0003"), ("shard-1.tar", "0004")]
    got = [pl.decode_item(x) for x in tb.data_source(tmp_path, cfg, "train")]
    assert [e.id for e in got] == ["shard-0:0000", "ep-2", "shard-1:0005"]
    assert [len(e.steps) for e in got] == [1, 2, 1] and got[1].steps[1].sketch.shape == (40, 56, 3)
    with pytest.raises(mb.TooManyBadRecords, match=r"shard-\*\.tar: more than 1 of 6 records bad"):
        tb.build(tmp_path, tb.WebDatasetConfig(name="strict", pattern=f"{root}/shard-*.tar",
                                               min_side=MIN_SIDE, max_bad_fraction=0.2))


# -- config and training ----------------------------------------------------------------------
@pytest.mark.parametrize("key, value, message", [
    ("source", "lmdb", "config key data.source: 'lmdb' is not one of 'shapes', 'pictures', 'manifest', 'parquet', "
                       "'webdataset'"),
    ("source", "parquet", "config key data.parquet.path: data.source='parquet' needs parquet files"),
    ("source", "webdataset", "config key data.webdataset.pattern: data.source='webdataset' needs tar shards"),
    ("parquet.image_column", "", "config key data.parquet.image_column: '' is not a column name"),
    ("webdataset.max_bad_fraction", 2.0, "config key data.webdataset.max_bad_fraction: 2.0 is not a number"),
])
def test_config_checks(key, value, message):
    c = shapes_tiny.get_config("test")
    node, _, leaf = f"data.{key}".rpartition(".")
    parent = c
    for part in node.split("."):
        parent = parent[part]
    parent[leaf] = value
    with pytest.raises(schema.ConfigKeyError) as err:
        schema.check(c)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def _shapes_parquet(path, seed: int, n: int) -> str:
    """The shapes world's single-pass episodes as BAGEL rows: in its vocabulary and image size."""
    eps = mixer.generate_episodes(seed, n, {"single_pass": 1.0})
    rows = [(_encode(e.final_image(), "PNG"), json.dumps({"caption": e.prompt})) for e in eps]
    pq.write_table(pa.table({"image": [r[0] for r in rows], "captions": [r[1] for r in rows]}), path)
    return str(path)


@pytest.mark.slow
def test_build_data_and_train_from_parquet(tmp_path):
    train = _shapes_parquet(tmp_path / "train.parquet", 4, 24)
    held = _shapes_parquet(tmp_path / "eval.parquet", 5, 8)
    w = tmp_path / "w"
    flags = ["--config.data.source=parquet", f"--config.data.parquet.path={train}",
             f"--config.data.parquet.eval_path={held}", "--config.data.parquet.min_side=8"]
    r = subprocess.run([sys.executable, "-m", "strokes_jax", "build-data", "--config", "shapes_tiny:test",
                        f"--workdir={w}", *flags], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "parquet_episodes/train/1.0.0: train 24 written, 0 skipped, eval 8 written, 0 skipped" in r.stdout

    from strokes_jax.train import loop
    c = shapes_tiny.get_config("test")
    c.data.source = "parquet"
    c.data.parquet.update(path=train, eval_path=held, min_side=8)
    c.train.update(steps=2, eval_every=2, log_every=1, tb_images=0)
    sources_ = loop.prepare_data(c, str(w))  # reuses what build-data wrote
    assert [len(s) for s in sources_] == [24, 8]
    assert pl.decode_item(sources_[0][0]).kind == "single_pass"
    _, summary = loop.train(c, str(w), sources_)
    assert summary["end_step"] == 2 and all(np.isfinite(l) for _, l in summary["losses"])
    c.data.parquet.eval_path = ""
    with pytest.raises(schema.ConfigKeyError, match="config key data.parquet.eval_path: training needs"):
        loop.prepare_data(c, str(w))
