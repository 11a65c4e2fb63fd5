"""Multi-process start for the command line: `jax.distributed.initialize()` when the
environment says this is one process of several, a no-op on one host.

What counts as multi-process:
  explicit   JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES and JAX_PROCESS_ID, the
             way to start one process per GPU host (or several processes on one machine);
  detected   a TPU pod slice (TPU_WORKER_HOSTNAMES names more than one worker), a SLURM job
             with several tasks, or an Open MPI job with several ranks: JAX finds the
             coordinator and the process ids itself.
Must run before anything touches a JAX backend.
"""

from __future__ import annotations

import os

EXPLICIT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def mode(env=None) -> str:
    """'explicit', 'detected' or 'single'."""
    env = os.environ if env is None else env
    present = [v for v in EXPLICIT if env.get(v)]
    if present and len(present) != len(EXPLICIT):
        missing = [v for v in EXPLICIT if not env.get(v)]
        raise ValueError(f"multi-process start: {', '.join(present)} set but {', '.join(missing)} "
                         f"missing")
    if present:
        return "explicit" if int(env["JAX_NUM_PROCESSES"]) > 1 else "single"
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return "detected"
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        try:
            if int(env.get(var, "1")) > 1:
                return "detected"
        except ValueError:
            pass
    return "single"


def initialize() -> dict:
    """Start jax.distributed when `mode()` says so; returns the topology this process sees
    (and prints it, one line per process, so every worker's log says where it stands)."""
    how = mode()
    import jax
    if how != "single":
        # CPU hosts need a collectives backend for cross-process arrays; accelerators ignore it.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if how == "explicit":
            jax.distributed.initialize(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                                       num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                                       process_id=int(os.environ["JAX_PROCESS_ID"]))
        else:
            jax.distributed.initialize()
    topo = {"start": how, "process_index": jax.process_index(),
            "process_count": jax.process_count(), "local_devices": jax.local_device_count(),
            "global_devices": jax.device_count(), "platform": jax.devices()[0].platform}
    if how != "single":
        print(f"process {topo['process_index']}/{topo['process_count']}: "
              f"{topo['local_devices']} local of {topo['global_devices']} {topo['platform']} "
              f"devices ({how} start)", flush=True)
    return topo
