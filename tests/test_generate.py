"""The generation loop, driven by an oracle model that knows a reference episode: the loop must
reproduce it exactly (texts, images, the stop decision), count NFE, respect the caps, and
return a well-formed Episode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from strokes_jax.sequence import tokenizer as tk
from strokes_jax.episodes import mixer
from strokes_jax.inference.generator import Generator, SamplingOptions
from strokes_jax.inference.uncached import UncachedBackend
from strokes_jax.sequence import layout

FLOW_STEPS = 4


class Oracle:
    """A stand-in for UnifiedModel.apply: next-token logits from the reference's clean stream
    (indexed by how many clean tokens precede a position) and the exact rectified-flow
    velocity towards the reference image being drawn."""

    def __init__(self, etok: tk.EpisodeTokenizer, ref):
        a = etok(ref)
        clean = a["types"] != layout.NOISY
        self.stream = jnp.asarray(np.append(a["tokens"][clean], etok.tok.pad_id))
        imgs = [trajectories_patches(img, etok.patch) for img in ref.images()]
        self.images = jnp.asarray(np.stack(imgs))
        self.vocab, self.vs = etok.tok.vocab_size, etok.tok.vision_start

    def apply(self, variables, tokens, types, positions, segment_ids, blocks, patch_pos,
              latents, timesteps):
        clean = (segment_ids > 0) & (types != layout.NOISY)
        k = jnp.cumsum(clean, axis=1) - 1
        nxt = self.stream[jnp.clip(k + 1, 0, self.stream.shape[0] - 1)]
        logits = 10.0 * jax.nn.one_hot(nxt, self.vocab)
        m = jnp.cumsum(clean & (tokens == self.vs), axis=1)
        x0 = self.images[jnp.clip(m, 0, self.images.shape[0] - 1), patch_pos]
        vel = (latents - x0) / jnp.maximum(timesteps, 1e-6)[..., None]
        return logits, vel


def trajectories_patches(img, patch):
    return tk.patchify(np.asarray(img), patch).astype(np.float32) / 127.5 - 1.0


def _episodes(kind, n=12):
    return [e for e in mixer.generate_episodes(5, n, {kind: 1.0})]


def _options(**kw):
    args = dict(flow_steps=FLOW_STEPS, shift=1.0, max_iterations=8, max_text_tokens=64)
    args.update(kw)
    return SamplingOptions(**args)


def _gen(etok, ref, **kw):
    return Generator(UncachedBackend(Oracle(etok, ref), etok, max_len=512), {},
                     options=_options(**kw))


@pytest.mark.parametrize("kind", ["additive", "critique", "edit"])
def test_process_loop_reproduces_reference(etok, kind):
    ref = max(_episodes(kind), key=lambda e: len(e.steps))  # the longest: several iterations
    out = _gen(etok, ref)([ref.prompt], "process")[0]
    assert out.error is None and out.episode is not None, out.error
    assert not out.hit_cap
    got = out.episode
    assert len(got.steps) == len(ref.steps) >= 2
    for a, b in zip(got.steps, ref.steps):
        assert (a.ins, a.des, a.inspect, a.refine) == (b.ins, b.des, b.inspect, b.refine)
        np.testing.assert_array_equal(a.sketch, b.sketch)
        assert (a.refined is None) == (b.refined is None)
        if b.refined is not None:
            np.testing.assert_array_equal(a.refined, b.refined)
    assert out.nfe == FLOW_STEPS * len(ref.images())
    assert out.text.endswith("<|endofepisode|>")


def test_single_pass_loop(etok):
    ref = _episodes("single_pass", 3)[0]
    out = _gen(etok, ref)([ref.prompt], "single_pass")[0]
    assert out.episode is not None and out.episode.kind == "single_pass"
    assert len(out.images) == 1 and out.nfe == FLOW_STEPS
    np.testing.assert_array_equal(out.final_image, ref.final_image())


def test_iteration_cap_stops_a_long_episode(etok):
    ref = max(_episodes("additive"), key=lambda e: len(e.steps))
    out = _gen(etok, ref, max_iterations=1)([ref.prompt], "process")[0]
    assert out.hit_cap
    assert out.episode is not None and len(out.episode.steps) == 1
    assert out.nfe == FLOW_STEPS


def test_text_cap_bounds_a_segment(etok):
    ref = _episodes("additive", 3)[0]
    out = _gen(etok, ref, max_text_tokens=3)([ref.prompt], "process")[0]
    assert out.hit_cap
    assert out.episode is None and "plan" in out.error  # truncated plan is reported, not hidden


def test_batched_prompts_are_independent(etok):
    refs = _episodes("additive", 6)[:3]
    # One oracle per reference cannot share a batch, so check that each prompt's result in a
    # batch of copies equals the single-prompt result.
    ref = refs[1]
    gen = _gen(etok, ref)
    one = gen([ref.prompt], "process")[0]
    many = gen([ref.prompt] * 3, "process")
    for r in many:
        assert r.text == one.text
        for a, b in zip(r.images, one.images):
            np.testing.assert_array_equal(a, b)


def test_pick_token_greedy_sampled_and_forced():
    from strokes_jax.inference.generator import pick_token
    logits = np.array([5.0, 1.0, 2.0, 0.5, 9.0])
    allowed = np.array([True, True, True, True, False])  # the largest logit is not allowed
    rng = np.random.default_rng(0)
    assert pick_token(logits, allowed, 0.0, rng) == 0
    draws = np.array([pick_token(logits, allowed, 2.0, rng) for _ in range(20000)])
    assert not (draws == 4).any()
    p = np.exp(logits[:4] / 2.0) / np.exp(logits[:4] / 2.0).sum()
    np.testing.assert_allclose(np.bincount(draws, minlength=4)[:4] / draws.size, p, atol=0.015)
    # A forced token (one allowed) takes nothing from the example's RNG.
    state = rng.bit_generator.state
    only = np.array([False, False, True, False, False])
    assert pick_token(logits, only, 2.0, rng) == 2 and rng.bit_generator.state == state


def test_sampled_text_follows_the_temperature(etok):
    ref = _episodes("additive", 3)[0]
    greedy = _gen(etok, ref)([ref.prompt], "process")[0]
    cold, hot = _gen(etok, ref, text_temperature=0.05), _gen(etok, ref, text_temperature=5.0)
    # The oracle's logit gap is 10, so at 0.05 sampling is greedy in effect.
    out = cold([ref.prompt], "process")[0]
    assert out.text == greedy.text
    # At 5 the right token has ~10% of the mass among ~70 allowed: the text departs.
    assert hot([ref.prompt], "process")[0].text != greedy.text
