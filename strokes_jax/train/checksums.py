"""Checksum manifests of checkpoint steps: every file of a step (parameters, optimizer state,
each process's input-iterator state, Orbax's own metadata) with its size and SHA-256.

Orbax makes a save atomic (a temporary folder renamed when complete) but does not check what
it reads back: a flipped byte in a parameter chunk restores silently, and a damaged metadata
file fails deep inside tensorstore. Neither Orbax, tensorstore's OCDBT nor MaxText keep
content checksums of a finished step, so the manifest is written here, last, after Orbax has
committed the step, by the process that saved it (a temporary file renamed into place, so a
half-written manifest never exists). A step without a manifest is unverified: it was never
confirmed complete by its writer, or it predates manifests. Paths go through etils.epath, so a
gs:// workdir is checked the same way.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os

from etils import epath

MANIFEST = "checksums.json"
_CHUNK = 1 << 24


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with epath.Path(path).open("rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _size(path: str) -> int:
    return int(epath.Path(path).stat().length)


def _files(step_dir: str) -> list[str]:
    out, top = [], epath.Path(step_dir)
    for root, _, names in top.walk():
        for n in names:
            rel = os.path.relpath(os.fspath(root / n), os.fspath(top))
            if rel != MANIFEST and not rel.endswith(".tmp"):
                out.append(rel)
    return sorted(out)


def _digests(step_dir: str, rels) -> dict[str, str]:
    # hashlib releases the GIL on large buffers: threads hash files in parallel.
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(rels, pool.map(lambda r: _sha256(os.path.join(step_dir, r)), rels)))


def write(step_dir: str, **extra) -> dict:
    rels = _files(step_dir)
    digests = _digests(step_dir, rels)
    manifest = {"files": {r: {"size": _size(os.path.join(step_dir, r)), "sha256": digests[r]}
                          for r in rels}, **extra}
    tmp = epath.Path(step_dir) / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    tmp.replace(epath.Path(step_dir) / MANIFEST)
    return manifest


def problem(step_dir: str) -> str | None:
    """None when every file of the step matches its manifest; else the first problem, naming
    the file."""
    path = os.path.join(step_dir, MANIFEST)
    if not epath.Path(step_dir).is_dir():
        return f"{step_dir}: missing"
    if not epath.Path(path).exists():
        return f"{path}: no checksum manifest (the save was never confirmed complete)"
    try:
        files = json.loads(epath.Path(path).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{path}: unreadable manifest ({e})"
    present = set(_files(step_dir))
    for rel in sorted(files):
        if rel not in present:
            return f"{os.path.join(step_dir, rel)}: missing"
        size = _size(os.path.join(step_dir, rel))
        if size != files[rel]["size"]:
            return f"{os.path.join(step_dir, rel)}: {size} bytes, {files[rel]['size']} written"
    extra = sorted(present - set(files))
    if extra:
        return f"{os.path.join(step_dir, extra[0])}: not part of the saved step"
    digests = _digests(step_dir, sorted(files))
    for rel in sorted(files):
        if digests[rel] != files[rel]["sha256"]:
            return f"{os.path.join(step_dir, rel)}: checksum mismatch (the file changed after the save)"
    return None
