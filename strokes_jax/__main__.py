"""One entry point: `python -m strokes_jax <command> --workdir DIR [--config FILE[:variant]]`.

Commands:
  demo        build data, train, generate single-pass and process-driven, score, report
  build-data  write the shapes episodes (TFDS, ArrayRecord) into the data dir
  train       train or resume in --workdir
  evaluate    load the newest checkpoint in --workdir, generate both ways, score, report
  bench       time training steps of --config on synthetic batches; JSON into --workdir
  reproduce   the ablation ladder (single-pass ... + self-sampled critique), one table
  self-critique  sample the trained model on training prompts, inspect with the exact checker,
              write the critique episodes to <workdir>/self_critique/ (ArrayRecord + stats)
  convert     `convert bagel --ema ... --ae ... --out DIR` or `convert params`: BAGEL-7B-MoT
              safetensors -> Orbax (strokes_jax/convert/__main__.py; its own options, so
              `convert` must come first and --workdir does not apply)
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", "shapes_tiny.py")
config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "ml_collections config file",
                                lock_config=True)
flags.DEFINE_string("workdir", "runs/shapes_tiny", "where data, checkpoints, logs and the report go")

FLAGS = flags.FLAGS
COMMANDS = ("demo", "build-data", "train", "evaluate", "bench", "self-critique", "reproduce")


def _print_summary(payload: dict) -> None:
    from strokes_jax.evaluate import report
    print("\n" + report.score_table(payload["results"]))
    print(f"\nreport: {payload['report_path']}")
    print("timings (s): " + json.dumps({k: round(v, 1) for k, v in payload["timings"].items()}))


def main(argv):
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"usage: python -m strokes_jax {{{'|'.join(COMMANDS)}}} "
                             f"[--workdir DIR] [--config FILE], or python -m strokes_jax "
                             f"convert {{bagel|params}} ... (convert first)")
    cmd, config, workdir = argv[1], FLAGS.config, FLAGS.workdir
    config_name = os.path.basename(config_flags.get_config_filename(FLAGS["config"]))
    # Orbax and TFDS log every file operation at INFO; progress is printed instead.
    logging.getLogger().setLevel(logging.WARNING)
    from strokes_jax.train import loop
    from strokes_jax.evaluate import job

    t0 = time.time()
    if cmd == "bench":
        from strokes_jax import bench
        out = bench.run(config, config_name, workdir)
        print(json.dumps(out, indent=1))
        return
    if cmd == "reproduce":
        from strokes_jax.evaluate import reproduce
        out = reproduce.run(config, config_name, workdir)
        print(reproduce.table(out))
        return
    if cmd == "self-critique":
        setup, _ = loop.restore_for_eval(config, workdir)
        stats = job.self_critique(setup, config, workdir)
        print(json.dumps(stats, indent=1))
        return
    if cmd == "build-data":
        loop.prepare_data(config, workdir)
        return
    timings = {}
    if cmd in ("demo", "train"):
        sources = loop.prepare_data(config, workdir)
        timings["data"] = time.time() - t0
        setup, summary = loop.train(config, workdir, sources)
        timings["train"] = summary["train_seconds"]
        print(f"trained {summary['start_step']} -> {summary['end_step']} steps; last losses "
              f"{summary['losses'][-3:]}")
        if cmd == "train" or summary["preempted"]:
            return  # preempted: the checkpoint is saved; rerun the command to resume
    else:
        setup, summary = loop.restore_for_eval(config, workdir)
    payload = job.run(setup, config, workdir, config_name, summary, timings)
    payload["timings"]["total"] = time.time() - t0
    _print_summary(payload)


def run():
    # convert has its own argparse options (--ema, --ae, --out, a plain-path --config) that
    # absl's flag parser would reject or misread, so it is dispatched before absl sees argv.
    if sys.argv[1:2] == ["convert"]:
        from strokes_jax.convert.__main__ import main as convert_main
        sys.exit(convert_main(sys.argv[2:], prog="python -m strokes_jax convert"))
    app.run(main)


if __name__ == "__main__":
    run()
