"""Damage to the stored data is a named, counted skip (or the bound's error naming the shard),
never a crash mid-run: a shard with flipped bytes, a truncated shard, and records whose header
fields are malformed."""

import glob
import json
import os
import shutil
import struct

import pytest

from strokes_jax.configs import shapes_tiny
from strokes_jax.data import pipeline as pl
from strokes_jax.episodes import mixer
from strokes_jax.train import loop

SEQ = 512


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    c = shapes_tiny.get_config("test")
    d = str(tmp_path_factory.mktemp("w"))
    loop.prepare_data(c, d)
    return c, d


def _source(c, d):
    train, _ = loop.prepare_data(c, d)
    return train


def _shard(d):
    return glob.glob(os.path.join(d, "data", "**", "*train.array_record-*"), recursive=True)[0]


def _read(source, etok, skips, batches=6):
    it = pl.make_train_iter(source, etok, seq_len=SEQ, global_batch_size=2, seed=0, skips=skips,
                            num_threads=1, process_index=0, process_count=1)
    for _ in range(batches):
        next(it)


def _copy(built, tmp_path):
    c, d = built
    w = str(tmp_path / "w")
    shutil.copytree(d, w)
    return c, w


def _damage(built, tmp_path, how):
    c, d = built
    w = str(tmp_path / "w")
    shutil.copytree(d, w)
    shard = _shard(w)
    data = bytearray(open(shard, "rb").read())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:  # the records sit in the first tens of KB; each is its own hashed chunk
        for i in (range(100, 30000, 997) if how == "flip many" else (5000,)):
            data[i] ^= 0x01
    open(shard, "wb").write(bytes(data))
    return c, w, os.path.basename(shard)


@pytest.mark.parametrize("how", ["flip many", "truncate"])
def test_a_damaged_shard_stops_at_the_bound_naming_the_file(how, built, tmp_path):
    c, w, shard = _damage(built, tmp_path, how)
    with pytest.raises(pl.TooManyBadRecords, match=rf"unreadable: \d+.*last: .*{shard} record \d+: "
                                                    r"(RuntimeError|no data)"):
        _read(_source(c, w), loop.episode_tokenizer(c),
              pl.SkipCounter(max_skip_fraction=0.2, min_records=10))


def test_one_flipped_bit_is_a_counted_skip_naming_the_record(built, tmp_path):
    c, w, shard = _damage(built, tmp_path, "flip one")
    skips = pl.SkipCounter(max_skip_fraction=0.2, min_records=10)
    _read(_source(c, w), loop.episode_tokenizer(c), skips, batches=20)  # past an epoch
    assert skips.by_reason == {"unreadable": skips.skipped} and skips.skipped >= 1
    assert all(f"{shard} record " in m and "hash mismatch" in m for m in skips.recent), \
        list(skips.recent)


def _raw(episode, **header_changes):
    b = episode.to_bytes()
    (n,) = struct.unpack("<I", b[5:9])
    header = json.loads(b[9:9 + n])
    for path, value in header_changes.items():
        node = header
        *parents, key = path.split(".")
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        node[key] = value
    h = json.dumps(header).encode()
    return b[:5] + struct.pack("<I", len(h)) + h + b[9 + n:]


def test_malformed_header_fields_are_named_skips(built):
    c, _ = built
    eps = list(mixer.generate_episodes(3, 6, {"additive": 1.0}))
    records = [e.to_bytes() for e in eps]
    records[1] = _raw(eps[1], **{"steps.0.sketch": 99})  # an image index out of range
    records[3] = _raw(eps[3], **{"steps.0.ins": 17})  # a number where text belongs
    records[4] = _raw(eps[4], prompt=["a", "list"])
    skips = pl.SkipCounter(max_skip_fraction=1.0)
    it = pl.make_eval_iter(records, loop.episode_tokenizer(c), seq_len=SEQ, global_batch_size=2,
                           skips=skips)
    list(it)
    assert skips.seen == 6 and skips.skipped == 3, list(skips.recent)
    for i in (1, 3, 4):
        assert any(f"#{i}" in m for m in skips.recent), (i, list(skips.recent))
