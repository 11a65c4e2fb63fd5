"""Generate both ways with a trained model, score with the exact checker, write the report."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

from clu import metric_writers

from strokes_jax.episodes import self_critique as sc
from strokes_jax import files, provenance
from strokes_jax.evaluate import injection, inspection, inspection_probe, report, shapes_bench
from strokes_jax.inference.generator import Generator, SamplingOptions


def sampling_options(config) -> SamplingOptions:
    """The evaluation's sampling: flow.sample_steps / sample_shift, the eval caps, and BAGEL's
    text / image CFG when eval.cfg_text_scale / eval.cfg_img_scale != 1."""
    ec = config.eval
    return SamplingOptions(
        flow_steps=int(config.flow["sample_steps"]), shift=float(config.flow["sample_shift"]),
        max_iterations=int(ec.max_iterations), max_text_tokens=int(ec.max_text_tokens),
        cfg_text_scale=float(ec.cfg_text_scale), cfg_img_scale=float(ec.cfg_img_scale),
        cfg_interval=tuple(float(t) for t in ec.cfg_interval), cfg_renorm=str(ec.cfg_renorm))


def make_generator(setup, config, seed: int = 0, *, bind_params: bool = True) -> Generator:
    """A generator with sampling_options(config). eval.kv_cache: the KV-cache backend (prefill
    once, decode from the cache; same outputs, several times faster, and the only one with
    CFG). bind_params=False leaves the parameters to each call, for a caller whose parameters
    change between calls (no stale copy is kept alive)."""
    if config.eval.kv_cache:
        from strokes_jax.inference.kv_cache import KVCacheBackend as backend
    else:
        from strokes_jax.inference.uncached import UncachedBackend as backend
    max_len = int(config.eval.get("max_len", 0)) or config.data.seq_len
    model, params = setup.model, setup.state.eval_params() if bind_params else None
    # Weight-only int8 experts (BAGEL on a 16 GB chip). The training-time filmstrips pass
    # their parameters per call and stay in float: quantizing every call would cost more.
    if config.eval.get("int8", False) and params is not None:
        from strokes_jax.model import quantize
        model, params = quantize.quantize(model, params)
    return Generator(backend(model, setup.etok, max_len=max_len), params,
                     options=sampling_options(config), seed=seed)


def _to_tensorboard(workdir: str, payload: dict, filmstrips: dict) -> None:
    """Scores and filmstrips next to the training curves (TensorBoard under <workdir>/tb)."""
    step = int(payload.get("train", {}).get("end_step", 0))
    w = metric_writers.create_default_writer(os.path.join(workdir, "tb"), just_logging=False)
    for mode, r in payload["results"].items():
        w.write_scalars(step, {f"eval/{mode}/{k}": v for k, v in r["scores"].items()})
    if filmstrips:
        w.write_images(step, {f"filmstrips/{n}": img[None] for n, img in filmstrips.items()})
    w.flush()


def self_critique(setup, config, workdir: str) -> dict:
    """Self-sampled critique episodes from the trained model, as a new ArrayRecord split."""
    c = config.self_critique
    out_dir = os.path.join(workdir, "self_critique")
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    prompts = sc.training_prompts(c.seed, c.num_prompts)
    rollouts = int(c.get("rollouts", 1))
    gen = make_generator(setup, config, c.seed)
    options = dataclasses.replace(gen.options, text_temperature=float(c.text_temperature))
    # Each rollout of a prompt draws its own noise (the generator's stream moves on).
    episodes, counts = sc.sample_and_critique(gen, prompts * rollouts, config.eval.batch_size,
                                              f"self{c.seed}", options=options)
    max_positive = float(c.get("max_positive_fraction", 1.0))
    episodes, made_up = sc.balance(episodes, max_positive)
    path = os.path.join(out_dir, "episodes.array_record")
    sc.write_array_record(episodes, path)
    stats = {"path": path, "episodes": len(episodes), "outcomes": counts, "split": made_up,
             "prompts": len(prompts), "rollouts": rollouts,
             "text_temperature": options.text_temperature,
             "max_positive_fraction": max_positive,
             "seconds": time.time() - t0}
    with open(os.path.join(out_dir, "stats.json"), "w") as f:
        json.dump(stats, f, indent=1)
    return stats


def _summarize(samples, bench) -> dict:
    out = shapes_bench.summarize(samples)
    if samples and samples[0].mode == "process":
        out["inspection"] = inspection.confusion(samples, bench)
    return out


def filmstrip_picks(samples, n: int, key=lambda s: s.tag) -> list:
    """n samples taken from each category (`key`) in turn (the first of each, then the
    second...), so the filmstrips cover every category that has samples."""
    by_tag: dict[str, list] = {}
    for s in samples:
        by_tag.setdefault(key(s), []).append(s)
    queues = list(by_tag.values())
    out = []
    for k in range(max((len(q) for q in queues), default=0)):
        out += [q[k] for q in queues if k < len(q)]
    return out[:n]


def run(setup, config, workdir: str, config_name: str, train_summary: dict | None = None,
        timings: dict | None = None, modes=shapes_bench.MODES) -> dict:
    import jax
    if jax.process_count() > 1:
        # The generators read back every example's logits on the host each turn, which a
        # parameter set spread over several processes does not allow yet.
        raise NotImplementedError("generation runs in one process: after a multi-process "
                                  "`train`, run `evaluate` with the same --workdir on one host")
    ec = config.eval
    gen = make_generator(setup, config, ec.seed)
    bench = shapes_bench.config_prompts(ec)
    results, samples, timings = {}, {}, dict(timings or {})
    for mode in modes:
        s, secs = shapes_bench.run(gen, bench, ec.images_per_prompt, mode, ec.batch_size)
        samples[mode] = s
        results[mode] = _summarize(s, bench)
        timings[f"generate_{mode}"] = secs
        logging.info("%s: %s", mode, results[mode]["scores"])
    # Test-time scaling: the same prompts with a tighter cap on iterations (accuracy vs NFE).
    for cap in (ec.iteration_caps if "process" in modes else ()):
        capped = dataclasses.replace(gen.options, max_iterations=int(cap))
        s, secs = shapes_bench.run(gen, bench, ec.images_per_prompt, "process", ec.batch_size,
                                   options=capped)
        results[f"process@cap{cap}"] = _summarize(s, bench)
        timings[f"generate_process_cap{cap}"] = secs
    if "process" in modes:  # inspection on exactly rendered errors, not only the model's own
        t0 = time.time()
        items = inspection_probe.probe_episodes(ec.seed, ec.prompts_per_tag)
        results["process"]["inspection_probe"] = inspection_probe.probe(
            setup.model, setup.state.eval_params(), setup.etok, items, config.data.seq_len)
        timings["inspection_probe"] = time.time() - t0
    plan = injection.Plan.from_config(ec)
    if plan.kinds and "process" in modes:  # mistakes put in, to see them caught and repaired
        t0 = time.time()
        # On GenEval's six categories: the hard split measures the model's own errors.
        six = [p for p in bench if p.tag != shapes_bench.HARD]
        results["process"]["injection"] = injection.run(gen, six, plan.kinds, plan.at,
                                                        ec.batch_size, ec.seed)
        timings["injection"] = time.time() - t0
    # The same (prompt, image) picks in every mode, side by side, every category in turn.
    picks = filmstrip_picks(samples[modes[0]], ec.filmstrips)
    strips = []
    for k, smp in enumerate(picks):
        for mode in modes:
            x = next(y for y in samples[mode] if y.prompt == smp.prompt and y.index == smp.index)
            verdict = "PASS" if x.correct else "FAIL"
            strips.append((f"{k:02d}_{smp.tag}_{mode} {verdict}", x.prompt, x.result.text,
                           x.result.images))
    payload = {
        "commit": provenance.git_commit(), "device": provenance.device_info(),
        "config_name": config_name, "config": config.to_dict(),
        "bench": {"prompts": len(bench), "images_per_prompt": ec.images_per_prompt,
                  "flow_steps": config.flow["sample_steps"], "max_iterations": ec.max_iterations},
        "results": results, "train": train_summary or {}, "timings": timings,
        "samples": {m: [x.row() for x in s] for m, s in samples.items()},
    }
    t0 = time.time()
    path, rendered = report.write(workdir, payload,
                                  [(n.replace(" ", "_"), p, t, im) for n, p, t, im in strips])
    _to_tensorboard(workdir, payload, rendered)
    payload["report_path"] = path
    timings["report"] = time.time() - t0
    return payload


def inject(setup, config, workdir: str, config_name: str, step: int) -> dict:
    """The `inject` command (evaluate/injection.py): every kind of eval.inject_kinds (empty: all seven) at
    eval.inject_at, on the benchmark prompts; writes <workdir>/injection/injection.json and
    filmstrips of up to eval.filmstrips caught-and-repaired episodes, one kind in turn."""
    ec = config.eval
    plan = injection.Plan.from_config(ec)
    kinds = plan.kinds or injection.KINDS
    out_dir = os.path.join(workdir, "injection")
    files.makedirs(out_dir)  # etils.epath: a gs:// workdir works too
    repaired = []

    def keep(row, result):
        if row["caught"] and row["repaired"]:
            repaired.append((row, result))

    gen = make_generator(setup, config, ec.seed)
    bench = [p for p in shapes_bench.config_prompts(ec) if p.tag != shapes_bench.HARD]
    t0 = time.time()
    res = injection.run(gen, bench, kinds, plan.at, ec.batch_size, ec.seed, on_result=keep)
    strips = []
    for row, r in filmstrip_picks(repaired, int(ec.filmstrips), key=lambda x: x[0]["kind"]):
        name = f"{len(strips):02d}_{row['kind'].replace(':', '_')}.png"
        report.filmstrip(r.prompt, r.text, r.images, os.path.join(out_dir, name),
                         title=f"{row['kind']} put in at iteration {plan.at}: caught, repaired")
        strips.append(name)
    payload = {"commit": provenance.git_commit(), "device": provenance.device_info(),
               "config_name": config_name, "checkpoint_step": step,
               "prompts": len(bench), "seconds": time.time() - t0, "filmstrips": strips,
               "sides": injection.side_summary(res), **res}
    files.write_json(os.path.join(out_dir, "injection.json"), payload)
    return payload
