"""KV-cache decoding equals uncached decoding.

(a, b) A batch of real tokenized episodes is stepped through decode mode (prompt prefilled,
then one text token, one noisy block (not written) or one clean block per call, rows in
different phases in the same call) and every logit and velocity is compared with the
uncached full-sequence forward pass. (c) Generation with the KV-cache backend gives the
same streams and images as with the uncached one on a random-parameter model; (d) it
reproduces a reference episode when steered by an oracle.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from strokes_jax.configs import shapes_tiny
from strokes_jax.sequence import tokenizer as tk
from strokes_jax.episodes.mixer import generate_episodes
from strokes_jax.inference.generator import Generator, SamplingOptions
from strokes_jax.inference.bench import Steered
from strokes_jax.inference.kv_cache import KVCacheBackend
from strokes_jax.inference.uncached import UncachedBackend
from strokes_jax.model import cache as kvc
from strokes_jax.model.unified import ModelConfig, UnifiedModel
from strokes_jax.sequence.layout import NOISY
from strokes_jax.worlds import grammar

IMAGE_SHAPE, PATCH = (36, 36, 3), 6


@pytest.fixture(scope="module")
def etok():
    # The grammar's words without the shapes tokenizer's padding: with this vocabulary and
    # init the untrained model opens images on these prompts, which the comparison needs;
    # what is compared (cached vs uncached) does not depend on the vocabulary.
    return tk.EpisodeTokenizer(tk.Tokenizer.for_words(grammar.vocabulary()), IMAGE_SHAPE, PATCH)


def _model(etok, scan=False, adaln=False):
    mc = dict(shapes_tiny.get_config("test").model)
    mc.update(vocab_size=etok.tok.vocab_size, patch_dim=etok.patch_dim, latent_grid=(6, 6),
              scan_layers=scan, time_adaln=adaln,
              # The v head: the x head's 1/t (1/x_min_t on text rows) would magnify float
              # rounding past the tolerance; it is an elementwise map of the same outputs.
              prediction="v", canvas_skip=False)
    return UnifiedModel(ModelConfig.from_config(mc))


@pytest.fixture(scope="module")
def model(etok):
    return _model(etok)


@pytest.fixture(scope="module")
def params(model):
    return _init_params(model)


def _init_params(model):
    z = jnp.zeros((1, 8), jnp.int32)
    p = nn.unbox(model.init(jax.random.PRNGKey(0), z, z, z, z + 1, z, z,
                            jnp.zeros((1, 8, model.cfg.patch_dim)), jnp.zeros((1, 8)))["params"])
    # llm2vae starts at zero; random weights make velocities depend on the inputs.
    k = jax.random.PRNGKey(1)
    p["llm2vae"]["kernel"] = 0.2 * jax.random.normal(k, p["llm2vae"]["kernel"].shape)
    p["llm2vae"]["bias"] = 0.1 * jax.random.normal(jax.random.fold_in(k, 1), p["llm2vae"]["bias"].shape)
    # Sharper logits than the 0.02 init so greedy decoding is not decided by rounding.
    p["lm_head"]["kernel"] = 5.0 * p["lm_head"]["kernel"]
    for i in range(model.cfg.decoder.depth):  # adaLN starts at zero too
        layer = p["decoder"][f"layer_{i}"]
        if "adaln_gen" in layer:
            layer["adaln_gen"]["kernel"] = 0.3 * jax.random.normal(
                jax.random.fold_in(k, 10 + i), layer["adaln_gen"]["kernel"].shape)
    return p


def _rows(etok):
    eps = [next(generate_episodes(0, 1, {"critique": 1.0})),
           next(generate_episodes(0, 1, {"additive": 1.0}))]
    rows = []
    rng = np.random.default_rng(0)
    for e in eps:
        r = etok(e)
        lat = r["patches"].astype(np.float32) / 127.5 - 1.0
        t = np.zeros(len(r["tokens"]), np.float32)
        noisy = r["types"] == NOISY
        for b in np.unique(r["blocks"][noisy]):  # one t per noisy block, x_t as in training
            sel = noisy & (r["blocks"] == b)
            t[sel] = rng.uniform(0.1, 0.9)
            lat[sel] = (1 - t[sel][:, None]) * lat[sel] + t[sel][:, None] * rng.standard_normal(lat[sel].shape)
        r.update(latents=lat, timesteps=t)
        rows.append(r)
    return rows


def _units(r, prompt_len, chunks):
    """Split a tokenized episode into decode calls: (start, stop, write); the prompt is
    prefilled in `chunks` pieces, which also puts rows out of phase."""
    cut = np.linspace(0, prompt_len, chunks + 1).astype(int)
    units = [(int(a), int(z), True) for a, z in zip(cut[:-1], cut[1:])]
    i, n = prompt_len, len(r["tokens"])
    while i < n:
        if r["blocks"][i] == 0:
            units.append((i, i + 1, True))
            i += 1
        else:
            j = i
            while j < n and r["blocks"][j] == r["blocks"][i]:
                j += 1
            units.append((i, j, r["types"][i] != NOISY))
            i = j
    return units


def _full(model, params, r):
    args = [r[k][None] for k in ("tokens", "types", "positions")]
    seg = np.ones((1, len(r["tokens"])), np.int32)
    logits, vel = jax.jit(model.apply)({"params": params}, *args, seg, r["blocks"][None],
                                       r["patch_pos"][None], r["latents"][None],
                                       r["timesteps"][None])
    return np.asarray(logits[0]), np.asarray(vel[0])


def _slab_step(m):
    """Decode mode returning every slab position's logits (the Generator reads only one)."""
    @jax.jit
    def f(params, cache, slab, n_write):
        logits, vel, new_kv = m.apply({"params": params}, slab["tokens"], slab["types"],
                                      slab["positions"], slab["valid"].astype(jnp.int32),
                                      slab["blocks"], slab["patch_pos"], slab["latents"],
                                      slab["timesteps"], cache=cache)
        return logits, vel, kvc.append(cache, new_kv, n_write)
    return f


@pytest.mark.parametrize("scan,adaln", [(False, False), (True, False), (True, True)])
def test_cached_logits_and_velocities_match_uncached(etok, model, params, scan, adaln):
    m = _model(etok, scan, adaln) if scan or adaln else model
    if adaln:
        params = _init_params(_model(etok, False, True))
    if scan:
        from strokes_jax.model.mot import stack_layers
        params = dict(params, decoder=stack_layers(params["decoder"], m.cfg.decoder.depth))
    rows = _rows(etok)
    W = etok.num_patches + 2
    units = [_units(r, int(np.argmax(r["tokens"] == etok.tok.im_end)) + 1, b + 1)
             for b, r in enumerate(rows)]
    assert units[0][0][1] <= W
    cache = kvc.init_cache(m.cfg, len(rows), 512)
    step = _slab_step(m)
    fields = ("tokens", "types", "positions", "blocks", "patch_pos", "latents", "timesteps")
    got_logits = [np.zeros((len(r["tokens"]), etok.tok.vocab_size), np.float32) for r in rows]
    got_vel = [np.zeros((len(r["tokens"]), etok.patch_dim), np.float32) for r in rows]
    mixed = False
    for s in range(max(map(len, units))):
        slab = {k: np.zeros((len(rows), W) + rows[0][k].shape[1:], rows[0][k].dtype) for k in fields}
        slab["valid"] = np.zeros((len(rows), W), bool)
        n_write = np.zeros(len(rows), np.int32)
        kinds = set()
        for b, (r, u) in enumerate(zip(rows, units)):
            if s >= len(u):
                continue
            a, z, write = u[s]
            for k in fields:
                slab[k][b, :z - a] = r[k][a:z]
            slab["valid"][b, :z - a] = True
            n_write[b] = (z - a) if write else 0
            kinds.add((z - a, write))
        mixed |= len(kinds) > 1
        full_logits, full_vel, cache = step(params, cache, slab, n_write)
        for b, (r, u) in enumerate(zip(rows, units)):
            if s < len(u):
                a, z, _ = u[s]
                got_logits[b][a:z] = np.asarray(full_logits[b, :z - a])
                got_vel[b][a:z] = np.asarray(full_vel[b, :z - a])
    assert mixed  # some call had rows in different phases
    for b, r in enumerate(rows):
        ref_logits, ref_vel = _full(m, params, r)
        clean = r["types"] != NOISY
        np.testing.assert_allclose(got_logits[b][clean], ref_logits[clean], atol=1e-5, rtol=0)
        noisy = ~clean
        assert np.abs(ref_vel[noisy]).mean() > 0.05  # velocities are non-trivial
        np.testing.assert_allclose(got_vel[b], ref_vel, atol=1e-5, rtol=0)


def _gen_kw(**kw):
    d = dict(max_len=512, flow_steps=3, shift=1.0, max_iterations=2, max_text_tokens=12, seed=3)
    d.update(kw)
    return d


def _generator(backend, model, params, etok, *, max_len, seed, **options):
    return Generator(backend(model, etok, max_len=max_len), params,
                     options=SamplingOptions(**options), seed=seed)


def _uncached(model, params, etok, **kw):
    return _generator(UncachedBackend, model, params, etok, **kw)


def _cached(model, params, etok, **kw):
    return _generator(KVCacheBackend, model, params, etok, **kw)


def _prompts():
    return [e.prompt for e in generate_episodes(2, 3, {"additive": 1.0})]


@pytest.mark.parametrize("mode", ["process", "single_pass"])
def test_cached_generator_matches_uncached(etok, model, params, mode):
    prompts = _prompts()
    ref = _uncached(model, params, etok, **_gen_kw())(prompts, mode)
    got = _cached(model, params, etok, **_gen_kw())(prompts, mode)
    assert sum(len(r.images) for r in ref) >= 1  # images were drawn
    assert len({r.text for r in ref}) > 1 or mode == "single_pass"
    for a, b in zip(ref, got):
        assert a.text == b.text
        assert (a.nfe, a.hit_cap, a.error) == (b.nfe, b.hit_cap, b.error)
        assert len(a.images) == len(b.images)
        for x, y in zip(a.images, b.images):
            assert np.abs(x.astype(int) - y.astype(int)).max() <= 1


def test_options_params_and_noise_are_per_call(etok, model, params):
    """A call's own rng repeats its noise, its own options and parameters override the
    generator's, and the backend frees the KV cache when the call ends."""
    prompts = _prompts()
    gen = _cached(model, params, etok, **_gen_kw())
    first = gen(prompts, "single_pass")
    assert gen.backend.cache is None
    again = gen(prompts, "single_pass", rng=np.random.default_rng(3))  # the generator's seed
    unbound = Generator(KVCacheBackend(model, etok, max_len=512), options=gen.options, seed=3)
    with pytest.raises(ValueError, match="parameters"):
        unbound(prompts, "single_pass")
    passed = unbound(prompts, "single_pass", params=params)
    for a, b, c in zip(first, again, passed):
        assert a.text == b.text == c.text
        np.testing.assert_array_equal(a.final_image, b.final_image)
        np.testing.assert_array_equal(a.final_image, c.final_image)
    later = gen(prompts, "single_pass")  # the generator's own stream has moved on
    assert any(np.abs(a.final_image.astype(int) - b.final_image.astype(int)).max() > 0
               for a, b in zip(first, later))
    two = gen(prompts, "single_pass", options=dataclasses.replace(gen.options, flow_steps=2))
    assert [r.nfe for r in two] == [2] * len(prompts) and gen.options.flow_steps == 3


@pytest.mark.parametrize("kind", ["critique", "edit"])
def test_cached_generator_reproduces_a_steered_reference(etok, model, params, kind):
    """The Oracle idea of test_generate.py, through the real model's decode mode."""
    refs = sorted(generate_episodes(5, 12, {kind: 1.0}), key=lambda e: -len(e.steps))[:2]
    gen = _cached(Steered(model, etok, refs), params, etok,
                  **_gen_kw(flow_steps=4, max_iterations=8, max_text_tokens=64))
    outs = gen([r.prompt for r in refs], "process")
    for out, ref in zip(outs, refs):
        assert out.error is None and not out.hit_cap, out.error
        assert len(out.episode.steps) == len(ref.steps) >= 2
        for a, b in zip(out.episode.steps, ref.steps):
            assert (a.ins, a.des, a.inspect, a.refine) == (b.ins, b.des, b.inspect, b.refine)
            np.testing.assert_array_equal(a.sketch, b.sketch)
            if b.refined is not None:
                np.testing.assert_array_equal(a.refined, b.refined)
        assert out.nfe == 4 * len(ref.images())


def test_text_cfg(etok, model, params):
    """Scale 1 is no CFG (no extra rows); a larger scale changes the images but not the
    text stream before them, nor the NFE count."""
    prompts = _prompts()
    base = _cached(model, params, etok, **_gen_kw())(prompts, "single_pass")
    one = _cached(model, params, etok, cfg_text_scale=1.0, **_gen_kw())(prompts, "single_pass")
    four = _cached(model, params, etok, cfg_text_scale=4.0, cfg_interval=(0.0, 1.0),
                   **_gen_kw())(prompts, "single_pass")
    for a, b, c in zip(base, one, four):
        assert a.text == b.text and c.text.startswith(a.text.split("<image>")[0])
        np.testing.assert_array_equal(a.final_image, b.final_image)
        assert np.abs(a.final_image.astype(int) - c.final_image.astype(int)).max() > 0
        assert c.nfe == a.nfe


class _TextSteered(Steered):
    """Steered text, the model's own velocities (so they depend on the context)."""

    def apply(self, variables, *args, cache=None, **vit):
        if cache is None:
            return super().apply(variables, *args, **vit)[0], self.model.apply(
                variables, *args, **vit)[1]
        logits, _, kv = super().apply(variables, *args, cache=cache, **vit)
        return logits, self.model.apply(variables, *args, cache=cache, **vit)[1], kv


def test_image_cfg_contexts(etok, model, params, monkeypatch):
    """The image-free context is the text-only stream: until an episode's first image it is
    the conditional context (same velocity), after it the velocities differ. Both
    unconditional contexts are evaluated every guided step (evals = 3 x NFE)."""
    from strokes_jax.inference import kv_cache
    calls = []
    real = kv_cache.flow.cfg_combine

    def spy(v_cond, v_text, scale, renorm, v_img=None, img_scale=1.0):
        calls.append((np.asarray(v_cond), np.asarray(v_text), np.asarray(v_img)))
        return real(v_cond, v_text, scale, renorm, v_img, img_scale)

    monkeypatch.setattr(kv_cache.flow, "cfg_combine", spy)
    refs = sorted(generate_episodes(5, 12, {"additive": 1.0}), key=lambda e: -len(e.steps))[:1]
    assert len(refs[0].steps) >= 2
    kw = _gen_kw(flow_steps=2, max_iterations=8, max_text_tokens=64)
    gen = _cached(_TextSteered(model, etok, refs), params, etok, cfg_text_scale=2.0,
                  cfg_img_scale=1.5, cfg_interval=(0.0, 1.0), **kw)
    out = gen([refs[0].prompt], "process")[0]
    assert len(calls) == out.nfe == 2 * len(out.images) and out.nfe_evals == 3 * out.nfe
    first, later = calls[:2], calls[2:]
    for v_c, v_t, v_i in first:
        np.testing.assert_allclose(v_i, v_c, atol=1e-5)
        assert np.abs(v_t - v_c).max() > 1e-3  # the text-free context differs
    assert all(np.abs(v_i - v_c).max() > 1e-3 for v_c, _, v_i in later)
    # Unguided sampling of the same stream: a different image, the same NFE.
    plain = _cached(_TextSteered(model, etok, refs), params, etok,
                    **kw)([refs[0].prompt], "process")[0]
    assert plain.nfe == out.nfe and plain.nfe_evals == plain.nfe
    assert np.abs(plain.images[-1].astype(int) - out.images[-1].astype(int)).max() > 0


@pytest.mark.slow
def test_vit_copies_in_generation_cached_matches_uncached():
    """With ViT copies packed (data.vit_copies), each finished image goes back into the
    context a second time through the understanding path, as in training: its own block of
    VIT tokens at the next RoPE position. Cached and uncached loops agree, and the copies
    change what comes after them."""
    from strokes_jax.sequence.layout import VIT
    vt = tk.EpisodeTokenizer(tk.Tokenizer.shapes(), IMAGE_SHAPE, PATCH, vit_patch=12,
                             vit_max_side=5)
    mc = dict(shapes_tiny.get_config("test").model)
    mc.update(vocab_size=vt.tok.vocab_size, patch_dim=vt.patch_dim, latent_grid=(6, 6),
              prediction="v", canvas_skip=False,
              vision=dict(width=16, depth=1, heads=2, mlp=24, patch=12, channels=3, max_side=5))
    m = UnifiedModel(ModelConfig.from_config(mc))
    from strokes_jax.train.state import dummy_inputs
    p = nn.unbox(m.init(jax.random.PRNGKey(0), **dummy_inputs(1, 8, vt.patch_dim,
                                                               m.cfg.vision))["params"])
    k = jax.random.PRNGKey(1)
    p["llm2vae"]["kernel"] = 0.2 * jax.random.normal(k, p["llm2vae"]["kernel"].shape)
    p["lm_head"]["kernel"] = 5.0 * p["lm_head"]["kernel"]
    refs = sorted(generate_episodes(5, 12, {"additive": 1.0}), key=lambda e: -len(e.steps))[:2]
    kw = _gen_kw(flow_steps=2, max_iterations=8, max_text_tokens=64)
    ref = _uncached(_TextSteered(m, vt, refs), p, vt, **kw)
    got = _cached(_TextSteered(m, vt, refs), p, vt, **kw)([r.prompt for r in refs],
                                                           "process")
    out = ref([r.prompt for r in refs], "process")
    assert all(len(o.images) >= 2 for o in out)
    for a, b in zip(out, got):
        assert a.text == b.text and a.nfe == b.nfe
        for x, y in zip(a.images, b.images):
            assert np.abs(x.astype(int) - y.astype(int)).max() <= 1
    # The uncached buffer: one ViT block per image, after its clean copy, one position on.
    buf = ref.backend.buf  # the last call's sequence
    for i, o in enumerate(out):
        vit = buf["types"][i] == VIT
        assert vit.sum() == vt.vit_num_patches * len(o.images)
        first = int(np.argmax(vit))
        assert buf["positions"][i, first] == buf["positions"][i, first - 2] + 1
        assert buf["tokens"][i, first - 2] == vt.tok.vision_end
    # Without the vision tower's input the second image comes out differently.
    p0 = jax.tree_util.tree_map(lambda x: x, p)
    p0["vision"] = jax.tree_util.tree_map(jnp.zeros_like, p["vision"])
    blind = _uncached(_TextSteered(m, vt, refs), p0, vt, **kw)([r.prompt for r in refs],
                                                                "process")
    assert np.abs(blind[0].images[1].astype(int) - out[0].images[1].astype(int)).max() > 0
