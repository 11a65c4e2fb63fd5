"""The one command-line door: `python -m strokes_jax COMMAND [options]`.

Config commands take `--workdir DIR`, `--config NAME[:ARG]` (a packaged config such as
`shapes_repro:long`, or a path) and per-key overrides `--config.optim.lr=3e-4`; unknown
keys fail before anything compiles. `convert`, `checkpoints`, `sweep`, `pod`, `geneval`,
`wise`, `bench-generate`, `bench-convert` and `bench-int8` have options of their own (`COMMAND --help`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from absl import flags
from ml_collections import config_flags

from strokes_jax import configs, exits

# command -> one line of help. The first group reads --config/--workdir.
CONFIG_COMMANDS = {
    "demo": "build data, train, generate single-pass and process-driven, score, write the report",
    "build-data": "write the episodes (the shapes world's, or a manifest's) as ArrayRecord",
    "train-ae": "train the autoencoder of block `vae` on the shapes world's pictures into "
                "world.ae_path (default <workdir>/ae); report its checker pass rate",
    "train": "train, or resume from the newest checkpoint in --workdir",
    "evaluate": "load the newest checkpoint in --workdir, generate both ways, score, report",
    "self-critique": "sample the trained model, inspect its steps with the exact checker, "
                     "write critique episodes",
    "inject": "load the newest checkpoint in --workdir, put known mistakes into its process "
              "episodes (eval.inject_kinds at eval.inject_at), report caught / repaired / final",
    "reproduce": "the ablation ladder (single-pass ... full method), one table",
    "generate": "paint --prompt / --prompts with the newest checkpoint in --workdir: images, "
                "trajectory text and a filmstrip per sample",
    "memory": "bytes per device of a training step for --config on --devices N, for each "
              "train.freeze choice, before anything compiles",
    "bench": "time training steps of --config on synthetic batches; JSON into --workdir",
    "bench-input": "time the real input pipeline of --config batch by batch against its training "
                   "step; JSON into --workdir",
}
OWN_OPTIONS = {
    "convert": "BAGEL-7B-MoT, Qwen2, FLUX AE or SigLIP safetensors -> Orbax params, or parameter counts "
               "(convert --help)",
    "bench-generate": "time cached vs uncached generation on a shapes model; JSON",
    "bench-convert": "peak host memory of `convert bagel` on a synthetic checkpoint; JSON",
    "bench-int8": "device memory of one generation call with bf16 weights and with int8 expert kernels "
                  "(bench-int8 --help)",
    "checkpoints": "verify every checkpoint step of --workdir against its checksums (checkpoints --help)",
    "sweep": "run a config's declared sweep (resumable) or gather its results table (sweep --help)",
    "pod": "TPU pod slices through gcloud: create, run a job on every worker, follow, reattach, delete "
           "(pod --help)",
    "geneval": "GenEval: paint the official prompts into its folder layout, score shapes, print the official "
               "summary (geneval --help)",
    "wise": "WISE: paint its prompts both ways, judge through an OpenAI-compatible endpoint, three scorings "
            "(wise --help)",
}
COMMANDS = tuple(CONFIG_COMMANDS) + tuple(OWN_OPTIONS)
EXIT_PREEMPTED = exits.PREEMPTED  # distinct from 0 / 1 / 2, so a retry loop can tell
_DEFAULT_CONFIG = os.path.join(configs.HERE, configs.DEFAULT + ".py")

config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "config NAME[:ARG] or PATH[:ARG]",
                                lock_config=True)
flags.DEFINE_string("workdir", "runs/shapes_tiny", "where data, checkpoints, logs and the report go")
flags.DEFINE_bool("verbose", False, "show the traceback of a project error, not one line")
flags.DEFINE_bool("allow_config_change", False, "resume or evaluate a workdir whose run was made "
                  "with another config")
# generate's own flags.
flags.DEFINE_multi_string("prompt", [], "generate: a prompt (repeatable)")
flags.DEFINE_string("prompts", None, "generate: a prompts file, one per line or JSONL with \"prompt\"")
flags.DEFINE_enum("mode", "process", ["process", "single", "both"], "generate: how to paint")
flags.DEFINE_integer("n", 1, "generate: samples per prompt and mode", lower_bound=1)
flags.DEFINE_string("out", None, "generate: output folder (default <workdir>/generate)")
# bench-input's own flags.
flags.DEFINE_string("bound_config", None, "bench-input: a config whose model's step time at the "
                    "--device's peak (default H100) the input must stay under")
flags.DEFINE_integer("input_batches", 20, "bench-input: batches timed", lower_bound=1)
flags.DEFINE_integer("input_steps", 5, "bench-input: training steps of --config's model timed on "
                     "those batches (0: none, for rows this machine cannot train on; use "
                     "--bound_config)", lower_bound=0)
# memory's own flags.
flags.DEFINE_integer("devices", 8, "memory: devices the mesh spans", lower_bound=1)
flags.DEFINE_string("device", None, "memory: h100, h200, a100, v5p, v5e, v6e, v4 or GB per device")
flags.DEFINE_bool("compile", False, "memory: also compile the step here (abstract shapes) and "
                  "print XLA's memory_analysis; needs --devices local devices")
FLAGS = flags.FLAGS


def usage() -> str:
    width = max(map(len, COMMANDS)) + 2
    lines = ["usage: python -m strokes_jax COMMAND [--workdir DIR] [--config NAME[:ARG]] "
             "[--config.KEY=VALUE ...]", "", "commands:"]
    lines += [f"  {c:<{width}}{h}" for c, h in {**CONFIG_COMMANDS, **OWN_OPTIONS}.items()]
    lines += ["", f"packaged configs: {', '.join(configs.NAMES)} (default {configs.DEFAULT})"]
    return "\n".join(lines)


def _print_summary(payload: dict) -> None:
    from strokes_jax.evaluate import report
    print("\n" + report.score_table(payload["results"]))
    print(f"\nreport: {payload['report_path']}")
    print("timings (s): " + json.dumps({k: round(v, 1) for k, v in payload["timings"].items()}))


def main(argv):
    """Runs a config command with the parsed FLAGS; argv = [program, command]."""
    cmd, config, workdir = argv[1], FLAGS.config, FLAGS.workdir
    config_name = os.path.basename(config_flags.get_config_filename(FLAGS["config"]))
    # Orbax and TFDS log every file operation at INFO; progress is printed instead.
    logging.getLogger().setLevel(logging.WARNING)
    from strokes_jax.train import loop
    from strokes_jax.evaluate import job

    t0 = time.time()
    loop.resolve_paths(config, workdir)
    if cmd == "train-ae":
        from strokes_jax.train import autoencoder
        report = autoencoder.train_ae(config, config.world["ae_path"] or
                                      os.path.join(workdir, "ae"))
        print(f"autoencoder: {autoencoder.summary(report)}")
        return
    if cmd == "bench":
        from strokes_jax.train import bench
        out = bench.run(config, config_name, workdir)
        print(json.dumps(out, indent=1))
        return
    if cmd == "bench-input":
        from strokes_jax.model.unified import ModelConfig
        from strokes_jax.train import input_bench
        bound = None
        if FLAGS.bound_config:
            bound = ModelConfig.from_config(configs.load(FLAGS.bound_config).model.to_dict())
        out = input_bench.run(config, config_name, workdir, batches=FLAGS.input_batches,
                              steps=FLAGS.input_steps, bound_model=bound,
                              bound_device=FLAGS.device or "H100")
        print(input_bench.summary(out))
        return
    if cmd == "reproduce":
        from strokes_jax.evaluate import reproduce
        out = reproduce.run(config, config_name, workdir)
        print(reproduce.table(out))
        return
    if cmd == "self-critique":
        setup, _ = loop.restore_for_eval(config, workdir, FLAGS.allow_config_change)
        stats = job.self_critique(setup, config, workdir)
        print(json.dumps(stats, indent=1))
        return
    if cmd == "inject":
        from strokes_jax.evaluate import injection
        setup, record = loop.restore_for_eval(config, workdir, FLAGS.allow_config_change)
        out = job.inject(setup, config, workdir, config_name, record.get("end_step"))
        print(injection.table(out))
        print(injection.line(out))
        return
    if cmd == "memory":
        from strokes_jax.train import memory
        print(memory.report(config, FLAGS.devices, FLAGS.device, FLAGS.compile))
        return
    if cmd == "generate":
        _generate(config, workdir)
        return
    if cmd == "build-data":
        loop.prepare_data(config, workdir, need_eval=False)
        return
    if cmd in ("demo", "train"):
        from strokes_jax.evaluate.train_images import TrainImages
        sources = loop.prepare_data(config, workdir)
        data_seconds = time.time() - t0
        setup, summary = loop.train(config, workdir, sources, eval_hooks=[TrainImages(config)],
                                    allow_config_change=FLAGS.allow_config_change)
        start, end = summary["start_step"], summary["end_step"]
        if end > start:
            record = loop.update_record(workdir, {}, timings={
                "data": data_seconds, "train": loop.training_record(workdir)["train_seconds"]})
            last = summary["losses"][-1] if summary["losses"] else None
            print(f"trained {start} -> {end} steps in {summary['train_seconds']:.0f}s"
                  + (f"; loss {last[1]:.4f} at step {last[0]}" if last else ""), flush=True)
        else:
            record = loop.training_record(workdir) or summary
            print(f"checkpoint at step {end} found in {os.path.join(workdir, 'checkpoints')}: "
                  f"nothing to train (train.steps={config.train.steps})", flush=True)
        if summary["preempted"]:
            print(f"preempted at step {end}: checkpoint saved; rerun the command to resume",
                  flush=True)
            sys.exit(EXIT_PREEMPTED)
        if cmd == "train":
            return
    else:
        setup, record = loop.restore_for_eval(config, workdir, FLAGS.allow_config_change)
    payload = job.run(setup, config, workdir, config_name, record, dict(record.get("timings", {})))
    payload["timings"]["this_command"] = time.time() - t0
    _print_summary(payload)


def _generate(config, workdir: str) -> None:
    from strokes_jax.evaluate import generate, job
    from strokes_jax.train import loop
    prompts = list(FLAGS.prompt)
    where = [f"--prompt {i + 1}" for i in range(len(prompts))]
    if FLAGS.prompts:
        from_file = generate.read_prompts(FLAGS.prompts)
        prompts += from_file
        where += [f"{FLAGS.prompts}: prompt {i + 1}" for i in range(len(from_file))]
    if not prompts:
        raise generate.PromptError("generate needs --prompt TEXT (repeatable) or --prompts FILE")
    setup, record = loop.restore_for_eval(config, workdir, FLAGS.allow_config_change)
    generate.check_prompts(setup.etok, prompts, where)
    out = FLAGS.out or os.path.join(workdir, "generate")
    gen = job.make_generator(setup, config, config.eval.seed)
    rows = generate.run(gen, prompts, out, modes=generate.MODES[FLAGS.mode], n=FLAGS.n,
                        batch_size=int(config.eval.batch_size), seed=int(config.eval.seed))
    print(f"step {record['end_step']}: " + generate.summary(rows).replace("\n", "\n  "))
    print(f"wrote {len(rows)} samples to {out} (samples.jsonl lists them)")


# Notices that native libraries write straight to the stderr file descriptor at import, for
# every run: absl's "before InitializeLog" preamble, TensorFlow's oneDNN and CPU-feature notes.
_NATIVE_NOTICES = ("All log messages before absl::InitializeLog()", "oneDNN custom operations",
                   "cpu_feature_guard", "To enable the following instructions",
                   "rebuild TensorFlow with the appropriate compiler flags")


def _import_native_quietly() -> None:
    """Imports TensorFlow (TFDS and clu use it), starts jax.distributed where the environment
    asks for it, and brings up JAX's backend, with file descriptor 2 captured; then passes on
    every line that is not one of the known notices."""
    import tempfile
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            try:
                import tensorflow  # noqa: F401
            except ImportError:
                pass
            from strokes_jax import distributed
            distributed.initialize()
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        for line in tmp.read().decode(errors="replace").splitlines():
            if line.strip() and not any(n in line for n in _NATIVE_NOTICES):
                print(line, file=sys.stderr)


def _fail(message: str) -> None:
    lines = [line for line in str(message).splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):
        lines = lines[-1:]  # a config file raised: its own message, not the traceback
        lines[0] = lines[0].split(": ", 1)[-1] if "Error: " in lines[0] else lines[0]
    print(f"error: {' '.join(' '.join(lines).split())}", file=sys.stderr)
    sys.exit(2)


def _unknown_override(args: list[str]) -> str | None:
    """The first `--config.KEY=VALUE` whose KEY the schema lacks, as a one-line message."""
    from strokes_jax.configs import schema
    for a in args:
        if a.startswith("--config.") and (bad := schema.unknown_path(a[len("--config."):].partition("=")[0])):
            return f"unknown config key {bad}"
    return None


def _check_workdir(workdir: str) -> None:
    """The workdir must be a folder this process can write (created when missing)."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"--workdir {workdir}: is a file, not a folder")
    probe = workdir
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.access(probe or ".", os.W_OK | os.X_OK):
        raise ValueError(f"--workdir {workdir}: {probe or '.'} is not writable")


def _resolve_config_arg(args: list[str]) -> list[str]:
    """Replaces a `--config NAME[:ARG]` value by the packaged file's path, so a missing file
    fails here, before JAX or TensorFlow is imported."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if a == "--config" and i + 1 < len(args):
            out += [a, configs.resolve(args[i + 1])]
            i += 2
            continue
        if a.startswith("--config="):
            a = "--config=" + configs.resolve(a[len("--config="):])
        out.append(a)
        i += 1
    return out


def run(argv=None):
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(usage(), file=sys.stdout if len(argv) >= 2 else sys.stderr)
        sys.exit(0 if len(argv) >= 2 else 2)
    cmd, rest = argv[1], argv[2:]
    if cmd not in COMMANDS:
        _fail(f"unknown command {cmd!r}; `python -m strokes_jax --help` lists them")
    prog = f"python -m strokes_jax {cmd}"
    if cmd == "convert":
        from strokes_jax.convert.cli import main as convert_main
        sys.exit(convert_main(rest, prog=prog))
    if cmd == "bench-generate":
        from strokes_jax.inference import bench as generate_bench
        sys.exit(generate_bench.main(rest, prog=prog))
    if cmd == "checkpoints":
        from strokes_jax.train import checkpoint
        sys.exit(checkpoint.main(rest, prog=prog))
    if cmd == "sweep":
        from strokes_jax import sweeps
        sys.exit(sweeps.main(rest, prog=prog))
    if cmd == "pod":
        from strokes_jax.launch import cli as pod_cli
        sys.exit(pod_cli.main(rest, prog=prog))
    if cmd in ("geneval", "wise"):
        from strokes_jax.benchmarks import cli as benchmarks_cli
        sys.exit(benchmarks_cli.main(cmd, rest, prog=prog, prepare=_import_native_quietly))
    if cmd == "bench-convert":
        from strokes_jax.convert import memory_bench
        sys.exit(memory_bench.main(rest, prog=prog))
    if cmd == "bench-int8":
        from strokes_jax.inference import int8_memory
        sys.exit(int8_memory.main(rest, prog=prog))
    if any(a in ("-h", "--help", "--helpfull") for a in rest):
        print(f"{prog}: {CONFIG_COMMANDS[cmd]}\n\noptions:\n  --workdir DIR\n"
              f"  --config NAME[:ARG] | PATH[:ARG]   packaged: {', '.join(configs.NAMES)}\n"
              f"  --config.SECTION.KEY=VALUE        any key of strokes_jax/configs/schema.py\n"
              f"  --allow_config_change             resume / evaluate a workdir made with another config\n"
              f"  --verbose                         tracebacks for project errors")
        sys.exit(0)
    try:
        rest = _resolve_config_arg(rest)
        FLAGS([argv[0]] + rest)
        from strokes_jax.configs import schema
        schema.check(FLAGS.config)
        if "://" not in FLAGS.workdir:  # remote (gs://) workdirs are checked by their filesystem
            _check_workdir(FLAGS.workdir)
    except (configs.ConfigNotFound, flags.Error, KeyError, AttributeError, TypeError,
            ValueError) as e:
        _fail(_unknown_override(rest) or (e.args[0] if getattr(e, "args", None) else e))
    _import_native_quietly()
    from strokes_jax.configs import schema
    from strokes_jax.train import run_info
    from strokes_jax.evaluate.generate import PromptError
    from strokes_jax.train.checkpoint import CheckpointError
    from strokes_jax.train.init_weights import WeightsMismatch
    from strokes_jax.episodes.jsonl import DataError
    try:
        main([argv[0], cmd])
    except (run_info.ConfigMismatch, schema.ConfigKeyError, FileNotFoundError,
            NotImplementedError, PromptError, DataError, CheckpointError, WeightsMismatch) as e:
        if FLAGS.verbose:
            raise
        _fail(e)


if __name__ == "__main__":
    run()
