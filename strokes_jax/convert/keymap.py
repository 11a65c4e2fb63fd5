"""Checkpoint conversion as data: an explicit list of rules (source key -> Flax param path, with
a reversible transform between the PyTorch and the Flax layout), and one engine that applies
them tensor by tensor.

Keeping the map explicit (no regex renaming) makes every source key visible in one place, lets
the same map export Flax params back to the source names (used to build synthetic checkpoints
and to check round trips), and gives errors that name the exact key at fault.

Each source tensor is also checked as it is read: a dtype other than the floating types BAGEL
ships, or a NaN/inf value, is refused naming the key and its file (`allow_dtype` /
`allow_nonfinite` let them through), since either would otherwise surface much later as a
model that trains or samples garbage.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

Path = tuple[str, ...]


class ConversionError(ValueError):
    """A checkpoint does not match the key map: the message names the key(s)."""


# The storage dtypes of BAGEL's checkpoints; an integer or float64 tensor where a weight belongs
# means the file is not the checkpoint the key map describes.
FLOAT_DTYPES = ("bfloat16", "float16", "float32")

# safetensors header dtype names -> numpy's, so header-only checks and loaded arrays agree.
_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
                       "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "BOOL": "bool",
                       **{f"I{n}": f"int{n}" for n in (8, 16, 32, 64)},
                       **{f"U{n}": f"uint{n}" for n in (8, 16, 32, 64)}}

# Elements per finite-check step: the check's temporaries stay a few MB however large the
# tensor (the embedding table is ~545M elements).
_FINITE_CHUNK = 1 << 22


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
            from safetensors import SafetensorError, safe_open  # optional dependency: conversion only
        except ImportError as e:
            raise ImportError("converting checkpoints needs safetensors: "
                              "pip install -e '.[convert]'") from e

        self._handles, self._where, self._file = [], {}, {}
        for path in files:
            path = str(path)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: no such file")
            try:
                h = safe_open(path, framework="numpy")
            except SafetensorError as e:  # a truncated or foreign file: its header does not parse
                raise ConversionError(f"{path}: not a readable safetensors file ({e})") from e
            self._handles.append(h)
            for k in h.keys():
                if k in self._where:
                    raise ConversionError(f"key {k!r} appears in more than one file ({path})")
                self._where[k] = h
                self._file[k] = path

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._where[key].get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        """numpy's name for the stored dtype, from the header (nothing read)."""
        d = self._where[key].get_slice(key).get_dtype()
        return _SAFETENSORS_DTYPES.get(d, d.lower())

    def file(self, key: str) -> str:
        return self._file[key]

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

    def dtype(self, key):
        return str(np.asarray(self._t[key]).dtype)

    def file(self, key):
        return None

    def get(self, key):
        return np.asarray(self._t[key])


def _named(reader, key: str) -> str:
    """`key 'k' in FILE` (the file when the reader knows it)."""
    where = getattr(reader, "file", None)
    where = where(key) if where is not None else None
    return f"key {key!r}" + (f" in {where}" if where else "")


def nonfinite_count(x: np.ndarray) -> int:
    """NaN/inf elements of `x`, a chunk of the flat tensor at a time (bfloat16 included:
    ml_dtypes gives it isfinite), so the check never holds a tensor-sized temporary."""
    if x.dtype.kind in "biu":
        return 0
    flat = x.reshape(-1)
    return sum(int(c.size - np.count_nonzero(np.isfinite(c)))
               for c in (flat[i:i + _FINITE_CHUNK] for i in range(0, flat.size, _FINITE_CHUNK)))


def _dtype_message(named: str, dtype) -> str:
    return (f"{named} has dtype {dtype}, not a floating type BAGEL ships ({', '.join(FLOAT_DTYPES)}); "
            "--allow_dtype converts it anyway")


def check_tensor(reader, key: str, x: np.ndarray, *, allow_nonfinite: bool = False,
                 allow_dtype: bool = False) -> np.ndarray:
    """`x` (the tensor just read for `key`) if its dtype is one BAGEL ships and it is all
    finite; otherwise a ConversionError naming the key and its file. Returns `x`."""
    if not allow_dtype and str(x.dtype) not in FLOAT_DTYPES:
        raise ConversionError(_dtype_message(_named(reader, key), x.dtype))
    if not allow_nonfinite:
        n = nonfinite_count(x)
        if n:
            raise ConversionError(f"{_named(reader, key)} holds {n} non-finite value(s) (NaN/inf) of {x.size}; "
                                  "--allow_nonfinite converts it anyway")
    return x


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


def check(reader, rules: Sequence[Rule], ignore: Iterable[str] = (), *, allow_dtype: bool = False) -> None:
    """Every rule's key present with its shape, and no source key left unmapped; one error
    listing every problem, each naming its key. Then, from the header alone when the reader
    can tell (`reader.dtype`), every mapped or ignored tensor of a floating dtype BAGEL ships:
    a wrong dtype fails here, before a long conversion, rather than when its tensor is read."""
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
    if allow_dtype or not hasattr(reader, "dtype"):
        return
    bad = [(k, reader.dtype(k)) for k in sorted((want | ignore) & have)]
    bad = [(k, d) for k, d in bad if d not in FLOAT_DTYPES]
    if len(bad) == 1:
        raise ConversionError(_dtype_message(_named(reader, bad[0][0]), bad[0][1]))
    if bad:
        raise ConversionError(f"{len(bad)} tensors of a dtype BAGEL does not ship ({', '.join(FLOAT_DTYPES)}): "
                              + ", ".join(f"{_named(reader, k)} ({d})" for k, d in bad[:20])
                              + (" ..." if len(bad) > 20 else "") + "; --allow_dtype converts them anyway")


# Where a param lands in a stacked (scanned) layout: (stacked path, index, stack length), or
# None to keep the path as is.
Stacking = Callable[[Path], "tuple[Path, int, int] | None"]


@dataclasses.dataclass(frozen=True)
class Fill:
    """A Flax param with no source tensor, set to a constant: the QK-norm scales a plain Qwen2
    checkpoint lacks start at one, as BAGEL initialised them."""

    dst: Path
    shape: tuple[int, ...]
    value: float = 1.0

    @property
    def flax_shape(self) -> tuple[int, ...]:
        return tuple(self.shape)


@dataclasses.dataclass(eq=False)
class Planned:
    """One output param before anything is read: its shape, dtype (None: the source's, known
    at the first read when the reader has no header) and `slots`, the stack length of a
    stacked param written one layer at a time (0 when unstacked)."""

    shape: tuple[int, ...]
    dtype: np.dtype | None
    slots: int = 0

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * (4 if self.dtype is None else self.dtype.itemsize)


@dataclasses.dataclass(frozen=True)
class Step:
    """One source tensor (a Rule) or constant (a Fill) and every place its value goes: (output
    path, slot of the stack or None for the whole param). A Copy is one more target of the
    step it copies, so its source is read once."""

    source: "Rule | Fill"
    targets: tuple[tuple[Path, "int | None"], ...]


def _np_dtype(name: str) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError:  # bfloat16 and the float8s: numpy knows them only through ml_dtypes
        import ml_dtypes
        return np.dtype(getattr(ml_dtypes, name))


def plan(reader, rules: Sequence[Rule], copies: Sequence[Copy] = (), fills: Sequence[Fill] = (), *,
         dtype=None, stacking: Stacking | None = None) -> tuple[dict, list[Step]]:
    """(nested dict of Planned leaves, the steps that fill them), from shapes and headers alone,
    so a writer can lay the output out before any tensor is read. Every param is written
    exactly once and every slot of a stack is filled, or a ConversionError names the param."""
    leaves: dict[Path, Planned] = {}
    written: set = set()
    steps: list[tuple] = []
    by_dst: dict[Path, int] = {}

    def target(path: Path, shape: tuple, src_dtype) -> tuple[Path, "int | None"]:
        where = stacking(path) if stacking is not None else None
        out, slot, n = (path, None, 0) if where is None else where
        full = tuple(shape) if slot is None else (n,) + tuple(shape)
        want = src_dtype if dtype is None else dtype
        leaf = leaves.setdefault(out, Planned(full, None if want is None else np.dtype(want), n))
        if leaf.shape != full:
            raise ConversionError(f"param {'/'.join(out)}: its layers have shapes {leaf.shape[1:]} and {shape}")
        if (out, slot) in written:
            raise ConversionError(f"two rules write the same param {'/'.join(path)}")
        written.add((out, slot))
        return out, slot

    has_header = hasattr(reader, "dtype")
    for s in (*rules, *fills):
        src_dtype = (np.float32 if isinstance(s, Fill) else _np_dtype(reader.dtype(s.src)) if has_header
                     else None)
        by_dst[s.dst] = len(steps)
        steps.append((s, [target(s.dst, s.flax_shape, src_dtype)]))
    for c in copies:
        if c.from_dst not in by_dst:
            raise ConversionError(f"param {'/'.join(c.dst)} copies {'/'.join(c.from_dst)}, which no rule writes")
        s, targets = steps[by_dst[c.from_dst]]
        targets.append(target(c.dst, s.flax_shape, leaves[targets[0][0]].dtype))
    for path, leaf in leaves.items():
        gaps = [i for i in range(leaf.slots) if (path, i) not in written]
        if gaps:
            raise ConversionError(f"param {'/'.join(path)}: stack slots {gaps} are not written by the key map")
    tree: dict = {}
    for path, leaf in leaves.items():
        _set(tree, path, leaf)
    return tree, [Step(s, tuple(t)) for s, t in steps]


def produce(reader, source: "Rule | Fill", *, dtype=None, allow_nonfinite: bool = False,
            allow_dtype: bool = False) -> np.ndarray:
    """A step's value in the Flax layout: the source tensor read, checked (check_tensor),
    transformed and cast to `dtype` (None keeps the source's), or the Fill's constant."""
    if isinstance(source, Fill):
        return np.full(source.shape, source.value, np.float32 if dtype is None else dtype)
    r = source
    x = r.transform.forward(check_tensor(reader, r.src, reader.get(r.src), allow_nonfinite=allow_nonfinite,
                                         allow_dtype=allow_dtype))
    if x.shape != r.flax_shape:  # a transform bug, never a checkpoint problem
        raise ConversionError(f"transform {r.transform.name} of {r.src!r} gave {x.shape}, "
                              f"expected {r.flax_shape}")
    return np.ascontiguousarray(x if dtype is None else x.astype(dtype))


def _fetch(out: Mapping, path: Path, stacking: Stacking | None) -> np.ndarray:
    where = stacking(path) if stacking is not None else None
    return _get(out, path) if where is None else _get(out, where[0])[where[1]]


def convert(reader, rules: Sequence[Rule], copies: Sequence[Copy] = (), *, dtype=None,
            ignore: Iterable[str] = (), stacking: Stacking | None = None, fills: Sequence[Fill] = (),
            on_tensor: Callable[[Rule, np.ndarray], None] | None = None,
            allow_nonfinite: bool = False, allow_dtype: bool = False) -> dict:
    """Source tensors -> nested dict of Flax params in host memory, one tensor read at a time:
    peak host memory is the output plus one source tensor, per-layer params going straight
    into pre-allocated stacks with `stacking` (the scanned layout). `dtype` casts each param
    (None keeps the source dtype, e.g. bfloat16). Each source tensor passes `check_tensor`
    as it is read. writer.py writes a checkpoint without holding the output."""
    check(reader, rules, ignore, allow_dtype=allow_dtype)
    tree, steps = plan(reader, rules, copies, fills, dtype=dtype, stacking=stacking)
    leaves = flat_paths(tree)
    out: dict = {}
    for step in steps:
        x = produce(reader, step.source, dtype=dtype, allow_nonfinite=allow_nonfinite, allow_dtype=allow_dtype)
        if on_tensor is not None and isinstance(step.source, Rule):
            on_tensor(step.source, x)
        for n, (path, slot) in enumerate(step.targets):
            if slot is None:
                _set(out, path, x if n == 0 else x.copy())
                continue
            try:
                buf = _get(out, path)
            except KeyError:  # first layer seen: allocate the whole stack once
                leaf = leaves[path]
                buf = np.empty(leaf.shape, leaf.dtype or x.dtype)
                _set(out, path, buf)
            buf[slot] = x
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
