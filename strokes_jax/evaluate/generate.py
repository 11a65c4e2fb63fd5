"""`generate`: paint your own prompts with a trained model and keep everything it wrote.

For every prompt and sample, in each mode asked for:

  <out>/<NNNNN>/prompt.txt                      the prompt as given
  <out>/<NNNNN>/<mode>_<k>.png                  the final image
  <out>/<NNNNN>/<mode>_<k>_images/<j>.png       every image of the episode, in order
  <out>/<NNNNN>/<mode>_<k>.txt                  the whole trajectory text (images as <image>)
  <out>/<NNNNN>/<mode>_<k>_filmstrip.png        the images captioned with the text between them
  <out>/samples.jsonl                           one row per sample: paths, NFE, cap, parse error

Process mode stops when the model writes the end marker, or at eval.max_iterations. Prompts
come from --prompt (repeatable) or a prompts file: one prompt per line (blank lines and `#`
comments skipped), or JSONL with a "prompt" field per line (GenEval's metadata layout).
Each batch draws from its own seed (the run's seed, the sample index, the batch index), so a
rerun with the same prompts, batch size and seed paints the same images.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
from etils import epath
from PIL import Image
from tqdm import tqdm

from strokes_jax.evaluate import report
from strokes_jax.sequence.tokenizer import TokenizerError

MODES = {"process": ("process",), "single": ("single_pass",), "both": ("process", "single_pass")}


class PromptError(ValueError):
    pass


def read_prompts(path: str) -> list[str]:
    """Prompts from a text file (one per line) or a JSONL file with a "prompt" field."""
    if not os.path.isfile(path):
        raise PromptError(f"--prompts {path}: no such file")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            if path.endswith(".jsonl"):
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as e:
                    raise PromptError(f"{path}:{n}: not JSON ({e.msg})") from None
                if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                    raise PromptError(f"{path}:{n}: needs a string field \"prompt\"")
                text = row["prompt"].strip()
            if not text:
                raise PromptError(f"{path}:{n}: empty prompt")
            out.append(text)
    if not out:
        raise PromptError(f"{path}: holds no prompts")
    return out


def check_prompts(etok, prompts: Sequence[str], where: Sequence[str]) -> None:
    """Every prompt must tokenize (the shapes world's vocabulary refuses unknown words)."""
    for p, w in zip(prompts, where):
        try:
            etok.tok.encode(p, record=w)
        except TokenizerError as e:
            raise PromptError(str(e)) from None


def _save_png(img: np.ndarray, path: str) -> None:
    """Written under a temporary name, then renamed: a killed run leaves no half image.
    Through etils.epath, so a gs:// output folder works too."""
    tmp = epath.Path(path + ".tmp.png")
    with tmp.open("wb") as f:
        Image.fromarray(np.asarray(img, np.uint8)).save(f, format="PNG")
    tmp.replace(path)


def _write_sample(out_dir: str, idx: int, k: int, result) -> dict:
    folder = os.path.join(out_dir, f"{idx:05d}")
    stem = f"{'single' if result.mode == 'single_pass' else 'process'}_{k}"
    frames = os.path.join(folder, stem + "_images")
    epath.Path(frames).mkdir(parents=True, exist_ok=True)
    for j, img in enumerate(result.images):
        _save_png(img, os.path.join(frames, f"{j}.png"))
    if result.final_image is not None:
        _save_png(result.final_image, os.path.join(folder, stem + ".png"))
    epath.Path(folder, stem + ".txt").write_text(result.text + "\n", encoding="utf-8")
    report.filmstrip(result.prompt, result.text, result.images,
                     os.path.join(folder, stem + "_filmstrip.png"), title=f"{stem} ({result.nfe} NFE)")
    return {"prompt_index": idx, "prompt": result.prompt, "mode": result.mode, "sample": k,
            "image": os.path.join(f"{idx:05d}", stem + ".png") if result.images else None,
            "images": len(result.images), "nfe": result.nfe, "hit_cap": result.hit_cap,
            "well_formed": result.episode is not None, "error": result.error}


def run(generator, prompts: Sequence[str], out_dir: str, *, modes: Sequence[str], n: int,
        batch_size: int, seed: int = 0) -> list[dict]:
    """Generates `n` samples of every prompt in every mode into `out_dir`; returns the rows
    written to samples.jsonl."""
    for i, p in enumerate(prompts):
        folder = epath.Path(out_dir, f"{i:05d}")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "prompt.txt").write_text(p + "\n", encoding="utf-8")
    batches = [list(range(s, min(s + batch_size, len(prompts))))
               for s in range(0, len(prompts), batch_size)]
    rows = []
    with tqdm(total=len(prompts) * n * len(modes), desc="generate", unit="sample") as bar:
        for mode in modes:
            for k in range(n):
                for b, idx in enumerate(batches):
                    rng = np.random.default_rng([seed, k, b])
                    results = generator([prompts[i] for i in idx], mode, rng=rng)
                    rows += [_write_sample(out_dir, i, k, r) for i, r in zip(idx, results)]
                    bar.update(len(idx))
    tmp = epath.Path(out_dir, "samples.jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(os.path.join(out_dir, "samples.jsonl"))
    return rows


def summary(rows: Sequence[dict]) -> str:
    lines = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        rs = [r for r in rows if r["mode"] == mode]
        lines.append(f"{mode}: {len(rs)} samples, mean NFE {np.mean([r['nfe'] for r in rs]):.1f}, "
                     f"{sum(r['well_formed'] for r in rs)} well-formed episodes, "
                     f"{sum(r['hit_cap'] for r in rs)} hit a cap")
    return "\n".join(lines)
