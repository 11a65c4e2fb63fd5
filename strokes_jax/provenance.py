"""Where a result came from: the commit and the devices, recorded in every JSON the
benchmarks and reports write."""

from __future__ import annotations

import os
import platform
import subprocess

import jax


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True, cwd=os.path.dirname(__file__))
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=os.path.dirname(__file__)).stdout
        return out.stdout.strip() + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        # A copied tree without .git (a lent accelerator): the launcher names the commit.
        return os.environ.get("STROKES_JAX_COMMIT", "unknown")


def device_info() -> dict:
    d = jax.devices()[0]
    return {"platform": d.platform, "device_kind": d.device_kind, "device_count": jax.device_count(),
            "process_count": jax.process_count(), "cpu_count": os.cpu_count(),
            "machine": platform.machine()}
