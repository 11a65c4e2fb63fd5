# The 2000-step ladder from three runs (session 5). Usage, from the repo root:
#   python results/repro/ladder_2000_steps/combine.py runs/repro_long
# Rows additive, edits, symbolic_critique: `reproduce --config configs/shapes_repro.py:long
# --config.reproduce.rows="('additive','edits','symbolic_critique')"` at f1fbc2f (its
# reproduction.json in the given workdir). The full method: run 5 at c9bb537
# (results/repro/full_method_2000_steps). Single-pass at 2000 steps: the 2x run at c9bb537
# (results/repro/single_pass_x2/report.md, which kept only the report). Writes
# reproduction.{json,md} and learning_curve.svg here with reproduce's own writer.
import json, os, re, sys
sys.path.insert(0, ".")
from strokes_jax.evaluate import reproduce

here = os.path.dirname(os.path.abspath(__file__))
new = json.load(open(os.path.join(sys.argv[1], "reproduction.json")))
full = json.load(open("results/repro/full_method_2000_steps/reproduction.json"))
report = open("results/repro/single_pass_x2/report.md").read()
cells = re.search(r"^\| single_pass \|(.*)$", report, re.M).group(1).split("|")
vals = [float(x) for x in cells[:10]]
tags = ("single_object", "two_object", "counting", "colors", "position", "color_attr", "overall")
train_s = float(re.search(r"steps 0 -> 2000 in (\d+)s", report).group(1))
single = {"mode": "single_pass", "scores": dict(zip(tags, vals[:7])), "nfe_per_image": vals[7],
          "nfe_per_sample": vals[8], "evals_per_sample": vals[9], "inspection": None,
          "episodes": 6000, "wall_s": train_s, "start_step": 0, "train_steps": 2000,
          "note": "scores from the report (2 decimals); wall_s is training only"}
out = {"config": "shapes_repro.py:long (three runs, see commit)",
       "commit": f"c9bb537 (single_pass, self_critique), {new['commit']} (additive, edits, "
                 "symbolic_critique)",
       "device": new["device"], "steps_per_row": 2000,
       "rows": {"single_pass": single, **new["rows"], **full["rows"]},
       "single_pass_curve": [(1.0, single["scores"]["overall"])],
       "self_critique_outcomes": full.get("self_critique_outcomes")}
reproduce._write(out, here)
print(open(os.path.join(here, "reproduction.md")).read())
