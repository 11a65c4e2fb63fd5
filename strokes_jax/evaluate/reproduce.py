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

  python -m strokes_jax reproduce --config configs/shapes_repro.py --workdir runs/repro
"""

from __future__ import annotations

import copy
import json
import os
import time

from strokes_jax.evaluate import job, report
from strokes_jax.train import loop

ROWS = ("single_pass", "additive", "edits", "symbolic_critique", "self_critique")


def row_config(config, row: str):
    c = copy.deepcopy(config)
    mixes = dict(config.reproduce.mixes)
    c.data.mix = dict(mixes["symbolic_critique" if row == "self_critique" else row])
    return c


class Preempted(RuntimeError):
    """A row's training stopped on a preemption notice: the reproduction stops too (its
    checkpoints stay; rerunning the command resumes the row)."""


def _train(c, workdir: str):
    setup, summary = loop.train(c, workdir)
    if summary["preempted"]:
        raise Preempted(f"training in {workdir} was preempted at step {summary['end_step']}")
    return setup, summary


def _train_eval(c, workdir: str, modes, name: str):
    setup, summary = _train(c, workdir)
    payload = job.run(setup, c, workdir, name, summary, {"train": summary["train_seconds"]},
                      modes=modes)
    return setup, summary, payload


def run(config, config_name: str, workdir: str, rows=ROWS) -> dict:
    total, frac = config.train.steps, config.reproduce.phase2_fraction
    out = {"config": config_name, "commit": report.git_commit(), "device": report.device_info(),
           "steps_per_row": total, "rows": {}}
    for row in rows:
        t0 = time.time()
        c = row_config(config, row)
        modes = ("single_pass",) if row == "single_pass" else ("process",)
        rowdir = os.path.join(workdir, row)
        if row != "self_critique":
            _, summary, payload = _train_eval(c, rowdir, modes, f"{config_name}:{row}")
            episodes = c.data.num_train
        else:
            p1 = copy.deepcopy(c)
            p1.train.steps = p1.optim.total_steps = total - int(round(frac * total))
            setup, _ = _train(p1, rowdir + "_phase1")
            crit = job.self_critique(setup, p1, rowdir + "_phase1")
            c.train.init_from = rowdir + "_phase1"
            c.train.steps = c.optim.total_steps = total - p1.train.steps
            c.data.extra_sources = ({"path": crit["path"],
                                     "weight": float(config.reproduce.self_critique_weight)},)
            _, summary, payload = _train_eval(c, rowdir, modes, f"{config_name}:{row}")
            episodes = c.data.num_train + crit["episodes"]
            out["self_critique_outcomes"] = crit["outcomes"]
        res = payload["results"][modes[0]]
        out["rows"][row] = {"mode": modes[0], "scores": res["scores"],
                            "nfe_per_image": res["nfe_per_image"],
                            "nfe_per_sample": res["nfe_per_sample"],
                            "episodes": episodes, "wall_s": time.time() - t0,
                            "train_steps": total, "final_loss": summary["losses"][-1][1]
                            if summary["losses"] else None}
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "reproduction.json"), "w") as f:
        json.dump(out, f, indent=1)
    with open(os.path.join(workdir, "reproduction.md"), "w") as f:
        f.write(table(out) + "\n")
    return out


def table(out: dict) -> str:
    head = ("| row | single_object | two_object | counting | colors | position | color_attr | "
            "overall | NFE/image | NFE/sample | episodes | wall s |")
    lines = [f"Commit `{out['commit']}`, {out['config']}, {out['device']['device_kind']} "
             f"({out['device']['cpu_count']} CPU cores), {out['steps_per_row']} steps per row.", "",
             head, "|" + "---|" * 12]
    for row, r in out["rows"].items():
        sc = r["scores"]
        lines.append(f"| {row} | " + " | ".join(f"{sc.get(t, float('nan')):.2f}" for t in (
            "single_object", "two_object", "counting", "colors", "position", "color_attr"))
            + f" | {sc['overall']:.3f} | {r['nfe_per_image']:.1f} | {r['nfe_per_sample']:.1f} | "
            f"{r['episodes']} | {r['wall_s']:.0f} |")
    return "\n".join(lines)
