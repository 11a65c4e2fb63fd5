"""The worker side of `pod`: runs on every TPU VM of a slice from the installed wheel, reached
through `gcloud compute tpus tpu-vm ssh --worker=all --command '... pod worker ACTION'`.

`start` hands the job to a supervisor in its own session and returns, so the job outlives the
ssh connection (and the laptop). The supervisor appends the job's output to its log, forwards
SIGTERM (a preemption notice, `pod stop`) to it, and writes its exit code when it ends.
`status` prints one marked JSON line per worker, which the laptop side parses out of
whatever else ssh prints. Everything lives in ~/strokes_pod/jobs/JOB/ on each worker:
argv.json, log.txt, pid (the supervisor's), exit_code.

On a TPU VM started by gcloud, JAX finds the slice's other workers in the VM metadata, but
`strokes_jax.distributed` looks at environment variables only; the supervisor therefore
passes the metadata on as JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, so
every worker calls `jax.distributed.initialize()` (needed for multi-host checkpoints and the
preemption sync).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

from strokes_jax import distributed, exits

MARK = "strokes-pod"
BUSY = 3  # another job is running on this worker
COORDINATOR_PORT = 8476  # the port JAX's own TPU detection uses


def root() -> str:
    return os.path.join(os.path.expanduser("~"), "strokes_pod", "jobs")


def job_dir(job: str) -> str:
    return os.path.join(root(), job)


def metadata(key: str, timeout: float = 2.0) -> str | None:
    """A TPU VM's instance attribute, or None off Google Cloud. GCE_METADATA_IP moves the
    server, as it does for JAX."""
    host = os.environ.get("GCE_METADATA_IP", "metadata.google.internal")
    req = urllib.request.Request(f"http://{host}/computeMetadata/v1/instance/attributes/{key}",
                                 headers={"Metadata-Flavor": "Google"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read().decode().strip()
    except (OSError, ValueError):
        return None


def endpoints(text: str) -> list[str]:
    """worker-network-endpoints: hostnames, or name:id:ip triples (the older format)."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        parts = item.split(":")
        out.append(parts[2] if len(parts) == 3 else parts[0])
    return out


def worker_id(meta=metadata) -> int:
    value = os.environ.get("TPU_WORKER_ID") or meta("agent-worker-number")
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def jax_env(env, meta=metadata) -> dict:
    """JAX_* variables for a multi-host start read from the VM metadata, when the environment
    does not already say how to start (see the module doc); {} on one host or off a TPU VM."""
    if distributed.mode(env) != "single":
        return {}
    eps, wid = meta("worker-network-endpoints"), meta("agent-worker-number")
    hosts = endpoints(eps or "")
    if len(hosts) < 2 or wid is None:
        return {}
    return {"JAX_COORDINATOR_ADDRESS": f"{hosts[0]}:{COORDINATOR_PORT}",
            "JAX_NUM_PROCESSES": str(len(hosts)), "JAX_PROCESS_ID": str(int(wid))}


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _write(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def _alive(job: str) -> int | None:
    """The job's supervisor pid while it runs. The command line is compared too, so a pid
    reused after a reboot does not count."""
    pid = _read(os.path.join(job_dir(job), "pid"))
    if not pid or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, PermissionError):
        return None
    cmdline = _read(f"/proc/{pid}/cmdline")
    if cmdline is not None and ("supervise" not in cmdline or job not in cmdline):
        return None
    return int(pid)


def _running_jobs() -> list[str]:
    try:
        names = sorted(os.listdir(root()))
    except FileNotFoundError:
        return []
    return [n for n in names if _alive(n)]


def _last_line(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 8192))
            lines = [line for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    lines = [line for line in lines if not line.startswith("# exit code")]
    return lines[-1][-300:] if lines else ""


def report(job: str) -> dict:
    d = job_dir(job)
    rc = _read(os.path.join(d, "exit_code"))
    if _alive(job):
        state = "running"
    elif rc is not None:
        state = "exited"
    else:
        state = "none"  # never started here (a new or recreated worker) or killed outright
    return {"worker": worker_id(), "job": job, "state": state,
            "rc": int(rc) if rc and rc.lstrip("-").isdigit() else None,
            "last": _last_line(os.path.join(d, "log.txt"))}


def _print_status(job: str, **extra) -> None:
    print(f"{MARK} " + json.dumps({**report(job), **extra}), flush=True)


# The TPU's device files: /dev/accel* on v4 and v5p, /dev/vfio/* on v5e and v6e.
DEVICES = ("/dev/accel*", "/dev/vfio/*")
LIBTPU_LOCK = "/tmp/libtpu_lockfile"


def _sudo() -> list[str]:
    # Another user's process (a job started with sudo, a notebook) is visible to lsof and
    # killable only as root; the TPU images give the login user passwordless sudo.
    return ["sudo", "-n"] if os.geteuid() != 0 and shutil.which("sudo") else []


def kill_stale(devices=None, run=subprocess.run, lock: str = LIBTPU_LOCK) -> list[int]:
    """Kills (SIGKILL) every process holding the TPU's device files, and removes libtpu's
    lock file: a job killed without its supervisor, or one started by hand, keeps the TPU
    and the next job's libtpu would fail with "TPU in use". Called only when no job of the
    launcher runs here, so it never ends one. Returns the pids killed."""
    paths = sorted(p for pattern in DEVICES for p in glob.glob(pattern)) if devices is None else list(devices)
    if not paths:
        return []  # not a TPU VM
    try:
        r = run([*_sudo(), "lsof", "-t", *paths], capture_output=True, text=True)
    except OSError:
        return []  # no lsof: nothing to go by
    pids = sorted({int(t) for t in r.stdout.split() if t.isdigit()} - {os.getpid(), os.getppid()})
    killed = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        except PermissionError:
            if run([*_sudo(), "kill", "-9", str(pid)], capture_output=True, text=True).returncode != 0:
                continue
        killed.append(pid)
    if lock and os.path.exists(lock):
        run([*_sudo(), "rm", "-f", lock], capture_output=True, text=True)
    return killed


def start(job: str, argv: list[str], stale: bool = False) -> int:
    """Starts `argv` detached unless this job already runs here (a rerun reattaches);
    `stale`: kills whatever else holds the TPU first (`kill_stale`)."""
    busy = _running_jobs()
    if job in busy:
        _print_status(job, note="already running")
        return 0
    if busy:
        print(f"{MARK}-error worker {worker_id()}: job {busy[0]} is running here "
              f"(`pod stop --job {busy[0]}` ends it)", file=sys.stderr, flush=True)
        return BUSY
    d = job_dir(job)
    os.makedirs(d, exist_ok=True)
    for name in ("exit_code", "pid"):
        if os.path.exists(os.path.join(d, name)):
            os.remove(os.path.join(d, name))
    killed = kill_stale() if stale else []
    if killed:
        with open(os.path.join(d, "log.txt"), "a") as log:
            log.write(f"# killed stale holders of the TPU: pid {', '.join(map(str, killed))}\n")
    _write(os.path.join(d, "argv.json"), json.dumps(argv))
    p = subprocess.Popen([sys.executable, "-m", "strokes_jax", "pod", "worker", "supervise", "--job", job],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True, cwd=os.path.expanduser("~"))
    _write(os.path.join(d, "pid"), str(p.pid))
    _print_status(job, note="started")
    return 0


def supervise(job: str) -> int:
    d = job_dir(job)
    with open(os.path.join(d, "argv.json")) as f:
        argv = json.load(f)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(os.path.join(d, "log.txt"), "a") as log:
        try:
            env.update(jax_env(env))
        except ValueError as e:  # half of the JAX_* variables set on this VM
            log.write(f"error: {e}\n# exit code {exits.BAD_INPUT}\n")
            _write(os.path.join(d, "exit_code"), str(exits.BAD_INPUT))
            return exits.BAD_INPUT
        log.write(f"$ {shlex.join(argv)}  # {time.strftime('%Y-%m-%dT%H:%M:%S')} worker {worker_id()}"
                  + (f", process {env['JAX_PROCESS_ID']} of {env['JAX_NUM_PROCESSES']}"
                     if "JAX_PROCESS_ID" in env else "") + "\n")
        log.flush()
        try:
            child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     env=env, cwd=os.path.expanduser("~"))
        except OSError as e:
            log.write(f"cannot start {argv[0]}: {e}\n")
            _write(os.path.join(d, "exit_code"), "127")
            return 127
        _write(os.path.join(d, "child"), str(child.pid))
        # A preemption notice or `pod stop`: the job saves its checkpoint and exits 75.
        signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum))
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        rc = child.wait()
        log.write(f"# exit code {rc}\n")
    _write(os.path.join(d, "exit_code"), str(rc))
    return 0


def stop(job: str, kill: bool = False) -> int:
    """SIGTERM to the job (it saves and exits 75); `kill`: SIGKILL, no save."""
    if _alive(job):
        child = _read(os.path.join(job_dir(job), "child"))
        if child and child.isdigit():
            try:
                os.kill(int(child), signal.SIGKILL if kill else signal.SIGTERM)
            except ProcessLookupError:
                pass
    _print_status(job)
    return 0


def logs(job: str, lines: int, follow: bool) -> int:
    path = os.path.join(job_dir(job), "log.txt")
    prefix = f"[worker {worker_id()}] "
    if not os.path.exists(path):
        print(f"{prefix}no log of job {job} here", flush=True)
        return 0
    with open(path, errors="replace") as f:
        for line in f.readlines()[-lines:] if lines > 0 else []:
            sys.stdout.write(prefix + line)
        sys.stdout.flush()
        quiet = 0
        while follow and (quiet < 3 or _alive(job)):
            line = f.readline()
            if line:
                sys.stdout.write(prefix + line)
                sys.stdout.flush()
                quiet = 0
            else:
                quiet += 1
                time.sleep(1.0)
    return 0


def main(argv, prog: str) -> int:
    parser = argparse.ArgumentParser(prog=prog, allow_abbrev=False,
                                     description="runs on a TPU worker (the launcher calls it over ssh)")
    sub = parser.add_subparsers(dest="action", required=True)
    for action in ("start", "supervise", "status", "logs", "stop"):
        p = sub.add_parser(action, allow_abbrev=False)
        p.add_argument("--job", required=True)
        if action == "logs":
            p.add_argument("--lines", type=int, default=100)
            p.add_argument("--follow", action="store_true")
        if action == "stop":
            p.add_argument("--kill", action="store_true")
        if action == "start":
            p.add_argument("--kill-stale", action="store_true",
                           help="kill other holders of /dev/accel* and /dev/vfio/* before starting")
    argv = list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    command = argv[cut + 1:]
    if args.action == "start":
        if not command:
            parser.error("start: the command goes after --")
        return start(args.job, command, stale=args.kill_stale)
    if args.action == "supervise":
        return supervise(args.job)
    if args.action == "logs":
        return logs(args.job, args.lines, args.follow)
    if args.action == "stop":
        return stop(args.job, args.kill)
    _print_status(args.job)
    return 0
