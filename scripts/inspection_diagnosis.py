# Inspection confusion of finished reproduction rows. Usage:
#   python scripts/inspection_diagnosis.py self_critique=runs/repro/self_critique \
#       symbolic_critique=runs/repro/symbolic_critique edits=runs/repro/edits
# Regenerates each row's process samples (same prompts and seeds as the reproduction) and
# scores every <inspect> verdict against the exact checker (strokes_jax/evaluate/inspection.py).
import sys, json, time
from absl import flags

flags.FLAGS(["script"])  # absl flags are read by the libraries below
from strokes_jax.evaluate.reproduce import restored_rows
from strokes_jax.evaluate import job, shapes_bench, inspection
out = {}
for row, wd, c, setup, _ in restored_rows(sys.argv[1:]):
    ec = c.eval
    bench = shapes_bench.benchmark_prompts(ec.seed, ec.prompts_per_tag)
    t = time.time()
    s, _ = shapes_bench.run(job.make_generator(setup, c, ec.seed), bench, ec.images_per_prompt,
                            "process", ec.batch_size)
    conf = inspection.confusion(s, bench)
    out[row] = {"overall": shapes_bench.summarize(s)["scores"]["overall"], **conf}
    print(row, wd, round(time.time()-t), out[row]["overall"], inspection.line(conf), conf["counts"], flush=True)
print(json.dumps(out, indent=1))
