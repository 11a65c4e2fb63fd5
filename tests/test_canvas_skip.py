"""model.canvas_skip: each noisy token gets the same patch of the episode's previous clean
image, as input and as the base of the x-head's prediction (model/unified.py).

Checked on real tokenized episodes packed two to a row: the canvas each noisy token gets is
the previous image's patch, blank for an episode's first image and across the segment
boundary; at the head's zero init the model predicts the canvas itself, so the cached and
the uncached generators both redraw the previous image exactly; cached and uncached
generation agree with random weights; and the config key is validated.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from strokes_jax.configs import shapes_tiny
from strokes_jax.sequence import tokenizer as tk
from strokes_jax.episodes.mixer import generate_episodes
from strokes_jax.model.unified import ModelConfig, UnifiedModel, previous_canvas
from strokes_jax.sequence.layout import NOISY
from strokes_jax.train.step import to_latents
from test_kv_cache import _TextSteered, _cached, _uncached
from test_model import pack

IMAGE_SHAPE, PATCH = (36, 36, 3), 6


@pytest.fixture(scope="module")
def etok():
    return tk.EpisodeTokenizer(tk.Tokenizer.shapes(), IMAGE_SHAPE, PATCH)


def _model(etok, **kw):
    mc = dict(shapes_tiny.get_config("test").model)
    mc.update(vocab_size=etok.tok.vocab_size, patch_dim=etok.patch_dim, latent_grid=(6, 6),
              prediction="x", canvas_skip=True)
    mc.update(kw)
    return UnifiedModel(ModelConfig.from_config(mc))


def _params(model, head_scale: float):
    z = jnp.zeros((1, 8), jnp.int32)
    p = nn.unbox(model.init(jax.random.PRNGKey(0), z, z, z, z + 1, z, z,
                            jnp.zeros((1, 8, model.cfg.patch_dim)), jnp.zeros((1, 8)))["params"])
    k = jax.random.PRNGKey(1)
    p["llm2vae"]["kernel"] = head_scale * jax.random.normal(k, p["llm2vae"]["kernel"].shape)
    p["lm_head"]["kernel"] = 5.0 * p["lm_head"]["kernel"]
    return p


def _episodes():
    eps = sorted(generate_episodes(5, 12, {"additive": 1.0}), key=lambda e: -len(e.steps))
    assert len(eps[0].steps) >= 2 and len(eps[1].steps) >= 2
    return eps[:2]


def test_previous_canvas_on_a_packed_row(etok):
    eps = _episodes()
    rows = [etok(e) for e in eps]
    r = pack(rows, sum(len(x["tokens"]) for x in rows) + 7)
    lat = to_latents(jnp.asarray(r["patches"]))
    got = np.asarray(previous_canvas(jnp.asarray(r["types"]), jnp.asarray(r["patch_pos"]),
                                     jnp.asarray(r["segment_ids"]), lat))[0]
    types, seg, blocks = r["types"][0], r["segment_ids"][0], r["blocks"][0]
    for s, e in zip((1, 2), eps):
        nb = np.unique(blocks[(seg == s) & (types == NOISY)])
        images = e.images()
        assert len(nb) == len(images) >= 2
        for k, b in enumerate(nb):
            sel = (types == NOISY) & (blocks == b)
            want = (np.zeros((36, etok.patch_dim), np.float32) if k == 0 else
                    tk.patchify(images[k - 1], PATCH).astype(np.float32) / 127.5 - 1.0)
            np.testing.assert_allclose(got[sel], want, atol=1e-6)
    # Every other token (text, clean copies, padding) gets nothing.
    assert not got[types != NOISY].any()


@pytest.mark.slow
def test_zero_head_redraws_the_canvas_exactly(etok):
    """With llm2vae at zero the x-head's prediction is the canvas, so every image after the
    first is the previous one, bit for bit, cached and uncached (the text is steered)."""
    model = _model(etok)
    params = _params(model, 0.0)
    refs = _episodes()
    kw = dict(max_len=512, flow_steps=3, shift=3.0, max_iterations=8, max_text_tokens=64,
              seed=3)
    for gen_cls in (_uncached, _cached):
        outs = gen_cls(_TextSteered(model, etok, refs), params, etok, **kw)(
            [r.prompt for r in refs], "process")
        for out, ref in zip(outs, refs):
            assert len(out.images) == len(ref.images()) >= 2
            # The first image paints on a blank canvas: mid-grey (0 in latent space).
            assert np.abs(out.images[0].astype(int) - 128).max() <= 1
            for a, b in zip(out.images, out.images[1:]):
                np.testing.assert_array_equal(a, b)


def test_image_free_context_paints_on_a_blank_canvas(etok):
    """Image CFG's unconditional context has no images, so no canvas. With the head's
    kernel at zero and a random bias b, the prediction is canvas + b: the first image (no
    canvas anywhere) is the same with and without guidance, the second is not (were the
    canvas shared with the image-free context, guidance would change nothing)."""
    model = _model(etok)
    params = _params(model, 0.0)
    params["llm2vae"]["bias"] = 0.3 * jax.random.normal(jax.random.PRNGKey(2),
                                                        params["llm2vae"]["bias"].shape)
    refs = _episodes()[:1]
    kw = dict(max_len=512, flow_steps=3, shift=3.0, max_iterations=8, max_text_tokens=64,
              seed=3)
    run = lambda **g: _cached(_TextSteered(model, etok, refs), params, etok, **kw,
                              **g)([refs[0].prompt], "process")[0]
    plain, guided = run(), run(cfg_img_scale=2.0, cfg_interval=(0.0, 1.0))
    assert len(guided.images) >= 2 and guided.nfe_evals == 2 * guided.nfe
    np.testing.assert_array_equal(plain.images[0], guided.images[0])
    assert np.abs(plain.images[1].astype(int) - guided.images[1].astype(int)).max() > 10


def test_cached_generation_matches_uncached(etok):
    model = _model(etok)
    params = _params(model, 0.2)
    refs = _episodes()
    kw = dict(max_len=512, flow_steps=3, shift=1.0, max_iterations=8, max_text_tokens=64,
              seed=3)
    prompts = [r.prompt for r in refs]
    ref = _uncached(_TextSteered(model, etok, refs), params, etok, **kw)(prompts, "process")
    got = _cached(_TextSteered(model, etok, refs), params, etok, **kw)(prompts, "process")
    for a, b in zip(ref, got):
        assert len(a.images) >= 2  # images painted on a canvas
        assert a.text == b.text and a.nfe == b.nfe
        for x, y in zip(a.images, b.images):
            assert np.abs(x.astype(int) - y.astype(int)).max() <= 1


def test_canvas_changes_the_prediction(etok):
    """The canvas reaches the output: the same noisy block over two different canvases."""
    model = _model(etok)
    params = _params(model, 0.2)
    r = etok(_episodes()[0])
    lat = jnp.asarray(r["patches"].astype(np.float32) / 127.5 - 1.0)[None]
    args = [jnp.asarray(r[k])[None] for k in ("tokens", "types", "positions")]
    seg = jnp.ones_like(args[0])
    rest = [jnp.asarray(r["blocks"])[None], jnp.asarray(r["patch_pos"])[None], lat,
            jnp.full(seg.shape, 0.5)]
    _, v1 = model.apply({"params": params}, *args, seg, *rest)
    _, v2 = model.apply({"params": params}, *args, seg, *rest, canvas=jnp.zeros_like(lat))
    noisy = r["types"] == NOISY
    assert np.abs(np.asarray(v1 - v2)[0][noisy]).max() > 0.1
    assert np.abs(np.asarray(v1 - v2)[0][~noisy]).max() == 0.0


def test_config_key_is_validated(etok):
    with pytest.raises(ValueError, match="model.canvas_skip"):
        _model(etok, prediction="v")
    with pytest.raises(ValueError, match="decode mode"):
        m = _model(etok)
        p = _params(m, 0.0)
        z = jnp.zeros((1, 4), jnp.int32)
        from strokes_jax.model import cache as kvc
        m.apply({"params": p}, z, z + NOISY, z, z + 1, z + 1, z,
                jnp.zeros((1, 4, m.cfg.patch_dim)), jnp.zeros((1, 4)),
                cache=kvc.init_cache(m.cfg, 1, 8))
