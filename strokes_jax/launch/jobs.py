"""The laptop side of `pod`: create and delete slices, install the wheel on every worker,
start a job there and follow it until every worker has exited.

A job is started detached on the workers (`worker.start`), so following it is only polling:
a closed terminal or a killed launcher loses nothing, and `status`, `logs` or a rerun of
`run` pick the job up again from the state file. A rerun of `run` starts the job again
unless it is still running (then it reattaches); the training command resumes from the
newest checkpoint in its workdir. Exit codes: 0 done, 1 failed, 2 bad input, 75 preempted
(rerun the same command, with --up when the slice itself was lost).
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

import strokes_jax
from strokes_jax import exits
from strokes_jax.launch import gcloud, spec, worker
from strokes_jax.launch.gcloud import GcloudError
from strokes_jax.launch.spec import JobSpec, PodError, PodSpec
from strokes_jax.launch.state import State, now

VENV = "~/strokes_pod/venv"
VENV_PY = VENV + "/bin/python"


class JobError(RuntimeError):
    """The job or the slice is not where it should be: one line, exit code 1."""


@dataclasses.dataclass
class Context:
    runner: gcloud.Runner
    state: State
    out: object = None

    def say(self, message: str) -> None:
        """Progress; a dry run prints commands only."""
        if not self.dry_run:
            print(message, file=self.out or sys.stdout, flush=True)

    def note(self, message: str) -> None:
        """A `# ` comment between a dry run's commands."""
        if self.dry_run:
            print(f"# {message}", file=self.out or sys.stdout, flush=True)

    @property
    def dry_run(self) -> bool:
        return self.runner.dry_run


# ---- what runs on the workers -----------------------------------------------------------

def worker_command(action: str, job: str, *extra: str) -> str:
    return " ".join([VENV_PY, "-m", "strokes_jax", "pod", "worker", action, "--job", shlex.quote(job), *extra])


def start_command(job: str, argv: list[str]) -> str:
    # --kill-stale: a worker where the job already runs reattaches and kills nothing.
    return worker_command("start", job, "--kill-stale", "--", VENV_PY, "-m", "strokes_jax", *map(shlex.quote, argv))


def jax_requirement() -> str:
    """jax[tpu] within the package's own jax pins, so the workers get a JAX it supports."""
    try:
        reqs = importlib.metadata.requires("strokes_jax") or []
    except importlib.metadata.PackageNotFoundError:
        reqs = []
    for r in reqs:
        m = re.fullmatch(r"jax\s*([<>=!~][^;]*)?", r.strip())
        if m:
            return "jax[tpu]" + (m.group(1) or "").replace(" ", "")
    return "jax[tpu]"


def setup_command(wheel_name: str, python: str = "python3.11") -> str:
    """A venv with this wheel and jax[tpu], made once per worker. The TPU images run Ubuntu
    22.04, whose python3 is 3.10; the package needs 3.11+, so `python` (from Ubuntu's
    archive when missing) makes the venv. The wheel is reinstalled every time: a rebuilt
    wheel keeps its version number."""
    py = shlex.quote(python)
    w = "~/" + wheel_name
    req = jax_requirement()
    if not re.fullmatch(r"[\w\[\],<>=.!~]+", req):
        raise PodError(f"the package's jax requirement {req!r} cannot be passed to pip on the workers")
    return (f"set -e; mkdir -p ~/strokes_pod/configs; v={VENV}; test -x $v/bin/pip || {py} -m venv $v 2>/dev/null || "
            f"{{ sudo apt-get -qq update && sudo DEBIAN_FRONTEND=noninteractive apt-get -qq install -y "
            f"{py}-venv && {py} -m venv $v; }}; $v/bin/pip install -q \"{req}\" {w}; "
            f"$v/bin/pip install -q --no-deps --force-reinstall {w}")


# ---- the slice --------------------------------------------------------------------------

def slice_state(ctx: Context, pod: PodSpec, assume: str | None = None) -> str | None:
    """What describe says (READY, PREEMPTED, ACTIVE, ...), None when there is no such slice;
    a dry run prints the command and returns `assume`."""
    cmd = gcloud.describe(pod)
    if ctx.dry_run:
        ctx.runner.show(cmd)
        return assume
    r = ctx.runner(cmd, allow=("not_found",))
    if r.kind == "not_found":
        return None
    lines = [line.strip() for line in r.stdout.splitlines() if line.strip()]
    return lines[-1] if lines else "UNKNOWN"


def wait_ready(ctx: Context, pod: PodSpec, poll: float) -> None:
    want = "ACTIVE" if pod.queued else "READY"
    if ctx.dry_run:
        ctx.runner.show(gcloud.describe(pod), note=f"every {poll:g}s until {want}")
        return
    last = None
    while True:
        st = slice_state(ctx, pod)
        if st != last:
            ctx.say(f"{pod.name}: {st or 'not found'}")
            last = st
        if st in gcloud.READY:
            return
        if st is None or st in gcloud.LOST:
            raise JobError(f"slice {pod.name} is {st or 'gone'} instead of {want}: `pod down`, then `pod up` again")
        ctx.runner.sleep(poll)


_ASK = "?"  # up(known=...): the state is not known yet


def up(ctx: Context, pod: PodSpec, wait: bool = True, recreate: bool = False, poll: float = 30.0,
       known: str | None = _ASK) -> int:
    """Creates the slice unless it is up; `recreate` replaces a preempted or failed one."""
    ctx.state.set_pod(pod.to_dict(), status="creating")
    st = slice_state(ctx, pod) if known == _ASK else known
    if st in gcloud.READY:
        ctx.say(f"{pod.name}: up ({st}), {pod.accelerator} with {pod.workers} workers in {pod.zone}")
        ctx.state.set_pod(pod.to_dict(), status="up")
        return exits.OK
    if st in gcloud.LOST:
        if not recreate:
            raise JobError(f"slice {pod.name} is {st}: `pod down` then `pod up` (or `pod run --up`) replaces it")
        ctx.say(f"{pod.name} is {st}: deleting it to create it again")
        ctx.runner(gcloud.delete(pod), allow=("not_found",))
        st = None
    if st is None:
        ctx.say(f"creating {pod.name}: {pod.accelerator} ({pod.workers} workers), {pod.capacity}"
                f"{', queued' if pod.queued else ''}, runtime {pod.runtime}, {pod.zone}")
        if ctx.runner(gcloud.create(pod), allow=("exists",)).kind == "exists":
            st = "CREATING"  # a retried create whose first try went through, or another launcher's
    if wait and (pod.queued or st in gcloud.WAITING):
        wait_ready(ctx, pod, poll)
    ctx.state.set_pod(pod.to_dict(), status="up" if wait or not pod.queued else "requested")
    ctx.say(f"{pod.name}: up" if wait or not pod.queued else f"{pod.name}: requested (`pod status` shows it)")
    return exits.OK


def ensure_ready(ctx: Context, pod: PodSpec, create: bool, poll: float, assume: str | None = "READY") -> None:
    """Returns once the slice is READY; `create`: makes or replaces it first when it must.
    A dry run shows the path for a slice in the state `assume`."""
    st = slice_state(ctx, pod, assume=assume)
    if st in gcloud.READY:
        return
    if st in gcloud.WAITING:
        wait_ready(ctx, pod, poll)
        return
    if not create:
        raise JobError(f"slice {pod.name} is {st or 'not found'}: `pod up` creates it (or add --up)")
    up(ctx, pod, recreate=True, poll=poll, known=st)


def down(ctx: Context, pod: PodSpec) -> int:
    r = ctx.runner(gcloud.delete(pod), allow=("not_found",))
    ctx.state.forget(pod.name)
    ctx.say(f"{pod.name}: {'deleted' if r.kind == 'ok' else 'not found, nothing to delete'}")
    return exits.OK


# ---- the job ----------------------------------------------------------------------------

def source_tree() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(strokes_jax.__file__)))
    if not os.path.isfile(os.path.join(here, "setup.cfg")):
        raise PodError("--wheel: this strokes_jax is installed without its sources; build a wheel "
                       "(`pip wheel --no-deps -w dist .` in a clone) and pass --wheel PATH")
    return here


def wheel_for(ctx: Context, wheel: str | None) -> str:
    """The wheel to install on the workers: `wheel`, or one built from this source tree."""
    if wheel:
        if not re.fullmatch(r"strokes_jax-[\w.+-]+\.whl", os.path.basename(wheel)):
            raise PodError(f"--wheel {wheel}: not a strokes_jax wheel (strokes_jax-VERSION-...whl)")
        if not os.path.isfile(wheel):
            raise PodError(f"--wheel {wheel}: not found")
        return wheel
    src = source_tree()
    out = os.path.join(os.path.dirname(ctx.state.path), "wheels")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out]
    try:
        import setuptools  # noqa: F401
        import wheel as _wheel  # noqa: F401
        cmd.append("--no-build-isolation")  # offline, with the build tools already here
    except ImportError:
        pass
    if ctx.dry_run:
        ctx.note(f"{shlex.join(cmd)} {src} (from a clean copy)")
        return os.path.join(out, f"strokes_jax-{strokes_jax.__version__}-py3-none-any.whl")
    for old in glob.glob(os.path.join(out, "strokes_jax-*.whl")):
        os.remove(old)
    # setuptools keeps build/ in the tree it builds, and a module deleted from the sources
    # would live on there and in the wheel: build from a fresh copy of what packaging reads.
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, "src")
        shutil.copytree(os.path.join(src, "strokes_jax"), os.path.join(copy, "strokes_jax"),
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for name in ("setup.cfg", "pyproject.toml", "setup.py", "README.md", "LICENSE"):
            if os.path.exists(os.path.join(src, name)):
                shutil.copy(os.path.join(src, name), copy)
        r = subprocess.run(cmd + [copy], capture_output=True, text=True)
    built = glob.glob(os.path.join(out, "strokes_jax-*.whl"))
    if r.returncode != 0 or not built:
        raise JobError(f"building the wheel failed: {gcloud.reason(r.stderr, r.returncode)}")
    return built[0]


def install(ctx: Context, pod: PodSpec, wheel: str, python: str, config_file: str | None) -> None:
    name = os.path.basename(wheel)
    ctx.say(f"installing {name} and {jax_requirement()} on {pod.workers} workers of {pod.name}")
    ctx.runner(gcloud.scp(pod, wheel, name))
    ctx.runner(gcloud.ssh(pod, setup_command(name, python)))
    upload_config(ctx, pod, config_file)


def upload_config(ctx: Context, pod: PodSpec, config_file: str | None) -> None:
    if config_file:
        ctx.runner(gcloud.scp(pod, config_file, f"{spec.REMOTE_CONFIGS}/{os.path.basename(config_file)}"))


def parse_status(text: str) -> list[dict]:
    """The workers' status lines, one per worker (the last one each printed)."""
    out = {}
    for line in text.splitlines():
        at = line.find(worker.MARK + " {")  # ssh may put something before it
        if at >= 0:
            try:
                s = json.loads(line[at + len(worker.MARK) + 1:])
            except ValueError:
                continue
            out[s.get("worker")] = s
    return [out[k] for k in sorted(out, key=lambda w: (w is None, w))]


def judge(statuses: list[dict]) -> tuple[str, str]:
    """('running' | 'done' | 'failed' | 'preempted' | 'missing', why) over the workers."""
    codes = {s["worker"]: s["rc"] for s in statuses if s["state"] == "exited"}
    failed = sorted(w for w, rc in codes.items() if rc not in (exits.OK, exits.PREEMPTED))
    running = [s for s in statuses if s["state"] == "running"]
    if failed:
        w = failed[0]
        return "failed", (f"worker {w} exited with code {codes[w]}"
                          + (f"; {len(running)} still running (`pod stop` ends them)" if running else ""))
    if running:
        return "running", f"{len(running)} of {len(statuses)} workers running"
    if any(s["state"] == "none" for s in statuses):
        return "missing", "the job is not on every worker (was the slice recreated?): rerun `pod run`"
    if any(rc == exits.PREEMPTED for rc in codes.values()):
        return "preempted", "exit code 75: checkpoint saved"
    return "done", "every worker exited 0"


def statuses(ctx: Context, pod: PodSpec, job: str) -> list[dict]:
    return parse_status(ctx.runner(gcloud.ssh(pod, worker_command("status", job))).stdout)


def launch(ctx: Context, pod: PodSpec, job: JobSpec, argv: list[str]) -> None:
    # Recorded first, so a launcher killed while the workers start the job still finds it;
    # a start the workers refused leaves the previous record as it was.
    previous = (ctx.state.pod(pod.name) or {}).get("job")
    ctx.state.set_job(pod.name, job=job.job, workdir=job.workdir, command=job.command, argv=argv,
                      started=now(), status="starting")
    try:
        r = ctx.runner(gcloud.ssh(pod, start_command(job.job, argv)))
    except GcloudError as e:
        if e.kind != "transient":
            ctx.state.put_job(pod.name, previous)
        raise
    if ctx.dry_run:
        return
    sts = parse_status(r.stdout)
    again = sum(s.get("note") == "already running" for s in sts)
    ctx.say(f"{job.job}: {'already running, reattached' if again else 'started'} on {len(sts)} of "
            f"{pod.workers} workers of {pod.name}; workdir {job.workdir}")
    ctx.state.set_job(pod.name, status="running")


def follow(ctx: Context, pod: PodSpec, job: str, poll: float) -> int:
    """Polls the workers until the job ends; returns its exit code (0, 1 or 75)."""
    if ctx.dry_run:
        ctx.runner.show(gcloud.ssh(pod, worker_command("status", job)),
                        note=f"every {poll:g}s until every worker has exited")
        return exits.OK
    ctx.say(f"following {job} every {poll:g}s; Ctrl-C detaches (the job keeps running)")
    shown, strikes = None, 0
    try:
        while True:
            try:
                sts = statuses(ctx, pod, job)
            except GcloudError as e:
                if e.kind != "transient":
                    raise
                sts = []
            if len(sts) < pod.workers:  # a worker did not answer: is the slice still there?
                st = slice_state(ctx, pod)
                if st is None or st in gcloud.LOST:
                    return _ended(ctx, pod, job, "preempted", f"slice {pod.name} is {st or 'gone'}")
                if st in gcloud.WAITING:  # restarting or repaired: ask again later
                    ctx.runner.sleep(poll)
                    continue
                strikes += 1
                if strikes > ctx.runner.retries:
                    raise JobError(f"{pod.name}: {len(sts)} of {pod.workers} workers answer; "
                                   f"`pod status` when they are back")
                ctx.runner.sleep(poll)
                continue
            strikes = 0
            verdict, why = judge(sts)
            line = sts[0].get("last")
            if line and line != shown:
                ctx.say(f"[worker {sts[0]['worker']}] {line}")
                shown = line
            if verdict == "running":
                ctx.runner.sleep(poll)
                continue
            bad = [s for s in sts if s["state"] == "exited" and s["rc"] not in (exits.OK, exits.PREEMPTED)]
            for s in bad[:3]:
                ctx.say(f"[worker {s['worker']}] exit code {s['rc']}: {s['last']}")
            return _ended(ctx, pod, job, verdict, why)
    except KeyboardInterrupt:
        ctx.say(f"\ndetached; {job} keeps running: `pod status --name {pod.name}`, `pod logs --name {pod.name}`")
        return 130


def _ended(ctx: Context, pod: PodSpec, job: str, verdict: str, why: str) -> int:
    ctx.state.set_job(pod.name, status=verdict, ended=now())
    if verdict == "done":
        ctx.say(f"{job}: done ({why})")
        return exits.OK
    if verdict == "preempted":
        ctx.say(f"{job}: preempted ({why}); rerun the same `pod run` (with --up if the slice is gone): "
                f"training resumes from the newest checkpoint")
        return exits.PREEMPTED
    ctx.say(f"{job}: {verdict} ({why}); `pod logs --name {pod.name}` shows every worker's log")
    return exits.FAILED


def run(ctx: Context, pod: PodSpec, job: JobSpec, wheel: str | None = None, python: str = "python3.11",
        do_install: bool = True, detach: bool = False, create: bool = False, poll: float = 60.0) -> int:
    job = job.checked(pod)
    config = spec.check_config_args(job.train_args)
    argv = job.argv(config[:2] if config else None)
    wheel = wheel_for(ctx, wheel) if do_install else None
    ctx.state.set_pod(pod.to_dict())
    ensure_ready(ctx, pod, create, poll)
    if do_install:
        install(ctx, pod, wheel, python, config and config[2])
    else:
        upload_config(ctx, pod, config and config[2])
    launch(ctx, pod, job, argv)
    if detach:
        ctx.say(f"detached: `pod status --name {pod.name}`, `pod logs --name {pod.name} --follow`")
        return exits.OK
    return follow(ctx, pod, job.job, poll)


def recorded_job(ctx: Context, pod: PodSpec, job: str | None) -> str:
    if job:
        return spec.job_name(job, given=True)
    entry = (ctx.state.pod(pod.name) or {}).get("job") or {}
    if not entry.get("job"):
        raise PodError(f"--job: no job of slice {pod.name} is recorded in {ctx.state.path}")
    return entry["job"]


def status(ctx: Context, pod: PodSpec) -> int:
    st = slice_state(ctx, pod, assume="READY")
    ctx.say(f"{pod.name}: {st or 'not found'} ({pod.accelerator}, {pod.workers} workers, {pod.capacity}"
            f"{', queued' if pod.queued else ''}, {pod.zone})")
    entry = (ctx.state.pod(pod.name) or {}).get("job") or {}
    if not entry.get("job"):
        return exits.OK
    if st not in gcloud.READY:
        ctx.say(f"job {entry['job']}: last seen {entry.get('status')} at {entry.get('updated')}")
        return exits.OK
    sts = statuses(ctx, pod, entry["job"])
    if ctx.dry_run:
        return exits.OK
    verdict, why = judge(sts) if sts else ("unknown", "no worker answered")
    ctx.state.set_job(pod.name, status=verdict)
    ctx.say(f"job {entry['job']}: {verdict} ({why}); started {entry.get('started')}; workdir {entry.get('workdir')}")
    odd = [s for s in sts if s["state"] != "running" or s["worker"] == 0]
    for s in odd[:8]:
        rc = f" (exit code {s['rc']})" if s["rc"] is not None else ""
        ctx.say(f"  [worker {s['worker']}] {s['state']}{rc}: {s['last']}")
    return exits.OK


def logs(ctx: Context, pod: PodSpec, job: str, worker_: str = "all", lines: int = 100, follow_: bool = False) -> int:
    cmd = gcloud.ssh(pod, worker_command("logs", job, "--lines", str(int(lines)), *(["--follow"] if follow_ else [])),
                     worker=worker_, quiet=not follow_)
    if follow_:
        return ctx.runner.interactive(cmd)
    sys.stdout.write(ctx.runner(cmd).stdout)
    return exits.OK


def stop(ctx: Context, pod: PodSpec, job: str, kill: bool = False) -> int:
    r = ctx.runner(gcloud.ssh(pod, worker_command("stop", job, *(["--kill"] if kill else []))))
    ctx.say(f"{job}: {'killed' if kill else 'asked to stop (it saves, then exits 75)'} on "
            f"{len(parse_status(r.stdout))} workers")
    return exits.OK


def ssh(ctx: Context, pod: PodSpec, worker_: str, command: str | None) -> int:
    return ctx.runner.interactive(gcloud.ssh(pod, command, worker=worker_, quiet=False))
