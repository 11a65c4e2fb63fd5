"""Fault injection on a real training run's checkpoints: for each kind of damage to the newest
step, the restart resumes from the newest step that verifies, with exactly the losses of an
uninterrupted run from there, or stops with a one-line error; it never resumes on damaged
data, and damaged steps are kept aside, not deleted."""

import json
import os
import shutil

import numpy as np
import pytest

from strokes_jax.configs import shapes_tiny
from strokes_jax.train import checkpoint as ckpt
from strokes_jax.train import checksums, init_weights, loop

pytestmark = pytest.mark.slow


def _config(steps):
    c = shapes_tiny.get_config("test")
    c.train.update(steps=steps, log_every=1, eval_every=0, checkpoint_every=2, keep_checkpoints=5)
    return c


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return loop.prepare_data(_config(8), str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def reference(sources, tmp_path_factory):
    _, summary = loop.train(_config(8), str(tmp_path_factory.mktemp("ref")), sources)
    return dict(summary["losses"])


@pytest.fixture(scope="module")
def six_steps(sources, tmp_path_factory):
    w = str(tmp_path_factory.mktemp("six") / "w")
    loop.train(_config(6), w, sources)
    return w


def _largest(folder):
    files = [os.path.join(r, n) for r, _, ns in os.walk(folder) for n in ns]
    return max(files, key=os.path.getsize)


def _flip(path, n):
    data = bytearray(open(path, "rb").read())
    for i in np.random.default_rng(0).choice(len(data), n, replace=False):
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))


def _iterator_file(step_dir):
    return os.path.join(step_dir, "data", "process_0-of-1.json")


def _edit_iterator(step_dir):
    p = _iterator_file(step_dir)
    state = json.load(open(p))
    state["emitted"] = state.get("emitted", 0) + 1
    json.dump(state, open(p, "w"))


DAMAGE = {
    "truncate a data file": lambda d: open(_largest(os.path.join(d, "state")), "r+b").truncate(10),
    "delete a data file": lambda d: os.remove(_largest(os.path.join(d, "state"))),
    "flip one byte": lambda d: _flip(_largest(os.path.join(d, "state")), 1),
    "flip many bytes": lambda d: _flip(_largest(os.path.join(d, "state")), 64),
    "delete the state metadata": lambda d: os.remove(os.path.join(d, "state", "_METADATA")),
    "delete the step metadata": lambda d: os.remove(os.path.join(d, "_CHECKPOINT_METADATA")),
    "delete the state folder": lambda d: shutil.rmtree(os.path.join(d, "state")),
    "garble the iterator state": lambda d: open(_iterator_file(d), "w").write("{not json"),
    "edit the iterator state": _edit_iterator,
    "delete the checksum manifest": lambda d: os.remove(os.path.join(d, checksums.MANIFEST)),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_newest_step_resumes_from_the_previous_one(kind, six_steps, sources, reference,
                                                           tmp_path, capfd):
    w = str(tmp_path / "w")
    shutil.copytree(six_steps, w)
    DAMAGE[kind](os.path.join(w, "checkpoints", "6"))
    _, summary = loop.train(_config(8), w, sources)
    assert summary["start_step"] == 4, kind
    got = dict(summary["losses"])
    assert [got[k] for k in (5, 6, 7, 8)] == [reference[k] for k in (5, 6, 7, 8)], kind
    err = capfd.readouterr().err
    assert "checkpoint step 6 skipped: " in err, err
    assert os.path.isdir(os.path.join(w, ckpt.REJECTED, "6"))  # kept, not deleted
    assert ckpt.main(["verify", "--workdir", w]) == 0
    out = capfd.readouterr().out
    assert out.splitlines()[0] == "step 8: verified", out


def test_a_half_written_temporary_folder_is_ignored(six_steps, sources, reference, tmp_path):
    w = str(tmp_path / "w")
    shutil.copytree(six_steps, w)
    tmp = os.path.join(w, "checkpoints", "8.orbax-checkpoint-tmp-1700000000")
    os.makedirs(os.path.join(tmp, "state"))
    open(os.path.join(tmp, "state", "junk"), "wb").write(b"\0" * 100)
    _, summary = loop.train(_config(8), w, sources)
    assert summary["start_step"] == 6
    got = dict(summary["losses"])
    assert [got[7], got[8]] == [reference[7], reference[8]]


def test_every_step_damaged_stops_with_one_line_naming_them(six_steps, sources, tmp_path, capfd):
    w = str(tmp_path / "w")
    shutil.copytree(six_steps, w)
    steps = sorted(os.listdir(os.path.join(w, "checkpoints")), key=int)  # Orbax also keeps step 1
    for step in steps:  # step 4 intact but unconfirmed (as if saved before manifests existed)
        if step == "4":
            os.remove(os.path.join(w, "checkpoints", step, checksums.MANIFEST))
        else:
            _flip(_largest(os.path.join(w, "checkpoints", step, "state")), 1)
    with pytest.raises(ckpt.CheckpointError, match=r"no checkpoint under .* verifies \(step 6: "
                                                   r".*checksum mismatch.*; step 4: .*no checksum "
                                                   r"manifest.*; step 2: "):
        loop.train(_config(8), w, sources)
    assert sorted(os.listdir(os.path.join(w, "checkpoints")), key=int) == steps  # untouched
    assert ckpt.main(["verify", "--workdir", w]) == 1
    assert "step 6: FAILED" in capfd.readouterr().out
    assert ckpt.main(["trust", "--workdir", w, "--step", "4"]) == 0
    _, summary = loop.train(_config(8), w, sources)  # the user's call: resume from step 4
    assert summary["start_step"] == 4
    assert os.path.isdir(os.path.join(w, ckpt.REJECTED, "6"))


def test_restoring_under_other_shapes_names_the_parameters(six_steps):
    c = _config(8)
    c.model.width = 64
    with pytest.raises(init_weights.WeightsMismatch, match=r"checkpoint step 6 .* mis-shaped \d+: "
                                                          r".*\(32,\) \(model \(64,\)\)"):
        loop.restore_for_eval(c, six_steps, allow_config_change=True)
