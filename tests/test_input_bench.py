"""`bench-input`: the real input pipeline timed batch by batch, against the training step it
feeds or, where no step can run, against the analytic step time of a bound model."""

import json

import pytest

from strokes_jax import configs
from strokes_jax.model.unified import ModelConfig
from strokes_jax.train import input_bench, loop

pytestmark = pytest.mark.slow


def test_input_against_the_step_and_against_a_bound(tmp_path):
    c = configs.load("shapes_tiny:images,test")
    w = str(tmp_path / "w")
    loop.resolve_paths(c, w)
    out = input_bench.run(c, "shapes_tiny:images,test", w, batches=3, steps=2)
    rec = json.load(open(out["path"]))
    assert rec["batches_timed"] == 3 and rec["input_s_per_batch"] > 0
    assert rec["steps_timed"] == 2 and rec["step_s"] > 0 and rec["input_over_step"] > 0
    assert rec["latents"] == "ae" and rec["precompute_latents"] and rec["records_skipped"] == 0
    assert rec["real_tokens_per_batch"] > 0
    bound = ModelConfig.from_config(configs.load("bagel7b_process").model.to_dict())
    out = input_bench.run(c, "shapes_tiny:images,test", w, batches=2, steps=0, bound_model=bound)
    assert out["step_s"] is None and out["steps_timed"] == 0 and "input_over_step" not in out
    b = out["bound"]
    assert b["device"] == "H100" and b["step_s_per_row_at_peak"] > 0
    assert "s of input per row against a" in input_bench.summary(out)
