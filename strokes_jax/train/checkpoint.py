"""Orbax checkpoints of the train state together with every process's input-iterator state
(Grain's handler writes one file per process), so a run resumed from its workdir continues
with exactly the batches it would have seen.

Saves are atomic (Orbax writes a temporary directory and renames it when complete), so a
process killed mid-save leaves the previous checkpoint as the newest restorable one.
"""

from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp


def manager(workdir: str, *, keep: int, save_every: int) -> ocp.CheckpointManager:
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every,
                                        create=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                 options=opts, item_names=("state", "data"))


def save(mgr: ocp.CheckpointManager, step: int, state, data_iter=None, force: bool = False) -> bool:
    args = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
        args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return mgr.save(step, args=ocp.args.Composite(**args), force=force)


def abstract_like(state, shardings):
    """ShapeDtypeStructs carrying the target shardings, for a sharded restore."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def restore_latest(mgr: ocp.CheckpointManager, state, shardings, data_iter=None, step=None):
    """(step, state) from the newest complete checkpoint (or the one at `step`), or None if
    there is none. When `data_iter` is given, its state is restored in place from this
    process's file."""
    step = mgr.latest_step() if step is None else step
    if step is None:
        return None
    args = {"state": ocp.args.StandardRestore(abstract_like(state, shardings))}
    if data_iter is not None:
        if not os.path.isdir(os.path.join(str(mgr.directory), str(step), "data")):
            raise FileNotFoundError(f"checkpoint {step} in {mgr.directory} has no input state")
        args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = mgr.restore(step, args=ocp.args.Composite(**args))
    return step, out["state"]
