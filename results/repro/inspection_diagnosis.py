# Inspection confusion of finished reproduction rows (session 4). Usage, from the repo root:
#   python results/repro/inspection_diagnosis.py self_critique=runs/repro3/self_critique \
#       symbolic_critique=runs/repro4/symbolic_critique edits=runs/repro2/edits
# Regenerates each row's process samples (same prompts and seeds as the reproduction) and
# scores every <inspect> verdict against the exact checker (strokes_jax/evaluate/inspection.py).
import sys, json, time
from absl import flags; flags.FLAGS(["x"])
sys.path.insert(0, ".")
from configs import shapes_repro
from strokes_jax.evaluate import reproduce, job, shapes_bench, inspection
from strokes_jax.train import loop
out = {}
for row, wd in [(a.split("=")[0], a.split("=")[1]) for a in sys.argv[1:]]:
    c = reproduce.row_config(shapes_repro.get_config(None), row)
    setup, _ = loop.restore_for_eval(c, wd)
    ec = c.eval
    bench = shapes_bench.benchmark_prompts(ec.seed, ec.prompts_per_tag)
    t = time.time()
    s, _ = shapes_bench.run(job.make_generator(setup, c, ec.seed), bench, ec.images_per_prompt, "process", ec.batch_size)
    conf = inspection.confusion(s, bench)
    out[row] = {"overall": shapes_bench.summarize(s)["scores"]["overall"], **conf}
    print(row, wd, round(time.time()-t), out[row]["overall"], inspection.line(conf), conf["counts"], flush=True)
print(json.dumps(out, indent=1))
