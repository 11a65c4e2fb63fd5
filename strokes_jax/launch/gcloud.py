"""The gcloud commands of a pod, as argv lists, and the one place that runs them: printed
instead under --dry-run, retried with backoff when the failure is transient, never retried
when gcloud rejected the command itself.

How a failure is read (stderr is gcloud's, or ssh's for `tpu-vm ssh`):
  bad input   exit code 2 (gcloud's usage errors), or INVALID_ARGUMENT, "unrecognized
              arguments", "argument --X:", "Invalid value", "invalid choice",
              PERMISSION_DENIED, UNAUTHENTICATED, FAILED_PRECONDITION, an exceeded quota:
              not retried, exit code 2 from `pod`.
  not found   NOT_FOUND or "was not found": a slice that does not exist (describe, delete).
  exists      ALREADY_EXISTS: create asked twice (a retried create whose first try worked).
  transient   ssh's exit code 255, or UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, ABORTED,
              RESOURCE_EXHAUSTED without a quota, "no more capacity", HTTP 429 / 500 / 502 /
              503 / 504, rateLimitExceeded, backendError, connection reset / refused / timed
              out / closed, "Temporary failure in name resolution", "Could not get lock" (apt
              on a worker that is still booting): retried up to --retries times, waiting
              --backoff seconds and doubling (at most 5 minutes).
  anything else: not retried, exit code 1.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import shlex
import subprocess
import sys
import time

from strokes_jax.launch.spec import PodSpec

GCLOUD = "gcloud"
MAX_DELAY = 300.0

_BAD = re.compile(r"INVALID_ARGUMENT|unrecognized arguments|argument --[\w-]+:|Invalid value|invalid choice|"
                  r"PERMISSION_DENIED|UNAUTHENTICATED|FAILED_PRECONDITION|[Qq]uota .*exceeded|exceeded .*[Qq]uota|"
                  r"must be specified")
_NOT_FOUND = re.compile(r"NOT_FOUND|was not found")
_EXISTS = re.compile(r"ALREADY_EXISTS|already exists")
_TRANSIENT = re.compile(r"\bUNAVAILABLE\b|DEADLINE_EXCEEDED|\bINTERNAL\b|\bABORTED\b|RESOURCE_EXHAUSTED|"
                        r"no more capacity|(status|code|Error)\W{0,4}(429|50[0234])\b|rateLimitExceeded|backendError|"
                        r"Connection (reset|refused|timed out|closed)|Temporary failure in name resolution|"
                        r"Could not get lock|return code \[255\]|Broken pipe|kex_exchange_identification")


def classify(rc: int, stderr: str) -> str:
    """'ok', 'bad', 'not_found', 'exists', 'transient' or 'failed' (see the module doc)."""
    if rc == 0:
        return "ok"
    if rc == 2 or _BAD.search(stderr):
        return "bad"
    if _NOT_FOUND.search(stderr):
        return "not_found"
    if _EXISTS.search(stderr):
        return "exists"
    if rc == 255 or _TRANSIENT.search(stderr):
        return "transient"
    return "failed"


def reason(stderr: str, rc: int) -> str:
    """The line that says why: gcloud's last ERROR line, else the last line, else the code."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    # What a worker said says more than gcloud's "ssh exited with return code [N]".
    errors = [line for line in lines if line.startswith("strokes-pod-error")] or \
        [line for line in lines if "No such file or directory" in line or "command not found" in line] or \
        [line for line in lines if line.startswith("ERROR:")]
    text = (errors or lines or [f"exit code {rc}"])[-1]
    return text if len(text) <= 400 else text[:397] + "..."


class GcloudError(RuntimeError):
    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


@dataclasses.dataclass
class Result:
    rc: int
    stdout: str
    stderr: str
    kind: str


# ---- the commands -----------------------------------------------------------------------

def _where(pod: PodSpec) -> list[str]:
    return [f"--zone={pod.zone}"] + ([f"--project={pod.project}"] if pod.project else [])


def _tpus(pod: PodSpec, group: str, verb: str, *args: str, alpha: bool = False) -> list[str]:
    return [GCLOUD, *(["alpha"] if alpha else []), "compute", "tpus", group, verb, *args, *_where(pod)]


def describe(pod: PodSpec) -> list[str]:
    """Prints the state alone: READY, PREEMPTED, ... (a queued resource: ACTIVE, SUSPENDED, ...)."""
    if pod.queued:
        return _tpus(pod, "queued-resources", "describe", pod.name) + ["--format=value(state.state)"]
    return _tpus(pod, "tpu-vm", "describe", pod.name) + ["--format=value(state)"]


_CAPACITY = {"on-demand": [], "spot": ["--spot"], "reserved": ["--reserved"], "best-effort": ["--best-effort"]}


def create(pod: PodSpec) -> list[str]:
    if pod.queued:  # --best-effort exists in the alpha command group only
        cmd = _tpus(pod, "queued-resources", "create", pod.name, alpha=pod.capacity == "best-effort")
        cmd += [f"--node-id={pod.name}", f"--accelerator-type={pod.accelerator}",
                f"--runtime-version={pod.runtime}", *_CAPACITY[pod.capacity]]
        return cmd + ([f"--valid-until-duration={pod.valid_until}"] if pod.valid_until else [])
    return _tpus(pod, "tpu-vm", "create", pod.name) + [
        f"--accelerator-type={pod.accelerator}", f"--version={pod.runtime}", *_CAPACITY[pod.capacity]]


def delete(pod: PodSpec) -> list[str]:
    if pod.queued:  # --force deletes the queued resource's nodes with it
        return _tpus(pod, "queued-resources", "delete", pod.name) + ["--force", "--quiet"]
    return _tpus(pod, "tpu-vm", "delete", pod.name) + ["--quiet"]


# --quiet: a first connection makes its ssh key without asking, where nobody sees the question.
def scp(pod: PodSpec, local: str, remote: str) -> list[str]:
    return _tpus(pod, "tpu-vm", "scp", local, f"{pod.name}:{remote}") + ["--worker=all", "--quiet"]


def ssh(pod: PodSpec, command: str | None = None, worker: str = "all", quiet: bool = True) -> list[str]:
    return _tpus(pod, "tpu-vm", "ssh", pod.name) + [f"--worker={worker}"] + (["--quiet"] if quiet else []) + (
        [f"--command={command}"] if command else [])


# States as describe prints them, by what the launcher does about them.
READY = {"READY", "ACTIVE"}
WAITING = {"CREATING", "STARTING", "RESTARTING", "REPAIRING", "ACCEPTED", "WAITING_FOR_RESOURCES",
           "PROVISIONING"}
LOST = {"PREEMPTED", "TERMINATED", "STOPPED", "STOPPING", "SUSPENDED", "SUSPENDING", "FAILED", "DELETING"}


# ---- running them -----------------------------------------------------------------------

@dataclasses.dataclass
class Runner:
    dry_run: bool = False
    retries: int = 4
    backoff: float = 10.0
    out: object = None  # where --dry-run prints (default stdout)
    sleep: object = time.sleep

    def show(self, argv: list[str], note: str | None = None) -> None:
        print(shlex.join(argv) + (f"  # {note}" if note else ""), file=self.out or sys.stdout, flush=True)

    def __call__(self, argv: list[str], *, allow: tuple[str, ...] = (), note: str | None = None) -> Result:
        """Runs `argv`, capturing its output; retries transient failures. A failure whose kind
        is in `allow` ('not_found', 'exists') is returned; any other raises GcloudError with
        one line."""
        what = " ".join(itertools.takewhile(lambda a: not a.startswith("-"), argv))
        if self.dry_run:
            self.show(argv, note)
            return Result(0, "", "", "ok")
        for attempt in range(self.retries + 1):
            try:
                p = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
            except FileNotFoundError:
                raise GcloudError(f"{argv[0]} not found on PATH: install the Google Cloud CLI "
                                  f"(https://cloud.google.com/sdk/docs/install)", "failed") from None
            kind = classify(p.returncode, p.stderr)
            if kind == "ok" or kind in allow:
                return Result(p.returncode, p.stdout, p.stderr, kind)
            why = reason(p.stderr, p.returncode)
            if kind == "bad":
                raise GcloudError(f"{what}: rejected, not retried: {why}", kind)
            if kind != "transient":
                raise GcloudError(f"{what}: {why}", kind)
            if attempt == self.retries:
                raise GcloudError(f"{what}: still failing after {attempt + 1} attempts: {why}", kind)
            delay = min(self.backoff * 2 ** attempt, MAX_DELAY)
            print(f"{what}: transient failure ({why}); retry {attempt + 1}/{self.retries} in {delay:.0f}s",
                  file=sys.stderr, flush=True)
            self.sleep(delay)
        raise AssertionError("unreachable")

    def interactive(self, argv: list[str]) -> int:
        """Runs `argv` on this terminal (ssh, a followed log); no retries."""
        if self.dry_run:
            self.show(argv)
            return 0
        try:
            return subprocess.call(argv)
        except FileNotFoundError:
            raise GcloudError(f"{argv[0]} not found on PATH: install the Google Cloud CLI", "failed") from None
