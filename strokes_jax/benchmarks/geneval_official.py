"""What GenEval's own tools do with a folder, reproduced where this project needs it.

Read from github:djghosh13/geneval (commit af4902f):
  evaluation/evaluate_images.py   `main()` walks `<root>/<digits>/metadata.jsonl` and
                                  `<root>/<digits>/samples/<name>` with `re.match(r"\\d+\\.png")`,
                                  and writes one JSON line per image (`filename`, `tag`,
                                  `prompt`, `correct`, `reason`, `metadata` as a JSON string,
                                  `details`); its detector needs mmdetection 2.x and a GPU.
  evaluation/summary_scores.py    the table below, from that results file (pandas).
BAGEL's copy of summary_scores.py (ByteDance-Seed/Bagel eval/gen/geneval/evaluation) prints
the same lines and then a short `SO TO CT CL POS ATTR ALL` row.
"""

from __future__ import annotations

import json
import os
import re
import shlex

import numpy as np

from strokes_jax.benchmarks.store import BenchmarkError

SAMPLE_NAME = re.compile(r"\d+\.png")


def walk(root: str) -> list[tuple[str, dict]]:
    """(image path, metadata) for every image the official evaluator would score, with its
    tests in its order. The official walk follows os.listdir's order; this one sorts, so
    results files come out the same on every filesystem. A prompt folder without
    metadata.jsonl (a generation still under way) stops the official evaluator with a
    traceback; here it is a one-line error."""
    if not os.path.isdir(root):
        raise BenchmarkError(f"{root}: no such folder")
    out = []
    for sub in sorted(os.listdir(root)):
        folder = os.path.join(root, sub)
        if not os.path.isdir(folder) or not sub.isdigit():
            continue
        meta_path = os.path.join(folder, "metadata.jsonl")
        if not os.path.isfile(meta_path):
            raise BenchmarkError(f"{folder}: no metadata.jsonl (an unfinished prompt: rerun the "
                                 f"generation to complete it)")
        with open(meta_path, encoding="utf-8") as fp:
            try:
                metadata = json.load(fp)
            except json.JSONDecodeError as e:
                raise BenchmarkError(f"{meta_path}:{e.lineno}: not JSON ({e.msg})") from None
        samples = os.path.join(folder, "samples")
        for name in sorted(os.listdir(samples)) if os.path.isdir(samples) else ():
            path = os.path.join(samples, name)
            if os.path.isfile(path) and SAMPLE_NAME.match(name):
                out.append((path, metadata))
    return out


def result_row(path: str, metadata: dict, correct: bool, reason: str, details: dict) -> dict:
    """One line of the official results file, keys in its order."""
    return {"filename": path, "tag": metadata["tag"], "prompt": metadata["prompt"],
            "correct": bool(correct), "reason": reason, "metadata": json.dumps(metadata),
            "details": json.dumps(details)}


def read_results(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise BenchmarkError(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise BenchmarkError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise BenchmarkError(f"{path}:{n}: expected a JSON object")
            for key in ("tag", "correct", "metadata"):
                if key not in row:
                    raise BenchmarkError(f"{path}:{n}: no {key!r} (not a GenEval results line)")
            if not isinstance(row["correct"], bool):
                raise BenchmarkError(f"{path}:{n}: 'correct' is {row['correct']!r}, not true/false")
            rows.append(row)
    if not rows:
        raise BenchmarkError(f"{path}: holds no results")
    return rows


def summary(path: str) -> str:
    """summary_scores.py's printout for a results file, character for character.

    The script's arithmetic: pandas' mean of a boolean column is its count of trues over
    its length (a float64 division, as here); tags in order of first appearance (groupby
    with sort=False); prompts are distinct `metadata` strings; the overall score is numpy's
    mean of the per-tag accuracies, whose summation order is numpy's, so it is computed by
    numpy here too.
    """
    rows = read_results(path)
    meta = [r["metadata"] if isinstance(r["metadata"], str) else json.dumps(r["metadata"])
            for r in rows]
    correct = [r["correct"] for r in rows]
    by_prompt: dict[str, bool] = {}
    for m, ok in zip(meta, correct):
        by_prompt[m] = by_prompt.get(m, False) or ok
    by_tag: dict[str, list[bool]] = {}
    for r in rows:
        by_tag.setdefault(r["tag"], []).append(r["correct"])
    lines = ["Summary", "=======",
             f"Total images: {len(rows)}",
             f"Total prompts: {len(by_prompt)}",
             f"% correct images: {sum(correct) / len(correct):.2%}",
             f"% correct prompts: {sum(by_prompt.values()) / len(by_prompt):.2%}",
             "", "Task breakdown", "=============="]
    task_scores = []
    for tag, oks in by_tag.items():
        acc = sum(oks) / len(oks)
        task_scores.append(np.float64(acc))
        lines.append(f"{tag:<16} = {acc:.2%} ({sum(oks)} / {len(oks)})")
    lines += ["", f"Overall score (avg. over tasks): {np.mean(task_scores):.5f}"]
    return "\n".join(lines) + "\n"


def scores(path: str) -> dict[str, float]:
    """Per-tag accuracy and the overall (plain mean over tags), as numbers."""
    by_tag: dict[str, list[bool]] = {}
    for r in read_results(path):
        by_tag.setdefault(r["tag"], []).append(r["correct"])
    out = {tag: sum(v) / len(v) for tag, v in by_tag.items()}
    out["overall"] = float(np.mean(list(out.values())))
    return out


def official_command(root: str, outfile: str | None = None) -> str:
    """The commands that score `root` with the official detector, for a machine with a CUDA
    GPU (evaluate_images.py asserts one), as the official README sets it up."""
    outfile = outfile or os.path.join(root, "results.jsonl")
    q = shlex.quote
    return "\n".join([
        "# Once, on a machine with a CUDA GPU (conda, mmdetection 2.x, Mask2Former weights):",
        "git clone https://github.com/djghosh13/geneval.git && cd geneval",
        "conda env create -f environment.yml && conda activate geneval",
        './evaluation/download_models.sh "$OBJECT_DETECTOR_FOLDER/"',
        "git clone https://github.com/open-mmlab/mmdetection.git",
        "(cd mmdetection && git checkout 2.x && pip install -v -e .)",
        "# Score the images (defaults: threshold 0.3, counting_threshold 0.9, max_objects 16,",
        "# position_threshold 0.1), then print the table:",
        f'python evaluation/evaluate_images.py {q(root)} --outfile {q(outfile)} '
        f'--model-path "$OBJECT_DETECTOR_FOLDER"',
        f"python evaluation/summary_scores.py {q(outfile)}",
        f"# or, here: python -m strokes_jax geneval summary {q(outfile)}",
    ])
