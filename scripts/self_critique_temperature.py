# What the self-sampled critique split holds at several text temperatures.
# Usage:
#   python scripts/self_critique_temperature.py OUT.json ROW=WORKDIR[=LABEL] N T [T ...]
# e.g. self_critique=runs/repro/self_critique_phase1 600 0 1 2
# Restores the checkpoint, samples N training prompts' traces (self_critique.seed, like
# `self-critique`) with text decoded greedily (T = 0) or sampled at temperature T, and counts
# the outcomes and the negatives by side (plan / image) and issue kind.
import sys, json, time, collections, dataclasses
from absl import flags

flags.FLAGS(["script"])  # absl flags are read by the libraries below
from strokes_jax.evaluate.reproduce import restored_rows
from strokes_jax.episodes import self_critique as sc
from strokes_jax.evaluate import job
from strokes_jax.worlds import grammar

(label, wd, c, setup, info), = restored_rows([sys.argv[2]], "long")
n, temps = int(sys.argv[3]), [float(t) for t in sys.argv[4:]]
prompts = sc.training_prompts(c.self_critique.seed, n)
out = {"workdir": wd, "step": info["end_step"], "prompts": n, "runs": {}}
for t in temps:
    t0 = time.time()
    gen = job.make_generator(setup, c, c.self_critique.seed)
    options = dataclasses.replace(gen.options, text_temperature=t)
    episodes, counts = sc.sample_and_critique(gen, prompts, c.eval.batch_size, "probe",
                                              options=options)
    sides = collections.Counter()
    for e in episodes:
        for st in e.steps:
            if st.refine:  # the step the verdict names wrong
                plan, image = st.inspect.split(" ; ")
                side = "plan" if plan.startswith("plan wrong") else "image"
                kind = grammar.parse_issue((plan if side == "plan" else image)
                                           .split(" : ")[1]).kind
                sides[f"{side}:{kind}"] += 1
                break
    out["runs"][str(t)] = {"outcomes": counts, "negatives_by_side_kind": dict(sides),
                           "seconds": time.time() - t0}
    print(f"{label} step {info['end_step']} T={t}: {counts} negatives {dict(sides)} "
          f"({time.time() - t0:.0f} s)", flush=True)
with open(sys.argv[1], "w") as f:
    json.dump(out, f, indent=1)
