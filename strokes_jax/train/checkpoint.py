"""Orbax checkpoints of the train state together with every process's input-iterator state
(Grain's handler writes one file per process), so a run resumed from its workdir continues
with exactly the batches it would have seen.

Saves are atomic (Orbax writes a temporary directory and renames it when complete), so a
process killed mid-save leaves the previous checkpoint as the newest restorable one. Once
Orbax has committed a step, `confirm` writes its checksum manifest (train/checksums.py);
restores verify it and fall back to the newest step that verifies, naming each step skipped
and why. Training moves rejected steps aside to `checkpoints_rejected/` (nothing is deleted)
so that the run can save those step numbers again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from strokes_jax import files
from strokes_jax.train import checksums, init_weights

REJECTED = "checkpoints_rejected"


class CheckpointError(ValueError):
    """No checkpoint step verifies, or the one asked for does not."""


def root(workdir: str) -> str:
    """The checkpoints folder: a local workdir made absolute, a gs:// one as it is."""
    return os.path.join(workdir if "://" in workdir else os.path.abspath(workdir), "checkpoints")


def manager(workdir: str, *, keep: int, save_every: int) -> ocp.CheckpointManager:
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every,
                                        create=True)
    return ocp.CheckpointManager(epath.Path(root(workdir)), options=opts,
                                 item_names=("state", "data"))


def step_dir(mgr: ocp.CheckpointManager, step: int) -> str:
    return os.path.join(str(mgr.directory), str(step))


def confirm(mgr: ocp.CheckpointManager) -> None:
    """Waits for the save in flight, then writes the manifest of every committed step that
    lacks one. Only steps this run saved can lack one: training starts by moving unverified
    steps aside."""
    mgr.wait_until_finished()
    if jax.process_index() != 0:
        return
    steps = sorted(mgr.all_steps())
    has = [(epath.Path(step_dir(mgr, k)) / checksums.MANIFEST).exists() for k in steps]
    # A step older than a confirmed one that lacks a manifest is not this run's: left alone.
    first = max([i + 1 for i, h in enumerate(has) if h], default=0)
    # Each step carries the resolved config it was trained under (the workdir's run_info.json
    # can be replaced by a later run with --allow_config_change) and its fingerprint.
    info = files.read_json(os.path.join(os.path.dirname(str(mgr.directory)), "run_info.json"))
    config = (info or {}).get("config")
    print_ = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest() if config else None
    for step in steps[first:]:
        checksums.write(step_dir(mgr, step), step=int(step), config=config,
                        config_sha256=print_)


def verified_steps(mgr: ocp.CheckpointManager) -> list[int]:
    return [s for s in sorted(mgr.all_steps()) if checksums.problem(step_dir(mgr, s)) is None]


def save(mgr: ocp.CheckpointManager, step: int, state, data_iter=None, force: bool = False) -> bool:
    confirm(mgr)  # the previous save is complete: its manifest is written before the next
    args = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
        args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return mgr.save(step, args=ocp.args.Composite(**args), force=force)


def abstract_like(state, shardings):
    """ShapeDtypeStructs carrying the target shardings, for a sharded restore."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def check_shapes(mgr, step: int, state) -> None:
    """Compares the step's saved parameters with the state's before Orbax reads anything:
    restoring under a config with other shapes (a changed width) is one error naming the
    parameters, not a tensorstore traceback."""
    quiet = logging.getLogger("absl")  # Orbax warns that the item has no step metadata
    level, quiet.level = quiet.level, logging.ERROR
    try:
        meta = ocp.StandardCheckpointer().metadata(os.path.join(step_dir(mgr, step), "state"))
        tree = getattr(meta.item_metadata, "tree", meta.item_metadata)
        saved = tree["params"]
    except Exception:  # unreadable metadata: the restore itself reports it
        return
    finally:
        quiet.level = level
    init_weights.compare(init_weights.shapes_by_path(saved), init_weights.shapes_by_path(state.params),
                         f"checkpoint step {step} in {mgr.directory}")


def _restore(mgr, step, state, shardings, data_iter):
    check_shapes(mgr, step, state)
    args = {"state": ocp.args.StandardRestore(abstract_like(state, shardings))}
    if data_iter is not None:
        if not (epath.Path(step_dir(mgr, step)) / "data").is_dir():
            raise FileNotFoundError(f"checkpoint {step} in {mgr.directory} has no input state")
        args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    return mgr.restore(step, args=ocp.args.Composite(**args))["state"]


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


def _set_aside(mgr, steps) -> None:
    """Moves rejected steps out of the manager's folder (kept, not deleted)."""
    if jax.process_index() == 0:
        dest = epath.Path(str(mgr.directory)).parent / REJECTED
        dest.mkdir(parents=True, exist_ok=True)
        for step in steps:
            target, n = dest / str(step), 1
            while target.exists():
                target, n = dest / f"{step}.{n}", n + 1
            epath.Path(step_dir(mgr, step)).rename(target)
            print(f"checkpoint step {step} moved to {target}", file=sys.stderr, flush=True)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("strokes_jax checkpoint set aside")
    mgr.reload()


def restore_latest(mgr: ocp.CheckpointManager, state, shardings, data_iter=None, step=None,
                   set_aside: bool = False):
    """(step, state) from the newest checkpoint that verifies (or exactly the one at `step`),
    or None if there is none at all. When `data_iter` is given, its state is restored in
    place from this process's file. Steps that fail are named on stderr; with `set_aside`
    (training) newer rejected steps are moved to checkpoints_rejected/. A folder whose every
    step fails raises CheckpointError rather than starting over."""
    if step is not None:
        bad = checksums.problem(step_dir(mgr, step))
        if bad:
            raise CheckpointError(f"checkpoint step {step}: {bad}")
        return step, _restore(mgr, step, state, shardings, data_iter)
    skipped = []
    for s in sorted(mgr.all_steps(), reverse=True):
        reason = checksums.problem(step_dir(mgr, s))
        if reason is None:
            try:
                restored = _restore(mgr, s, state, shardings, data_iter)
            except init_weights.WeightsMismatch:  # the config's fault, not the step's
                raise
            except Exception as e:  # a verified step that still does not restore
                reason = _one_line(e)
        if reason is not None:
            print(f"checkpoint step {s} skipped: {reason}", file=sys.stderr, flush=True)
            skipped.append((s, reason))
            continue
        if skipped and set_aside:
            _set_aside(mgr, [k for k, _ in skipped])
        return s, restored
    if skipped:
        raise CheckpointError(
            f"no checkpoint under {mgr.directory} verifies (" + "; ".join(
                f"step {k}: {r}" for k, r in skipped) + "); `python -m strokes_jax checkpoints "
            "verify` lists them, `checkpoints trust` accepts a step you have checked")
    return None


def _steps_in(workdir: str) -> tuple[str, list[int]]:
    folder = root(workdir)
    if not epath.Path(folder).is_dir():
        raise CheckpointError(f"--workdir {workdir}: no checkpoints folder")
    return folder, sorted(int(p.name) for p in epath.Path(folder).iterdir() if p.name.isdigit())


def main(argv, prog: str = "python -m strokes_jax checkpoints") -> int:
    """`checkpoints verify --workdir W`: each step's status, newest first; exit 1 when no
    step verifies. `checkpoints trust --workdir W --step N`: write the manifest of a step
    you have checked yourself (one saved before manifests existed)."""
    import argparse
    ap = argparse.ArgumentParser(prog=prog)
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify", help="check every step against its checksum manifest")
    v.add_argument("--workdir", required=True)
    t = sub.add_parser("trust", help="write the manifest of an existing step as it is now")
    t.add_argument("--workdir", required=True)
    t.add_argument("--step", type=int, required=True)
    args = ap.parse_args(argv)
    try:
        folder, steps = _steps_in(args.workdir)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.cmd == "trust":
        d = os.path.join(folder, str(args.step))
        if args.step not in steps:
            print(f"error: {d}: no such step", file=sys.stderr)
            return 2
        checksums.write(d, step=args.step, trusted_by_user=True)
        print(f"step {args.step}: manifest written ({d})")
        return 0
    good = 0
    for step in reversed(steps):
        bad = checksums.problem(os.path.join(folder, str(step)))
        good += bad is None
        print(f"step {step}: " + ("verified" if bad is None else f"FAILED {bad}"))
    if not steps:
        print(f"no checkpoints in {folder}")
    return 0 if good else 1
