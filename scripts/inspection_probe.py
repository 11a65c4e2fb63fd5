# Teacher-forced inspection probe of finished reproduction rows. Usage:
#   python scripts/inspection_probe.py OUT.json ROW=WORKDIR[=LABEL] ...
# e.g. self_critique=runs/repro/self_critique symbolic_critique=runs/repro/symbolic_critique
# Restores each row's newest checkpoint and runs strokes_jax/evaluate/inspection_probe.py on
# the reproduction's evaluation prompts: one exactly rendered error of every applicable
# critique kind per prompt, plus error-free episodes, everything before each verdict
# teacher-forced.
import sys, json, time
from absl import flags

flags.FLAGS(["script"])  # absl flags are read by the libraries below
from strokes_jax.evaluate.reproduce import restored_rows
from strokes_jax.evaluate import inspection_probe as ip
out = {}
items = None
for label, wd, c, setup, info in restored_rows(sys.argv[2:]):
    if items is None:
        items = ip.probe_episodes(c.eval.seed, c.eval.prompts_per_tag)
    t = time.time()
    r = ip.probe(setup.model, setup.state.eval_params(), setup.etok, items, c.data.seq_len)
    r["workdir"], r["step"], r["seconds"] = wd, info["end_step"], time.time() - t
    out[label] = r
    print(label, wd, r["step"], ip.line(r), flush=True)
    for k, v in r.items():
        if isinstance(v, dict) and "steps" in v:
            print(f"  {k:14s} n={v['steps']:4d} plan_wrong={v['plan_said_wrong']:.2f} "
                  f"image_wrong={v['image_said_wrong']:.2f} exact={v['verdict_exact']:.2f} "
                  f"p_wrong(img)={v['image_mean_p_wrong']:.2f}", flush=True)
with open(sys.argv[1], "w") as f:
    json.dump(out, f, indent=1)
