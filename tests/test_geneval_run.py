"""GenEval runs: the official metadata read (bad lines named), images painted into the official
layout and resumed byte for byte after a kill, the official evaluator's folder walk, the
official summary reproduced character for character, the official detection filter, and the
shapes world's download-free chain (export -> paint -> exact scorer -> summary)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from strokes_jax.benchmarks import geneval, geneval_official, store
from strokes_jax.benchmarks.store import BenchmarkError
from strokes_jax.inference.generator import Generator, SamplingOptions
from strokes_jax.inference.uncached import UncachedBackend
from strokes_jax.worlds import geneval as rules
from strokes_jax.worlds import prompts as wp
from strokes_jax.worlds import shapes
from test_generate import Oracle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFICIAL = os.path.join(ROOT, "..", "shared", "benchmarks", "geneval", "evaluation_metadata.jsonl")


class NoisyOracle(Oracle):
    """The oracle's velocity, damped: the images keep some of their starting noise, so they
    depend on the seeds and a wrong seed shows in the bytes."""

    def apply(self, *args, **kw):
        logits, vel = super().apply(*args, **kw)
        return logits, 0.6 * vel


def _gen(etok, ref):
    return Generator(UncachedBackend(NoisyOracle(etok, ref), etok, max_len=512), {},
                     options=SamplingOptions(flow_steps=3, shift=1.0, max_iterations=4, max_text_tokens=64))


def _metadata(tmp_path, ref, count=4) -> str:
    """`count` GenEval lines that all carry the oracle's prompt (it paints only that one)."""
    path = tmp_path / "evaluation_metadata.jsonl"
    lines = [json.dumps({"tag": tag, **ref.metadata, "prompt": ref.prompt})
             for tag in ("single_object", "two_object", "counting", "colors", "position", "color_attr")[:count]]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


class Killed(Exception):
    pass


class StopAfter:
    """A generator that dies on its (k+1)-th call, as a run killed between two prompts."""

    def __init__(self, gen, k):
        self.gen, self.k, self.calls, self.etok = gen, k, 0, gen.etok

    def __call__(self, *a, **kw):
        if self.calls >= self.k:
            raise Killed
        self.calls += 1
        return self.gen(*a, **kw)


def test_bad_metadata_names_the_file_and_line(tmp_path):
    p = tmp_path / "m.jsonl"
    with pytest.raises(BenchmarkError, match=r"m\.jsonl: no such file"):
        geneval.read_metadata(str(p))
    good = '{"tag": "single_object", "include": [{"class": "cow", "count": 1}], "prompt": "a photo of a cow"}'
    for bad, message in [
        ('{"tag": "x", "prompt": ', r"m\.jsonl:2: not JSON"),
        ('{"tag": "x", "include": [{"class": "cow", "count": 1}]}', r"m\.jsonl:2: needs a non-empty string 'prompt'"),
        ('{"tag": "x", "prompt": "p", "include": [{"class": "cow", "count": 0}]}',
         r"m\.jsonl:2: include\[0\] needs a whole \"count\" >= 1"),
        ('{"tag": "position", "prompt": "p", "include": [{"class": "a", "count": 1, "position": ["above", 0]}]}',
         r"m\.jsonl:2: include\[0\]: \"position\" must be \[relation, index of an earlier include clause\]"),
        ('[1, 2]', r"m\.jsonl:2: expected a JSON object"),
    ]:
        p.write_text(good + "\n" + bad + "\n")
        with pytest.raises(BenchmarkError, match=message):
            geneval.read_metadata(str(p))
    p.write_text("\n\n")
    with pytest.raises(BenchmarkError, match="holds no prompts"):
        geneval.read_metadata(str(p))


@pytest.mark.skipif(not os.path.isfile(OFFICIAL), reason="no copy of GenEval's prompt metadata")
def test_the_official_metadata():
    entries = geneval.read_metadata(OFFICIAL)
    tags = [e.metadata["tag"] for e in entries]
    assert len(entries) == 553
    assert {t: tags.count(t) for t in set(tags)} == {"single_object": 80, "two_object": 99, "counting": 80,
                                                     "colors": 94, "position": 100, "color_attr": 100}
    for e in entries:
        if e.metadata["tag"] == "counting":
            (inc,), (exc,) = e.metadata["include"], e.metadata["exclude"]
            assert exc == {"class": inc["class"], "count": inc["count"] + 1}
    assert geneval.variant(OFFICIAL) == "original GenEval prompts"


def test_the_official_detection_filter():
    d = lambda cls, score, x=0.0: rules.Detection(cls, (x, 0.0, x + 10, 10.0), None, score)  # noqa: E731
    dets = [d("cat", 0.95), d("cat", 0.5, 20), d("cat", 0.3, 40), d("dog", 0.2), d("dog", 0.91, 60)]
    kept = rules.filter_detections(dets, "two_object")
    assert [x.score for x in kept["cat"]] == [0.95, 0.5] and [x.score for x in kept["dog"]] == [0.91]
    kept = rules.filter_detections(dets, "counting")  # only the confident ones count
    assert [x.score for x in kept["cat"]] == [0.95] and [x.score for x in kept["dog"]] == [0.91]
    many = [d("cup", 0.99 - i / 100, 12 * i) for i in range(20)]
    assert len(rules.filter_detections(many, "single_object")["cup"]) == 16
    two = {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}]}
    assert not rules.evaluate_filtered(dets, two)[0]  # 0.5 is under the counting threshold
    assert rules.evaluate_filtered(dets, dict(two, tag="two_object"))[0]


def test_killed_runs_resume_to_the_same_bytes(etok, ref, tmp_path, monkeypatch):
    meta = _metadata(tmp_path, ref)
    entries = geneval.read_metadata(meta)
    record = geneval.run_record(meta, 2, "process", 7, {"checkpoint_step": 0})
    gen = _gen(etok, ref)
    whole = str(tmp_path / "whole")
    out = geneval.generate(gen, entries, whole, n=2, seed=7, record=record)
    assert out == {"prompts": 4, "skipped": 0, "generated": 4, "redone": 0, "images": 8, "root": whole}

    # Killed between prompts, after two.
    cut = str(tmp_path / "cut")
    with pytest.raises(Killed):
        geneval.generate(StopAfter(gen, 2), entries, cut, n=2, seed=7, record=record)
    assert sorted(os.listdir(cut)) == ["00000", "00001", "run.json"]
    # Killed again in the middle of writing a prompt: some files there, metadata.jsonl not.
    real, writes = store.write_bytes, []

    def dying(path, data):
        if len(writes) == 3:
            raise Killed
        writes.append(path)
        real(path, data)

    monkeypatch.setattr(store, "write_bytes", dying)
    with pytest.raises(Killed):
        geneval.generate(gen, entries, cut, n=2, seed=7, record=record)
    monkeypatch.setattr(store, "write_bytes", real)
    partial = os.path.join(cut, "00002")
    assert os.path.isdir(partial) and not os.path.exists(os.path.join(partial, "metadata.jsonl"))
    os.makedirs(os.path.join(partial, "samples"), exist_ok=True)
    (tmp_path / "cut" / "00002" / "samples" / ".tmp-0000.png").write_bytes(b"half a png")
    (tmp_path / "cut" / ".tmp-run.json").write_text("{")
    with pytest.raises(BenchmarkError, match="00002: no metadata.jsonl"):
        geneval_official.walk(cut)  # the official evaluator would crash on it: resume first

    counting = StopAfter(gen, 99)
    out = geneval.generate(counting, entries, cut, n=2, seed=7, record=record)
    assert (out["skipped"], out["generated"], out["redone"], counting.calls) == (2, 2, 1, 2)
    assert geneval.folder_digest(cut) == geneval.folder_digest(whole)
    again = StopAfter(gen, 0)  # a finished folder asks the model for nothing
    assert geneval.generate(again, entries, cut, n=2, seed=7, record=record)["skipped"] == 4

    # Another seed (or model, or prompt file) in the same folder is refused, naming the key.
    with pytest.raises(BenchmarkError, match=r"run\.json: this folder was generated with other seed"):
        geneval.generate(gen, entries, cut, n=2, seed=8, record=dict(record, seed=8))


def test_seeds_are_per_prompt_and_image(etok, ref, tmp_path):
    meta = _metadata(tmp_path, ref, count=2)
    entries = geneval.read_metadata(meta)
    geneval.generate(_gen(etok, ref), entries, str(tmp_path / "a"), n=2, mode="single", seed=1)
    d = geneval.folder_digest(str(tmp_path / "a"))
    samples = [d[f"0000{i}/samples/000{k}.png"] for i in range(2) for k in range(2)]
    assert len(set(samples)) == 4  # same prompt text, four different draws
    # Painting only the second prompt gives its images the same bytes.
    geneval.generate(_gen(etok, ref), entries[1:], str(tmp_path / "b"), n=2, mode="single", seed=1)
    assert geneval.folder_digest(str(tmp_path / "b")) == {k: v for k, v in d.items() if k.startswith("00001")}
    assert not any("trajectories" in k for k in d)  # single mode: the sample and its record


def test_the_layout_passes_the_official_walk(etok, ref, tmp_path):
    meta = _metadata(tmp_path, ref, count=3)
    entries = geneval.read_metadata(meta)
    root = str(tmp_path / "r")
    geneval.generate(_gen(etok, ref), entries, root, n=3, seed=0)
    (tmp_path / "r" / "notes").mkdir()  # not digits: the official walk skips it, so does ours
    found = geneval_official.walk(root)
    assert [os.path.relpath(p, root) for p, _ in found] == [f"0000{i}/samples/000{k}.png"
                                                             for i in range(3) for k in range(3)]
    assert [m for _, m in found] == [e.metadata for e in entries for _ in range(3)]
    for i in range(3):
        folder = tmp_path / "r" / f"0000{i}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == entries[i].metadata
        assert sorted(os.listdir(folder)) == ["generation.json", "metadata.jsonl", "samples", "trajectories"]
        text = (folder / "trajectories" / "0000.txt").read_text()
        rec = json.loads((folder / "generation.json").read_text())["samples"][0]
        assert text.count("<image>") == rec["images"] == len(ref.images()) and rec["well_formed"]
    # Why leftovers are named .tmp-*: the official pattern matches names from their start.
    assert geneval_official.SAMPLE_NAME.match("0000.png.tmp")
    assert not geneval_official.SAMPLE_NAME.match(store.TMP_PREFIX + "0000.png")


# (tag, prompt, verdicts of its images); tags out of alphabetical order, counts that round.
FIXTURE = [
    ("two_object", "a photo of a cat and a dog", [True, False, True]),
    ("single_object", "a photo of a bench", [True, True, True, True]),
    ("two_object", "a photo of a cup and a fork", [False, False, False]),
    ("counting", "a photo of two clocks", [True, False, False, False, False, False, False, False]),
    ("position", "a photo of a dog right of a teddy bear", [False, False, False, False]),
    ("colors", "a photo of a red car", [True, True, False]),
    ("color_attr", "a photo of a red car and a blue bench", [True, True, True, True, True, False]),
    ("single_object", "a photo of a cow", [True, True, True]),
]
# evaluation/summary_scores.py (djghosh13/geneval af4902f, pandas 3.1.1) on that file.
OFFICIAL_SUMMARY = """Summary
=======
Total images: 34
Total prompts: 8
% correct images: 50.00%
% correct prompts: 75.00%

Task breakdown
==============
two_object       = 33.33% (2 / 6)
single_object    = 100.00% (7 / 7)
counting         = 12.50% (1 / 8)
position         = 0.00% (0 / 4)
colors           = 66.67% (2 / 3)
color_attr       = 83.33% (5 / 6)

Overall score (avg. over tasks): 0.49306
"""


def _fixture_results(path):
    lines = []
    for i, (tag, prompt, oks) in enumerate(FIXTURE):
        meta = {"tag": tag, "include": [{"class": "x", "count": 1}], "prompt": prompt}
        for k, ok in enumerate(oks):
            lines.append(json.dumps({"filename": f"/imgs/{i:05d}/samples/{k:04d}.png", "tag": tag,
                                     "prompt": prompt, "correct": ok, "reason": "",
                                     "metadata": json.dumps(meta), "details": "{}"}))
    # pandas' to_json escapes slashes, as the official evaluator's file has them.
    lines[0] = lines[0].replace("/", "\\/")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_summary_is_the_official_scripts_to_the_digit(tmp_path):
    path = _fixture_results(tmp_path / "results.jsonl")
    assert geneval_official.summary(path) == OFFICIAL_SUMMARY
    s = geneval_official.scores(path)
    assert s["counting"] == 1 / 8 and round(s["overall"], 5) == 0.49306
    r = subprocess.run([sys.executable, "-m", "strokes_jax", "geneval", "summary", path],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout == OFFICIAL_SUMMARY, r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text(open(path).readline() + '{"tag": "colors", "correct": "yes", "metadata": "{}"}\n')
    with pytest.raises(BenchmarkError, match=r"bad\.jsonl:2: 'correct' is 'yes', not true/false"):
        geneval_official.summary(str(bad))
    r = subprocess.run([sys.executable, "-m", "strokes_jax", "geneval", "summary", str(tmp_path / "none.jsonl")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == f"error: {tmp_path / 'none.jsonl'}: no such file"


def test_the_official_command_names_the_folder(tmp_path):
    text = geneval_official.official_command("/data/my run", "/data/res.jsonl")
    assert "python evaluation/evaluate_images.py '/data/my run' --outfile /data/res.jsonl" in text
    assert "python evaluation/summary_scores.py /data/res.jsonl" in text


def test_the_shapes_chain_without_downloads(tmp_path):
    """Exported shapes prompts, painted by a perfect painter (the renderer) except one image
    with an object missing, scored by the exact detector into the official format."""
    meta = str(tmp_path / "shapes.jsonl")
    assert geneval.export_shapes(meta, seed=0, per_tag=2) == 12
    entries = geneval.read_metadata(meta)
    assert [e.metadata["tag"] for e in entries] == [t for t in shapes.TAGS for _ in range(2)]
    first = json.loads(open(meta).readline())
    assert list(first) == ["tag", "include", "prompt"]
    root = tmp_path / "root"
    rng = np.random.default_rng(0)
    for e in entries:
        p = wp.Prompt.from_geneval(e.metadata)
        for k in range(2):
            scene = list(wp.sample_scene(rng, p))
            if e.index == 0 and k == 1:
                scene = []
            store.write_png(str(root / f"{e.index:05d}" / "samples" / f"{k:04d}.png"), shapes.render(scene))
        store.write_text(str(root / f"{e.index:05d}" / "metadata.jsonl"), json.dumps(e.metadata))
    path, rows = geneval.score_shapes(str(root))
    assert len(rows) == 24 and sum(not r["correct"] for r in rows) == 1
    assert list(rows[0]) == ["filename", "tag", "prompt", "correct", "reason", "metadata", "details"]
    assert rows[1]["reason"].startswith("expected ") and json.loads(rows[0]["metadata"]) == entries[0].metadata
    text = geneval_official.summary(path)
    assert "single_object    = 75.00% (3 / 4)" in text and "Total prompts: 12" in text


@pytest.mark.slow
def test_geneval_on_a_trained_shapes_workdir(tmp_path):
    w = str(tmp_path / "w")
    base = [sys.executable, "-m", "strokes_jax"]
    r = subprocess.run(base + ["train", "--config", "shapes_tiny:test", f"--workdir={w}",
                               "--config.train.tb_images=0"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = str(tmp_path / "shapes.jsonl")
    r = subprocess.run(base + ["geneval", "export-shapes", "--out", meta, "--per-tag", "1"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    gen = base + ["geneval", "generate", "--config", "shapes_tiny:test", "--workdir", w, "--metadata", meta,
                  "--n", "2"]
    r = subprocess.run(gen, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    root = os.path.join(w, "geneval", "process")
    assert "6 prompts x 2 images" in r.stdout and "evaluate_images.py" in r.stdout
    assert len(geneval_official.walk(root)) == 12
    run = json.load(open(os.path.join(root, "run.json")))
    assert run["checkpoint_step"] == 8 and run["metadata_file"] == "shapes.jsonl"
    r = subprocess.run(base + ["geneval", "score-shapes", root], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and "Overall score (avg. over tasks):" in r.stdout, r.stderr[-3000:]
    r = subprocess.run(gen, capture_output=True, text=True, cwd=tmp_path)  # finished: nothing to paint
    assert r.returncode == 0 and "6 already there, 0 painted" in r.stdout, r.stderr[-3000:]


def test_bad_input_is_one_line_before_jax(tmp_path):
    """A missing or malformed prompt file fails in one line, before JAX is imported."""
    poison = tmp_path / "poison"
    for name in ("jax", "tensorflow"):
        (poison / name).mkdir(parents=True)
        (poison / name / "__init__.py").write_text(f"raise ImportError('{name} imported')\n")
    (tmp_path / "m.jsonl").write_text('{"tag": "colors", "prompt": "a photo of a red cow"}\n')
    (tmp_path / "w.json").write_text('[\n  {"Prompt": "p", "prompt_id": 3}\n]\n')
    env = dict(os.environ, PYTHONPATH=str(poison))
    for args, message in [
        (["geneval", "generate", "--workdir", "w", "--metadata", "nope.jsonl"], "error: nope.jsonl: no such file"),
        (["geneval", "generate", "--workdir", "w", "--metadata", "m.jsonl"],
         "error: m.jsonl:1: needs a non-empty list \"include\""),
        (["wise", "generate", "--workdir", "w", "--prompts", "w.json"],
         "error: w.json:2: prompt 3 needs a string 'Explanation'"),
        (["wise", "judge", "nowhere", "--url", "http://127.0.0.1:9", "--model", "m"],
         "error: nowhere/prompts.json: no such file"),
    ]:
        r = subprocess.run([sys.executable, "-m", "strokes_jax", *args], capture_output=True, text=True,
                           env=env, cwd=tmp_path)
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr
        assert r.stderr.strip().startswith(message), r.stderr
