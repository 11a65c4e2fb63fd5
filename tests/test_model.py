"""Model tests: the generalized causal mask (on the mask function and end to end through the
unified model), hard MoT routing, per-stage loss composition (flow helpers and positional
tables are in test_flow_layers.py).

Everything runs on the tiny `test` config (width 32, depth 2) with one packed row of two real
tokenized episodes (a critique episode, which has a refine step, then an additive one). Each
jitted function is compiled once in a module-level fixture and reused.
"""

from __future__ import annotations

import dataclasses

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from strokes_jax.configs import shapes_tiny
from strokes_jax.train import losses
from strokes_jax.episodes import episode as ep
from strokes_jax.episodes.mixer import generate_episodes
from strokes_jax.model import attention
from strokes_jax.model.mot import DecoderConfig, MoTDecoder
from strokes_jax.model.unified import ModelConfig, UnifiedModel
from strokes_jax.sequence.tokenizer import CLEAN, NOISY, TEXT, EpisodeTokenizer, Tokenizer
from strokes_jax.train import step as train_step
from strokes_jax.sequence import layout

IMAGE_SHAPE, PATCH = (36, 36, 3), 6
SEQ_LEN = 432  # critique episode 0 (297) + additive episode 0 (108) = 405, then padding
PACK_KEYS = ("tokens", "types", "stages", "targets", "target_stages", "positions", "blocks",
             "patch_pos")


# --------------------------------------------------------------------------------------
# Fixtures: a real packed row, the tiny model, compiled functions.


def pack(rows: list[dict[str, np.ndarray]], length: int) -> dict[str, np.ndarray]:
    """Concatenate tokenized episodes into one row: segment ids 1, 2, ..., block ids of later
    episodes offset by the max block so far (0 stays 0), zero padding (segment 0)."""
    cols = {k: [] for k in PACK_KEYS + ("patches", "segment_ids")}
    max_block = 0
    for seg, r in enumerate(rows, start=1):
        n = len(r["tokens"])
        for k in PACK_KEYS + ("patches",):
            cols[k].append(r[k])
        cols["blocks"][-1] = np.where(r["blocks"] > 0, r["blocks"] + max_block, 0)
        max_block = max(max_block, int(cols["blocks"][-1].max()))
        cols["segment_ids"].append(np.full((n,), seg, np.int32))
    out = {k: np.concatenate(v) for k, v in cols.items()}
    used = len(out["tokens"])
    assert used <= length, (used, length)
    for k, v in out.items():
        pad = np.zeros((length - used,) + v.shape[1:], v.dtype)
        out[k] = np.concatenate([v, pad])[None]  # [1, L, ...]
    return out


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.shapes()


@pytest.fixture(scope="module")
def row(tok) -> dict[str, np.ndarray]:
    etok = EpisodeTokenizer(tok, IMAGE_SHAPE, PATCH)
    e1 = next(generate_episodes(0, 1, {"critique": 1.0}))
    e2 = next(generate_episodes(0, 1, {"additive": 1.0}))
    r = pack([etok(e1), etok(e2)], SEQ_LEN)
    # The row must exercise what the tests rely on.
    s = r["segment_ids"][0]
    assert (s == 0).any() and (s == 1).any() and (s == 2).any()
    assert ((r["types"][0] == NOISY) & (s == 2)).any()
    assert (r["target_stages"][0][r["targets"][0] > 0] == ep.INSPECT).any()
    assert ((r["types"][0] == NOISY) & (r["stages"][0] == ep.REFINE)).any()
    return r


@pytest.fixture(scope="module")
def cfg():
    return shapes_tiny.get_config("test")


@pytest.fixture(scope="module")
def model(cfg, tok) -> UnifiedModel:
    mc = dict(cfg.model)
    mc.update(vocab_size=tok.vocab_size, patch_dim=PATCH * PATCH * 3,
              latent_grid=(IMAGE_SHAPE[0] // PATCH, IMAGE_SHAPE[1] // PATCH))
    m = UnifiedModel(ModelConfig.from_config(mc))
    assert m.cfg.decoder.width == 32 and m.cfg.decoder.depth == 2
    assert m.cfg.decoder.dtype == "float32"
    return m


@pytest.fixture(scope="module")
def params(model, row):
    variables = model.init(jax.random.PRNGKey(0), *model_inputs(row, *inputs_lat(row)))
    p = nn.unbox(variables["params"])
    # llm2vae is zero-initialised (velocities start at 0); make it random so velocity
    # outputs carry information about the inputs.
    k = jax.random.PRNGKey(1)
    p["llm2vae"]["kernel"] = 0.2 * jax.random.normal(k, p["llm2vae"]["kernel"].shape)
    p["llm2vae"]["bias"] = 0.1 * jax.random.normal(jax.random.fold_in(k, 1),
                                                   p["llm2vae"]["bias"].shape)
    return p


def inputs_lat(row):
    """x_t at noisy tokens, x_0 at clean ones (the training recipe), t per noisy block."""
    xt, t, _ = train_step.noised_inputs(jax.tree_util.tree_map(jnp.asarray, row),
                                        jax.random.PRNGKey(7), 1.0)
    return np.asarray(xt), np.asarray(t)


def model_inputs(row, latents, timesteps):
    return (row["tokens"], row["types"], row["positions"], row["segment_ids"], row["blocks"],
            row["patch_pos"], latents, timesteps)


@pytest.fixture(scope="module")
def apply_fn(model):
    return jax.jit(lambda p, *a: model.apply({"params": p}, *a))


@pytest.fixture(scope="module")
def base(row):
    """The unperturbed inputs as a mutable dict (copy before editing)."""
    xt, t = inputs_lat(row)
    return dict(tokens=row["tokens"].copy(), latents=xt, timesteps=t)


def run_model(apply_fn, params, row, tokens, latents, timesteps):
    r = dict(row, tokens=tokens)
    logits, vel = apply_fn(params, *model_inputs(r, latents, timesteps))
    return np.asarray(logits[0]), np.asarray(vel[0])


@pytest.fixture(scope="module")
def base_out(apply_fn, params, row, base):
    out = run_model(apply_fn, params, row, base["tokens"], base["latents"], base["timesteps"])
    assert np.isfinite(out[0]).all() and np.isfinite(out[1]).all()
    return out


def token_diff(a, b):
    """Per-token max |a - b| over logits and velocities: [L]."""
    return np.maximum(np.abs(a[0] - b[0]).max(-1), np.abs(a[1] - b[1]).max(-1))


# --------------------------------------------------------------------------------------
# 1. Mask rules on the mask function.


@pytest.fixture(scope="module")
def mask(row) -> np.ndarray:
    m = attention.generalized_causal_mask(jnp.asarray(row["segment_ids"]),
                                          jnp.asarray(row["blocks"]), jnp.asarray(row["types"]))
    m = np.asarray(m)
    assert m.shape == (1, SEQ_LEN, SEQ_LEN) and m.dtype == bool
    return m[0]


def test_mask_text_is_causal(mask, row):
    seg, blk, typ = row["segment_ids"][0], row["blocks"][0], row["types"][0]
    L = len(seg)
    j = np.arange(L)
    text = np.nonzero((seg > 0) & (blk == 0) & (typ == TEXT))[0]
    assert len(text) > 50
    for i in text:
        expect = (seg == seg[i]) & (j <= i) & (typ != NOISY)
        np.testing.assert_array_equal(mask[i], expect, err_msg=f"text token {i}")
    # In particular: no text token sees anything after itself.
    assert not np.triu(mask[np.ix_(text, text)], 1).any()


def test_mask_blocks_are_bidirectional(mask, row):
    blk = row["blocks"][0]
    ids = np.unique(blk[blk > 0])
    assert len(ids) >= 8  # critique episode: 3 images x 2 copies; additive: 1 x 2
    for b in ids:
        idx = np.nonzero(blk == b)[0]
        assert mask[np.ix_(idx, idx)].all(), f"block {b} is not bidirectional"


def test_mask_noisy_tokens_hidden_from_everything_else(mask, row):
    blk, typ = row["blocks"][0], row["types"][0]
    noisy = np.nonzero(typ == NOISY)[0]
    for j in noisy:
        seen_by = np.nonzero(mask[:, j])[0]
        assert (blk[seen_by] == blk[j]).all(), f"noisy token {j} seen outside its block"
        later = seen_by[seen_by > j]
        assert (blk[later] == blk[j]).all()
    # Later clean copy and later text explicitly: the first image's noisy copy is block 1,
    # its clean copy block 2; nothing after block 1 but block 1 itself sees it.
    n1 = np.nonzero(blk == 1)[0]
    after = np.arange(n1[-1] + 1, len(blk))
    assert not mask[np.ix_(after, n1)].any()


def test_mask_clean_block_sees_earlier_context(mask, row):
    seg, blk, typ = row["segment_ids"][0], row["blocks"][0], row["types"][0]
    L = len(seg)
    j = np.arange(L)
    clean_blocks = np.unique(blk[typ == CLEAN])
    assert len(clean_blocks) >= 4
    for b in clean_blocks:
        idx = np.nonzero(blk == b)[0]
        start, end = idx[0], idx[-1]
        assert row["tokens"][0][start] != 0 and typ[start] == TEXT  # <|vision_start|>
        s = seg[start]
        earlier = (seg == s) & (j < start) & (typ != NOISY)
        assert earlier.any()
        for i in idx:
            expect = earlier | (blk == b)
            np.testing.assert_array_equal(mask[i], expect, err_msg=f"clean block {b} token {i}")
        assert not mask[np.ix_(idx, np.arange(end + 1, L))].any()


def test_mask_noisy_block_sees_earlier_context_only(mask, row):
    seg, blk, typ = row["segment_ids"][0], row["blocks"][0], row["types"][0]
    j = np.arange(len(seg))
    for b in np.unique(blk[typ == NOISY]):
        idx = np.nonzero(blk == b)[0]
        expect = ((seg == seg[idx[0]]) & (j < idx[0]) & (typ != NOISY)) | (blk == b)
        for i in idx:
            np.testing.assert_array_equal(mask[i], expect, err_msg=f"noisy block {b} token {i}")


def test_mask_packed_episodes_isolated_and_padding(mask, row):
    seg = row["segment_ids"][0]
    e1, e2, pad = (np.nonzero(seg == s)[0] for s in (1, 2, 0))
    assert not mask[np.ix_(e1, e2)].any()
    assert not mask[np.ix_(e2, e1)].any()
    for p in pad:
        assert mask[p].sum() == 1 and mask[p, p], f"padding {p} sees more than itself"
        assert mask[:, p].sum() == 1, f"padding {p} is seen by another token"
    # Every row attends to at least itself (finite softmax).
    assert np.diagonal(mask).all()


def test_mask_reference_on_small_example():
    # Hand-built row: [t t | n n | vs c c ve | t] + [t n vs c ve] + pad pad, for a
    # brute-force comparison independent of the tokenizer.
    T_, N_, C_ = TEXT, NOISY, CLEAN
    types = [T_, T_, N_, N_, T_, C_, C_, T_, T_, T_, N_, T_, C_, T_, 0, 0]
    blocks = [0, 0, 1, 1, 2, 2, 2, 2, 0, 0, 3, 4, 4, 4, 0, 0]
    segs = [1] * 9 + [2] * 5 + [0, 0]
    L = len(types)
    m = np.asarray(attention.generalized_causal_mask(
        jnp.asarray([segs]), jnp.asarray([blocks]), jnp.asarray([types])))[0]
    ref = np.zeros((L, L), bool)
    for i in range(L):
        for j in range(L):
            if i == j:
                ref[i, j] = True
            elif segs[i] == 0 or segs[i] != segs[j]:
                ref[i, j] = False
            elif blocks[i] > 0 and blocks[i] == blocks[j]:
                ref[i, j] = True
            else:
                ref[i, j] = j < i and types[j] != NOISY
    np.testing.assert_array_equal(m, ref)


# --------------------------------------------------------------------------------------
# 2. The same rules end to end through the model.


def _first_noisy_block(row):
    blk, typ, seg = row["blocks"][0], row["types"][0], row["segment_ids"][0]
    b = int(blk[(typ == NOISY) & (seg == 1)].min())
    return b, blk == b


def test_e2e_noisy_block_invisible(apply_fn, params, row, base, base_out):
    b, in_blk = _first_noisy_block(row)
    assert (row["types"][0][in_blk] == NOISY).all()
    lat, t = base["latents"].copy(), base["timesteps"].copy()
    rng = np.random.default_rng(0)
    lat[0, in_blk] += rng.normal(size=lat[0, in_blk].shape).astype(np.float32)
    t[0, in_blk] = 1.0 - t[0, in_blk] * 0.5
    out = run_model(apply_fn, params, row, base["tokens"], lat, t)
    np.testing.assert_allclose(out[0][~in_blk], base_out[0][~in_blk], rtol=0, atol=1e-6)
    np.testing.assert_allclose(out[1][~in_blk], base_out[1][~in_blk], rtol=0, atol=1e-6)
    # ...but the noisy block itself responds, every one of its tokens.
    dv = np.abs(out[1][in_blk] - base_out[1][in_blk]).max(-1)
    assert (dv > 1e-4).all(), dv


@pytest.mark.parametrize("changed,kept", [(1, 2), (2, 1)])
def test_e2e_packed_episodes_isolated(apply_fn, params, row, base, base_out, tok, changed, kept):
    seg, typ = row["segment_ids"][0], row["types"][0]
    rng = np.random.default_rng(changed)
    tokens, lat, t = base["tokens"].copy(), base["latents"].copy(), base["timesteps"].copy()
    txt = (seg == changed) & (typ == TEXT)
    latm = (seg == changed) & (typ != TEXT)
    tokens[0, txt] = (tokens[0, txt] + rng.integers(1, tok.vocab_size, txt.sum())) % tok.vocab_size
    lat[0, latm] += rng.normal(size=lat[0, latm].shape).astype(np.float32)
    t[0, latm & (typ == NOISY)] *= 0.5
    out = run_model(apply_fn, params, row, tokens, lat, t)
    d = token_diff(out, base_out)
    assert d[seg == kept].max() <= 1e-6, f"episode {kept} moved by {d[seg == kept].max()}"
    assert d[seg == 0].max() <= 1e-6, "padding moved"
    assert d[seg == changed].min() > 0, "every token of the edited episode should change"


def test_e2e_text_is_causal(apply_fn, params, row, base, base_out, tok):
    seg, blk, typ = row["segment_ids"][0], row["blocks"][0], row["types"][0]
    L = len(seg)
    # A text token of episode 1 after its first image, with a later image still to come.
    first_clean_end = np.nonzero((blk == 2))[0][-1]
    cands = np.nonzero((seg == 1) & (typ == TEXT) & (blk == 0) & (np.arange(L) > first_clean_end))[0]
    k = int(cands[len(cands) // 4])
    later_noisy = np.nonzero((seg == 1) & (typ == NOISY) & (np.arange(L) > k))[0]
    later_text = np.nonzero((seg == 1) & (typ == TEXT) & (np.arange(L) > k))[0]
    assert len(later_noisy) and len(later_text)
    tokens = base["tokens"].copy()
    tokens[0, k] = (tokens[0, k] + 1) % tok.vocab_size
    out = run_model(apply_fn, params, row, tokens, base["latents"], base["timesteps"])
    d = token_diff(out, base_out)
    assert d[:k].max() <= 1e-6, f"earlier tokens moved by {d[:k].max()}"
    assert np.abs(out[0][:k] - base_out[0][:k]).max() <= 1e-6
    assert d[seg == 2].max() <= 1e-6
    assert d[k] > 0
    assert (d[later_text] > 0).all(), "later text must see the changed token"
    assert (d[later_noisy] > 0).all(), "later noisy latents must see the earlier context"


def test_e2e_clean_latent_visible_bidirectionally(apply_fn, params, row, base, base_out):
    seg, blk, typ = row["segment_ids"][0], row["blocks"][0], row["types"][0]
    L = len(seg)
    pos = np.arange(L)
    b = 2  # clean copy of episode 1's first image
    idx = np.nonzero(blk == b)[0]
    assert typ[idx[0]] == TEXT and typ[idx[-1]] == TEXT and (typ[idx[1:-1]] == CLEAN).all()
    c = int(idx[len(idx) // 2])  # one clean latent in the middle of the block
    lat = base["latents"].copy()
    lat[0, c] += 0.5
    out = run_model(apply_fn, params, row, base["tokens"], lat, base["timesteps"])
    d = token_diff(out, base_out)
    others = idx[idx != c]
    assert (d[others] > 0).all(), "every token of the block (both markers too) sees it"
    assert (d[idx[idx < c]] > 0).all(), "earlier tokens of the block see it (bidirectional)"
    later_text = np.nonzero((seg == 1) & (typ == TEXT) & (blk == 0) & (pos > idx[-1]))[0]
    assert len(later_text) and (d[later_text] > 0).all(), "later text sees the clean copy"
    assert d[: idx[0]].max() <= 1e-6, "tokens before the block (incl. its noisy copy) moved"
    assert d[seg == 2].max() <= 1e-6 and d[seg == 0].max() <= 1e-6


# --------------------------------------------------------------------------------------
# 3. Hard routing in the MoT decoder.


@pytest.fixture(scope="module")
def decoder_grad(cfg):
    # The decoder's own keys of the model block (the rest belong to ModelConfig).
    keys = {f.name for f in dataclasses.fields(DecoderConfig)}
    dc = DecoderConfig(**{k: v for k, v in dict(cfg.model).items() if k in keys})
    dec = MoTDecoder(dc)
    L = 12
    x = jax.random.normal(jax.random.PRNGKey(0), (1, L, dc.width))
    pos = jnp.arange(L)[None]
    mask = jnp.tril(jnp.ones((L, L), bool))[None]
    p = nn.unbox(dec.init(jax.random.PRNGKey(1), x, jnp.zeros((1, L), bool), pos, mask)["params"])
    w = jax.random.normal(jax.random.PRNGKey(2), (1, L, dc.width))

    @jax.jit
    def g(p, is_gen):
        return jax.grad(lambda p: jnp.sum(dec.apply({"params": p}, x, is_gen, pos, mask) * w))(p)

    return lambda is_gen: g(p, jnp.full((1, L), is_gen)), p


def _expert_leaves(tree, tag):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    out = {}
    for path, leaf in flat:
        names = [getattr(k, "key", str(k)) for k in path]
        if any(n.endswith(f"_{tag}") for n in names):
            out["/".join(names)] = np.asarray(leaf)
    return out


def test_every_block_weight_has_both_experts(decoder_grad):
    _, p = decoder_grad
    und = {re.sub(r"_und(?=/|$)", "", k) for k in _expert_leaves(p, "und")}
    gen = {re.sub(r"_gen(?=/|$)", "", k) for k in _expert_leaves(p, "gen")}
    assert und == gen and len(und) >= 2 * 12 + 1
    n_leaves = len(jax.tree_util.tree_leaves(p))
    assert len(und) * 2 == n_leaves, "every decoder weight belongs to one expert"


@pytest.mark.parametrize("is_gen,silent,active", [(False, "gen", "und"), (True, "und", "gen")])
def test_hard_routing_grads(decoder_grad, is_gen, silent, active):
    g_fn, _ = decoder_grad
    g = g_fn(is_gen)
    zero = _expert_leaves(g, silent)
    live = _expert_leaves(g, active)
    assert zero and live
    for name, v in zero.items():
        assert np.all(v == 0), f"{name} got gradient {np.abs(v).max()} from {active}-only tokens"
    # The routed expert does learn: every weight matrix of it gets a non-zero gradient.
    for name, v in live.items():
        if name.endswith("kernel"):
            assert np.abs(v).max() > 0, f"{name} got no gradient"


# --------------------------------------------------------------------------------------
# 4. Loss composition via train.step.loss_fn.


@pytest.fixture(scope="module")
def loss_grad(model, params, row):
    batch = {k: jnp.asarray(row[k]) for k in layout.ROW_FIELDS}

    @jax.jit
    def g(params, batch, sw, ce_w, mse_w):
        # LossConfig fields are used as arrays inside loss_fn, so traced weights give one
        # compile for every weighting.
        lc = train_step.LossConfig(stage_weights=sw, ce_weight=ce_w, mse_weight=mse_w, shift=1.0)
        f = functools.partial(train_step.loss_fn, model=model, lc=lc)
        (loss, sums), grads = jax.value_and_grad(f, has_aux=True)(params, batch,
                                                                  jax.random.PRNGKey(3))
        return (loss, losses.finalize(sums, ce_w, mse_w)), grads

    def call(weights, ce_w=0.25, mse_w=1.0, b=None):
        sw = losses.stage_weight_vector(weights)
        (loss, metrics), grads = g(params, batch if b is None else b, sw, ce_w, mse_w)
        return float(loss), jax.tree_util.tree_map(np.asarray, metrics), \
            jax.tree_util.tree_map(np.asarray, grads)

    return call, batch


def _gnorm(grads):
    return float(sum(np.sum(np.square(x)) for x in jax.tree_util.tree_leaves(grads))) ** 0.5


ALL = dict(prompt=0.0, plan=1.0, sketch=1.0, inspect=1.0, refine=1.0)


def test_loss_per_stage_metrics(loss_grad):
    call, _ = loss_grad
    loss, metrics, grads = call(ALL)
    assert np.isfinite(loss) and loss > 0
    for k in ("loss", "ce", "mse", "text_accuracy", "plan/ce", "sketch/ce", "inspect/ce",
              "refine/ce", "sketch/mse", "refine/mse", "plan/accuracy"):
        assert k in metrics, k
        assert np.isfinite(metrics[k]), k
    for k in ("plan/ce", "inspect/ce", "refine/ce", "sketch/mse", "refine/mse"):
        assert metrics[k] > 0, k
        assert metrics[k.replace("/ce", "/ce_tokens").replace("/mse", "/mse_tokens")] > 0, k
    assert "inspect/mse" not in metrics and "plan/mse" not in metrics
    assert _gnorm(grads) > 0 and np.isfinite(_gnorm(grads))


def test_loss_only_inspect_and_all_zero(loss_grad):
    call, _ = loss_grad
    only = dict.fromkeys(ep.STAGE_NAMES, 0.0) | {"inspect": 1.0}
    loss_i, metrics, g_i = call(only, ce_w=1.0, mse_w=0.0)
    assert _gnorm(g_i) > 0
    # The loss is the inspect tokens' CE summed over all CE tokens' count.
    n_ce = sum(metrics[f"{s}/ce_tokens"] for s in ep.STAGE_NAMES)
    np.testing.assert_allclose(loss_i, metrics["inspect/ce"] * metrics["inspect/ce_tokens"] / n_ce,
                               rtol=1e-5)
    # A CE-only loss gives the velocity head no gradient.
    assert np.all(g_i["llm2vae"]["kernel"] == 0)

    loss0, _, g0 = call(dict.fromkeys(ep.STAGE_NAMES, 0.0), ce_w=1.0, mse_w=1.0)
    assert loss0 == 0.0
    for path, v in jax.tree_util.tree_flatten_with_path(g0)[0]:
        assert np.all(v == 0), f"{jax.tree_util.keystr(path)} has gradient with all weights 0"


def test_loss_zero_stage_weight_removes_exactly_that_stage(loss_grad):
    call, batch = loss_grad
    _, m_all, g_all = call(ALL)
    _, _, g_no = call(ALL | {"inspect": 0.0})
    _, _, g_only = call(dict.fromkeys(ep.STAGE_NAMES, 0.0) | {"inspect": 1.0}, mse_w=0.0)
    # Linear in the weights: full = (inspect 0) + (inspect only).
    for a, b, c in zip(*(jax.tree_util.tree_leaves(x) for x in (g_all, g_no, g_only))):
        # Rounding relative to the leaf's scale (the x head's 1/t makes some gradients large).
        np.testing.assert_allclose(a, b + c, rtol=1e-4, atol=1e-5 * float(np.abs(a).max()))
    assert _gnorm(g_only) > 1e-3 * _gnorm(g_all)

    # Manual exclusion: drop the inspect targets from the batch; the CE is normalised by
    # the number of CE tokens, so rescale ce_weight to the original count.
    insp = (batch["target_stages"] == ep.INSPECT) & (batch["targets"] > 0)
    n_all = int(jnp.sum((batch["targets"] > 0) & (batch["segment_ids"] > 0)))
    n_insp = int(jnp.sum(insp))
    assert n_insp > 0
    b2 = dict(batch, targets=jnp.where(insp, 0, batch["targets"]))
    _, _, g_man = call(ALL, ce_w=0.25 * (n_all - n_insp) / n_all, b=b2)
    for a, b in zip(jax.tree_util.tree_leaves(g_no), jax.tree_util.tree_leaves(g_man)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(a).max()))
