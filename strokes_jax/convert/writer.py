"""A conversion written straight into an Orbax checkpoint, one source tensor at a time.

Building the whole output in host memory (keymap.convert) and handing it to Orbax holds a
second copy while Orbax saves: about twice the output, ~115 GB for BAGEL-7B-MoT in float32.
Here the tree Orbax is given holds only `keymap.Planned` leaves (shape and dtype). A type
handler lets Orbax's numpy handler create each array exactly as it would for a numpy leaf,
then walks the conversion steps: it reads, checks and transforms one source tensor, writes
it into its place(s) and drops it. A large stacked (scanned) param gets one storage chunk per
layer, so writing a layer touches nothing else; a small one (norm scales, biases) is
assembled in memory and written whole. Peak host memory is then a few tensors, whatever the
checkpoint's size.

The result is an ordinary Orbax PyTree checkpoint of numpy arrays, which
`StandardCheckpointer().restore` reads without this module.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import shutil
from typing import Iterable, Mapping, Sequence

import numpy as np

from strokes_jax.convert.keymap import (
    Copy, Fill, Path, Planned, Rule, Stacking, Step, check, flat_paths, plan, produce)

# Converted bytes allowed to wait for their write to commit before the next tensor is read:
# enough for reading one tensor to overlap writing the last, and no more.
IN_FLIGHT_BYTES = 256 << 20
# Orbax warns about storage chunks under 1 MiB; a stack whose layers are smaller is assembled
# and written whole instead of a chunk per layer.
MIN_SLOT_CHUNK = 1 << 20


@dataclasses.dataclass
class Part:
    """One source checkpoint's share of the output: its reader, the planned tree (keymap.plan)
    that lands at `prefix` in the output, and the steps that fill it."""

    reader: object
    tree: Mapping
    steps: Sequence[Step]
    prefix: Path


def part(reader, prefix: Path, rules: Sequence[Rule], copies: Sequence[Copy] = (), fills: Sequence[Fill] = (), *,
         ignore: Iterable[str] = (), stacking: Stacking | None = None, dtype=None, allow_dtype: bool = False) -> Part:
    """A Part from a key map: keymap.check (keys, shapes and dtypes, from the headers) then
    keymap.plan, so a mismatch fails before anything is written."""
    check(reader, rules, ignore, allow_dtype=allow_dtype)
    tree, steps = plan(reader, rules, copies, fills, dtype=dtype, stacking=stacking)
    return Part(reader, tree, steps, tuple(prefix))


def _chunked(leaf: Planned) -> bool:
    return bool(leaf.slots) and leaf.nbytes // leaf.slots >= MIN_SLOT_CHUNK


class _Job:
    def __init__(self, parts: Sequence[Part], dtype, checks: dict, progress: str | None):
        self.parts, self.dtype, self.checks, self.progress = parts, dtype, checks, progress
        self.leaves = {part.prefix + p: leaf for part in parts for p, leaf in flat_paths(part.tree).items()}
        self.stores: dict[int, object] = {}
        self.error: BaseException | None = None

    async def run(self) -> None:
        from tqdm import tqdm
        pending: collections.deque = collections.deque()
        total = sum(len(p.steps) for p in self.parts)
        # disable=None: a bar on a terminal only, so logs and the CLI's one-line errors stay clean.
        try:
            with tqdm(total=total, unit="tensor", desc=self.progress, disable=None if self.progress else True) as bar:
                await self._steps(pending, bar)
        finally:  # on an error too: nothing may still be writing when Orbax finishes the folder
            for f, _ in pending:
                await f.commit

    async def _steps(self, pending: collections.deque, bar) -> None:
        in_flight = 0
        stacks: dict[Path, list] = {}  # small stacks being assembled: [array, slots filled]
        for part in self.parts:
            for step in part.steps:
                x = produce(part.reader, step.source, dtype=self.dtype, **self.checks)
                for path, slot in step.targets:
                    path = part.prefix + path
                    leaf = self.leaves[path]
                    y = x.astype(leaf.dtype, copy=False)
                    store = self.stores[id(leaf)]
                    if slot is not None and not _chunked(leaf):
                        buf = stacks.setdefault(path, [np.empty(leaf.shape, leaf.dtype), 0])
                        buf[0][slot] = y
                        buf[1] += 1
                        if buf[1] < leaf.slots:
                            continue
                        y = stacks.pop(path)[0]
                    dest = store if slot is None or not _chunked(leaf) else store[slot]
                    pending.append((dest.write(y, can_reference_source_data_indefinitely=True), y.nbytes))
                    in_flight += y.nbytes
                del x, y
                bar.update(1)
                while pending and in_flight > IN_FLIGHT_BYTES:
                    f, n = pending.popleft()
                    await f.commit
                    in_flight -= n


def _handler(job: _Job):
    import orbax.checkpoint as ocp
    import tensorstore as ts

    class StreamingHandler(ocp.type_handlers.NumpyHandler):
        """Orbax's numpy handler, except that the values are Planned leaves: opening their
        arrays uses its write specs unchanged (same layout, 'np.ndarray' in the metadata),
        and the data comes from the job."""

        async def _open_and_write(self, value, tspec, ts_context):
            job.stores[id(value)] = await ts.open(ts.Spec(tspec), create=True, open=True, context=ts_context)

        async def serialize(self, values, infos, args=None):
            args = args or [ocp.SaveArgs()] * len(values)

            async def write_all():
                await self._background_serialize(values, infos, args)  # creates every array
                try:
                    await job.run()
                except Exception as e:  # raised by save() instead: Orbax would log it with a traceback
                    job.error = e
            return [ocp.future.CommitFutureAwaitingContractedSignals(write_all(), name="convert_stream")]

    return StreamingHandler()  # its deep copy of host arrays happens in the serialize replaced here


def save(path: str, parts: Sequence[Part], *, dtype=None, allow_nonfinite: bool = False,
         allow_dtype: bool = False, progress: str | None = "converting") -> None:
    """Writes the parts' converted params to a new Orbax checkpoint at `path`; `dtype` casts
    (None keeps each source's). A bad tensor raises its ConversionError from here and leaves
    nothing at `path`; should Orbax itself fail, its temporary folder beside `path` is the
    caller's to remove."""
    import jax
    import orbax.checkpoint as ocp

    job = _Job(parts, None if dtype is None else np.dtype(dtype),
               dict(allow_nonfinite=allow_nonfinite, allow_dtype=allow_dtype), progress)
    tree: dict = {}
    for part in parts:
        node = tree
        for p in part.prefix[:-1]:
            node = node.setdefault(p, {})
        node[part.prefix[-1]] = part.tree
    if any(leaf.dtype is None for leaf in job.leaves.values()):
        raise ValueError("the writer needs every dtype up front: read from a reader with headers")

    def save_args(leaf: Planned):
        if _chunked(leaf):  # one chunk per layer: axis 0 split first, down to one slot
            return ocp.SaveArgs(chunk_byte_size=leaf.nbytes // leaf.slots, shard_axes=(0,))
        return ocp.SaveArgs()
    # jax.Array's handler only so Orbax finds its array-metadata store (and does not warn).
    registry = ocp.type_handlers.create_type_handler_registry(
        (Planned, _handler(job)), (jax.Array, ocp.type_handlers.ArrayHandler()))
    ckpt = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry))
    try:
        ckpt.save(path, args=ocp.args.PyTreeSave(tree, save_args=jax.tree_util.tree_map(save_args, tree)))
    except Exception:
        if job.error is None:
            raise
        # else Orbax's check that every param was written, failing because the steps stopped
    if job.error is not None:
        _remove_attempt(path)
        raise job.error


def _remove_attempt(path: str) -> None:
    """`path` and Orbax's temporary folders for it (`path` + its tmp suffix)."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    for n in os.listdir(parent):
        if n == name or n.startswith(name + ".orbax-checkpoint-tmp"):
            shutil.rmtree(os.path.join(parent, n), ignore_errors=True)
