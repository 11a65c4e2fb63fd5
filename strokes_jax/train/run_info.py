"""What a workdir's run was made with: the resolved config, the commit, package versions and
the device topology, in `<workdir>/run_info.json`; and the check that a resumed or evaluated
run uses a compatible config, naming every key that differs.

Resuming training compares the whole config except the keys a user may change between
restarts (how long to train, how often to log / save / evaluate, how to evaluate).
Evaluating compares only what shapes the parameters (`world`, `model`).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform

import jax

from strokes_jax import files, provenance

FILE = "run_info.json"
# Keys that may change when a run is resumed.
RESUMABLE = ("train.steps", "train.log_every", "train.eval_every", "train.checkpoint_every",
             "train.keep_checkpoints", "train.tb_images", "optim.total_steps", "eval.",
             "self_critique.", "reproduce.", "bench.", "data.data_dir")
# What evaluation needs to match: the parameters' shapes and meaning.
EVAL_KEYS = ("world.", "model.")
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "tensorflow-datasets",
            "ml-collections", "clu", "numpy")


class ConfigMismatch(ValueError):
    pass


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def _jsonable(config) -> dict:
    """The config as plain JSON values (tuples become lists, as they read back)."""
    return json.loads(json.dumps(config.to_dict(), default=str))


def versions() -> dict:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def read(workdir: str) -> dict | None:
    return files.read_json(os.path.join(workdir, FILE))


def write(workdir: str, config, mesh_shape=None) -> dict:
    info = {"config": _jsonable(config), "commit": provenance.git_commit(),
            "versions": versions(), "device": provenance.device_info(),
            "mesh_shape": list(mesh_shape) if mesh_shape is not None else None}
    if jax.process_index() == 0:
        files.write_json(os.path.join(workdir, FILE), info)
    return info


def differences(stored: dict, config, keys=None, skip=RESUMABLE) -> list[str]:
    """'key: stored -> now' for every differing key (only `keys` prefixes when given)."""
    old, new = _flat(stored), _flat(_jsonable(config))
    out = []
    for k in sorted(set(old) | set(new)):
        if keys is not None and not k.startswith(keys):
            continue
        if keys is None and (k in skip or k.startswith(tuple(s for s in skip if s.endswith(".")))):
            continue
        if old.get(k, "<absent>") != new.get(k, "<absent>"):
            out.append(f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}")
    return out


def check(workdir: str, config, *, for_eval: bool = False) -> None:
    """Raise ConfigMismatch when the workdir's run was made with an incompatible config."""
    info = read(workdir)
    if info is None:
        return
    diff = differences(info["config"], config, keys=EVAL_KEYS if for_eval else None)
    if diff:
        shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
        raise ConfigMismatch(f"{workdir} holds a run made with another config ({shown}); use "
                             f"another --workdir, or pass --allow_config_change to go on anyway")
