"""Files a benchmark run leaves behind, each written whole or not at all.

Every file goes to a temporary name in its folder first and is renamed into place, so a run
killed at any moment leaves complete files and leftovers whose names start with `.tmp-`:
no official tool mistakes one for a sample (GenEval's walk keeps names matching `\\d+\\.png`
from their start, which `0000.png.tmp` would). A run record (`run.json`) pins what a
folder's images came from, so a resumed run never mixes two models or two prompt sets.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Sequence

import numpy as np
from PIL import Image

TMP_PREFIX = ".tmp-"
# What a sample is when the model drew no image: flat grey, in which neither GenEval's
# detector nor the shapes detector finds an object (the shapes world's background), so the
# sample counts as failed instead of going missing and inflating the accuracy.
EMPTY_RGB = (128, 128, 128)


class BenchmarkError(ValueError):
    """Bad input to a benchmark command, as one line naming the file (and line) at fault."""


def write_bytes(path: str, data: bytes) -> None:
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, TMP_PREFIX + os.path.basename(path))
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remove_leftovers(folder: str) -> None:
    """Temporary files a killed run left in `folder` (not below it)."""
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith(TMP_PREFIX):
                os.remove(os.path.join(folder, name))


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str, obj) -> None:
    write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(img, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_png(path: str, img: np.ndarray) -> None:
    write_bytes(path, png_bytes(img))


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def final_image(result, image_shape: Sequence[int]) -> np.ndarray:
    """The sample to score: the episode's last image, or flat grey when it drew none."""
    if result.final_image is not None:
        return result.final_image
    return np.broadcast_to(np.array(EMPTY_RGB, np.uint8), tuple(image_shape)).copy()


def write_trajectory(stem: str, result) -> None:
    """`<stem>.txt` (the whole stream, images as <image>) and `<stem>_filmstrip.png`."""
    from strokes_jax.evaluate import report  # brings up JAX: only where images are written

    write_text(stem + ".txt", result.text + "\n")
    strip = report.filmstrip(result.prompt, result.text, result.images, None,
                             title=f"{os.path.basename(stem)} ({result.nfe} NFE)")
    write_png(stem + "_filmstrip.png", strip)


def sample_record(k: int, result) -> dict:
    """What a sample's generation did, deterministic (no timings), so reruns match bytewise."""
    return {"sample": k, "images": len(result.images), "nfe": int(result.nfe),
            "hit_cap": bool(result.hit_cap), "well_formed": result.episode is not None,
            "error": result.error}


def check_run_record(path: str, record: dict) -> None:
    """Writes `record` where none is; refuses a folder whose record differs, naming the keys
    (a resumed run must come from the same model, prompts, seed and sampling)."""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            try:
                old = json.load(f)
            except json.JSONDecodeError as e:
                raise BenchmarkError(f"{path}:{e.lineno}: not JSON ({e.msg})") from None
        want = json.loads(json.dumps(record))  # tuples as lists, as the file holds them
        diff = sorted(k for k in set(old) | set(want) if old.get(k) != want.get(k))
        if diff:
            raise BenchmarkError(f"{path}: this folder was generated with other {', '.join(diff)}; "
                                 f"pass another --out (or delete the folder) to start afresh")
        return
    write_json(path, record)
