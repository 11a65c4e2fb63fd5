"""What a pod job is: the slice (name, accelerator, zone, project, runtime, capacity) and the
job on it (workdir, the training command). Everything is checked here, before any gcloud
call, so that a typo costs nothing and the message names the flag to fix."""

from __future__ import annotations

import dataclasses
import os
import posixpath
import re

CAPACITIES = ("on-demand", "spot", "reserved", "best-effort")
# The commands of `python -m strokes_jax` that make sense as a job on a slice.
JOB_COMMANDS = ("train", "demo", "evaluate", "build-data", "bench", "reproduce", "self-critique", "generate",
                "inject")


class PodError(ValueError):
    """Bad input, found before anything ran: the one-line message names the flag."""


def _cube(limit: int):
    # v4 and v5p count TensorCores (2 per chip, 4 chips per VM): slices inside one 64-chip
    # cube double from 2x2x1, larger ones are whole cubes (128 TensorCores each).
    return lambda n: n in (8, 16, 32, 64, 128) or (n % 128 == 0 and 128 <= n <= limit)


def _plane(n: int) -> bool:
    # v5e and v6e count chips (one TensorCore each) on a 2D torus of at most 16x16.
    return n in (1, 4, 8, 16, 32, 64, 128, 256)


@dataclasses.dataclass(frozen=True)
class Generation:
    runtime: str  # the TPU software version Google documents for JAX on this generation
    valid: object  # size -> bool
    sizes: str  # the valid sizes, in words
    workers: object  # size -> number of TPU VMs


GENERATIONS = {
    "v4": Generation("tpu-ubuntu2204-base", _cube(8192),
                     "8, 16, 32, 64, 128, then multiples of 128 up to 8192", lambda n: n // 8),
    "v5p": Generation("v2-alpha-tpuv5", _cube(12288),
                      "8, 16, 32, 64, 128, then multiples of 128 up to 12288", lambda n: n // 8),
    # Up to 8 chips sit on one VM; larger slices are built from 4-chip VMs.
    "v5litepod": Generation("v2-alpha-tpuv5-lite", _plane, "1, 4, 8, 16, 32, 64, 128 or 256",
                            lambda n: 1 if n <= 8 else n // 4),
    "v6e": Generation("v2-alpha-tpuv6e", _plane, "1, 4, 8, 16, 32, 64, 128 or 256",
                      lambda n: 1 if n <= 8 else n // 4),
}


@dataclasses.dataclass(frozen=True)
class Accelerator:
    name: str  # as gcloud spells it: v5p-128
    generation: str
    size: int
    workers: int  # TPU VMs in the slice, each runs one process of the job
    runtime: str


def accelerator(text: str) -> Accelerator:
    m = re.fullmatch(r"(v\w+?)-(\d+)", text or "")
    gen = GENERATIONS.get(m.group(1)) if m else None
    if gen is None:
        hint = " (v5e is spelled v5litepod-N)" if m and m.group(1) == "v5e" else ""
        raise PodError(f"--accelerator {text!r}: one of {', '.join(g + '-N' for g in GENERATIONS)}{hint}")
    n = int(m.group(2))
    if not gen.valid(n):
        raise PodError(f"--accelerator {text}: {m.group(1)}-N takes N = {gen.sizes}")
    return Accelerator(text, m.group(1), n, gen.workers(n), gen.runtime)


_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
_ZONE = re.compile(r"[a-z]+-[a-z]+[0-9]+-[a-z]")
_PROJECT = re.compile(r"[a-z][-a-z0-9.:]{4,61}[a-z0-9]")
# gcloud's durations: 7200s, 30m, 6h, 2d (combinations too) or ISO 8601 (PT6H).
_DURATION = re.compile(r"(\d+[smhd])+|P(\d+D)?(T(\d+H)?(\d+M)?(\d+S)?)?")


@dataclasses.dataclass(frozen=True)
class PodSpec:
    name: str
    accelerator: str
    zone: str
    project: str | None = None
    runtime: str | None = None  # None: the generation's documented default
    capacity: str = "on-demand"
    queued: bool = False  # create through a queued resource (best-effort needs one)
    valid_until: str | None = None  # a queued request expires after this (--valid-until-duration)

    @property
    def acc(self) -> Accelerator:
        return accelerator(self.accelerator)

    @property
    def workers(self) -> int:
        return self.acc.workers

    def checked(self) -> PodSpec:
        """This spec with its defaults filled in, or PodError naming the bad flag."""
        if not _NAME.fullmatch(self.name or ""):
            raise PodError(f"--name {self.name!r}: lowercase letters, digits and '-', starting with a "
                           f"letter, at most 63 characters")
        acc = self.acc
        if not _ZONE.fullmatch(self.zone or ""):
            raise PodError(f"--zone {self.zone!r}: a zone such as us-east5-a or europe-west4-b")
        if self.project is not None and not _PROJECT.fullmatch(self.project):
            raise PodError(f"--project {self.project!r}: not a Google Cloud project id")
        if self.capacity not in CAPACITIES:
            raise PodError(f"--capacity {self.capacity!r}: one of {', '.join(CAPACITIES)}")
        queued = self.queued or self.capacity == "best-effort"
        if self.valid_until is not None:
            if not queued:
                raise PodError("--valid-until-duration: only a queued request expires; add --queued")
            if not _DURATION.fullmatch(self.valid_until) or self.valid_until == "P":
                raise PodError(f"--valid-until-duration {self.valid_until!r}: a duration such as 6h, "
                               f"90m, 2d or PT6H")
        runtime = self.runtime or acc.runtime
        if not re.fullmatch(r"[a-z0-9][-a-z0-9.]*", runtime):
            raise PodError(f"--runtime {runtime!r}: not a TPU software version")
        return dataclasses.replace(self, runtime=runtime, queued=queued)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PodSpec:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


_BUCKET = re.compile(r"gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9](/.*)?")


def check_workdir(workdir: str, acc: Accelerator, flag: str = "--workdir") -> str:
    """The workdir every worker of the slice writes to. A multi-host job needs one they all
    reach: a gs:// path (a worker's own disk is also lost when a spot slice is preempted)."""
    if not workdir:
        raise PodError(f"{flag}: required")
    if workdir.startswith("gs://"):
        if not _BUCKET.fullmatch(workdir):
            raise PodError(f"{flag} {workdir}: not a gs://BUCKET/PATH")
        return workdir.rstrip("/")
    if "://" in workdir:
        raise PodError(f"{flag} {workdir}: TPU workers reach gs:// paths only")
    if acc.workers > 1:
        raise PodError(f"{flag} {workdir}: a {acc.name} slice has {acc.workers} workers, which must share "
                       f"one workdir: give a gs://BUCKET/PATH")
    return workdir


_JOB = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=,+-]{0,99}")


def job_name(text: str, given: bool = False) -> str:
    """A job's folder name on the workers, in the characters of a sweep's run names: a name
    `given` with --job must be one, a derived one is made one."""
    name = text if given else re.sub(r"[^A-Za-z0-9._=,+-]", "_", text).lstrip("._=,+-")[:100]
    if not _JOB.fullmatch(name):
        raise PodError(f"--job {text!r}: letters, digits and ._=,+- (at most 100)")
    return name


@dataclasses.dataclass(frozen=True)
class JobSpec:
    workdir: str
    train_args: tuple[str, ...] = ()  # after `--`: --config NAME[:ARG] --config.KEY=VALUE ...
    command: str = "train"
    job: str | None = None  # None: the workdir's last path component

    def checked(self, pod: PodSpec) -> JobSpec:
        if self.command not in JOB_COMMANDS:
            raise PodError(f"--command {self.command!r}: one of {', '.join(JOB_COMMANDS)}")
        workdir = check_workdir(self.workdir, pod.acc)
        for a in self.train_args:
            if a == "--workdir" or a.startswith("--workdir="):
                raise PodError("--workdir goes before `--` (the launcher checks it and passes it on)")
        job = job_name(self.job, given=True) if self.job else job_name(posixpath.basename(workdir) or "job")
        return dataclasses.replace(self, workdir=workdir, job=job, train_args=tuple(self.train_args))

    def argv(self, config_arg: tuple[str, ...] | None = None) -> list[str]:
        """`strokes_jax COMMAND --workdir W ARGS`, with the --config value replaced by
        `config_arg` when the config file travels with the job."""
        args = list(self.train_args)
        if config_arg is not None:
            args = replace_config(args, *config_arg)
        return [self.command, "--workdir", self.workdir, *args]


def config_value(args) -> tuple[int, str] | None:
    """(index, value) of the `--config` flag in a training command, or None."""
    for i, a in enumerate(args):
        if a == "--config" and i + 1 < len(args):
            return i, args[i + 1]
        if a.startswith("--config="):
            return i, a[len("--config="):]
    return None


def replace_config(args: list[str], old: str, new: str) -> list[str]:
    found = config_value(args)
    if found is None or found[1] != old:
        return args
    i, _ = found
    return args[:i] + ["--config", new] + args[i + (2 if args[i] == "--config" else 1):]


REMOTE_CONFIGS = "strokes_pod/configs"  # on each worker, relative to the home folder the job runs in


def check_config_args(args) -> tuple[str, str, str | None] | None:
    """Parses the training command's `--config` and `--config.KEY=VALUE` flags exactly as the
    command line will on the workers (absl + ml_collections, then the schema), so an unknown
    key or a value out of range fails here. Returns None without a `--config` flag, else
    (the value given, the value the workers get, the file to copy to them or None): a
    packaged config travels in the wheel and is passed by name, any other file is copied."""
    from absl import flags
    from ml_collections import config_flags

    from strokes_jax import configs
    from strokes_jax.configs import schema

    found = config_value(args)
    spec = found[1] if found else configs.DEFAULT
    try:
        resolved = configs.resolve(spec)
    except configs.ConfigNotFound as e:
        raise PodError(f"--config {spec}: {e}") from None
    overrides = [a for a in args if a.startswith("--config.")]
    mine = ["pod", "--config", resolved, *overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=mine)
    try:
        fv(mine)
        schema.check(fv.config)
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
        unknown = [schema.unknown_path(a[len("--config."):].partition("=")[0]) for a in overrides]
        bad = next((u for u in unknown if u), None)
        msg = f"unknown config key {bad}" if bad else " ".join(str(e.args[0] if e.args else e).split())
        raise PodError(f"training command: {msg}") from None
    if found is None:
        return None
    path, sep, arg = resolved.partition(":")
    stem = os.path.basename(path)
    if os.path.dirname(os.path.abspath(path)) == configs.HERE:
        return spec, stem[:-3] + sep + arg, None
    return spec, f"{REMOTE_CONFIGS}/{stem}{sep}{arg}", path
