"""A config's declared sweep (strokes_jax/sweeps.py) as pod jobs: each point one job, in its
own workdir `<sweep root>/<run name>`, either one after the other on one slice or each on a
slice of its own.

On one slice the points run in declaration order and the launcher waits for each. A rerun
skips the points recorded as done and resumes the others from their checkpoints; a
preempted point stops the sweep (exit code 75: rerun it), a failed one is stopped on every
worker and the sweep goes on (exit code 1 at the end). A record in the form `sweep results`
reads (sweep.json) is kept beside the state file, so the table can be made once the run
folders are copied next to it (docs/pods.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import time

from strokes_jax import configs, exits, sweeps
from strokes_jax.configs import schema
from strokes_jax.launch import jobs, spec
from strokes_jax.launch.jobs import Context
from strokes_jax.launch.spec import JobSpec, PodError, PodSpec


def plan(pod: PodSpec, config: str, root: str, command: str, overrides: dict) -> list[tuple[sweeps.Point, JobSpec]]:
    """Every point of the sweep with its job, checked (keys, values, the workdir)."""
    try:
        points = sweeps.expand(config, overrides)
    except (sweeps.SweepError, configs.ConfigNotFound, schema.ConfigKeyError) as e:
        raise PodError(str(e)) from None
    root = spec.check_workdir(root, pod.acc)
    prefix = posixpath.basename(root) or "sweep"
    out = []
    for p in points:
        flags = {**overrides, **p.overrides}
        args = ("--config", config, *(f"--config.{k}={sweeps._flag(v)}" for k, v in flags.items()))
        out.append((p, JobSpec(workdir=posixpath.join(root, p.name), train_args=args, command=command,
                               job=spec.job_name(f"{prefix}.{p.name}")).checked(pod)))
    return out


def record_dir(ctx: Context, root: str) -> str:
    return os.path.join(os.path.dirname(ctx.state.path), "sweeps", spec.job_name(root.replace("/", "_")))


def _write_record(ctx: Context, root: str, config: str, command: str, overrides: dict, entries: list[dict]) -> str:
    """sweep.json as `sweeps.run` writes it, for `sweep results` on the copied run folders."""
    folder = record_dir(ctx, root)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, sweeps.RECORD)
    record = dict(config=config, command=command, overrides={k: sweeps._flag(v) for k, v in overrides.items()},
                  points=entries, root=root, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1, default=repr)
    os.replace(path + ".tmp", path)
    return path


def run(ctx: Context, pod: PodSpec, config: str, root: str, command: str = "train", overrides: dict | None = None,
        wheel: str | None = None, python: str = "python3.11", do_install: bool = True, create: bool = False,
        poll: float = 60.0, per_point: bool = False) -> int:
    overrides = dict(overrides or {})
    root = spec.check_workdir(root, pod.acc)
    points = plan(pod, config, root, command, overrides)
    cfg = spec.check_config_args(("--config", config))
    if per_point:
        return _per_point(ctx, pod, points, cfg, wheel, python, do_install, poll)
    old = ctx.state.read()["sweeps"].get(root) or {}
    if old and old.get("config") != config:
        raise PodError(f"--workdir {root}: holds a sweep of config {old.get('config')!r}, not {config!r}: "
                       f"use another --workdir")
    done = {e["name"] for e in old.get("points", []) if e.get("status") == "done"}
    entries = [dict(name=p.name, overrides=p.overrides, job=j.job, workdir=j.workdir,
                    status="done" if p.name in done else "pending") for p, j in points]
    wheel = jobs.wheel_for(ctx, wheel) if do_install else None
    ctx.state.set_pod(pod.to_dict())
    jobs.ensure_ready(ctx, pod, create, poll)
    if do_install:
        jobs.install(ctx, pod, wheel, python, cfg and cfg[2])
    else:
        jobs.upload_config(ctx, pod, cfg and cfg[2])

    def save():
        with ctx.state.update() as data:
            data["sweeps"][root] = dict(config=config, command=command, pod=pod.name, points=entries)
        if not ctx.dry_run:
            _write_record(ctx, root, config, command, overrides, entries)

    code = exits.OK
    for i, ((p, job), entry) in enumerate(zip(points, entries)):
        head = f"[{i + 1}/{len(points)}] {p.name}"
        if entry["status"] == "done":
            ctx.say(f"{head}: done before, skipped")
            ctx.note(f"{head}: done before, skipped")
            continue
        ctx.say(f"{head}: {job.workdir}")
        ctx.note(f"{head}: {job.workdir}")
        t0 = time.time()
        jobs.launch(ctx, pod, job, job.argv(cfg[:2] if cfg else None))
        entry["status"] = "running"
        save()
        rc = jobs.follow(ctx, pod, job.job, poll)
        entry.update(exit_code=rc, seconds=round(time.time() - t0, 1),
                     status={exits.OK: "done", exits.PREEMPTED: "preempted"}.get(rc, "failed"))
        save()
        if rc == exits.PREEMPTED or rc == 130:
            code = rc
            break
        if rc != exits.OK:  # the other workers may still be waiting on the failed one
            jobs.stop(ctx, pod, job.job, kill=True)
            code = exits.FAILED
    if ctx.dry_run:
        return exits.OK
    counts = {}
    for e in entries:
        counts[e["status"]] = counts.get(e["status"], 0) + 1
    ctx.say(f"sweep {root}: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    if code == exits.PREEMPTED:
        ctx.say("  preempted: rerun the same `pod sweep` (with --up if the slice is gone) to resume")
    folder = record_dir(ctx, root)
    ctx.say(f"  table: gcloud storage rsync -r --exclude='.*/(checkpoints|data|tb)/.*' {root} {folder} && "
            f"python -m strokes_jax sweep results --workdir {folder}")
    return code


def _per_point(ctx: Context, pod: PodSpec, points, cfg, wheel, python, do_install, poll) -> int:
    """Point i on its own slice NAME-i, all started, none waited for."""
    wheel = jobs.wheel_for(ctx, wheel) if do_install else None
    names = []
    for i, (p, job) in enumerate(points):
        mine = dataclasses.replace(pod, name=f"{pod.name}-{i}").checked()
        ctx.note(f"point {p.name} on {mine.name}")
        ctx.state.set_pod(mine.to_dict())
        jobs.ensure_ready(ctx, mine, True, poll, assume=None)
        if do_install:
            jobs.install(ctx, mine, wheel, python, cfg and cfg[2])
        jobs.launch(ctx, mine, job, job.argv(cfg[:2] if cfg else None))
        names.append(mine.name)
    ctx.say(f"{len(names)} points started on {', '.join(names)}: `pod status --name NAME` each; "
            f"`pod down --name NAME` each when done")
    return exits.OK
