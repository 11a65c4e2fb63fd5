"""`generate`: prompts in (flags, text or JSONL files, with errors naming the line), every
sample's images, trajectory text and filmstrip out, reproducibly."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

from strokes_jax.episodes import mixer
from strokes_jax.evaluate import generate
from strokes_jax.inference.generator import Generator, SamplingOptions
from strokes_jax.inference.uncached import UncachedBackend
from test_generate import Oracle


def test_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# my prompts\na photo of a red circle\n\na photo of two blue squares\n")
    assert generate.read_prompts(str(txt)) == ["a photo of a red circle",
                                               "a photo of two blue squares"]
    js = tmp_path / "p.jsonl"
    js.write_text('{"prompt": "a photo of a cat", "tag": "single_object"}\n')
    assert generate.read_prompts(str(js)) == ["a photo of a cat"]
    js.write_text('{"prompt": "a photo of a cat"}\n{"prompt": \n')
    with pytest.raises(generate.PromptError, match=r"p\.jsonl:2: not JSON"):
        generate.read_prompts(str(js))
    js.write_text('{"text": "a cat"}\n')
    with pytest.raises(generate.PromptError, match=r"p\.jsonl:1: needs a string field"):
        generate.read_prompts(str(js))
    with pytest.raises(generate.PromptError, match="no such file"):
        generate.read_prompts(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(generate.PromptError, match="holds no prompts"):
        generate.read_prompts(str(tmp_path / "empty.txt"))


def test_a_word_outside_the_vocabulary_names_the_prompt(etok):
    with pytest.raises(generate.PromptError, match=r"--prompt 2: unknown token\(s\) \['zebra'\]"):
        generate.check_prompts(etok, ["a photo of a red circle", "a photo of a zebra"],
                               ["--prompt 1", "--prompt 2"])


def _digest(folder) -> dict:
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, folder)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def test_writes_every_sample_and_reruns_identically(etok, tmp_path):
    """An oracle model that knows a reference episode: process mode paints its whole
    trajectory and stops on its end marker; both modes write images, text and filmstrips."""
    ref = next(iter(mixer.generate_episodes(5, 1, {"additive": 1.0})))
    gen = Generator(UncachedBackend(Oracle(etok, ref), etok, max_len=512), {},
                    options=SamplingOptions(flow_steps=4, shift=1.0, max_iterations=8,
                                            max_text_tokens=64))
    prompts = [ref.prompt, ref.prompt, ref.prompt]
    rows = generate.run(gen, prompts, str(tmp_path / "a"), modes=("process", "single_pass"), n=2,
                        batch_size=2)
    assert len(rows) == 3 * 2 * 2
    proc = [r for r in rows if r["mode"] == "process"]
    assert all(r["well_formed"] and not r["hit_cap"] for r in proc)
    assert all(r["images"] == len(ref.images()) for r in proc)
    for r in rows:
        folder = tmp_path / "a" / f"{r['prompt_index']:05d}"
        stem = "process" if r["mode"] == "process" else "single"
        assert (folder / f"{stem}_{r['sample']}.png").is_file()
        assert (folder / f"{stem}_{r['sample']}_filmstrip.png").is_file()
        text = (folder / f"{stem}_{r['sample']}.txt").read_text()
        assert text.count("<image>") == r["images"]
        assert len(os.listdir(folder / f"{stem}_{r['sample']}_images")) == r["images"]
        assert (folder / "prompt.txt").read_text().strip() == ref.prompt
    listed = [json.loads(line) for line in open(tmp_path / "a" / "samples.jsonl")]
    assert listed == rows
    generate.run(gen, prompts, str(tmp_path / "b"), modes=("process", "single_pass"), n=2,
                 batch_size=2)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    # A gs:// output folder (etils.epath, served from a local folder here) gets the same files.
    from test_report import _bucket
    with _bucket(tmp_path):
        generate.run(gen, prompts, "gs://bucket/gen", modes=("process", "single_pass"), n=2,
                     batch_size=2)
    assert _digest(tmp_path / "bucket" / "gen") == _digest(tmp_path / "a")
    assert "process: 6 samples" in generate.summary(rows)


@pytest.mark.slow
def test_generate_command_on_a_trained_workdir(tmp_path):
    w = str(tmp_path / "w")
    base = [sys.executable, "-m", "strokes_jax"]
    cfg = ["--config", "shapes_tiny:test", f"--workdir={w}"]
    r = subprocess.run(base + ["train"] + cfg + ["--config.train.tb_images=0"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (tmp_path / "p.txt").write_text("a photo of a red circle\n")
    r = subprocess.run(base + ["generate"] + cfg + ["--prompt", "a photo of a blue square",
                                                   "--prompts", str(tmp_path / "p.txt"),
                                                   "--mode", "both", "--n", "2"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in open(os.path.join(w, "generate", "samples.jsonl"))]
    assert len(rows) == 2 * 2 * 2 and {x["mode"] for x in rows} == {"process", "single_pass"}
    assert "wrote 8 samples" in r.stdout
    r = subprocess.run(base + ["generate"] + cfg + ["--prompt", "a photo of a zebra"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: record --prompt 1: unknown token")
    # The same workdir under error injection: every prompt is either injected or counted
    # with the reason it could not be.
    r = subprocess.run(base + ["inject"] + cfg + ["--config.eval.inject_kinds=('image:missing','text:extra')",
                                                 "--config.eval.prompts_per_tag=1"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.load(open(os.path.join(w, "injection", "injection.json")))
    assert set(out["kinds"]) == {"image:missing", "text:extra"} and out["prompts"] == 6
    for k in out["kinds"].values():
        assert k["injected"] + sum(k["not_injected"].values()) == 6
    assert "injected mistakes:" in r.stdout and "| image:missing |" in r.stdout
