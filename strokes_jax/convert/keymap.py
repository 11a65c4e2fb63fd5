"""Checkpoint conversion as data: an explicit list of rules (source key -> Flax param path, with
a reversible transform between the PyTorch and the Flax layout), and one engine that applies
them tensor by tensor.

Keeping the map explicit (no regex renaming) makes every source key visible in one place, lets
the same map export Flax params back to the source names (used to build synthetic checkpoints
and to check round trips), and gives errors that name the exact key at fault.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

Path = tuple[str, ...]


class ConversionError(ValueError):
    """A checkpoint does not match the key map: the message names the key(s)."""


# --------------------------------------------------------------------------------------
# Reversible transforms between a source tensor (PyTorch layout) and a Flax param.


@dataclasses.dataclass(frozen=True)
class Transform:
    """`forward` maps a source tensor to the Flax layout, `inverse` maps it back; `flax_shape`
    predicts the Flax shape from the source shape so shapes are checked before any work."""

    name: str
    forward: Callable[[np.ndarray], np.ndarray]
    inverse: Callable[[np.ndarray], np.ndarray]
    flax_shape: Callable[[tuple[int, ...]], tuple[int, ...]]


IDENTITY = Transform("identity", lambda x: x, lambda y: y, lambda s: s)

# torch Linear [out, in] -> Flax Dense kernel [in, out].
LINEAR = Transform("linear", lambda x: x.T, lambda y: y.T, lambda s: (s[1], s[0]))

# torch Conv2d [out, in, kh, kw] -> Flax Conv [kh, kw, in, out].
CONV2D = Transform("conv2d", lambda x: x.transpose(2, 3, 1, 0), lambda y: y.transpose(3, 2, 0, 1),
                   lambda s: (s[2], s[3], s[1], s[0]))

# A 1x1 conv used as a per-pixel linear map (FLUX AE attention) -> Dense kernel [in, out].
CONV1X1_TO_LINEAR = Transform(
    "conv1x1_to_linear", lambda x: x[:, :, 0, 0].T, lambda y: y.T[:, :, None, None],
    lambda s: (s[1], s[0]))


def linear_to_heads(heads: int, head_dim: int) -> Transform:
    """torch Linear [heads*head_dim, in] -> DenseGeneral kernel [in, heads, head_dim]."""
    return Transform(
        f"linear_to_heads({heads},{head_dim})",
        lambda x: x.T.reshape(x.shape[1], heads, head_dim),
        lambda y: y.reshape(y.shape[0], heads * head_dim).T,
        lambda s: (s[1], heads, head_dim) if s[0] == heads * head_dim else ("bad", s))


def bias_to_heads(heads: int, head_dim: int) -> Transform:
    """torch bias [heads*head_dim] -> [heads, head_dim]."""
    return Transform(
        f"bias_to_heads({heads},{head_dim})",
        lambda x: x.reshape(heads, head_dim), lambda y: y.reshape(heads * head_dim),
        lambda s: (heads, head_dim) if s == (heads * head_dim,) else ("bad", s))


def conv_patch_to_linear(channels: int, patch: int) -> Transform:
    """SigLIP's Conv2d patch embedding [hidden, c, p, p] -> Dense kernel [p*p*c, hidden] with
    (row, col, channel) input order, as BAGEL's convert_conv2d_to_linear does (for checkpoints
    that still store the conv form)."""
    return Transform(
        f"conv_patch_to_linear({channels},{patch})",
        lambda x: x.transpose(0, 2, 3, 1).reshape(x.shape[0], -1).T,
        lambda y: y.T.reshape(y.shape[1], patch, patch, channels).transpose(0, 3, 1, 2),
        lambda s: (s[2] * s[3] * s[1], s[0]))


@dataclasses.dataclass(frozen=True)
class Rule:
    """One source tensor: where it goes and how. `shape` is the expected *source* shape."""

    src: str
    dst: Path
    shape: tuple[int, ...]
    transform: Transform = IDENTITY

    @property
    def flax_shape(self) -> tuple[int, ...]:
        return tuple(self.transform.flax_shape(tuple(self.shape)))


@dataclasses.dataclass(frozen=True)
class Copy:
    """A Flax param with no source tensor of its own, filled from another destination (BAGEL
    initialises its generation expert from the understanding expert)."""

    dst: Path
    from_dst: Path


# --------------------------------------------------------------------------------------
# The engine.


class Reader:
    """Minimal interface over a tensor store: keys(), shape(key), get(key). Backed by
    `safetensors.safe_open` so only the requested tensor is ever read into memory."""

    def __init__(self, files: Sequence[str]):
        try:
            from safetensors import safe_open  # optional dependency: conversion only
        except ImportError as e:
            raise ImportError("converting checkpoints needs safetensors: "
                              "pip install -e '.[convert]'") from e

        self._handles, self._where = [], {}
        for path in files:
            h = safe_open(str(path), framework="numpy")
            self._handles.append(h)
            for k in h.keys():
                if k in self._where:
                    raise ConversionError(f"key {k!r} appears in more than one file ({path})")
                self._where[k] = h

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._where[key].get_slice(key).get_shape())

    def get(self, key: str) -> np.ndarray:
        return self._where[key].get_tensor(key)


class DictReader:
    """The Reader interface over an in-memory mapping (tests, already-loaded tensors)."""

    def __init__(self, tensors: Mapping[str, np.ndarray]):
        self._t = tensors

    def keys(self):
        return list(self._t)

    def shape(self, key):
        return tuple(np.shape(self._t[key]))

    def get(self, key):
        return np.asarray(self._t[key])


def _set(tree: dict, path: Path, value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    if path[-1] in tree:
        raise ConversionError(f"two rules write the same param {'/'.join(path)}")
    tree[path[-1]] = value


def _get(tree: Mapping, path: Path):
    for p in path:
        tree = tree[p]
    return tree


def check(reader, rules: Sequence[Rule], ignore: Iterable[str] = ()) -> None:
    """Every rule's key present with its shape, and no source key left unmapped; one error
    listing every problem, each naming its key."""
    ignore = set(ignore)
    have = set(reader.keys())
    want = {r.src for r in rules}
    problems = []
    missing = sorted(want - have)
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing[:20]}"
                        + (" ..." if len(missing) > 20 else ""))
    unexpected = sorted(have - want - ignore)
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected[:20]}"
                        + (" ..." if len(unexpected) > 20 else ""))
    for r in rules:
        if r.src in have and reader.shape(r.src) != tuple(r.shape):
            problems.append(f"key {r.src!r} has shape {reader.shape(r.src)}, expected "
                            f"{tuple(r.shape)}")
    if problems:
        raise ConversionError("checkpoint does not match the key map:\n  " + "\n  ".join(problems))


# Where a param lands in a stacked (scanned) layout: (stacked path, index, stack length), or
# None to keep the path as is.
Stacking = Callable[[Path], "tuple[Path, int, int] | None"]


def _put(out: dict, path: Path, x: np.ndarray, stacking: Stacking | None) -> None:
    where = stacking(path) if stacking is not None else None
    if where is None:
        _set(out, path, x)
        return
    spath, i, n = where
    try:
        buf = _get(out, spath)
    except KeyError:  # first layer seen: allocate the whole stack once
        buf = np.empty((n,) + x.shape, x.dtype)
        _set(out, spath, buf)
    buf[i] = x


def _fetch(out: Mapping, path: Path, stacking: Stacking | None) -> np.ndarray:
    where = stacking(path) if stacking is not None else None
    return _get(out, path) if where is None else _get(out, where[0])[where[1]]


def convert(reader, rules: Sequence[Rule], copies: Sequence[Copy] = (), *, dtype=None,
            ignore: Iterable[str] = (), stacking: Stacking | None = None,
            on_tensor: Callable[[Rule, np.ndarray], None] | None = None) -> dict:
    """Source tensors -> nested dict of Flax params. Reads one tensor at a time, transforms it
    and stores only the result, so peak host memory is the output plus one source tensor; with
    `stacking`, per-layer params are written straight into pre-allocated stacked arrays (the
    scanned layout) instead of being stacked afterwards, which would briefly hold two copies.
    `dtype` casts each param (None keeps the source dtype, e.g. bfloat16)."""
    check(reader, rules, ignore)
    out: dict = {}
    for r in rules:
        x = r.transform.forward(reader.get(r.src))
        if x.shape != r.flax_shape:  # a transform bug, never a checkpoint problem
            raise ConversionError(f"transform {r.transform.name} of {r.src!r} gave {x.shape}, "
                                  f"expected {r.flax_shape}")
        x = np.ascontiguousarray(x if dtype is None else x.astype(dtype))
        if on_tensor is not None:
            on_tensor(r, x)
        _put(out, r.dst, x, stacking)
    for c in copies:
        _put(out, c.dst, np.array(_fetch(out, c.from_dst, stacking)), stacking)
    return out


def export(params: Mapping, rules: Sequence[Rule], stacking: Stacking | None = None
           ) -> dict[str, np.ndarray]:
    """Flax params -> source-named tensors through the inverse transforms (the map's inverse);
    every param the rules name must exist."""
    out = {}
    for r in rules:
        try:
            y = np.asarray(_fetch(params, r.dst, stacking))
        except KeyError as e:
            raise ConversionError(f"param {'/'.join(r.dst)} (for {r.src!r}) is missing") from e
        if y.shape != r.flax_shape:
            raise ConversionError(f"param {'/'.join(r.dst)} has shape {y.shape}, expected "
                                  f"{r.flax_shape} (for {r.src!r})")
        out[r.src] = np.ascontiguousarray(r.transform.inverse(y))
    return out


def flat_paths(tree: Mapping, prefix: Path = ()) -> dict[Path, object]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flat_paths(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def check_covers(abstract_params: Mapping, rules: Sequence[Rule], copies: Sequence[Copy] = (),
                 stacking: Stacking | None = None) -> None:
    """The map fills exactly the model's params with the model's shapes (catches a key map
    drifting from the Flax modules)."""
    want = {p: tuple(v.shape) for p, v in flat_paths(abstract_params).items()}
    got = {r.dst: r.flax_shape for r in rules}
    got.update({c.dst: got.get(c.from_dst) for c in copies})
    if stacking is not None:
        stacked = {}
        for p, shape in got.items():
            where = stacking(p)
            stacked[p if where is None else where[0]] = shape if where is None else (where[2],) + shape
        got = stacked
    problems = [f"param {'/'.join(p)} is not produced by the key map" for p in sorted(set(want) - set(got))]
    problems += [f"key map writes {'/'.join(p)}, which the model does not have"
                 for p in sorted(set(got) - set(want))]
    problems += [f"param {'/'.join(p)}: model shape {want[p]}, key map gives {got[p]}"
                 for p in sorted(set(want) & set(got)) if want[p] != got[p]]
    if problems:
        raise ConversionError("key map and model disagree:\n  " + "\n  ".join(problems))


def merge(base: Mapping, converted: Mapping, where: Path = ()) -> dict:
    """`base` (e.g. a fresh init) with every leaf of `converted` put in its place; a converted
    leaf the base lacks, or of another shape, is an error naming its path."""
    out = dict(base)
    for k, v in converted.items():
        path = where + (k,)
        if k not in base:
            raise ConversionError(f"converted param {'/'.join(path)} is not in the model")
        if isinstance(v, Mapping):
            out[k] = merge(base[k], v, path)
        else:
            if tuple(np.shape(base[k])) != tuple(np.shape(v)):
                raise ConversionError(f"converted param {'/'.join(path)} has shape {np.shape(v)}, "
                                      f"the model has {np.shape(base[k])}")
            out[k] = v
    return out
