"""Mesh with role-named axes and the logical-axis rules that map parameters onto it."""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
import flax.linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Resolve one -1 entry to fill the devices; errors name the config key `mesh.shape`."""
    shape = [int(s) for s in shape]
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh.shape must have {len(MESH_AXES)} entries {MESH_AXES}, got {shape}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh.shape may contain at most one -1, got {shape}")
    known = int(np.prod([s for s in shape if s != -1]))
    if known <= 0 or num_devices % known:
        raise ValueError(f"mesh.shape {shape} does not divide {num_devices} devices")
    shape = [num_devices // known if s == -1 else s for s in shape]
    if int(np.prod(shape)) != num_devices:
        raise ValueError(f"mesh.shape {shape} uses {int(np.prod(shape))} devices, "
                         f"but {num_devices} are available")
    return tuple(shape)


def make_mesh(shape: Sequence[int], devices=None) -> Mesh:
    devices = jax.devices() if devices is None else list(devices)
    resolved = mesh_shape(shape, len(devices))
    return Mesh(np.asarray(devices).reshape(resolved), MESH_AXES)


def rules_tuple(rules) -> tuple[tuple[str, object], ...]:
    out = []
    for name, axes in rules:
        axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
        for a in (axes if isinstance(axes, tuple) else (axes,)):
            if a is not None and a not in MESH_AXES:
                raise ValueError(f"config key `rules`: logical axis {name!r} maps to unknown "
                                 f"mesh axis {a!r}; mesh axes are {MESH_AXES}")
        out.append((name, axes))
    return tuple(out)


def state_shardings(abstract_state, mesh: Mesh, rules):
    """Shardings for a pytree whose leaves may be flax LogicallyPartitioned boxes."""
    specs = nn.get_partition_spec(abstract_state)
    return nn.logical_to_mesh_sharding(specs, mesh, rules_tuple(rules))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_divisible(abstract_state, mesh: Mesh, rules) -> None:
    """Every sharded dimension must split evenly over its mesh axes; fail before compiling,
    naming the parameter, its logical axis and the `rules` entry that maps it."""
    rules = rules_tuple(rules)
    boxed = jax.tree_util.tree_flatten_with_path(
        abstract_state, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
    for path, leaf in boxed:
        if not isinstance(leaf, nn.LogicallyPartitioned):
            continue
        spec = nn.logical_to_mesh_axes(leaf.names, rules)
        for dim, logical, axes in zip(leaf.value.shape, leaf.names, spec):
            axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
            n = int(np.prod([mesh.shape[a] for a in axes]))
            if dim % n:
                raise ValueError(
                    f"parameter {jax.tree_util.keystr(path)} has {logical!r} dimension {dim}, "
                    f"not divisible by mesh axes {axes} of size {n}: change config key `rules` "
                    f"for {logical!r} or `mesh.shape`")


def check_batch(batch_size: int, mesh: Mesh, accum_steps: int, process_count: int) -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % (shards * accum_steps) or batch_size % process_count:
        raise ValueError(f"config key data.batch_size ({batch_size}) must be a multiple of "
                         f"mesh data x fsdp ({shards}) x train.accum_steps ({accum_steps}) "
                         f"and of the process count ({process_count})")


def sharded_fraction(params, mesh: Mesh) -> float:
    """Bytes of parameters on the fullest device over an ideal 1/(fsdp x tensor) share."""
    total, per_device = 0, {}
    for x in jax.tree_util.tree_leaves(params):
        total += x.nbytes
        for sh in x.addressable_shards:
            per_device[sh.device] = per_device.get(sh.device, 0) + sh.data.nbytes
    ideal = total / (mesh.shape["fsdp"] * mesh.shape["tensor"])
    return max(per_device.values()) / ideal


def check_sufficiently_sharded(params, mesh: Mesh, tolerance: float) -> float:
    """MaxText's guard: a run whose parameters are mostly replicated over fsdp/tensor fails
    (it would waste memory silently). Returns the measured ratio (1.0 = perfectly split)."""
    ratio = sharded_fraction(params, mesh)
    if ratio > 1.0 + tolerance:
        raise ValueError(
            f"parameters are not sharded enough: the fullest device holds {ratio:.2f}x its "
            f"ideal 1/(fsdp x tensor) share (tolerance {tolerance}); check config key `rules` "
            f"against mesh.shape {dict(mesh.shape)}")
    return ratio
