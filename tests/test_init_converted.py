"""Training from converted weights: a synthetic checkpoint with BAGEL's key names converts,
is read straight into an fsdp-sharded state on 8 devices, computes what the converted tree
computes, and trains; mismatches are named; frozen parameters stay bit-identical and carry no
optimizer state."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import ml_dtypes  # noqa: F401  (bfloat16 numpy arrays for the source files)
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

from strokes_jax.configs import bagel7b_process
from strokes_jax.convert import bagel, keymap
from strokes_jax.convert.cli import configs_of
from strokes_jax.model.unified import UnifiedModel
from strokes_jax.model.vae import AutoEncoder
from strokes_jax.train import init_weights, loop
from strokes_jax.train import state as st

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import distributed_driver  # noqa: E402
from test_distributed import _env  # noqa: E402

pytestmark = pytest.mark.slow


def _convert(config, out_dir, seed: int, **model):
    """Random params for `config`'s model exported under BAGEL's names, converted to out_dir."""
    c = distributed_driver.config(**distributed_driver.BAGEL_SHAPED,
                                  **{f"model.{k}": v for k, v in model.items()})
    cfg = loop.model_config(c, loop.episode_tokenizer(c))
    params = jax.tree_util.tree_map(np.asarray, nn.unbox(UnifiedModel(cfg).init(
        jax.random.PRNGKey(seed), **st.dummy_inputs(1, 8, cfg.patch_dim, cfg.vision))["params"]))
    rng = np.random.default_rng(seed)
    params["llm2vae"]["kernel"] = rng.normal(0, 0.05, params["llm2vae"]["kernel"].shape).astype(np.float32)
    _, ae_cfg = configs_of(bagel7b_process.get_config("test"))
    vae = jax.tree_util.tree_map(np.asarray, AutoEncoder(ae_cfg).init(
        jax.random.PRNGKey(seed), np.zeros((1, 8, 8, 3), np.float32))["params"])
    ema = keymap.export(params, bagel.model_rules(cfg)[0])
    for t in bagel.fixed_tables(cfg):
        ema[t.src] = t.value
    src = out_dir + "_src"
    os.makedirs(src)
    safetensors_numpy.save_file(ema, os.path.join(src, "ema.safetensors"))
    safetensors_numpy.save_file(keymap.export(vae, bagel.vae_rules(ae_cfg)),
                                os.path.join(src, "ae.safetensors"))
    bagel.convert_bagel(os.path.join(src, "ema.safetensors"), os.path.join(src, "ae.safetensors"),
                        out_dir, cfg, ae_cfg, dtype=np.float32)
    return params, cfg


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    d = tmp_path_factory.mktemp("conv")
    out = str(d / "converted")
    params, cfg = _convert(distributed_driver.config(), out, seed=7)
    return out, params, cfg


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("data"))
    distributed_driver.sources(distributed_driver.config(), d)
    return d


def test_train_from_converted_on_an_fsdp_mesh(converted, data_dir, tmp_path):
    out, params, cfg = converted
    res = str(tmp_path / "res.json")
    p = subprocess.run([sys.executable, os.path.join(HERE, "distributed_driver.py"), "converted",
                        res, data_dir, str(tmp_path / "w"), out], env=_env(8),
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.load(open(res))
    assert r["embed_shard_shape"][1] * 8 == r["embed_shape"][1], r  # really split 8 ways
    assert len(r["losses"]) == 2 and all(np.isfinite(r["losses"]))
    got = np.load(res + ".npz")
    inputs = {k: got[k] for k in ("tokens", "types", "positions", "segment_ids", "blocks",
                                  "patch_pos", "latents", "timesteps")}
    direct = bagel.load_converted(out)["model"]
    logits, vel = UnifiedModel(cfg).apply({"params": direct}, **inputs)
    # Sharded matmuls sum in another order: float32 rounding, nothing more.
    np.testing.assert_allclose(got["logits"], logits, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(got["vel"], vel, atol=2e-5, rtol=1e-5)
    # And the converted tree is the exported one (the config's own seed would differ).
    np.testing.assert_array_equal(direct["embed"], params["embed"])


def test_a_checkpoint_for_another_model_names_every_mismatch(converted, tmp_path):
    out = str(tmp_path / "wide")
    _convert(None, out, seed=3, mlp=96)  # every MLP kernel has another shape
    c = distributed_driver.config(**distributed_driver.BAGEL_SHAPED,
                                  **{"train.init_converted": out, "mesh.shape": (1, 1, 1)})
    s = loop.setup(c, devices=jax.devices()[:1])
    with pytest.raises(init_weights.WeightsMismatch,
                       match=r"mis-shaped 12: decoder/layer_0/down_gen/kernel \(96, 32\) "
                             r"\(model \(64, 32\)\)"):
        loop._init_from(s, c)
    with pytest.raises(FileNotFoundError, match="config key train.init_converted: .* holds no "
                                                "converted params"):
        init_weights.params_dir(str(tmp_path), "train.init_converted")


def test_numerics_of_another_conversion_are_refused(converted, tmp_path):
    out, _, _ = converted
    meta = json.load(open(os.path.join(out, "conversion.json")))
    meta["model"]["decoder"]["rope_theta"] = 1e6
    with pytest.raises(init_weights.WeightsMismatch,
                       match=r"model.rope_theta is 10000.0, the converted weights' 1000000.0"):
        init_weights.check_numerics(meta["model"], {"decoder": {"rope_theta": 10000.0}},
                                    "conversion.json", "train.init_converted")


def test_compare_lists_missing_and_unexpected():
    with pytest.raises(init_weights.WeightsMismatch, match=r"missing 1: b; unexpected 1: c"):
        init_weights.compare({"a": (2,), "c": (1,)}, {"a": (2,), "b": (3,)}, "ckpt")


def _leaves(tree) -> dict:
    return {st.param_path(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_frozen_parameters_stay_bit_identical_and_have_no_optimizer_state(converted, data_dir,
                                                                          tmp_path):
    out, _, _ = converted
    c = distributed_driver.config(steps=3, **distributed_driver.BAGEL_SHAPED,
                                  **{"train.init_converted": out, "mesh.shape": (1, 1, 1),
                                     "train.freeze": ("und", "embeddings")})
    s, summary = loop.train(c, str(tmp_path / "w"), distributed_driver.sources(c, data_dir),
                            devices=jax.devices()[:1])
    assert all(np.isfinite(loss) for _, loss in summary["losses"])
    before, after = _leaves(bagel.load_converted(out)["model"]), _leaves(s.state.params)
    labels = _leaves(st.freeze_labels(s.state.params, ("und", "embeddings")))
    frozen = [k for k, v in labels.items() if v == "frozen"]
    assert "embed" in frozen and "lm_head/kernel" in frozen
    assert "decoder/layer_0/q_und/kernel" in frozen and "decoder/final_norm_und/scale" in frozen
    assert "decoder/layer_0/q_gen/kernel" not in frozen
    for k in frozen:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    trained = [k for k, v in labels.items() if v == "train"]
    assert all(not np.array_equal(after[k], before[k]) for k in trained if k.endswith("kernel"))
    # Adam's two moments exist for the trained parameters only.
    shapes = sorted(x.shape for x in jax.tree_util.tree_leaves(s.state.opt_state) if x.ndim)
    assert shapes == sorted([after[k].shape for k in trained] * 2)


def test_a_freeze_entry_that_matches_nothing_is_named():
    params = {"embed": np.zeros(2), "decoder": {"q_und": {"kernel": np.zeros(2)}}}
    with pytest.raises(ValueError, match=r"config key train.freeze: 'visoin' matches no parameter"):
        st.freeze_labels(params, ("visoin",))
    assert st.freeze_labels(params, ("decoder/.*",)) == {"embed": "train",
                                                         "decoder": {"q_und": {"kernel": "frozen"}}}


def _part(folder, tree, kind):
    """A converter's output folder (output.py's layout): params/ as an Orbax checkpoint of
    numpy arrays, conversion.json naming its kind."""
    import orbax.checkpoint as ocp
    os.makedirs(folder)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(folder, "params"), tree)
    ckptr.wait_until_finished()
    with open(os.path.join(folder, "conversion.json"), "w") as f:
        json.dump({"kind": kind}, f)
    return folder


def test_parts_side_by_side_fill_what_they_hold_and_leave_the_rest(converted, tmp_path, capsys):
    """A Qwen2 decoder and another part, as BAGEL started: what they hold is read in, what
    neither holds (here llm2vae) keeps the fresh initialisation, and it is said which."""
    out, _, _ = converted
    full = bagel.load_converted(out)["model"]
    text_keys = ("embed", "lm_head", "decoder")
    text = _part(str(tmp_path / "qwen2"), {"model": {k: full[k] for k in text_keys}}, "qwen2")
    rest = {k: v for k, v in full.items() if k not in text_keys + ("llm2vae",)}
    other = _part(str(tmp_path / "other"), {"model": rest}, "siglip")
    c = distributed_driver.config(**distributed_driver.BAGEL_SHAPED,
                                  **{"train.init_converted": f"{text}, {other}", "mesh.shape": (1, 1, 1)})
    s = loop.setup(c, devices=jax.devices()[:1])
    init = _leaves(s.state.params)
    loop._init_from(s, c)
    got, conv = _leaves(s.state.params), _leaves(full)
    fresh = [k for k in got if k.startswith("llm2vae/")]
    assert fresh and len(conv) == len(got)
    for k in got:
        np.testing.assert_array_equal(got[k], init[k] if k in fresh else conv[k], err_msg=k)
    assert any(not np.array_equal(init[k], conv[k]) for k in got if k not in fresh)
    said = capsys.readouterr().out
    assert f"{len(fresh)} parameters no part holds keep their initialisation: llm2vae/" in said

    # Two parts that hold the same parameter: which one wins would be a guess.
    again = _part(str(tmp_path / "again"), {"model": {"embed": full["embed"]}}, "qwen2")
    c.train.init_converted = f"{text},{again}"
    with pytest.raises(init_weights.WeightsMismatch, match=r"both hold 1 parameters: embed"):
        loop._init_from(loop.setup(c, devices=jax.devices()[:1]), c)
    # A whole conversion (convert bagel's kind) that lacks parameters is still refused.
    short = _part(str(tmp_path / "short"), {"model": {k: full[k] for k in text_keys}}, "bagel")
    c.train.init_converted = short
    with pytest.raises(init_weights.WeightsMismatch, match=r"missing \d+: llm2vae/bias"):
        loop._init_from(loop.setup(c, devices=jax.devices()[:1]), c)


def test_converted_weights_paint_without_training_and_in_int8(converted, tmp_path):
    """A workdir with no checkpoint evaluates train.init_converted's weights as they are;
    eval.int8 generates from the same weights with int8 expert kernels."""
    from strokes_jax.evaluate import job
    out, params, _ = converted
    c = distributed_driver.config(**distributed_driver.BAGEL_SHAPED,
                                  **{"train.init_converted": out, "mesh.shape": (1, 1, 1)})
    c.eval.update(max_iterations=1, max_text_tokens=8)
    c.flow.sample_steps = 2
    s, rec = loop.restore_for_eval(c, str(tmp_path / "empty"))
    assert rec["end_step"] == 0 and rec["init_converted"] == out
    np.testing.assert_array_equal(np.asarray(s.state.params["embed"]), params["embed"])
    prompts = ["a photo of a red circle", "a photo of two blue squares"]
    rng = lambda: np.random.default_rng(0)  # noqa: E731
    full = job.make_generator(s, c)(prompts, "process", rng=rng())
    c.eval.int8 = True
    gen = job.make_generator(s, c)
    from strokes_jax.model import quantize
    q_leaves = quantize.quantized_leaves(gen._params)
    # q/k/v/o and gate/up/down of both experts: one stacked leaf each, or one per layer.
    assert len(q_leaves) in (14, 14 * c.model.depth), sorted(q_leaves)
    assert all(str(x.qvalue.dtype) == "int8" for x in q_leaves.values())
    q = gen(prompts, "process", rng=rng())
    # Random weights: what matters is that the int8 model runs the same loop on the same
    # weights (closeness is tests/test_quantize.py's); both start with the prompt.
    assert len(q) == len(full) == 2 and all(r.text.startswith("<|im_start|>") for r in q)
