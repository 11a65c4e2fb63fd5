# Own drawings vs exact renders of the same scenes. Usage:
#   python scripts/own_vs_rendered.py OUT.json ROW=WORKDIR[=LABEL] ...
# Regenerates each row's process samples (the reproduction's prompts and seeds), cuts every
# trace at its first wrong step, puts the exact checker's verdict in place of the model's,
# and runs the teacher-forced inspection probe twice: on the model's own sketches, and on the
# exact renders of what the detector found in them (inspection_probe.own_trace_items).
# Also writes OUT_<label>.png: for up to 8 traces whose drawing was wrong, the canvas before
# the step, the model's own sketch, and the exact render of what the detector found in it.
import sys, json, time
import numpy as np
from PIL import Image
from absl import flags

flags.FLAGS(["script"])  # absl flags are read by the libraries below
from strokes_jax.evaluate.reproduce import restored_rows
from strokes_jax.worlds import checker
from strokes_jax.evaluate import job, shapes_bench, inspection, inspection_probe as ip
from strokes_jax.worlds import shapes


def wrong_steps_png(samples, bench, path, n=8):
    by_text, tiles = {p.text: p for p in bench}, []
    for smp in samples:
        e = smp.result.episode
        for k, st in enumerate(e.steps if e is not None else []):
            truth, v = inspection.expected_verdict(st, by_text[smp.prompt])
            if truth == "image_wrong" and v is not None:
                before = e.steps[k - 1].sketch if k else shapes.render(())
                rendered = shapes.render(checker.drawn_scene(st.sketch))
                tiles.append(np.concatenate([before, st.sketch, rendered], 1))
                print(f"  {smp.prompt} | plan: {st.des} | checker: {v.text()} | model: {st.inspect}")
                break
        if len(tiles) == n:
            break
    if tiles:
        img = np.concatenate(tiles, 0)
        Image.fromarray(img).resize((img.shape[1] * 4, img.shape[0] * 4), Image.NEAREST).save(path)


out = {}
for label, wd, c, setup, info in restored_rows(sys.argv[2:]):
    ec = c.eval
    bench = shapes_bench.benchmark_prompts(ec.seed, ec.prompts_per_tag)
    t = time.time()
    s, _ = shapes_bench.run(job.make_generator(setup, c, ec.seed), bench, ec.images_per_prompt,
                            "process", ec.batch_size)
    r = {"workdir": wd, "step": info["end_step"],
         "overall": shapes_bench.summarize(s)["scores"]["overall"]}
    for name, rerender in (("own", False), ("rendered", True)):
        items = ip.own_trace_items(s, bench, rerender=rerender, kind="wrong")
        r[name] = ip.probe(setup.model, setup.state.eval_params(), setup.etok, items,
                           c.data.seq_len)
        w, p = r[name].get("wrong", {}), r[name]["positive"]
        print(f"{label} step {info['end_step']} {name:8s}: wrong steps {w.get('steps', 0)}, "
              f"caught {w.get('caught', float('nan')):.2f} (p_wrong image "
              f"{w.get('image_mean_p_wrong', float('nan')):.2f}); right steps {p['steps']}, "
              f"false alarms image {p['image_said_wrong']:.2f} plan {p['plan_said_wrong']:.2f} "
              f"(p_wrong image {p['image_mean_p_wrong']:.2f})", flush=True)
    r["seconds"] = time.time() - t
    wrong_steps_png(s, bench, sys.argv[1].replace(".json", f"_{label}.png"))
    out[label] = r
with open(sys.argv[1], "w") as f:
    json.dump(out, f, indent=1)
