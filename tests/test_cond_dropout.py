"""BAGEL's CFG condition dropout (data.cfg_dropout): what a dropped prompt, clean copy or
ViT copy does to the layout, and the pipeline's per-epoch, seeded draws."""

from __future__ import annotations

import numpy as np
import pytest

from strokes_jax.episodes import episode as ep
from strokes_jax.sequence import tokenizer as tk
from strokes_jax.data import pipeline as pl
from strokes_jax.sequence import layout
from tests.test_data_pipeline import IMAGE_SHAPE, PATCH, make_episode


@pytest.fixture(scope="module")
def etok():
    return tk.EpisodeTokenizer(tk.Tokenizer.shapes(), IMAGE_SHAPE, PATCH)


def test_dropped_prompt_leaves_the_rest_in_place(etok):
    e = make_episode(3, steps=2)
    a, b = etok(e), etok(e, tk.CondDrop(prompt=True))
    n = int(np.sum(a["stages"] == ep.PROMPT))
    assert n > 2 and not (b["stages"] == ep.PROMPT).any()
    assert b["tokens"][0] == etok.tok.im_start and b["positions"][0] == 0
    for k in ("tokens", "types", "stages", "patches", "patch_pos"):
        np.testing.assert_array_equal(b[k], a[k][n:], err_msg=k)
    np.testing.assert_array_equal(b["positions"], a["positions"][n:] - n)
    np.testing.assert_array_equal(b["targets"], a["targets"][n:])


def test_dropped_clean_copy_keeps_the_flow_target_and_hides_the_image(etok):
    e = make_episode(4, steps=2)
    a, b = etok(e), etok(e, tk.CondDrop(clean=frozenset({0})))
    P = etok.num_patches
    assert len(b["tokens"]) == len(a["tokens"]) - (P + 2)
    assert (b["types"] == layout.NOISY).sum() == (a["types"] == layout.NOISY).sum()  # both targets
    assert (b["types"] == layout.CLEAN).sum() == (a["types"] == layout.CLEAN).sum() - P
    # The noisy copy keeps its position, so the text after it does too.
    np.testing.assert_array_equal(np.unique(b["positions"]), np.unique(a["positions"]))
    # The plan's <|im_end|> no longer precedes the image it would announce: no CE target.
    first_noisy = int(np.argmax(b["types"] == layout.NOISY))
    assert b["tokens"][first_noisy - 1] == etok.tok.im_end and b["targets"][first_noisy - 1] == 0
    assert a["targets"][first_noisy - 1] == etok.tok.vision_start
    # Gone: that target and the removed <|vision_end|>'s; the rest are the default layout's.
    assert (b["targets"] > 0).sum() == (a["targets"] > 0).sum() - 2
    after = first_noisy + P  # the noisy copy is where it was; the clean block is gone
    for k in ("tokens", "targets", "positions", "types"):
        np.testing.assert_array_equal(b[k][after:], a[k][after + P + 2:], err_msg=k)
    np.testing.assert_array_equal(b["targets"][:first_noisy - 1], a["targets"][:first_noisy - 1])


def test_a_dropped_context_image_disappears(etok):
    e = make_episode(5, steps=2)
    e.steps[0].sketch_target = False  # drawn by someone else: context only
    a, b = etok(e), etok(e, tk.CondDrop(clean=frozenset({0})))
    assert len(b["tokens"]) == len(a["tokens"]) - (etok.num_patches + 2)
    assert b["positions"].max() == a["positions"].max() - 1  # it held one RoPE position


def test_vit_copy_dropped_alone():
    vt = tk.EpisodeTokenizer(tk.Tokenizer.shapes(), IMAGE_SHAPE, PATCH, vit_patch=12,
                             vit_max_side=5)
    e = make_episode(6, steps=2)
    a, b = vt(e), vt(e, tk.CondDrop(vit=frozenset({1})))
    assert (b["types"] == layout.VIT).sum() == (a["types"] == layout.VIT).sum() - vt.vit_num_patches
    assert (b["types"] == layout.CLEAN).sum() == (a["types"] == layout.CLEAN).sum()
    assert b["positions"].max() == a["positions"].max() - 1


def test_draw_probabilities():
    rng = np.random.default_rng(0)
    draws = [tk.CondDrop.draw(rng, 4, text=0.3, vae=0.1, vit=1.0) for _ in range(2000)]
    assert abs(np.mean([d.prompt for d in draws]) - 0.3) < 0.04
    assert abs(np.mean([len(d.clean) for d in draws]) / 4 - 0.1) < 0.02
    assert all(d.vit == frozenset(range(4)) for d in draws)
    assert tk.CondDrop.draw(rng, 4) == tk.CondDrop()


def _batches(recs, etok, dropout, n, seed=7):
    it = pl.make_train_iter(recs, etok, seq_len=640, global_batch_size=2, seed=seed,
                            num_rows=3, num_threads=2, process_index=0, process_count=1,
                            cond_dropout=dropout)
    return [next(it) for _ in range(n)]


def test_pipeline_draws_are_seeded_and_fresh_each_epoch(etok):
    recs = [make_episode(i, steps=1 + i % 2).to_bytes() for i in range(6)]
    plain = _batches(recs, etok, None, 6)
    zero = _batches(recs, etok, {"text": 0.0, "vae": 0.0}, 6)
    for x, y in zip(plain, zero):  # zero probabilities: the undropped pipeline exactly
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
    allp = _batches(recs, etok, {"text": 1.0}, 6)
    assert all(not (b["stages"][b["segment_ids"] > 0] == ep.PROMPT).any() for b in allp)
    half = _batches(recs, etok, {"text": 0.5}, 12)
    again = _batches(recs, etok, {"text": 0.5}, 12)
    for x, y in zip(half, again):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
    # Per episode (its id's first image), whether the prompt was there, over the epochs.
    kept = [int(((b["stages"] == ep.PROMPT) & (b["segment_ids"] > 0)).any(axis=1).sum())
            for b in half]
    assert 0 < sum(kept) < sum(int((b["segment_ids"].max(axis=1) > 0).sum()) * 3 for b in half)


def test_bad_dropout_config_names_the_key(etok):
    with pytest.raises(ValueError, match="data.cfg_dropout.*unknown"):
        pl.TokenizeEpisode(etok, 640, {"txt": 0.1})
    with pytest.raises(ValueError, match="data.cfg_dropout.*not in"):
        pl.TokenizeEpisode(etok, 640, {"text": 1.5})
