"""Config sweeps, declared next to the config and run offline, one point after the other.

A config file declares its sweep beside `get_config(arg)`, as big_vision's `get_hyper` does:

    def get_sweep(arg, hyper):
        return hyper.product([hyper.sweep("optim.lr", [3e-4, 1e-3]),
                              hyper.sweep("train.steps", [500, 1000])])

`hyper` is this module, passed in so that config files import nothing from the runner
(configs stay below it in the import graph). A sweep is a list of override dicts
{"optim.lr": 1e-3, ...}; each point gets a readable run name (`lr=0.001,steps=500`) and its
own workdir `<sweep workdir>/<run name>`. `sweep run` runs each point as its own
`python -m strokes_jax COMMAND` subprocess (a fresh JAX each), so this module imports no
JAX; `sweep results` gathers the runs into one table (docs/sweeps.md).
"""

from __future__ import annotations

import argparse
import ast
import builtins
import collections
import csv
import dataclasses
import difflib
import hashlib
import importlib.util
import io
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import ml_collections

from etils import epath

from strokes_jax import configs, exits, files
from strokes_jax.configs import schema

EXIT_PREEMPTED = exits.PREEMPTED
COMMANDS = ("demo", "train", "evaluate")  # the commands whose finished result is known
RECORD = "sweep.json"
_TABLE_METRICS = ("overall", "nfe_per_sample")  # per mode, in the Markdown table (CSV: all)


class SweepError(ValueError):
    pass


# ---- declaring -------------------------------------------------------------------------

def sweep(key: str, values) -> list[dict]:
    """One axis: [{key: v} for v in values]."""
    return [{key: v} for v in values]


def product(*axes) -> list[dict]:
    """Every combination of the axes (each a list of override dicts; a single list of axes
    also works, as in big_vision's `hyper.product([...])`)."""
    out = []
    for combo in itertools.product(*_axes(axes)):
        keys = [k for part in combo for k in part]
        if len(set(keys)) < len(keys):
            raise SweepError(f"sweep key {next(k for k in keys if keys.count(k) > 1)} is set by two "
                             f"axes of one product")
        out.append({k: v for part in combo for k, v in part.items()})
    return out


def zip_(*axes) -> list[dict]:
    """The axes side by side: point i merges point i of every axis (equal lengths)."""
    axes = _axes(axes)
    if len({len(a) for a in axes}) > 1:
        raise SweepError(f"zip of axes with different lengths: {[len(a) for a in axes]}")
    return [dict(kv for part in parts for kv in part.items()) for parts in builtins.zip(*axes)]


zip = zip_  # big_vision's name (hyper.zip); this module itself calls builtins.zip


def _axes(axes) -> list[list[dict]]:
    if len(axes) == 1 and axes[0] and isinstance(axes[0][0], list):
        axes = axes[0]
    return [list(a) for a in axes]


# ---- naming ----------------------------------------------------------------------------

def _labels(keys: list[str]) -> dict[str, str]:
    """Each key's shortest dotted suffix that no other key of the sweep ends with."""
    out = {}
    for k in keys:
        parts = k.split(".")
        for n in range(1, len(parts) + 1):
            label = ".".join(parts[-n:])
            if not any(o != k and (o == label or o.endswith("." + label)) for o in keys):
                break
        out[k] = label
    return out


def _text(v) -> str:
    if isinstance(v, (tuple, list)):
        return "_".join(map(_text, v)) or "none"
    return v if isinstance(v, str) else repr(v)


def _digest(overrides: dict) -> str:
    return hashlib.sha1(json.dumps(overrides, sort_keys=True, default=repr).encode()).hexdigest()[:8]


def run_names(points: list[dict]) -> list[str]:
    """Readable folder names, `lr=0.001,steps=20`: characters other than letters, digits and
    `._+-` become `_`, long names are cut and end in a hash, and names that still collide
    get their overrides' hash appended."""
    keys = list(dict.fromkeys(k for p in points for k in p))
    labels = _labels(keys)
    names = []
    for p in points:
        name = ",".join(f"{labels[k]}={re.sub(r'[^A-Za-z0-9._+-]', '_', _text(v))}"
                        for k, v in p.items()) or "base"
        names.append(name if len(name) <= 100 else f"{name[:80]}-{_digest(p)}")
    first = list(names)
    for i, name in enumerate(first):
        twins = [j for j, n in enumerate(first) if n == name and j != i]
        if any(points[j] == points[i] for j in twins):
            raise SweepError(f"sweep point {name} appears twice")
        if twins:
            names[i] = f"{name}-{_digest(points[i])}"
    return names


# ---- expanding -------------------------------------------------------------------------

@dataclasses.dataclass
class Point:
    name: str
    overrides: dict  # the point's own keys (its name), without the sweep-wide ones
    config: ml_collections.ConfigDict  # the config the point runs with, checked


def _config_module(spec: str):
    path, _, arg = configs.resolve(spec).partition(":")
    mod_spec = importlib.util.spec_from_file_location("_strokes_sweep_config", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod, arg or None


def _apply(config, key: str, value, from_text: bool = False) -> None:
    """Sets one override as `--config.KEY=VALUE` would; a SweepError says what is wrong."""
    node, parts = config, key.split(".")
    for i, part in enumerate(parts):
        keys = list(node.keys()) if isinstance(node, (ml_collections.ConfigDict, dict)) else []
        if part not in keys:
            hint = difflib.get_close_matches(part, keys, n=1)
            where = ".".join(parts[:i + 1])
            raise SweepError(f"unknown config key {where}"
                             + (f" (did you mean {'.'.join(parts[:i] + [hint[0]])}?)" if hint else ""))
        if i < len(parts) - 1:
            node = node[part]
    current = node[parts[-1]]
    if current is None or isinstance(current, (ml_collections.ConfigDict, dict)):
        raise SweepError(f"config key {key} holds {'None' if current is None else 'a section'} "
                         f"in this config: the command line cannot override it")
    if from_text and isinstance(current, bool) and value.lower() in ("true", "false"):
        value = value.lower() == "true"  # absl's spelling of booleans
    elif from_text and not isinstance(current, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
    if not isinstance(value, (bool, int, float, str, tuple, list)):
        raise SweepError(f"config key {key}: {value!r} cannot be written on a command line")
    try:
        node[parts[-1]] = tuple(value) if isinstance(value, list) else value
    except (TypeError, ValueError) as e:
        raise SweepError(f"config key {key}: {e}") from None


def expand(config_spec: str, overrides: dict | None = None) -> list[Point]:
    """The config file's `get_sweep(arg, hyper)` as checked points. `overrides` apply to
    every point (values may be command-line text) and are not part of the run names."""
    mod, arg = _config_module(config_spec)
    if not hasattr(mod, "get_sweep"):
        raise SweepError(f"config {config_spec} declares no sweep (no get_sweep(arg, hyper))")
    declared = mod.get_sweep(arg, sys.modules[__name__])
    if not declared or not isinstance(declared, list) or not all(isinstance(p, dict) for p in declared):
        raise SweepError(f"get_sweep of {config_spec} must return a non-empty list of override dicts")
    base = dict(overrides or {})
    swept = sorted(set(base) & {k for p in declared for k in p})
    if swept:
        raise SweepError(f"{', '.join(swept)}: swept by {config_spec}, so a sweep-wide override would be ignored")
    points = []
    for name, p in builtins.zip(run_names(declared), declared):
        c = mod.get_config(arg)
        try:
            for k, v in base.items():
                _apply(c, k, v, from_text=isinstance(v, str))
            for k, v in p.items():
                _apply(c, k, v)
            schema.check(c)
        except (SweepError, schema.ConfigKeyError) as e:
            raise SweepError(f"sweep point {name}: {e}") from None
        points.append(Point(name, p, c))
    return points


def _flag(v) -> str:
    if isinstance(v, (tuple, list)):
        return repr(tuple(v))
    return v if isinstance(v, str) else repr(v)


def _argv(command: str, config_spec: str, run_dir: str, overrides: dict) -> list[str]:
    return [sys.executable, "-m", "strokes_jax", command, "--config", config_spec,
            "--workdir", run_dir] + [f"--config.{k}={_flag(v)}" for k, v in overrides.items()]


# ---- running ---------------------------------------------------------------------------

# Records go through strokes_jax.files (etils.epath), so a sweep root on gs:// works the
# same as a local folder.
def _read(path: str):
    try:
        return files.read_json(path)
    except (OSError, ValueError):
        return None


def finished(command: str, run_dir: str, config) -> bool:
    """Whether the run directory already holds the command's result for this config."""
    trained = (_read(os.path.join(run_dir, "train_record.json")) or {}).get("end_step") == config.train.steps
    if command == "train":
        return trained
    scored = epath.Path(os.path.join(run_dir, "report", "results.json")).is_file()
    return scored and (trained or command == "evaluate")


def _write(path: str, record: dict) -> None:
    record["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    files.write_json(path, record, default=repr)


def _stream(argv: list[str], run_dir: str, on_start) -> int:
    """Runs one point, its stdout and stderr appended to <run dir>/log.txt and echoed. A
    bucket cannot append, so a remote run dir's log is kept here and copied there after."""
    files.makedirs(run_dir)
    remote = "://" in run_dir
    local = os.path.join(os.path.expanduser("~"), ".strokes_sweeps", re.sub(r"[^\w.=,+-]", "_", run_dir),
                         "log.txt") if remote else os.path.join(run_dir, "log.txt")
    os.makedirs(os.path.dirname(local), exist_ok=True)
    try:
        return _stream_to(argv, local, on_start)
    finally:
        if remote:
            epath.Path(os.path.join(run_dir, "log.txt")).write_text(open(local).read())


def _stream_to(argv: list[str], log_path: str, on_start) -> int:
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(argv)}\n")
        log.flush()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        on_start(proc)
        for line in proc.stdout:
            log.write(line)
            log.flush()
            sys.stdout.write(line)
            sys.stdout.flush()
        return proc.wait()


def run(config_spec: str, workdir: str, command: str = "demo", dry_run: bool = False,
        overrides: dict | None = None) -> int:
    """Runs every point of the config's sweep in turn, skipping finished ones; returns 0,
    1 when a point failed (the rest still ran), or EXIT_PREEMPTED when a point was preempted
    (the sweep stops; rerun it to resume). `dry_run` prints the commands and runs nothing."""
    if command not in COMMANDS:
        raise SweepError(f"sweep command {command!r}: one of {', '.join(COMMANDS)}")
    points = expand(config_spec, overrides)
    base = dict(overrides or {})
    path = os.path.join(workdir, RECORD)
    old = _read(path)
    if old and old.get("config") != config_spec:
        raise SweepError(f"{path} holds a sweep of config {old.get('config')!r}, not {config_spec!r}: "
                         f"use another --workdir")
    plan = [(p, os.path.join(workdir, p.name), {**base, **p.overrides}) for p in points]
    if dry_run:
        for p, run_dir, flags in plan:
            if finished(command, run_dir, p.config):
                print(f"# {p.name}: finished, would be skipped")
            print(shlex.join(_argv(command, config_spec, run_dir, flags)))
        return 0
    files.makedirs(workdir)
    record = dict(config=config_spec, command=command, overrides={k: _flag(v) for k, v in base.items()},
                  points=[dict(name=p.name, overrides=p.overrides, status="pending") for p in points])
    child, stop = [], []

    def forward(signum, frame):  # a preemption notice: the running point saves and exits 75
        stop.append(signum)
        if child and child[-1].poll() is None:
            child[-1].send_signal(signum)

    try:
        old_handler = signal.signal(signal.SIGTERM, forward)
    except ValueError:  # not the main thread: leave signals alone
        old_handler = None
    try:
        for i, (p, run_dir, flags) in enumerate(plan):
            entry = record["points"][i]
            if stop:
                break
            if finished(command, run_dir, p.config):
                entry["status"] = "skipped-finished"
                print(f"[{i + 1}/{len(plan)}] {p.name}: finished, skipped", flush=True)
                _write(path, record)
                continue
            argv = _argv(command, config_spec, run_dir, flags)
            print(f"[{i + 1}/{len(plan)}] {p.name}: {shlex.join(argv)}", flush=True)
            entry["status"] = "running"
            _write(path, record)
            t0 = time.time()
            code = _stream(argv, run_dir, child.append)
            entry.update(exit_code=code, seconds=round(time.time() - t0, 1),
                         status="done" if code == 0 else
                         "preempted" if code == EXIT_PREEMPTED or stop else "failed")
            _write(path, record)
            if entry["status"] == "preempted":
                stop.append(code)
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    failed = [e for e in record["points"] if e["status"] == "failed"]
    counts = collections.Counter(e["status"] for e in record["points"])
    print(f"\nsweep {workdir}: " + ", ".join(f"{n} {s}" for s, n in counts.items()), flush=True)
    for e in failed:
        print(f"  failed: {e['name']} (exit code {e['exit_code']}; {os.path.join(workdir, e['name'], 'log.txt')})")
    if stop:
        print("  preempted: rerun the same sweep command to resume", flush=True)
        return EXIT_PREEMPTED
    try:
        out = results(workdir, "final_loss" if command == "train" else "process.overall")
        print(f"results: {out['markdown']}, {out['csv']}" + (f", {out['plot']}" if out["plot"] else ""))
    except SweepError as e:
        print(f"no results table: {e}")
    return 1 if failed else 0


# ---- gathering -------------------------------------------------------------------------

def _row(workdir: str, entry: dict) -> dict:
    run_dir = os.path.join(workdir, entry["name"])
    row = {"name": entry["name"], "status": entry.get("status", "")}
    row.update(entry.get("overrides", {}))
    payload = _read(os.path.join(run_dir, "report", "results.json")) or {}
    for mode, r in payload.get("results", {}).items():
        row.update({f"{mode}.{k}": v for k, v in r.get("scores", {}).items()})
        row.update({f"{mode}.{k}": v for k, v in r.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)})
    rec = _read(os.path.join(run_dir, "train_record.json")) or {}
    row.update({k: rec[k] for k in ("train_seconds", "end_step") if k in rec})
    if rec.get("losses"):
        row["final_loss"] = rec["losses"][-1][1]  # [step, loss] pairs
    return row


def _cell(v) -> str:
    return "" if v is None else f"{v:.4g}" if isinstance(v, float) else _flag(v).replace("|", "\\|")


def _lower_is_better(metric: str) -> bool:
    last = metric.rpartition(".")[2]
    return "loss" in last or "seconds" in last or last.startswith(("nfe", "evals"))


def results(workdir: str, sort_by: str = "process.overall", descending: bool | None = None) -> dict:
    """One table of the sweep's runs: <workdir>/sweep_results.md and .csv, one row per point
    (its overrides as columns), sorted by `sort_by` (highest first, or lowest for losses,
    seconds and NFE unless `descending` says), and a plot of it against the first swept key
    (sweep_results.png, when matplotlib is installed). Returns the rows and the paths."""
    record = _read(os.path.join(workdir, RECORD))
    if not record:
        raise SweepError(f"no {RECORD} in {workdir}: run the sweep first")
    rows = [_row(workdir, e) for e in record["points"]]
    keys = list(dict.fromkeys(k for e in record["points"] for k in e.get("overrides", {})))
    metrics = list(dict.fromkeys(k for r in rows for k in r if k not in keys and k not in ("name", "status")))
    if sort_by not in metrics:
        raise SweepError(f"no run has {sort_by!r} yet" + (f"; columns: {', '.join(metrics)}" if metrics else ""))
    desc = not _lower_is_better(sort_by) if descending is None else descending
    have = [r for r in rows if isinstance(r.get(sort_by), (int, float))]
    declared, rows = rows, sorted(have, key=lambda r: r[sort_by], reverse=desc) + [r for r in rows if r not in have]
    shown = [m for m in metrics if m.rpartition(".")[2] in _TABLE_METRICS
             or m in ("final_loss", "train_seconds", sort_by)]
    md_cols = ["name", "status", *keys, *shown]
    lines = [f"Sweep `{record['config']}` ({record['command']}), sorted by {sort_by} "
             f"({'highest' if desc else 'lowest'} first).", "",
             "| " + " | ".join(md_cols) + " |", "|" + "---|" * len(md_cols)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in md_cols) + " |" for r in rows]
    out = {"rows": rows, "columns": ["name", "status", *keys, *metrics],
           "markdown": os.path.join(workdir, "sweep_results.md"),
           "csv": os.path.join(workdir, "sweep_results.csv"), "table": "\n".join(lines)}
    epath.Path(out["markdown"]).write_text(out["table"] + "\n")
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(out["columns"])
    w.writerows([[_flag(r[c]) if isinstance(r.get(c), (tuple, list)) else r.get(c, "")
                  for c in out["columns"]] for r in rows])
    epath.Path(out["csv"]).write_bytes(buf.getvalue().encode())
    out["plot"], out["plot_note"] = _plot(os.path.join(workdir, "sweep_results.png"), declared, keys,
                                          sort_by)
    return out


def _plot(path: str, rows: list[dict], keys: list[str], metric: str):
    """The metric against the first swept key, one line per setting of the other keys."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None, "matplotlib is not installed: no plot (pip install matplotlib)"
    rows = [r for r in rows if keys and keys[0] in r and isinstance(r.get(metric), (int, float))]
    if not rows:
        return None, f"no run has {metric} and a swept key: no plot"
    x_key, rest = keys[0], keys[1:]
    numeric = all(isinstance(r[x_key], (int, float)) and not isinstance(r[x_key], bool) for r in rows)
    ticks = sorted({r[x_key] for r in rows}) if numeric else list(dict.fromkeys(_flag(r[x_key]) for r in rows))
    pos = (lambda v: v) if numeric else (lambda v: ticks.index(_flag(v)))
    groups: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: pos(r[x_key])):
        groups.setdefault(",".join(f"{k}={_flag(r.get(k))}" for k in rest), []).append(r)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, g in groups.items():
        ax.plot([pos(r[x_key]) for r in g], [r[metric] for r in g], marker="o", label=label or None)
    if numeric and ticks[0] > 0 and ticks[-1] >= 10 * ticks[0]:
        ax.set_xscale("log")  # learning rates and the like
    ax.set_xticks([pos(t) for t in ticks], [_flag(t) for t in ticks])
    ax.minorticks_off()
    if rest:
        ax.legend(fontsize=7)
    ax.set(xlabel=x_key, ylabel=metric)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    epath.Path(path).write_bytes(png.getvalue())
    return path, ""


# ---- command line ----------------------------------------------------------------------

def main(argv=None, prog: str = "python -m strokes_jax sweep") -> int:
    """`sweep run ...` / `sweep results ...`; returns the exit code (2: bad input)."""
    parser = argparse.ArgumentParser(prog=prog, allow_abbrev=False,
                                     description="config sweeps: each point of a config's get_sweep, run in turn")
    sub = parser.add_subparsers(dest="action", required=True)
    p_run = sub.add_parser("run", allow_abbrev=False, help="run every point, skipping finished ones",
                           epilog="--config.KEY=VALUE applies to every point (not part of run names)")
    p_run.add_argument("--config", required=True, help="config NAME[:ARG] or PATH[:ARG] with a get_sweep")
    p_run.add_argument("--workdir", required=True, help="the sweep's folder; each point runs in WORKDIR/NAME")
    p_run.add_argument("--command", default="demo", choices=COMMANDS)
    p_run.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p_res = sub.add_parser("results", allow_abbrev=False, help="gather the runs into one table")
    p_res.add_argument("--workdir", required=True)
    p_res.add_argument("--sort-by", default="process.overall", help="a column: MODE.SCORE, final_loss, ...")
    args, extra = parser.parse_known_args(argv)
    overrides = configs.overrides(extra, args.action == "run", parser.error,
                                  " (sweep-wide overrides: --config.KEY=VALUE)")
    try:
        if args.action == "run":
            return run(args.config, args.workdir, args.command, args.dry_run, overrides)
        out = results(args.workdir, args.sort_by)
    except (SweepError, configs.ConfigNotFound, schema.ConfigKeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out["table"] + f"\n\n{out['markdown']}\n{out['csv']}\n{out['plot'] or out['plot_note']}")
    return 0
