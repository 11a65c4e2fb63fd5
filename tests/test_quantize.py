"""Weight-only int8 of the decoder experts (model/quantize.py, through qwix).

(a) Every expert kernel, and nothing else, becomes int8 with one absmax scale per output
channel, at a quarter of its float32 bytes (half of bf16); the other params are untouched.
(b) The quantized model's logits and velocities stay as close to the float32 model's as the
same model computed in bfloat16 does, and the scanned layout gives what the unscanned does.
(c) The KV-cache generator runs on the quantized model: its decode mode agrees with the
quantized full forward (the uncached generator), and it gives as many episodes as float.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from strokes_jax.configs import bagel7b_process, shapes_tiny
from strokes_jax.episodes.mixer import generate_episodes
from strokes_jax.inference.generator import Generator, SamplingOptions
from strokes_jax.inference.kv_cache import KVCacheBackend
from strokes_jax.inference.uncached import UncachedBackend
from strokes_jax.model import quantize as qz
from strokes_jax.model.mot import stack_layers
from strokes_jax.model.unified import ModelConfig, UnifiedModel
from strokes_jax.sequence import tokenizer as tk
from strokes_jax.sequence.layout import NOISY
from strokes_jax.train.memory import model_config_of
from strokes_jax.train.state import dummy_inputs
from strokes_jax.worlds import grammar


def _init(model, seed=0):
    mc = model.cfg
    init = jax.jit(lambda k: model.init(k, **dummy_inputs(1, 8, mc.patch_dim, mc.vision)))
    p = nn.unbox(init(jax.random.PRNGKey(seed))["params"])
    # llm2vae starts at zero; random weights make velocities depend on the inputs. Sharper
    # logits than the 0.02 init so greedy decoding is not decided by rounding.
    k = jax.random.PRNGKey(seed + 1)
    p["llm2vae"]["kernel"] = 0.2 * jax.random.normal(k, p["llm2vae"]["kernel"].shape)
    p["lm_head"]["kernel"] = 5.0 * p["lm_head"]["kernel"]
    return p


def _flat(tree):
    """'/'-joined path -> leaf; a quantized kernel (qwix's WithAux) is one leaf."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "how"))[0]
    return {"/".join(str(k.key) for k in path): v for path, v in leaves}


# -- (a) what is quantized, and how --------------------------------------------------------

@pytest.fixture(scope="module")
def bagel_tiny():
    """The BAGEL architecture at test size: scanned layers, a ViT, kv_heads < heads."""
    model = UnifiedModel(model_config_of(bagel7b_process.get_config("test")))
    return model, _init(model)


def test_expert_kernels_int8_per_output_channel(bagel_tiny):
    model, params = bagel_tiny
    qparams = qz.quantize_params(model, params)
    q = qz.quantized_leaves(qparams)
    flat = _flat(params)
    experts = {p for p in flat if qz.is_expert_kernel(p)}
    assert len(experts) == 14 and set(q) == experts  # scanned: 7 projections x 2 experts
    for path, qa in q.items():
        w = np.asarray(flat[path])
        assert qa.qvalue.dtype == jnp.int8 and qa.qvalue.shape == w.shape
        # The stacked layer axis and the output axes keep their own scale; the input axis
        # (axis 1 after the layer axis) shares one.
        assert qa.scale.shape == w.shape[:1] + (1,) + w.shape[2:], path
        # qwix's absmax: amax maps to 127.5, the far edge of the top bucket.
        amax = np.abs(w).max(axis=1, keepdims=True)
        np.testing.assert_allclose(np.asarray(qa.scale), amax / 127.5, rtol=1e-6)
        err = np.abs(np.asarray(qa.qvalue, np.float32) * np.asarray(qa.scale) - w)
        assert (err <= np.asarray(qa.scale) * (0.5 + 1e-4)).all(), path
        fan_in = w.shape[1]
        ratio = qz.nbytes(qa) / w.nbytes  # int8 values + float32 scales / float32 kernel
        assert 0.25 < ratio <= 0.25 + 1 / fan_in, (path, ratio)
    # Everything else as it was.
    qflat = _flat(qparams)
    others = {p: v for p, v in flat.items() if p not in experts}
    assert any(p.startswith("vision/") for p in others) and "embed" in others
    for p, v in others.items():
        assert qflat[p].dtype == v.dtype and np.array_equal(np.asarray(qflat[p]), np.asarray(v)), p
    # From bfloat16 params: half the bytes, bfloat16 scales.
    half = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    qh = qz.quantized_leaves(qz.quantize_params(model, half))
    hq, hf = sum(qz.nbytes(a) for a in qh.values()), sum(qz.nbytes(_flat(half)[p]) for p in qh)
    assert all(a.scale.dtype == jnp.bfloat16 for a in qh.values())
    assert 0.5 < hq / hf <= 0.5 + 1 / model.cfg.decoder.width, hq / hf


def test_quantizing_a_quantized_model_is_refused(bagel_tiny):
    model, params = bagel_tiny
    with pytest.raises(TypeError, match="float model"):
        qz.quantize_params(qz.quantize_model(model), params)


# -- (b) closeness on a real sequence --------------------------------------------------------

@pytest.fixture(scope="module")
def etok():
    # As in test_kv_cache: with this vocabulary the untrained model opens images.
    return tk.EpisodeTokenizer(tk.Tokenizer.for_words(grammar.vocabulary()), (36, 36, 3), 6)


def _model(etok, **kw):
    mc = dict(shapes_tiny.get_config("test").model)
    mc.update(vocab_size=etok.tok.vocab_size, patch_dim=etok.patch_dim, latent_grid=(6, 6),
              prediction="v", canvas_skip=False, **kw)
    return UnifiedModel(ModelConfig.from_config(mc))


@pytest.fixture(scope="module")
def shapes(etok):
    model = _model(etok)
    return model, _init(model)


def _row(etok):
    """A tokenized episode with x_t and t on its noisy blocks, as in training."""
    r = etok(next(generate_episodes(0, 1, {"critique": 1.0})))
    rng = np.random.default_rng(0)
    lat = r["patches"].astype(np.float32) / 127.5 - 1.0
    t = np.zeros(len(r["tokens"]), np.float32)
    noisy = r["types"] == NOISY
    for b in np.unique(r["blocks"][noisy]):
        sel = noisy & (r["blocks"] == b)
        t[sel] = rng.uniform(0.1, 0.9)
        lat[sel] = (1 - t[sel][:, None]) * lat[sel] + t[sel][:, None] * rng.standard_normal(lat[sel].shape)
    keys = ("tokens", "types", "positions", "blocks", "patch_pos")
    args = {k: r[k][None] for k in keys}
    args.update(segment_ids=np.ones_like(r["tokens"])[None], latents=lat[None], timesteps=t[None])
    return args, noisy


def _forward(model, params, args):
    logits, vel = jax.jit(model.apply)({"params": params}, **args)
    return np.asarray(logits[0], np.float64), np.asarray(vel[0], np.float64)


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_logits_and_velocities_close_to_float(etok, shapes):
    """Relative L2 error against float32, for int8 kernels (float32 compute) and for the
    float model computed in bfloat16. int8 absmax rounding moves each kernel entry by up to
    half a step of amax/127 (rms ~0.6% of a Gaussian kernel's scale at these fan-ins), bf16
    rounds every weight and activation to 8 bits of mantissa (~0.2% rms each, at every
    op); both end up near 1%, so int8 may be at most twice the bf16 error, and below 3%.
    Per-tensor scales or a kernel quantized along the wrong axis fail this."""
    model, params = shapes
    args, noisy = _row(etok)
    ref = _forward(model, params, args)
    got = _forward(*qz.quantize(model, params), args)
    bf16 = _forward(_model(etok, dtype="bfloat16"), params, args)
    for name, i, sel in (("logits", 0, slice(None)), ("velocities", 1, noisy)):
        assert np.abs(ref[i][sel]).mean() > 0.05  # non-trivial outputs
        e_q, e_bf = _rel(got[i][sel], ref[i][sel]), _rel(bf16[i][sel], ref[i][sel])
        print(f"{name}: relative L2 error int8 {e_q:.4f}, bfloat16 {e_bf:.4f}")
        assert 1e-4 < e_q < min(2 * e_bf, 0.03), (name, e_q, e_bf)
    # Greedy text decisions mostly survive.
    agree = (got[0].argmax(-1) == ref[0].argmax(-1)).mean()
    assert agree > 0.9, agree


def test_scanned_layers_quantize_like_unscanned(etok, shapes):
    model, params = shapes
    scanned = _model(etok, scan_layers=True)
    sp = dict(params, decoder=stack_layers(params["decoder"], model.cfg.decoder.depth))
    args, _ = _row(etok)
    a = _forward(*qz.quantize(model, params), args)
    b = _forward(*qz.quantize(scanned, sp), args)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=2e-5, rtol=0)


# -- (c) generation -----------------------------------------------------------------------------

def _generate(backend, model, params, etok, prompts, mode):
    opts = SamplingOptions(flow_steps=3, shift=1.0, max_iterations=2, max_text_tokens=12)
    return Generator(backend(model, etok, max_len=512), params, options=opts, seed=3)(prompts, mode)


def test_kv_cache_generator_runs_quantized(etok, shapes):
    model, params = shapes
    qmodel, qparams = qz.quantize(model, params)
    prompts = [e.prompt for e in generate_episodes(2, 2, {"additive": 1.0})]
    ref = _generate(KVCacheBackend, model, params, etok, prompts, "process")
    got = _generate(KVCacheBackend, qmodel, qparams, etok, prompts, "process")
    full = _generate(UncachedBackend, qmodel, qparams, etok, prompts, "process")
    assert len(got) == len(ref) == len(prompts)
    assert sum(len(r.images) for r in got) >= 1  # images were drawn
    for a, b in zip(got, full):  # decode mode == full forward, on quantized params
        assert a.error == b.error and a.text == b.text and a.nfe == b.nfe
        for x, y in zip(a.images, b.images):
            assert np.abs(x.astype(int) - y.astype(int)).max() <= 1
    for a, b, prompt in zip(ref, got, prompts):
        assert (a.error is None) == (b.error is None), (a.error, b.error)
        # Random weights put some greedy choices near a tie, where any rounding flips them
        # (bfloat16 compute flips the same ones here); the first generated word must agree.
        start = a.text.index(prompt) + len(prompt)
        start = a.text.index("<|im_start|>", start) + len("<|im_start|>")
        common = next((i for i, (x, y) in enumerate(zip(a.text, b.text)) if x != y),
                      min(len(a.text), len(b.text)))
        assert common > a.text.index(" ", start + 1), (a.text, b.text)
        diff = [float(np.abs(x.astype(int) - y.astype(int)).mean())
                for x, y in zip(a.images, b.images)]
        print(f"int8 vs float: text equal for {common} of {len(a.text)} characters, "
              f"{len(b.images)} vs {len(a.images)} images, mean |pixel difference| {diff}")
