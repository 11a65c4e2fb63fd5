"""`shapes_tiny:images` end to end at test size: the shapes episodes exported as 96-pixel PNG
pictures with a JSONL manifest, an autoencoder trained on them, latents precomputed, the
Qwen2-style BPE, training, generation decoded by the AE, the report; and the same config
with latents encoded inside the step instead."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

pytestmark = pytest.mark.slow
ARGS = ["--config", "shapes_tiny:images,test", "--config.train.tb_images=0"]


def _run(*args):
    r = subprocess.run([sys.executable, "-m", "strokes_jax", *args], capture_output=True, text=True)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return r.stdout


def test_images_demo_runs_the_papers_data_path(tmp_path):
    w = tmp_path / "w"
    out = _run("demo", *ARGS, f"--workdir={w}")
    assert "autoencoder:" in out and "trained 0 -> 8 steps" in out
    # The pictures went through the manifest source: PNG files and a JSONL manifest per split.
    manifests = list((w / "data" / "pictures").glob("*/train/manifest.jsonl"))
    assert len(manifests) == 1
    first = json.loads(manifests[0].read_text().splitlines()[0])
    png = manifests[0].parent / first["steps"][0]["image"]
    assert Image.open(png).size == (96, 96)
    report = json.load(open(w / "ae" / "ae_report.json"))
    assert 0.0 <= report["checker_pass_rate"] <= 1.0 and report["eval_mse"] > 0
    assert len(list((w / "data" / "latents").rglob("*.array_record"))) == 2
    res = json.load(open(w / "report" / "results.json"))
    assert set(res["results"]) >= {"single_pass", "process"}
    assert res["samples"]["process"][0]["mode"] == "process"
    strips = list((w / "report" / "filmstrips").glob("*.png"))
    assert strips
    # A second run reuses the pictures, the autoencoder and the latents.
    mtime = os.path.getmtime(w / "ae" / "ae_report.json")
    _run("build-data", *ARGS, f"--workdir={w}")
    assert os.path.getmtime(w / "ae" / "ae_report.json") == mtime


def test_latents_encoded_in_the_step_train_too(tmp_path):
    w = tmp_path / "w"
    out = _run("train", *ARGS, f"--workdir={w}", "--config.data.precompute_latents=False",
               "--config.train.steps=2", "--config.train.eval_every=2")
    assert "trained 0 -> 2 steps" in out
    assert not (w / "data" / "latents").exists()
