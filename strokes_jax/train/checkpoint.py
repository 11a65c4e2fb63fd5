"""Orbax checkpoints of the train state together with the input iterator's state, so a run
resumed from its workdir continues with the batches it would have seen."""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


def manager(workdir: str, *, keep: int, save_every: int) -> ocp.CheckpointManager:
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every,
                                        create=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                 options=opts, item_names=("state", "data"))


def save(mgr: ocp.CheckpointManager, step: int, state, data_state: dict | None,
         force: bool = False) -> bool:
    args = {"state": ocp.args.StandardSave(state)}
    if data_state is not None:
        args["data"] = ocp.args.JsonSave(data_state)
    return mgr.save(step, args=ocp.args.Composite(**args), force=force)


def abstract_like(state, shardings):
    """ShapeDtypeStructs carrying the target shardings, for a sharded restore."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def restore_latest(mgr: ocp.CheckpointManager, state, shardings):
    """(step, state, data_state) from the newest complete checkpoint, or None if none."""
    step = mgr.latest_step()
    if step is None:
        return None
    items = mgr.item_metadata(step)
    args = {"state": ocp.args.StandardRestore(abstract_like(state, shardings))}
    has_data = items is not None and "data" in items
    if has_data:
        args["data"] = ocp.args.JsonRestore()
    out = mgr.restore(step, args=ocp.args.Composite(**args))
    return step, out["state"], (out["data"] if has_data else None)
