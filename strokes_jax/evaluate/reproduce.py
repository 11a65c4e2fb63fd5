"""The shapes reproduction of the paper's claim in one command: the same model size and the
same training steps (so the same training tokens) for every row, scored on Shapes-GenEval.

Rows (the paper's ablation ladder):
  single_pass        trained on (prompt, final image) pairs, generates in one pass
  additive           process-driven, additive steps only
  edits              + modify / move / swap steps
  symbolic_critique  + symbolic critiques (image-side and text-side, positive and negative)
  self_critique      the full method: phase 1 as symbolic_critique, then the model samples
                     its own traces, the checker writes critiques, and phase 2 trains on the
                     mixture (phase 1 + phase 2 steps = the other rows' steps)

  python -m strokes_jax reproduce --config shapes_repro --workdir runs/repro
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time

from strokes_jax import provenance
from strokes_jax.evaluate import curve, injection, inspection, inspection_probe, intervals, job, report, shapes_bench
from strokes_jax.evaluate.train_images import TrainImages
from strokes_jax.train import checkpoint as ckpt
from strokes_jax.train import loop
from strokes_jax.worlds import prompts, shapes

ROWS = ("single_pass", "additive", "edits", "symbolic_critique", "self_critique")
# Training order: the two rows the claim compares first, so a run stopped part way (the
# table is written after every row) already holds single-pass vs the full method.
RUN_ORDER = ("single_pass", "self_critique", "additive", "edits", "symbolic_critique")


def row_config(config, row: str):
    c = copy.deepcopy(config)
    mixes = dict(config.reproduce.mixes)
    c.data.mix = dict(mixes["symbolic_critique" if row == "self_critique" else row])
    # Sparse MoT routing capacities depend on the row's mix (its share of image tokens).
    per_row = dict(config.reproduce.sparse_routing)
    if row in per_row:
        c.train.sparse_routing = tuple(per_row[row])
    if row != "self_critique":  # test-time scaling (accuracy vs iteration cap): full method
        c.eval.iteration_caps = ()
    return c


def restored_rows(args, variant=None):
    """For each ROW=WORKDIR[=LABEL] argument: (label, workdir, row config, setup, restore
    info) with the newest checkpoint of WORKDIR restored, for analyses of finished rows.
    `variant` is the shapes_repro variant whose evaluation settings apply (the model is the
    same in every variant)."""
    from strokes_jax.configs import shapes_repro
    for arg in args:
        row, wd, *label = arg.split("=")
        c = row_config(shapes_repro.get_config(variant), row)
        setup, info = loop.restore_for_eval(c, wd)
        yield (label[0] if label else row), wd, c, setup, info


class Preempted(RuntimeError):
    """A row's training stopped on a preemption notice: the reproduction stops too (its
    checkpoints stay; rerunning the command resumes the row)."""


def _train(c, workdir: str):
    setup, summary = loop.train(c, workdir, eval_hooks=[TrainImages(c)])
    if summary["preempted"]:
        raise Preempted(f"training in {workdir} was preempted at step {summary['end_step']}")
    return setup, summary


def _train_eval(c, workdir: str, modes, name: str):
    setup, summary = _train(c, workdir)
    payload = job.run(setup, c, workdir, name, summary, {"train": summary["train_seconds"]},
                      modes=modes)
    return setup, summary, payload


def _overall(setup, c, mode: str) -> float:
    ec = c.eval
    bench = shapes_bench.benchmark_prompts(ec.seed, ec.prompts_per_tag)
    samples, _ = shapes_bench.run(job.make_generator(setup, c, ec.seed), bench,
                                  ec.images_per_prompt, mode, ec.batch_size)
    return shapes_bench.summarize(samples)["scores"]["overall"]


def _checkpoint_curve(setup, c, rowdir: str, total: int) -> list[tuple[float, float]]:
    """Single-pass overall at the row's intermediate checkpoints, as (multiple, score)."""
    mgr = ckpt.manager(rowdir, keep=c.train.keep_checkpoints, save_every=c.train.checkpoint_every)
    pts = []
    for step in sorted(mgr.all_steps()):
        # Only the planned points: Orbax also keeps a run's first step, and a preemption
        # save lands off the grid.
        if 0 < step < total and step % c.train.checkpoint_every == 0:
            _, setup.state = ckpt.restore_latest(mgr, setup.state, setup.shardings, step=step)
            pts.append((step / total, _overall(setup, c, "single_pass")))
    return pts


def _longer_single_pass(config, config_name: str, workdir: str, out: dict) -> None:
    """Single-pass runs of reproduce.single_pass_multiples x the row's steps (each from
    scratch, its own schedule), so the learning curve can say how much more training
    single-pass needs. They run after every row: a stopped run still has the whole table."""
    total = config.train.steps
    for m in config.reproduce.single_pass_multiples:
        cm = row_config(config, "single_pass")
        cm.train.steps = cm.optim.total_steps = int(round(m * total))
        cm.train.checkpoint_every = cm.train.steps
        _, _, payload = _train_eval(cm, os.path.join(workdir, f"single_pass_x{m:g}"),
                                    ("single_pass",), f"{config_name}:single_pass_x{m:g}")
        # Points read back from reproduction.json are lists; tuples sort with tuples only.
        out["single_pass_curve"] = sorted(
            [tuple(p) for p in out.get("single_pass_curve", [])] +
            [(float(m), payload["results"]["single_pass"]["scores"]["overall"])])
        _write(out, workdir)


def _with_curve_checkpoints(c, config):
    n = int(config.reproduce.curve_points)
    if n > 1:
        c.train.checkpoint_every = max(1, config.train.steps // n)
        c.train.keep_checkpoints = n + 1
    return c


def selected_rows(config) -> tuple[str, ...]:
    """reproduce.rows (default: every row), in RUN_ORDER; an unknown name fails by key."""
    rows = tuple(config.reproduce.rows) or RUN_ORDER
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise ValueError(f"config key reproduce.rows: unknown rows {unknown}; rows are {ROWS}")
    return tuple(r for r in RUN_ORDER if r in rows)


def config_sha(c) -> str:
    """A short fingerprint of the run's config (overrides included, reproduce.rows left
    out): rows kept from an earlier run in the same workdir show whether they come from a
    different experiment."""
    d = c.to_dict()
    # Which rows and extra single-pass runs one command adds do not change a row.
    for key in ("rows", "single_pass_multiples", "curve_points"):
        d.get("reproduce", {}).pop(key, None)
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=repr).encode()).hexdigest()[:10]


def _earlier(workdir: str, config_name: str, total: int, rows) -> dict:
    """The rows of an earlier reproduction.json in workdir that this run does not redo, so
    rerunning one row keeps the table whole. A workdir holding another config or step
    budget is refused: its row folders hold that run's checkpoints, which the rows would
    resume from."""
    path = os.path.join(workdir, "reproduction.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        old = json.load(f)
    if old.get("config") != config_name or old.get("steps_per_row") != total:
        raise ValueError(
            f"{path} is a reproduction of {old.get('config')} at {old.get('steps_per_row')} "
            f"steps per row, not {config_name} at {total}: its row folders would resume from "
            f"that run's checkpoints; use a fresh --workdir")
    kept = {}
    for row, r in old.get("rows", {}).items():
        if row not in rows:
            r.setdefault("commit", old.get("commit"))
            kept[row] = r
    # Run-level results that belong to one row are kept with it.
    extra = {k: old[k] for k, row in (("single_pass_curve", "single_pass"),
                                      ("self_critique_outcomes", "self_critique"))
             if k in old and row not in rows}
    return {"rows": kept, **extra}


def run(config, config_name: str, workdir: str, rows=None) -> dict:
    rows = selected_rows(config) if rows is None else rows
    missing = [r for r in rows if ("symbolic_critique" if r == "self_critique" else r)
               not in config.reproduce.mixes]
    if missing:
        raise ValueError(f"config key reproduce.mixes: no training mix for rows {missing} "
                         f"(the ladder's mixes are in the shapes_repro config)")
    total, frac = config.train.steps, config.reproduce.phase2_fraction
    out = {"config": config_name, "commit": provenance.git_commit(), "device": provenance.device_info(),
           "steps_per_row": total, "rows": {}}
    out.update(_earlier(workdir, config_name, total, rows))
    sha = config_sha(config)
    for row in rows:
        t0 = time.time()
        c = row_config(config, row)
        modes = ("single_pass",) if row == "single_pass" else ("process",)
        rowdir = os.path.join(workdir, row)
        if row == "single_pass":
            c = _with_curve_checkpoints(c, config)
            setup, summary, payload = _train_eval(c, rowdir, modes, f"{config_name}:{row}")
            episodes = c.data.num_train
            # Scored at reproduce.curve_points checkpoints inside the row.
            out["single_pass_curve"] = _checkpoint_curve(setup, c, rowdir, total) + [
                (1.0, payload["results"][modes[0]]["scores"]["overall"])]
        elif row != "self_critique":
            _, summary, payload = _train_eval(c, rowdir, modes, f"{config_name}:{row}")
            episodes = c.data.num_train
        else:
            p1 = copy.deepcopy(c)
            p1.train.steps = p1.optim.total_steps = total - int(round(frac * total))
            setup, p1_summary = _train(p1, rowdir + "_phase1")
            crit = job.self_critique(setup, p1, rowdir + "_phase1")
            c.train.init_from = rowdir + "_phase1"
            c.train.steps = c.optim.total_steps = total - p1.train.steps
            if crit["episodes"]:
                c.data.extra_sources = ({"path": crit["path"],
                                         "weight": float(config.reproduce.self_critique_weight)},)
            else:  # no trace could be inspected: phase 2 goes on with the phase-1 mix, said aloud
                print(f"self_critique row: the self-critique split is empty ({crit['outcomes']}); "
                      f"phase 2 trains on the phase-1 mix alone", flush=True)
            _, summary, payload = _train_eval(c, rowdir, modes, f"{config_name}:{row}")
            episodes = c.data.num_train + crit["episodes"]
            out["self_critique_outcomes"] = crit["outcomes"]
            out["self_critique_split"] = crit["split"]
            summary = dict(summary, episodes_seen=summary.get("episodes_seen", 0)
                           + p1_summary.get("episodes_seen", 0),
                           phase1_start_step=p1_summary.get("start_step", 0))
        res = payload["results"][modes[0]]
        out["rows"][row] = {"mode": modes[0], "commit": out["commit"],
                            "config_sha": sha,
                            "device_kind": out["device"]["device_kind"],
                            "scores": res["scores"],
                            # 95% intervals, and the per-prompt outcomes the paired
                            # comparisons between rows resample
                            "intervals": res.get("intervals"),
                            "per_prompt": res.get("per_prompt"),
                            "hard": res.get("hard"),
                            "nfe_per_image": res["nfe_per_image"],
                            "nfe_per_sample": res["nfe_per_sample"],
                            "evals_per_sample": res.get("evals_per_sample"),
                            "inspection": res.get("inspection"),
                            "inspection_probe": res.get("inspection_probe"),
                            "injection": res.get("injection"),
                            # distinct episodes (data + self-critique split), and packed
                            # episodes trained on (this process's steps only on a resume)
                            "episodes": episodes, "episodes_seen": summary.get("episodes_seen"),
                            "wall_s": time.time() - t0,
                            # > 0: the row resumed from a checkpoint, and wall_s and
                            # episodes_seen are this process's share only.
                            "start_step": summary.get("start_step", 0),
                            "phase1_start_step": summary.get("phase1_start_step"),
                            "train_steps": total, "final_loss": summary["losses"][-1][1]
                            if summary["losses"] else None}
        _write(out, workdir)  # after every row: a stopped run still leaves its finished rows
    if "single_pass" in rows:
        _longer_single_pass(config, config_name, workdir, out)
    return out


def _write(out: dict, workdir: str) -> None:
    os.makedirs(workdir, exist_ok=True)
    files = []
    pts = out.get("single_pass_curve")
    if pts:
        levels = {r: v["scores"]["overall"] for r, v in out["rows"].items() if r != "single_pass"}
        full = levels.get("self_critique")
        out["single_pass_multiple_to_match"] = (None if full is None
                                                else curve.multiple_to_match(pts, full))
        title = f"Shapes-GenEval overall, {out['config']} ({out['steps_per_row']} steps = 1x)"
        files.append(("learning_curve.svg", curve.svg(pts, levels, title)))
    files += [("reproduction.json", json.dumps(out, indent=1)),
              ("reproduction.md", table(out) + "\n")]
    for name, text in files:
        tmp = os.path.join(workdir, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(workdir, name))


def seen(r: dict) -> str:
    return f" ({r['episodes_seen']} seen)" if r.get("episodes_seen") else ""


# Row comparisons the ladder makes: each rung against the one below, and the claim itself.
COMPARISONS = (("additive", "single_pass"), ("edits", "additive"), ("symbolic_critique", "edits"),
               ("self_critique", "symbolic_critique"), ("self_critique", "single_pass"))


def paired_lines(rows: dict) -> list[str]:
    """One line per COMPARISONS pair present: the overall (and hard) difference with its
    paired 95% interval over the shared prompts; a pair that cannot be paired says why."""
    lines = []
    for a, b in COMPARISONS:
        if a not in rows or b not in rows:
            continue
        pa, pb = rows[a].get("per_prompt"), rows[b].get("per_prompt")
        if not pa or not pb:
            lines.append(f"- {a} - {b}: not paired (a row from a run that kept no per-prompt "
                         f"outcomes)")
            continue
        try:
            d = intervals.paired_difference(intervals.from_rows(pa), intervals.from_rows(pb),
                                            shapes.TAGS)
        except ValueError:
            lines.append(f"- {a} - {b}: not paired (the rows were scored on different prompts)")
            continue
        hard = (f"; hard {intervals.fmt_difference(d[prompts.HARD_TAG])}"
                if prompts.HARD_TAG in d else "")
        lines.append(f"- {a} - {b}: overall {intervals.fmt_difference(d['overall'])}{hard}")
    if lines:  # the same prompts resampled for both rows: the shared difficulty cancels
        lines = ["", "Paired differences (95% paired bootstrap over the shared prompts):"] + lines
    return lines


def table(out: dict) -> str:
    hard = report.has_hard(out["rows"].values())
    cols = list(shapes.TAGS) + ["overall"] + ([prompts.HARD_TAG] if hard else [])
    head = "| row | " + " | ".join(cols) + " | NFE/image | NFE/sample | episodes | wall s |"
    lines = [f"Commit `{out['commit']}`, {out['config']}, {out['device']['device_kind']} "
             f"({out['device']['cpu_count']} CPU cores), {out['steps_per_row']} steps per row.", "",
             head, "|" + "---|" * (len(cols) + 5)]
    curve_lines = []
    if out.get("single_pass_curve"):
        pts = ", ".join(f"{m:g}x: {v:.3f}" for m, v in out["single_pass_curve"])
        match = out.get("single_pass_multiple_to_match")
        max_m = max(m for m, _ in out["single_pass_curve"])
        verdict = ("not reached within the measured range (up to "
                   f"{max_m:g}x)" if match is None else f"{match:.2f}x the row budget")
        curve_lines = ["", f"Single-pass learning curve (overall; learning_curve.svg): {pts}.",
                       f"Single-pass training needed to match the full method: {verdict}."]
    for row, r in sorted(out["rows"].items(), key=lambda kv: ROWS.index(kv[0])):
        resumed = (f" (resumed at step {r['start_step']})" if r.get("start_step") else
                   f" (phase 1 resumed at step {r['phase1_start_step']})"
                   if r.get("phase1_start_step") else "")
        lines.append(f"| {row} | " + " | ".join(report.score_cells(r, hard))
                     + f" | {r['nfe_per_image']:.1f} | {r['nfe_per_sample']:.1f} | "
                     f"{r['episodes']}{seen(r)} | {r['wall_s']:.0f}{resumed} |")
    if any(r.get("intervals") for r in out["rows"].values()):
        lines += ["", "Brackets: 95% bootstrap intervals over prompts (prompts resampled within "
                  "each category, each keeping its images)."
                  + (" `hard`: the harder split, scored apart, not part of overall." if hard else "")]
    runs = {(r.get("commit"), r.get("config_sha"), r.get("device_kind"))
            for r in out["rows"].values()}
    if len(runs) > 1:  # rows kept from earlier runs in this workdir: say which is which
        lines += ["", "Rows from more than one run: " + ", ".join(
            f"{row} at {r.get('commit')} on {r.get('device_kind') or 'a device not recorded'} "
            f"(config {r.get('config_sha') or 'not recorded'})"
            for row, r in sorted(out["rows"].items(), key=lambda kv: ROWS.index(kv[0]))) + "."]
    if "self_critique" not in out["rows"]:
        curve_lines = curve_lines[:2]  # no full-method score to compare with yet
    insp = [f"- {row}: {inspection.line(r['inspection'])}"
            + (f"; {inspection_probe.line(r['inspection_probe'])}"
               if r.get("inspection_probe") else "")
            + (f"; {injection.line(r['injection'])}" if r.get("injection") else "")
            for row, r in sorted(out["rows"].items(), key=lambda kv: ROWS.index(kv[0]))
            if r.get("inspection")]
    if insp:  # a false alarm redraws a right canvas; a miss keeps a wrong one
        insp = ["", "Inspection against the exact checker, per process row:"] + insp
    return "\n".join(lines + curve_lines + paired_lines(out["rows"]) + insp)
