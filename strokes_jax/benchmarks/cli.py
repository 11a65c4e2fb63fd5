"""`python -m strokes_jax geneval ...` and `python -m strokes_jax wise ...` (docs/benchmarks.md).

Generation subcommands take the config commands' `--config NAME[:ARG]`, `--workdir DIR` and
`--config.KEY=VALUE` overrides and restore the newest checkpoint as `evaluate` does; the
others read files only and never bring up JAX. Bad input is one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from strokes_jax import configs, exits
from strokes_jax.benchmarks import geneval, geneval_official, wise
from strokes_jax.benchmarks.store import BenchmarkError

EXIT_BAD_INPUT = exits.BAD_INPUT
EXIT_INCOMPLETE = 3  # judging stopped early (budget spent, or some images failed): rerun


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="shapes_tiny", help="config NAME[:ARG] or PATH[:ARG] (as `train`)")
    p.add_argument("--workdir", required=True, help="the trained workdir whose newest checkpoint paints")
    p.add_argument("--out", help="output folder (default under --workdir)")
    p.add_argument("--seed", type=int, help="generation seed (default: the config's eval.seed)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="use a workdir trained with another config")


def _parser(cmd: str, prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, allow_abbrev=False, epilog="generation subcommands also "
                                     "take --config.KEY=VALUE overrides")
    sub = parser.add_subparsers(dest="action", required=True)
    if cmd == "geneval":
        p = sub.add_parser("generate", allow_abbrev=False, help="paint the prompts into GenEval's folder layout "
                           "(resumable)")
        p.add_argument("--metadata", required=True, help="evaluation_metadata.jsonl (or BAGEL's _long variant, "
                       "or an export-shapes file)")
        p.add_argument("--n", type=int, default=4, help="images per prompt (GenEval: 4)")
        p.add_argument("--mode", choices=tuple(geneval.GEN_MODES), default="process")
        _model_args(p)
        p = sub.add_parser("export-shapes", allow_abbrev=False,
                           help="the shapes world's prompts as a GenEval metadata file")
        p.add_argument("--out", required=True)
        p.add_argument("--per-tag", type=int, default=10)
        p.add_argument("--seed", type=int, default=0)
        p = sub.add_parser("score-shapes", allow_abbrev=False, help="score a folder of shapes prompts with the "
                           "exact detector into the official results format, print the summary")
        p.add_argument("root")
        p.add_argument("--outfile", help="default ROOT/results.jsonl")
        p = sub.add_parser("summary", allow_abbrev=False, help="summary_scores.py's table for a results file")
        p.add_argument("results")
        p = sub.add_parser("official-command", allow_abbrev=False,
                           help="the commands that score a folder with the official detector")
        p.add_argument("root")
        p.add_argument("--outfile")
    else:
        p = sub.add_parser("generate", allow_abbrev=False, help="paint WISE's prompts (both modes, trajectories)")
        p.add_argument("--prompts", nargs="+", required=True, help="WISE prompt files (JSON arrays)")
        p.add_argument("--mode", choices=tuple(wise.MODES), default="both")
        _model_args(p)
        p = sub.add_parser("judge", allow_abbrev=False, help="judge a generated folder with an OpenAI-compatible "
                           "endpoint (cached, resumable)")
        p.add_argument("root")
        p.add_argument("--url", required=True, help="API base, e.g. http://127.0.0.1:8000/v1")
        p.add_argument("--model", required=True, help="the judge model's name at that endpoint")
        p.add_argument("--api-key-env", help="name of the environment variable holding the API key")
        p.add_argument("--protocol", choices=("auto", "legacy", "verified"), default="auto",
                       help="auto: the judge the prompt set was made for")
        p.add_argument("--mode", choices=tuple(wise.MODES), help="default: every mode generated")
        p.add_argument("--max-requests", type=int, help="stop after this many requests (retries included)")
        p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
        p.add_argument("--attempts", type=int, default=3, help="tries per image")
        p.add_argument("--backoff", type=float, default=2.0, help="seconds before the first retry (doubling)")
        p.add_argument("--workers", type=int, default=4, help="requests in flight")
        p = sub.add_parser("scores", allow_abbrev=False, help="the three conventions side by side")
        p.add_argument("roots", nargs="+")
    return parser


def _overrides(parser, args, extra: list[str]) -> dict:
    return configs.overrides(extra, args.action == "generate", parser.error)


def _restore(args, overrides: dict, prepare):
    """(config, setup, generator, model record) from the workdir's newest checkpoint."""
    from strokes_jax import configs, sweeps
    from strokes_jax.configs import schema

    try:
        config = configs.load(args.config)
        for k, v in overrides.items():
            sweeps._apply(config, k, v, from_text=True)  # the override semantics of the rest of the CLI
        schema.check(config)
    except (configs.ConfigNotFound, schema.ConfigKeyError, sweeps.SweepError) as e:
        raise BenchmarkError(str(e)) from None
    if prepare is not None:
        prepare()
    logging.getLogger().setLevel(logging.WARNING)  # Orbax logs every file operation at INFO
    import jax
    from strokes_jax.evaluate import job
    from strokes_jax.train import loop

    if jax.process_count() > 1:
        raise BenchmarkError("generation runs in one process: run it on one host")
    from strokes_jax.train import run_info
    try:
        setup, rec = loop.restore_for_eval(config, args.workdir, args.allow_config_change)
    except run_info.ConfigMismatch as e:
        raise BenchmarkError(str(e)) from None
    seed = int(config.eval.seed) if args.seed is None else args.seed
    gen = job.make_generator(setup, config, seed)
    model = {"config": args.config, "overrides": dict(sorted(overrides.items())),
             "checkpoint_step": int(rec["end_step"]), "sampling": _jsonable(dataclasses.asdict(gen.options))}
    return config, setup, gen, model, seed


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _check_vocabulary(setup, texts, where) -> None:
    from strokes_jax.evaluate import generate
    try:
        generate.check_prompts(setup.etok, texts, where)
    except generate.PromptError as e:
        raise BenchmarkError(str(e)) from None


def _geneval(args, overrides, prepare) -> int:
    if args.action == "export-shapes":
        n = geneval.export_shapes(args.out, args.seed, args.per_tag)
        print(f"wrote {n} shapes-world prompts in GenEval's metadata format to {args.out}")
        return 0
    if args.action == "score-shapes":
        path, rows = geneval.score_shapes(args.root, args.outfile)
        print(geneval_official.summary(path), end="")
        print(f"\nresults (official format): {path}")
        return 0
    if args.action == "summary":
        print(geneval_official.summary(args.results), end="")
        return 0
    if args.action == "official-command":
        print(geneval_official.official_command(args.root, args.outfile))
        return 0
    entries = geneval.read_metadata(args.metadata)
    if args.n < 1:
        raise BenchmarkError(f"--n {args.n}: needs at least one image per prompt")
    config, setup, gen, model, seed = _restore(args, overrides, prepare)
    _check_vocabulary(setup, [e.prompt for e in entries], [e.where for e in entries])
    root = args.out or os.path.join(args.workdir, "geneval", args.mode)
    record = geneval.run_record(args.metadata, args.n, args.mode, seed, model)
    out = geneval.generate(gen, entries, root, n=args.n, mode=args.mode, seed=seed, record=record)
    print(f"{out['prompts']} prompts x {args.n} images in {root} ({geneval.variant(args.metadata)}; "
          f"{out['skipped']} already there, {out['generated']} painted, {out['redone']} of them redone)")
    print("\nTo score them with the official detector:\n" + geneval_official.official_command(root))
    return 0


def _wise(args, overrides, prepare) -> int:
    if args.action == "scores":
        for root in args.roots:
            print(wise.table(wise.root_scores(root), title=f"WISE scores in {root}"))
        return 0
    if args.action == "judge":
        return _judge(args)
    prompts = wise.read_prompts(args.prompts)
    config, setup, gen, model, seed = _restore(args, overrides, prepare)
    _check_vocabulary(setup, [p.prompt for p in prompts], [p.where for p in prompts])
    root = args.out or os.path.join(args.workdir, "wise")
    batch = int(config.eval.batch_size)
    record = wise.run_record(args.prompts, prompts, seed, batch, model)
    counts = wise.generate(gen, prompts, root, modes=wise.MODES[args.mode], seed=seed, batch_size=batch,
                           record=record)
    for m, c in counts.items():
        print(f"{m}: {c['prompts']} prompts in {os.path.join(root, m, 'images')} ({c['generated']} painted now)")
    print(f"prompt set: {wise.prompt_set(prompts)}; judge with: python -m strokes_jax wise judge {root} "
          f"--url URL --model NAME --api-key-env VAR")
    return 0


def _judge(args) -> int:
    from strokes_jax.benchmarks import judge as judge_mod

    prompts = wise.load_root_prompts(args.root)
    protocol = wise.default_protocol(prompts) if args.protocol == "auto" else args.protocol
    key = None
    if args.api_key_env:
        key = os.environ.get(args.api_key_env)
        if not key:
            raise BenchmarkError(f"--api-key-env {args.api_key_env}: that environment variable is not set")
    for name, v, lo in (("--attempts", args.attempts, 1), ("--workers", args.workers, 1),
                        ("--max-requests", args.max_requests, 0)):
        if v is not None and v < lo:
            raise BenchmarkError(f"{name} {v}: must be at least {lo}")
    cache = judge_mod.Cache(os.path.join(args.root, "judge_cache.jsonl"))
    ep = judge_mod.Endpoint(args.url, args.model, key, args.timeout, args.attempts, args.backoff)
    judge = judge_mod.Judge(ep, cache, args.max_requests, log=lambda m: print(m, file=sys.stderr))
    modes = wise.MODES[args.mode] if args.mode else None
    out = wise.judge_root(args.root, judge, protocol, modes, args.workers)
    for m, c in out["modes"].items():
        print(f"{m}: {c['judged']} of {c['images']} images judged ({protocol} protocol, {args.model})")
    print(f"{out['requests']} requests sent; cache {cache.path} holds {len(cache)} verdicts")
    print(wise.table(wise.root_scores(args.root), title=f"WISE scores in {args.root}"))
    if out["budget_spent"]:
        print(f"stopped: --max-requests {args.max_requests} spent; rerun to go on (cached verdicts are "
              f"not asked again)", file=sys.stderr)
        return EXIT_INCOMPLETE
    if out["failures"]:
        print(f"{len(out['failures'])} images got no verdict (prompt ids "
              f"{sorted(p for p, _ in out['failures'])[:20]}); rerun to retry them", file=sys.stderr)
        return EXIT_INCOMPLETE
    return 0


def main(cmd: str, argv: list[str], prog: str, prepare=None) -> int:
    """`prepare`: called once before JAX comes up (the CLI's quiet native imports)."""
    parser = _parser(cmd, prog)
    args, extra = parser.parse_known_args(argv)
    overrides = _overrides(parser, args, extra)
    from strokes_jax.benchmarks.judge import JudgeError
    try:
        return (_geneval if cmd == "geneval" else _wise)(args, overrides, prepare)
    except (BenchmarkError, JudgeError, FileNotFoundError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
