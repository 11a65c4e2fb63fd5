"""Run hygiene: a workdir records what its run was made with, and a resume or an evaluation
under an incompatible config stops with one line naming the keys."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from strokes_jax import configs
from strokes_jax.train import run_info


def test_differences_name_keys_and_skip_the_resumable_ones():
    c = configs.load("shapes_tiny:test")
    stored = run_info._jsonable(c)
    c.train.steps, c.eval.batch_size = 100, 3  # how long, how to evaluate: fine to change
    assert run_info.differences(stored, c) == []
    c.model.width, c.model.rope_theta = 64, 500.0
    assert run_info.differences(stored, c) == ["model.rope_theta: 10000.0 -> 500.0",
                                               "model.width: 32 -> 64"]
    c = configs.load("shapes_tiny:test")
    c.optim.lr = 1.0  # changes training, not the parameters' shapes: evaluation may go on
    assert run_info.differences(stored, c, keys=run_info.EVAL_KEYS) == []
    assert run_info.differences(stored, c) == ["optim.lr: 0.001 -> 1.0"]


def _cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "strokes_jax", *args], capture_output=True,
                          text=True, cwd=cwd)


@pytest.mark.slow
def test_resume_and_evaluate_under_another_config_are_refused(tmp_path):
    w = f"--workdir={tmp_path / 'w'}"
    base = ["--config", "shapes_tiny:test", "--config.train.tb_images=0", w]
    r = _cli(["train", *base, "--config.train.steps=2"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.load(open(tmp_path / "w" / run_info.FILE))
    assert info["config"]["model"]["width"] == 32 and info["commit"] and "jax" in info["versions"]
    assert info["device"]["platform"] == "cpu"

    r = _cli(["train", *base, "--config.model.width=64"], tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-3000:]
    assert "model.width: 32 -> 64" in r.stderr and "--allow_config_change" in r.stderr
    r = _cli(["evaluate", *base, "--config.model.rope_theta=500.0"], tmp_path)
    assert r.returncode == 2 and "model.rope_theta: 10000.0 -> 500.0" in r.stderr, r.stderr[-3000:]
    r = _cli(["train", *base, "--config.train.steps=3"], tmp_path)  # training longer is a resume
    assert r.returncode == 0 and "trained 2 -> 3 steps" in r.stdout, r.stderr[-3000:]
