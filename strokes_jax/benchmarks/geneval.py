"""GenEval with a trained model: official prompt metadata in, the official folder layout out.

  <root>/run.json                       what the images came from (model, prompts, seed, sampling)
  <root>/00000/metadata.jsonl           the prompt's metadata line (one JSON object)
  <root>/00000/samples/0000.png ...     N images: what the official evaluator scores
  <root>/00000/generation.json          per image: NFE, caps hit, whether the episode parsed
  <root>/00000/trajectories/0000.txt    process mode: the whole trajectory text, and
  <root>/00000/trajectories/0000_filmstrip.png   its images captioned with that text

Trajectories sit outside `samples/`, so the official walk (geneval_official.walk) sees the
samples only. Each prompt's N images are one generator call whose RNG is seeded by
(seed, prompt index); the generator gives each example its own noise from that call's draw
and its index, so image k of prompt i is the same whatever else runs and however often the
run is interrupted. A folder's metadata.jsonl is written last: a folder that has it and every
other file is complete and skipped on resume; any other prompt folder is deleted and redone.

The shapes world runs the same chain without downloads: `export_shapes` writes its prompts in
GenEval's metadata format, a shapes model paints them, and `score_shapes` scores the PNGs with
the exact detector and GenEval's rules into the official results format, which
geneval_official.summary prints as the official script does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from strokes_jax.benchmarks import store
from strokes_jax.benchmarks.geneval_official import result_row, walk
from strokes_jax.benchmarks.store import BenchmarkError
from strokes_jax.worlds import geneval as rules

ORIGINAL = "evaluation_metadata.jsonl"  # djghosh13/geneval prompts/
REWRITTEN = "evaluation_metadata_long.jsonl"  # ByteDance-Seed/Bagel eval/gen/geneval/prompts/
VARIANTS = {ORIGINAL: "original GenEval prompts",
            REWRITTEN: "BAGEL's LLM-rewritten prompts (same metadata, long prompt text)"}
GEN_MODES = {"process": "process", "single": "single_pass"}
RELATIONS = ("left of", "right of", "above", "below")


@dataclasses.dataclass(frozen=True)
class Entry:
    index: int  # position in the metadata file, 0-based: the prompt's folder number
    where: str  # "FILE:LINE", for messages
    metadata: dict

    @property
    def prompt(self) -> str:
        return self.metadata["prompt"]


def _check_clause(c, where: str, k: int, kind: str, earlier: int) -> None:
    what = f"{where}: {kind}[{k}]"
    if not isinstance(c, dict):
        raise BenchmarkError(f"{what} is not an object")
    if not isinstance(c.get("class"), str) or not c["class"]:
        raise BenchmarkError(f"{what} needs a string \"class\"")
    if not isinstance(c.get("count"), int) or isinstance(c["count"], bool) or c["count"] < 1:
        raise BenchmarkError(f"{what} needs a whole \"count\" >= 1")
    if "color" in c and not isinstance(c["color"], str):
        raise BenchmarkError(f"{what}: \"color\" must be a string")
    if "position" in c:
        p = c["position"]
        if (kind != "include" or not isinstance(p, list) or len(p) != 2 or p[0] not in RELATIONS
                or not isinstance(p[1], int) or not 0 <= p[1] < earlier):
            raise BenchmarkError(f"{what}: \"position\" must be [relation, index of an earlier "
                                 f"include clause], relation one of {', '.join(RELATIONS)}")


def check_metadata(obj, where: str) -> dict:
    """One metadata line, checked against the schema GenEval's rules read."""
    if not isinstance(obj, dict):
        raise BenchmarkError(f"{where}: expected a JSON object")
    for key in ("tag", "prompt"):
        if not isinstance(obj.get(key), str) or not obj[key].strip():
            raise BenchmarkError(f"{where}: needs a non-empty string {key!r}")
    if not isinstance(obj.get("include"), list) or not obj["include"]:
        raise BenchmarkError(f"{where}: needs a non-empty list \"include\"")
    for k, c in enumerate(obj["include"]):
        _check_clause(c, where, k, "include", k)
    if not isinstance(obj.get("exclude", []), list):
        raise BenchmarkError(f"{where}: \"exclude\" must be a list")
    for k, c in enumerate(obj.get("exclude", [])):
        _check_clause(c, where, k, "exclude", 0)
    return obj


def read_metadata(path: str) -> list[Entry]:
    """GenEval's evaluation_metadata.jsonl (or BAGEL's _long variant, or the shapes world's
    export): one prompt per line; a bad line is an error naming the file and line."""
    if not os.path.isfile(path):
        raise BenchmarkError(f"{path}: no such file")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise BenchmarkError(f"{where}: not JSON ({e.msg})") from None
            out.append(Entry(len(out), where, check_metadata(obj, where)))
    if not out:
        raise BenchmarkError(f"{path}: holds no prompts")
    return out


def variant(path: str) -> str:
    return VARIANTS.get(os.path.basename(path), "custom metadata file")


def _folder(root: str, i: int) -> str:
    return os.path.join(root, f"{i:05d}")


def expected_files(n: int, mode: str) -> list[str]:
    files = ["metadata.jsonl", "generation.json"] + [f"samples/{k:04d}.png" for k in range(n)]
    if mode == "process":
        files += [f"trajectories/{k:04d}{s}" for k in range(n) for s in (".txt", "_filmstrip.png")]
    return files


def is_complete(folder: str, n: int, mode: str) -> bool:
    return all(os.path.isfile(os.path.join(folder, f)) for f in expected_files(n, mode))


def _write_prompt(folder: str, entry: Entry, results: Sequence, mode: str, image_shape) -> None:
    if mode == "process":
        for k, r in enumerate(results):
            store.write_trajectory(os.path.join(folder, "trajectories", f"{k:04d}"), r)
    store.write_json(os.path.join(folder, "generation.json"),
                     {"prompt": entry.prompt, "samples": [store.sample_record(k, r) for k, r in enumerate(results)]})
    for k, r in enumerate(results):
        store.write_png(os.path.join(folder, "samples", f"{k:04d}.png"), store.final_image(r, image_shape))
    # Last, as the official generator writes it (json.dump, no newline): its presence marks
    # the folder complete.
    store.write_text(os.path.join(folder, "metadata.jsonl"), json.dumps(entry.metadata))


def run_record(metadata_path: str, n: int, mode: str, seed: int, model: dict | None = None) -> dict:
    """run.json: what a folder's images come from. `model`: the config, checkpoint step and
    sampling options (cli.py fills it)."""
    return {"benchmark": "geneval", "metadata_file": os.path.basename(metadata_path),
            "metadata_sha256": store.sha256_file(metadata_path), "variant": variant(metadata_path),
            "images_per_prompt": n, "mode": mode, "seed": seed, **(model or {})}


def generate(generator, entries: Sequence[Entry], root: str, *, n: int = 4, mode: str = "process",
             seed: int = 0, record: dict | None = None, image_shape=None) -> dict:
    """Paints every entry's N images into `root` (resuming a killed run); returns counts.
    `record`: run.json's content (run_record), checked against an existing folder's."""
    if mode not in GEN_MODES:
        raise BenchmarkError(f"unknown mode {mode!r}; expected one of {', '.join(GEN_MODES)}")
    os.makedirs(root, exist_ok=True)
    store.remove_leftovers(root)
    if record is not None:
        store.check_run_record(os.path.join(root, "run.json"), record)
    image_shape = image_shape or generator.etok.image_shape
    todo, done = [], 0
    for e in entries:
        folder = _folder(root, e.index)
        if is_complete(folder, n, mode):
            done += 1
        else:
            todo.append(e)
    redone = 0
    with tqdm(total=len(entries), initial=done, desc=f"geneval {mode}", unit="prompt") as bar:
        for e in todo:
            folder = _folder(root, e.index)
            if os.path.exists(folder):  # a prompt a killed run left unfinished
                shutil.rmtree(folder)
                redone += 1
            rng = np.random.default_rng([seed, e.index])
            results = generator([e.prompt] * n, GEN_MODES[mode], rng=rng)
            _write_prompt(folder, e, results, mode, image_shape)
            bar.update(1)
    return {"prompts": len(entries), "skipped": done, "generated": len(todo), "redone": redone,
            "images": len(entries) * n, "root": root}


# ---- the shapes world's chain ----------------------------------------------------------

def export_shapes(path: str, seed: int = 0, per_tag: int = 10) -> int:
    """The shapes world's benchmark prompts (shapes_bench.benchmark_prompts: distinct prompts
    per tag from an evaluation seed) as a GenEval metadata file, keys in the official order."""
    from strokes_jax.evaluate import shapes_bench

    lines = []
    for p in shapes_bench.benchmark_prompts(seed, per_tag):
        line = {"tag": p.tag, **{k: p.metadata[k] for k in ("include", "exclude") if k in p.metadata},
                "prompt": p.text}
        lines.append(json.dumps(line) + "\n")
    store.write_text(path, "".join(lines))
    return len(lines)


def _details(dets) -> dict:
    """The results file's `details`: class -> [x0, y0, x1, y1, confidence] per detection."""
    out: dict[str, list] = {}
    for d in dets:
        out.setdefault(d.cls, []).append([*map(float, d.box), float(d.score)])
    return out


def score_shapes(root: str, outfile: str | None = None) -> tuple[str, list[dict]]:
    """Scores every image of a GenEval folder of shapes-world prompts with the shapes world's
    exact detector and GenEval's rules, into the official results format.

    The detector's score is a template IoU, not a confidence, so the official confidence
    filter (rules.filter_detections, for real detectors) is not applied: verdicts are the
    exact checker's, the same as the `evaluate` command's."""
    from strokes_jax.worlds import detect

    outfile = outfile or os.path.join(root, "results.jsonl")
    rows = []
    for path, metadata in tqdm(walk(root), desc="score shapes", unit="image"):
        img = np.asarray(Image.open(path).convert("RGB"))
        dets = detect.detect(img)
        ok, reason = rules.evaluate_detections(dets, metadata)
        rows.append(result_row(path, metadata, ok, reason, _details(dets)))
    if not rows:
        raise BenchmarkError(f"{root}: no GenEval images (expected <root>/00000/samples/0000.png ...)")
    store.write_text(outfile, "".join(json.dumps(r) + "\n" for r in rows))
    return outfile, rows


def folder_digest(root: str) -> dict[str, str]:
    """relative path -> sha256 of every file under root, to compare runs."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out
