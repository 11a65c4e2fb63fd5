"""`pod host`: a job on one multi-GPU machine, this one or one reached by ssh, without gcloud.

By default the job is one process that sees every local GPU (JAX's own default). With
`--gpus-per-process K` it is one process per K GPUs instead, each started with its own
CUDA_VISIBLE_DEVICES and the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
that `strokes_jax.distributed` reads, the coordinator on the same machine. The processes run
in the foreground: process 0 prints to this terminal, the others to log files; when one fails
the others are stopped, since they would wait for it in their next collective.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import subprocess
import sys
import time

from strokes_jax import exits
from strokes_jax.launch import spec
from strokes_jax.launch.spec import PodError

LOCAL = "local"


def parse_gpus(text: str | None) -> tuple[str, ...] | None:
    """--gpus: a count (4: GPUs 0..3) or the GPUs' indices (2,3,4,5); None: not given."""
    if text is None:
        return None
    if text.isdigit() and int(text) > 0:
        return tuple(str(i) for i in range(int(text)))
    parts = text.split(",")
    if all(p.isdigit() for p in parts) and len(set(parts)) == len(parts):
        return tuple(parts)
    raise PodError(f"--gpus {text!r}: a count (4) or GPU indices (0,1,2,3)")


@dataclasses.dataclass(frozen=True)
class HostJob:
    host: str  # LOCAL or an ssh destination (user@machine)
    workdir: str
    train_args: tuple[str, ...] = ()
    command: str = "train"
    gpus: tuple[str, ...] | None = None  # None: whatever the machine has, all in one process
    gpus_per_process: int | None = None
    port: int = 8476
    python: str | None = None  # None: this Python here, python3 over ssh
    cd: str | None = None  # over ssh: the folder to run in (default: the login's home)

    def checked(self) -> HostJob:
        if self.command not in spec.JOB_COMMANDS:
            raise PodError(f"--command {self.command!r}: one of {', '.join(spec.JOB_COMMANDS)}")
        if not self.workdir:
            raise PodError("--workdir: required")
        if not self.host or self.host.startswith("-") or any(c.isspace() for c in self.host):
            raise PodError(f"--host {self.host!r}: `local` or an ssh destination such as user@machine")
        for a in self.train_args:
            if a == "--workdir" or a.startswith("--workdir="):
                raise PodError("--workdir goes before `--` (the launcher checks it and passes it on)")
        k = self.gpus_per_process
        if k is not None:
            if k < 1:
                raise PodError(f"--gpus-per-process {k}: a number >= 1")
            if self.gpus is None:
                raise PodError("--gpus-per-process: needs --gpus (how many GPUs, or which)")
            if len(self.gpus) % k:
                raise PodError(f"--gpus-per-process {k}: does not divide the {len(self.gpus)} GPUs of --gpus")
        if not 0 < self.port < 65536:
            raise PodError(f"--port {self.port}: 1..65535")
        return self

    @property
    def processes(self) -> int:
        return len(self.gpus) // self.gpus_per_process if self.gpus_per_process else 1

    def env(self, i: int) -> dict[str, str]:
        """Process i's environment on top of the machine's."""
        out = {}
        if self.gpus is not None:
            k = self.gpus_per_process or len(self.gpus)
            out["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus[i * k:(i + 1) * k])
        if self.processes > 1:
            out.update(JAX_COORDINATOR_ADDRESS=f"localhost:{self.port}", JAX_NUM_PROCESSES=str(self.processes),
                       JAX_PROCESS_ID=str(i))
        return out

    def argv(self, i: int) -> list[str]:
        """Process i's command as it is run here: `env VAR=... python -m strokes_jax ...`,
        inside `ssh HOST '...'` for another machine."""
        python = self.python or (sys.executable if self.host == LOCAL else "python3")
        inner = ["env", *(f"{k}={v}" for k, v in self.env(i).items()), python, "-m", "strokes_jax", self.command,
                 "--workdir", self.workdir, *self.train_args]
        if self.host == LOCAL:
            return inner
        # exec: the training process is the one ssh's session ends, not a shell around it.
        remote = (f"cd {shlex.quote(self.cd)} && " if self.cd else "") + "exec " + shlex.join(inner)
        return ["ssh", "-o", "BatchMode=yes", self.host, remote]


def log_path(logdir: str, i: int) -> str:
    return os.path.join(logdir, f"process-{i}.log")


def run(job: HostJob, logdir: str, dry_run: bool = False, out=None, poll: float = 1.0) -> int:
    """Runs every process of `job` and waits for all; 0 done, 1 failed, 75 preempted."""
    job = job.checked()
    spec.check_config_args(job.train_args)  # a bad key fails here, before any process starts
    out = out or sys.stdout
    if dry_run:
        for i in range(job.processes):
            print(shlex.join(job.argv(i)) + (f"  # > {log_path(logdir, i)}" if i else ""), file=out, flush=True)
        return exits.OK
    os.makedirs(logdir, exist_ok=True)
    procs, logs = [], []
    try:
        for i in range(job.processes):
            log = None if i == 0 else open(log_path(logdir, i), "a")
            logs.append(log)
            procs.append(subprocess.Popen(job.argv(i), stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT if log else None))
        if job.processes > 1:
            print(f"{job.processes} processes on {job.host}; processes 1..{job.processes - 1} log to "
                  f"{logdir}/process-N.log", file=out, flush=True)
        failed = None
        while [p.poll() for p in procs].count(None):  # every one polled: poll() sets returncode
            bad = [i for i, p in enumerate(procs) if p.returncode not in (None, exits.OK, exits.PREEMPTED)]
            if bad and failed is None:
                failed = bad[0]
                print(f"process {failed} exited with code {procs[failed].returncode}: stopping the others",
                      file=out, flush=True)
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
            time.sleep(poll)
    except KeyboardInterrupt:  # SIGINT reached the local processes too; wait for their save
        for p in procs:
            p.wait()
    finally:
        for log in logs:
            if log:
                log.close()
    codes = [p.returncode for p in procs]
    if any(c not in (exits.OK, exits.PREEMPTED) for c in codes):
        return exits.FAILED
    return exits.PREEMPTED if exits.PREEMPTED in codes else exits.OK
