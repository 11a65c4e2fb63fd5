"""The shapes world exported as a user's own data (PNG files and a JSONL manifest) goes
through `build-data` and `train` on the manifest path and trains, byte for byte the same
episodes as the generated ones."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from strokes_jax.episodes import jsonl, mixer

MIX = {"additive": 0.5, "critique": 0.3, "single_pass": 0.2}


def test_exported_shapes_episodes_read_back_identically(tmp_path):
    eps = list(mixer.generate_episodes(3, 12, MIX))
    back = jsonl.load_manifest(jsonl.write_manifest(eps, tmp_path), jsonl.Limits(min_side=8))
    assert [e.to_bytes() for e in back] == [e.to_bytes() for e in eps]
    assert any(not s.sketch_target for e in back for s in e.steps) or all(
        s.sketch_target for e in eps for s in e.steps)


@pytest.mark.slow
def test_build_data_and_train_on_a_manifest(tmp_path):
    train = jsonl.write_manifest(mixer.generate_episodes(4, 24, MIX), tmp_path / "train")
    held = jsonl.write_manifest(mixer.generate_episodes(5, 8, MIX), tmp_path / "eval")
    w = tmp_path / "w"
    args = ["--config", "shapes_tiny:test", f"--workdir={w}", "--config.data.source=manifest",
            f"--config.data.manifest.path={train}", f"--config.data.manifest.eval_path={held}",
            "--config.data.manifest.min_side=8", "--config.train.tb_images=0",
            "--config.train.steps=3", "--config.train.eval_every=3"]
    r = subprocess.run([sys.executable, "-m", "strokes_jax", "build-data", *args],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "train 24 written, 0 skipped, eval 8 written, 0 skipped" in r.stdout, r.stdout
    r = subprocess.run([sys.executable, "-m", "strokes_jax", "train", *args],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "trained 0 -> 3 steps" in r.stdout
    record = json.load(open(w / "train_record.json"))
    assert record["end_step"] == 3 and record["losses"]
    # A manifest without an eval split builds, but training on it asks for one.
    r = subprocess.run([sys.executable, "-m", "strokes_jax", "train", *args[:-5],
                        f"--config.data.manifest.path={train}", "--config.data.manifest.eval_path=",
                        "--config.data.manifest.min_side=8", f"--workdir={tmp_path / 'w2'}"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: config key data.manifest.eval_path")
