"""`python -m strokes_jax pod ACTION`: the launcher's command line (docs/pods.md)."""

from __future__ import annotations

import argparse
import os
import sys

from strokes_jax import configs, exits, sweeps
from strokes_jax.launch import gcloud, host, jobs, spec, sweep_jobs, worker
from strokes_jax.launch.gcloud import GcloudError
from strokes_jax.launch.jobs import Context, JobError
from strokes_jax.launch.spec import PodError, PodSpec
from strokes_jax.launch.state import State

EXAMPLES = """examples:
  pod up --name exp --accelerator v5p-128 --zone us-east5-a --project my-proj --capacity spot
  pod run --name exp --workdir gs://my-bucket/exp1 -- --config shapes_repro:long --config.optim.lr=3e-4
  pod status                 (the one recorded slice and its newest job)
  pod logs --worker 0 --follow
  pod sweep --name exp --config shapes_tiny --workdir gs://my-bucket/lr_sweep
  pod down --name exp
  pod host --host local --gpus 8 --gpus-per-process 1 --workdir runs/exp -- --config shapes_tiny
exit codes: 0 done, 1 failed, 2 bad input (nothing ran), 75 preempted (rerun the same command)"""

# Fields of a slice that name a different slice when they differ from the recorded ones.
_IDENTITY = ("accelerator", "zone", "project", "capacity", "queued")
_FLAG = {"valid_until": "--valid-until-duration"}


def _parser(prog: str) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    s = common.add_argument_group("the slice (recorded by `up` and `run`; later commands need only --name)")
    s.add_argument("--name", help="the TPU VM (and queued resource) name; default: the one recorded slice")
    s.add_argument("--accelerator", help="v4-N, v5p-N, v5litepod-N or v6e-N, e.g. v5p-128")
    s.add_argument("--zone")
    s.add_argument("--project", help="default: gcloud's configured project")
    s.add_argument("--runtime", help="TPU software version; default per generation (v2-alpha-tpuv5 for v5p, ...)")
    s.add_argument("--capacity", choices=spec.CAPACITIES, help="default on-demand; best-effort implies --queued")
    s.add_argument("--queued", action="store_const", const=True, help="create through a queued resource")
    s.add_argument("--valid-until-duration", dest="valid_until", help="a queued request expires after this (6h)")
    g = common.add_argument_group("the launcher")
    g.add_argument("--state", help="the state file (default $STROKES_POD_STATE or ~/.strokes_pod/state.json)")
    g.add_argument("--dry-run", action="store_true", help="print every command, one per line; run nothing")
    g.add_argument("--retries", type=int, default=4, help="retries of a transient gcloud failure (default 4)")
    g.add_argument("--backoff", type=float, default=10.0, help="seconds before the first retry, doubling")

    parser = argparse.ArgumentParser(prog=prog, allow_abbrev=False, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="TPU VM slices through gcloud: create one, run a job on "
                                                 "every worker, follow it, reattach, delete it")
    sub = parser.add_subparsers(dest="action", required=True)

    def add(name, text):
        return sub.add_parser(name, parents=[common], allow_abbrev=False, help=text, description=text)

    p = add("up", "create the slice (a no-op when it is up)")
    p.add_argument("--no-wait", action="store_true", help="a queued request: do not wait for ACTIVE")
    p.add_argument("--poll", type=float, default=30.0, help="seconds between state checks")
    for name, text in (("run", "install the package on every worker and run `strokes_jax COMMAND` there: "
                                "pod run [options] -- --config NAME[:ARG] --config.KEY=VALUE ..."),
                       ("sweep", "run a config's declared sweep as pod jobs, one point after the other")):
        p = add(name, text)
        p.add_argument("--workdir", required=True,
                       help="gs://BUCKET/PATH (required on a multi-host slice)" if name == "run" else
                       "the sweep's root: point NAME runs in WORKDIR/NAME")
        p.add_argument("--command", default="train", choices=spec.JOB_COMMANDS if name == "run" else sweeps.COMMANDS)
        p.add_argument("--wheel", help="the strokes_jax wheel to install (default: built from this source tree)")
        p.add_argument("--python", default="python3.11", help="the workers' Python for the venv (>= 3.11)")
        p.add_argument("--no-install", action="store_true", help="the workers already have this wheel")
        p.add_argument("--up", action="store_true", help="create the slice when missing, replace it when preempted")
        p.add_argument("--poll", type=float, default=60.0, help="seconds between checks of the job")
        if name == "run":
            p.add_argument("--job", help="the job's name (default: the workdir's last component)")
            p.add_argument("--detach", action="store_true", help="start the job and return")
        else:
            p.add_argument("--config", required=True, help="a config NAME[:ARG] or PATH[:ARG] with a get_sweep")
            p.add_argument("--slices", choices=("one", "per-point"), default="one",
                           help="one: the points in turn on --name; per-point: point i on slice NAME-i")
    p = add("status", "the slice's state and its newest job on every worker")
    p = add("logs", "the job's log on each worker")
    p.add_argument("--job", help="default: the slice's newest job")
    p.add_argument("--worker", default="all", help="a worker number or all")
    p.add_argument("--lines", type=int, default=100)
    p.add_argument("--follow", action="store_true", help="keep printing until the job ends")
    p = add("ssh", "a shell on one worker, or a command after --")
    p.add_argument("--worker", default="0")
    p = add("stop", "SIGTERM the job on every worker (it saves its checkpoint and exits 75)")
    p.add_argument("--job", help="default: the slice's newest job")
    p.add_argument("--kill", action="store_true", help="SIGKILL instead: no checkpoint")
    add("down", "delete the slice (a queued resource with --force)")
    text = ("run `strokes_jax COMMAND` on one multi-GPU machine, this one or one reached by ssh (no gcloud): "
            "one process for all its GPUs, or one per --gpus-per-process GPUs")
    p = sub.add_parser("host", allow_abbrev=False, help=text, description=text)
    p.add_argument("--host", default=host.LOCAL, help="local (default) or an ssh destination, user@machine")
    p.add_argument("--workdir", required=True)
    p.add_argument("--command", default="train", choices=spec.JOB_COMMANDS)
    p.add_argument("--gpus", help="a count (8: GPUs 0..7) or indices (2,3); default: all, one process")
    p.add_argument("--gpus-per-process", type=int, help="one process per this many GPUs (needs --gpus)")
    p.add_argument("--port", type=int, default=8476, help="the coordinator's port on the machine")
    p.add_argument("--python", help="the Python with strokes_jax (default: this one; python3 over ssh)")
    p.add_argument("--cd", help="over ssh: the folder to run in (default: the login's home)")
    p.add_argument("--logdir", help="processes 1.. log here (default: next to the state file, hosts/JOB)")
    p.add_argument("--state", help="the state file, whose folder holds the logs by default")
    p.add_argument("--dry-run", action="store_true", help="print every process's command, one per line")
    return parser


def resolve(args, state: State) -> PodSpec:
    """The slice the command is about: the recorded spec, with flags given now on top."""
    pods = state.read()["pods"]
    name = args.name
    if name is None:
        if len(pods) != 1:
            raise PodError(f"--name: required ({'no slice is' if not pods else f'{len(pods)} slices are'} "
                           f"recorded in {state.path}{': ' + ', '.join(sorted(pods)) if pods else ''})")
        name = next(iter(pods))
    recorded = dict((pods.get(name) or {}).get("spec") or {})
    fields = dict(recorded, name=name)
    for key in ("accelerator", "zone", "project", "runtime", "capacity", "queued", "valid_until"):
        value = getattr(args, key, None)
        if value is None:
            continue
        if key in _IDENTITY and recorded.get(key) not in (None, value):
            flag = _FLAG.get(key, "--" + key)
            raise PodError(f"{flag} {value}: slice {name} is recorded with {recorded[key]} "
                           f"(`pod down --name {name}` first, or another --name)")
        fields[key] = value
    missing = [k for k in ("accelerator", "zone") if not fields.get(k)]
    if missing:
        raise PodError(f"{' and '.join('--' + k for k in missing)}: needed, slice {name} is not recorded in "
                       f"{state.path}")
    return PodSpec.from_dict(fields).checked()


def _worker_arg(value: str, pod: PodSpec) -> str:
    if value == "all" or (value.isdigit() and int(value) < pod.workers):
        return value
    raise PodError(f"--worker {value}: all or 0..{pod.workers - 1}")


def _host(args, tail) -> int:
    try:
        job = host.HostJob(host=args.host, workdir=args.workdir, train_args=tuple(tail), command=args.command,
                           gpus=host.parse_gpus(args.gpus), gpus_per_process=args.gpus_per_process, port=args.port,
                           python=args.python, cd=args.cd)
        name = spec.job_name(os.path.basename(args.workdir.rstrip("/")) or "job")
        logdir = args.logdir or os.path.join(os.path.dirname(State(args.state, dry_run=True).path), "hosts", name)
        return host.run(job, logdir, dry_run=args.dry_run)
    except PodError as e:
        print(f"error: {e}", file=sys.stderr)
        return exits.BAD_INPUT
    except OSError as e:  # ssh or the Python missing here
        print(f"error: {e}", file=sys.stderr)
        return exits.FAILED


def main(argv=None, prog: str = "python -m strokes_jax pod") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:  # the side that runs on the TPU VMs
        return worker.main(argv[1:], prog=f"{prog} worker")
    cut = argv.index("--") if "--" in argv else len(argv)
    head, tail = argv[:cut], argv[cut + 1:]
    parser = _parser(prog)
    args, extra = parser.parse_known_args(head)
    overrides = configs.overrides(extra, args.action == "sweep", parser.error)
    if tail and args.action not in ("run", "ssh", "host"):
        parser.error(f"`--` and what follows belong to `pod run`, `pod host` and `pod ssh`, not `pod {args.action}`")
    if args.action == "host":
        return _host(args, tail)
    if args.retries < 0 or args.backoff < 0 or getattr(args, "poll", 0) < 0:
        parser.error("--retries, --backoff and --poll take numbers >= 0")
    state = State(args.state, dry_run=args.dry_run)
    ctx = Context(gcloud.Runner(dry_run=args.dry_run, retries=args.retries, backoff=args.backoff), state)
    try:
        if args.action == "status" and args.name is None and len(state.read()["pods"]) > 1:
            for name in sorted(state.read()["pods"]):
                args.name = name
                jobs.status(ctx, resolve(args, state))
            return exits.OK
        pod = resolve(args, state)
        if args.action == "up":
            return jobs.up(ctx, pod, wait=not args.no_wait, poll=args.poll)
        if args.action == "run":
            job = spec.JobSpec(workdir=args.workdir, train_args=tuple(tail), command=args.command, job=args.job)
            return jobs.run(ctx, pod, job, wheel=args.wheel, python=args.python, do_install=not args.no_install,
                            detach=args.detach, create=args.up, poll=args.poll)
        if args.action == "sweep":
            return sweep_jobs.run(ctx, pod, args.config, args.workdir, args.command, overrides, wheel=args.wheel,
                                  python=args.python, do_install=not args.no_install, create=args.up,
                                  poll=args.poll, per_point=args.slices == "per-point")
        if args.action == "status":
            return jobs.status(ctx, pod)
        if args.action == "logs":
            return jobs.logs(ctx, pod, jobs.recorded_job(ctx, pod, args.job), _worker_arg(args.worker, pod),
                             args.lines, args.follow)
        if args.action == "ssh":
            return jobs.ssh(ctx, pod, _worker_arg(args.worker, pod), " ".join(tail) or None)
        if args.action == "stop":
            return jobs.stop(ctx, pod, jobs.recorded_job(ctx, pod, args.job), args.kill)
        return jobs.down(ctx, pod)
    except PodError as e:
        print(f"error: {e}", file=sys.stderr)
        return exits.BAD_INPUT
    except GcloudError as e:
        print(f"error: {e}", file=sys.stderr)
        return exits.BAD_INPUT if e.kind == "bad" else exits.FAILED
    except (JobError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return exits.FAILED
    except KeyboardInterrupt:  # a job already started keeps running on the workers
        print("\ninterrupted: `pod status` shows where the slice and the job stand", file=sys.stderr)
        return 130
