"""Data path: TFDS/ArrayRecord round trips, packing, bad records, iterator state, global
arrays. Datasets are tiny and built in tmp_path."""

from __future__ import annotations

import collections
import json
import logging
import time

import grain
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from strokes_jax.episodes import episode as ep
from strokes_jax.sequence import tokenizer as tk
from strokes_jax.data import pipeline as pl
from strokes_jax.worlds import shapes
from strokes_jax.worlds.shapes import Obj
from strokes_jax.sequence import layout

PATCH = 6
IMAGE_SHAPE = (shapes.CANVAS, shapes.CANVAS, 3)


@pytest.fixture(scope="module")
def etok() -> tk.EpisodeTokenizer:
    return tk.EpisodeTokenizer(tk.Tokenizer.shapes(), IMAGE_SHAPE, PATCH)


def _obj(i: int) -> Obj:
    return Obj(shapes.SHAPES[i % 4], shapes.COLORS[i % 10], i % 3, (i // 3) % 3)


def _phrase(o: Obj) -> str:
    return f"{o.color} {o.shape} at r{o.row} c{o.col}"


def make_episode(i: int, steps: int = 1, refine: bool = False, **kw) -> ep.Episode:
    """A valid additive episode whose content depends on `i` (so episodes are distinct)."""
    out, scene = [], []
    for s in range(steps):
        o = _obj(i + s)
        scene = [x for x in scene if x.cell != o.cell] + [o]
        step = ep.Step(sketch=shapes.render(scene), ins=f"add {_phrase(o)}",
                       des=" , ".join(_phrase(x) for x in scene), inspect="plan ok ; image ok")
        if refine:
            new = o.replace(color="blue" if o.color != "blue" else "red")
            step.inspect = f"plan ok ; image wrong : {_phrase(o)} should be {new.color}"
            step.refine = f"recolour {_phrase(o)} to {new.color}"
            scene = [x for x in scene if x.cell != o.cell] + [new]
            step.refined = shapes.render(scene)
        out.append(step)
    fields = dict(id=f"ep{i}", prompt=f"a photo of a {_obj(i).shape}", tag="single_object",
                  metadata={"i": i}, steps=out, kind="additive")
    fields.update(kw)
    return ep.Episode(**fields)


def tiny_episodes(seed: int, num: int, mix: dict[str, float]):
    """Stand-in for trajectories.generate_episodes, named in ShapesConfig.source."""
    rng = np.random.default_rng(seed)
    for i in range(num):
        yield make_episode(int(rng.integers(1000)) * 100 + i, steps=1 + i % 3,
                           refine=bool(i % 2))


def _records(n: int, start: int = 0) -> list[bytes]:
    return [make_episode(start + i, steps=1 + i % 3, refine=bool(i % 2)).to_bytes()
            for i in range(n)]


def _key(arrays: dict[str, np.ndarray]) -> bytes:
    return arrays["tokens"].tobytes() + arrays["patches"].tobytes()


def _segments(row: dict[str, np.ndarray]):
    seg = row["segment_ids"]
    for s in range(1, int(seg.max()) + 1):
        idx = np.nonzero(seg == s)[0]
        yield s, idx


# -- round trips ---------------------------------------------------------------------------
def test_tfds_array_record_roundtrip(tmp_path):
    from strokes_jax.data import shapes_builder as ts

    cfg = ts.ShapesConfig(name="tiny", seed=3, num_train=24, num_eval=6,
                          source=f"{__name__}:tiny_episodes")
    t0 = time.perf_counter()
    ts.build(tmp_path, cfg)
    build_s = time.perf_counter() - t0
    files = sorted(p.name for p in (tmp_path / "shapes_episodes" / "tiny" / "1.1.0").iterdir())
    assert any(".array_record-" in f for f in files), files
    for split, num in (("train", 24), ("eval", 6)):
        want = [e.to_bytes() for e in tiny_episodes(ts.split_seed(3, split), num, {})]
        src = ts.data_source(tmp_path, cfg, split)
        assert len(src) == num
        got = list(grain.MapDataset.source(src).map(pl.decode_item))
        assert [e.to_bytes() for e in got] == want
        assert src[0]["tag"] == b"single_object" and src[0]["kind"] == b"additive"
    # A second build reuses what is on disk.
    t0 = time.perf_counter()
    ts.build(tmp_path, cfg)
    assert time.perf_counter() - t0 < build_s + 1.0
    # Same name, other parameters: refuse rather than reuse the stale data.
    other = ts.ShapesConfig(name="tiny", seed=4, num_train=24, num_eval=6,
                            source=f"{__name__}:tiny_episodes")
    with pytest.raises(ValueError, match="give this config another name"):
        ts.data_source(tmp_path, other, "train")
    print(f"TFDS build of 30 episodes: {build_s:.2f}s")


def test_tfds_source_errors():
    from strokes_jax.data import shapes_builder as ts

    with pytest.raises(ValueError, match="package.module:function"):
        ts.resolve_source("no_colon")
    assert ts.split_seed(0, "train") != ts.split_seed(0, "eval")


def test_raw_array_record_roundtrip(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    recs = _records(7)
    path = str(tmp_path / "eps.array_record")
    w = ArrayRecordWriter(path, "group_size:1")
    for r in recs:
        w.write(r)
    w.close()
    src = grain.sources.ArrayRecordDataSource([path])
    assert len(src) == 7
    got = [pl.decode_item(src[i], record=str(i)) for i in range(len(src))]
    assert [e.to_bytes() for e in got] == recs


# -- packing -------------------------------------------------------------------------------
def test_packing_rows(etok):
    recs = _records(23)
    seq_len, rows = 640, 4
    skips = pl.SkipCounter()
    it = pl.make_eval_iter(recs, etok, seq_len=seq_len, global_batch_size=rows, skips=skips,
                           num_rows=4, process_index=0, process_count=1)
    batches = list(it)
    assert skips.seen == 23 and skips.skipped == 0
    expected = collections.Counter(_key(etok(ep.Episode.from_bytes(r))) for r in recs)
    by_key = {_key(etok(ep.Episode.from_bytes(r))): etok(ep.Episode.from_bytes(r)) for r in recs}
    found, nonpad = collections.Counter(), 0
    for b in batches:
        assert set(b) == set(layout.ROW_FIELDS)
        for k, v in b.items():
            want_shape = (rows, seq_len, etok.patch_dim) if k == "patches" else (rows, seq_len)
            assert v.shape == want_shape, k
            assert v.dtype == (np.uint8 if k == "patches" else np.int32), k
        for r in range(rows):
            row = {k: v[r] for k, v in b.items()}
            pad = row["segment_ids"] == 0
            nonpad += int((~pad).sum())
            assert (row["tokens"][pad] == etok.tok.pad_id).all()
            for k in ("types", "targets", "blocks", "positions"):
                assert (row[k][pad] == 0).all(), k
            assert (row["patches"][pad] == 0).all()
            seen_blocks: set[int] = set()
            prev_end = 0
            for s, idx in _segments(row):
                # Contiguous, in order, and starting where the previous segment ended.
                assert idx[0] == prev_end and (np.diff(idx) == 1).all()
                prev_end = idx[-1] + 1
                part = {k: row[k][idx] for k in row}
                orig = by_key[_key(part)]
                found[_key(part)] += 1
                for k in layout.TOKEN_FIELDS:
                    if k != "blocks":
                        np.testing.assert_array_equal(part[k], orig[k], err_msg=k)
                np.testing.assert_array_equal(part["patches"], orig["patches"])
                np.testing.assert_array_equal(part["blocks"] == 0, orig["blocks"] == 0)
                base = part["blocks"][orig["blocks"] > 0] - orig["blocks"][orig["blocks"] > 0]
                assert len(set(base.tolist())) <= 1
                blocks = set(part["blocks"][part["blocks"] > 0].tolist())
                assert not blocks & seen_blocks
                seen_blocks |= blocks
            assert not pad[:prev_end].any()
    assert found == expected
    assert nonpad == sum(len(etok(ep.Episode.from_bytes(r))["tokens"]) for r in recs)
    # Packing actually packs: fewer rows than episodes.
    assert sum(int((b["segment_ids"].max(axis=1) > 0).sum()) for b in batches) < len(recs)


def test_process_sharding_partitions_records(etok):
    recs = _records(9)
    keys = []
    for pi in range(2):
        for b in pl.make_eval_iter(recs, etok, seq_len=640, global_batch_size=4,
                                   process_index=pi, process_count=2):
            for r in range(len(b["tokens"])):
                row = {k: v[r] for k, v in b.items()}
                keys += [_key({k: row[k][idx] for k in row}) for _, idx in _segments(row)]
    assert sorted(keys) == sorted(_key(etok(ep.Episode.from_bytes(r))) for r in recs)


# -- bad records ---------------------------------------------------------------------------
def _bad_records() -> dict[str, tuple[str, str, bytes]]:
    """name -> (expected reason, episode id the message names or "", record)."""
    two_images = make_episode(50, steps=1, refine=True).to_bytes()
    tagged = make_episode(51)
    tagged.steps[0].ins = "add <des> red square at r0 c0"
    small = ep.Episode("ep52", "a photo of a square", "single_object", {},
                       [ep.Step(sketch=np.zeros((30, 30, 3), np.uint8))])
    return {
        "bad_tag": ("invalid", "ep51", tagged.to_bytes()),
        "missing_image": ("corrupt", "ep50", two_images[:-int(np.prod(IMAGE_SHAPE))]),
        "wrong_size": ("invalid", "ep52", small.to_bytes()),
        "unknown_token": ("unknown_token", "ep53",
                          make_episode(53, prompt="a photo of a hexagon").to_bytes()),
        "too_long": ("too_long", "ep54", make_episode(54, steps=4, refine=True).to_bytes()),
        "garbage": ("corrupt", "", b"\x00garbage bytes, not an episode"),
    }


def test_bad_records_are_counted_and_skipped(etok, caplog):
    bad = _bad_records()
    good = _records(10)
    recs = good[:5] + [r for _, _, r in bad.values()] + good[5:]
    skips = pl.SkipCounter(max_skip_fraction=1.0)
    with caplog.at_level(logging.WARNING, logger=pl.__name__):
        batches = list(pl.make_eval_iter(recs, etok, seq_len=640, global_batch_size=2,
                                         skips=skips, process_index=0, process_count=1))
    want = collections.Counter(reason for reason, _, _ in bad.values())
    assert skips.by_reason == want and skips.skipped == 6 and skips.seen == 16
    nseg = sum(int(b["segment_ids"].max(axis=1).sum()) for b in batches)
    assert nseg == 10
    for j, (name, (_, eid, _)) in enumerate(bad.items()):
        index = 5 + j
        msgs = [m for m in skips.recent if f"record #{index}" in m]
        assert len(msgs) == 1, (name, list(skips.recent))
        assert repr(eid) in msgs[0] if eid else "bad magic" in msgs[0], msgs[0]
        assert any(f"record #{index}" in r.getMessage() for r in caplog.records)
    assert "more than seq_len 640" in " ".join(skips.recent)


@pytest.mark.parametrize("kw,match", [
    (dict(max_skips=1), r"max_skips=1.*unknown_token: 2"),
    (dict(max_skip_fraction=0.05, min_records=10), r"max_skip_fraction=0.05.*unknown_token"),
])
def test_too_many_bad_records_raises(etok, kw, match):
    bad = make_episode(60, prompt="a photo of a hexagon").to_bytes()
    recs = [r for g in _records(20) for r in (g, bad)]
    with pytest.raises(pl.TooManyBadRecords, match=match):
        list(pl.make_eval_iter(recs, etok, seq_len=640, global_batch_size=2,
                               skips=pl.SkipCounter(**kw), process_index=0, process_count=1))


# -- iterator state ------------------------------------------------------------------------
def _train_iter(recs, etok, skips):
    return pl.make_train_iter(recs, etok, seq_len=640, global_batch_size=2, seed=7,
                              skips=skips, num_rows=3, num_threads=2, process_index=0,
                              process_count=1)


@pytest.mark.parametrize("k", [0, 1, 4])
def test_iterator_state_restores_exactly(etok, k):
    recs = _records(11) + [b"garbage"]
    skips = pl.SkipCounter(max_skip_fraction=0.5, min_records=1)
    it = _train_iter(recs, etok, skips)
    for _ in range(k):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # must survive a JSON checkpoint
    cont = [next(it) for _ in range(6)]
    skips2 = pl.SkipCounter(max_skip_fraction=0.5, min_records=1)
    it2 = _train_iter(recs, etok, skips2)
    it2.set_state(state)
    again = [next(it2) for _ in range(6)]
    for a, b in zip(cont, again):
        assert a.keys() == b.keys()
        for f in a:
            np.testing.assert_array_equal(a[f], b[f], err_msg=f)
    assert skips2.get_state() == skips.get_state() and skips.by_reason["corrupt"] >= 1


# -- device --------------------------------------------------------------------------------
def test_to_global_one_device(etok):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1),
                             ("data", "fsdp", "tensor"))
    batch = next(_train_iter(_records(6), etok, pl.SkipCounter()))
    out = pl.to_global(batch, mesh)
    assert out.keys() == batch.keys()
    for k, v in out.items():
        assert isinstance(v, jax.Array)
        assert v.sharding == NamedSharding(mesh, P(("data", "fsdp")))
        assert v.shape == batch[k].shape and v.dtype == batch[k].dtype
        np.testing.assert_array_equal(np.asarray(v), batch[k])
