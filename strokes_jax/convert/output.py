"""The folder a conversion writes: `OUT/params` (an Orbax checkpoint of numpy arrays, see
writer.py), `OUT/conversion.json` (what was converted, from which files, under which config)
and, for `convert bagel`, `OUT/tokenizer.json`.

An existing OUT is refused before anything is read unless `overwrite`, and then only a folder
holding nothing but a conversion's outputs is replaced, so a mistyped --out cannot wipe
unrelated files. The params are written to `OUT/params.converting` and moved into place
once every tensor has converted: a source refused half-way leaves a previous conversion in
OUT as it was, and a fresh OUT is removed again.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Callable, Mapping, Sequence

import numpy as np

from strokes_jax.convert import writer

OUTPUTS = ("params", "conversion.json", "tokenizer.json")
_STAGING = "params.converting"


def check_out(out_dir: str, overwrite: bool) -> str:
    """`out_dir` made absolute, if a conversion may write there; called before anything is read."""
    out_dir = os.path.abspath(out_dir)
    if os.path.lexists(out_dir):
        if not overwrite:
            raise FileExistsError(f"{out_dir}: exists; pass overwrite=True to replace it")
        _check_replaceable(out_dir)
    return out_dir


def _check_replaceable(out_dir: str) -> None:
    if os.path.islink(out_dir) or not os.path.isdir(out_dir):
        raise FileExistsError(f"{out_dir}: exists and is not a folder; not replacing it")
    # Orbax's in-progress `params.*` folders count as a conversion's own.
    foreign = sorted(n for n in os.listdir(out_dir) if n not in OUTPUTS and not n.startswith("params."))
    if foreign:
        raise FileExistsError(f"{out_dir}: exists and holds files a conversion does not write "
                              f"({', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}); not replacing it")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def _remove_staging(out_dir: str) -> None:
    for n in os.listdir(out_dir):
        if n.startswith(_STAGING):  # ours and Orbax's temporary folders for it
            _remove(os.path.join(out_dir, n))


def write(out_dir: str, parts: Sequence[writer.Part], meta: Mapping, *, dtype=None, overwrite: bool = False,
          allow_nonfinite: bool = False, allow_dtype: bool = False,
          extra: Callable[[str], None] | None = None, progress: str | None = "converting") -> str:
    """Converts `parts` into `out_dir/params` and writes conversion.json (`meta` + dtype and
    checks); `extra(out_dir)` adds files (the tokenizer) once the params are in place.
    Returns the params path."""
    out_dir = check_out(out_dir, overwrite)
    created = not os.path.lexists(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    _remove_staging(out_dir)  # an interrupted earlier run's
    staging = os.path.join(out_dir, _STAGING)
    try:
        writer.save(staging, parts, dtype=dtype, allow_nonfinite=allow_nonfinite, allow_dtype=allow_dtype,
                    progress=progress)
        if not created:
            _check_replaceable(out_dir)  # again: something may have been written there meanwhile
    except BaseException:
        _remove_staging(out_dir)
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    for n in os.listdir(out_dir):
        if n != _STAGING:
            _remove(os.path.join(out_dir, n))
    path = os.path.join(out_dir, "params")
    os.rename(staging, path)
    if extra is not None:
        extra(out_dir)
    meta = dict(meta, dtype=None if dtype is None else str(np.dtype(dtype)),
                allow_nonfinite=allow_nonfinite, allow_dtype=allow_dtype)
    with open(os.path.join(out_dir, "conversion.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return path


def load_part(out_dir: str, key: str) -> dict:
    """One top-level part of the converted params (e.g. 'vae' of a BAGEL conversion) as numpy
    arrays, read without the rest: the AE of a 14B conversion costs its own 330 MB only."""
    import jax
    import orbax.checkpoint as ocp
    path = os.path.join(os.path.abspath(out_dir), "params")
    ckptr = ocp.PyTreeCheckpointer()
    meta = ckptr.metadata(path)
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
    if key not in tree:
        raise KeyError(f"{out_dir}: the conversion holds {sorted(tree)}, no {key!r}")
    sub = {key: tree[key]}
    args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), sub)
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(item=sub, restore_args=args,
                                                           partial_restore=True))[key]


def load_converted(out_dir: str) -> dict:
    """The converted params ({'model': ..., 'vae': ...} or the part a converter wrote) as numpy
    arrays in host memory; place them with jax.device_put, or merge a part into a fresh init
    with keymap.merge."""
    import orbax.checkpoint as ocp
    return ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(out_dir), "params"))
