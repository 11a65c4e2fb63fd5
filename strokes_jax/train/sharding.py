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
