"""BAGEL's noisy / clean / ViT packing (sequence/tokenizer.py `vit_patch`): the layout around each ViT
copy, the attention it gets, the packer carrying its fields, and a jitted train step that
feeds the vision tower. Shapes-world images (36x36) with 9x9 ViT patches (4x4 per image) on a
5x5 position table, so row * max_side + col differs from a plain token index."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from strokes_jax.configs import shapes_tiny
from strokes_jax.episodes import episode as ep
from strokes_jax.sequence import tokenizer as tk
from strokes_jax.data import pipeline as pl
from strokes_jax.model import attention
from strokes_jax.train import loop
from strokes_jax.train import step as sp
from strokes_jax.worlds import shapes
from strokes_jax.worlds.shapes import Obj
from strokes_jax.sequence import layout

IMAGE_SHAPE, PATCH = (shapes.CANVAS, shapes.CANVAS, 3), 6
VIT_PATCH, MAX_SIDE = 9, 5
VIT_N = (shapes.CANVAS // VIT_PATCH) ** 2


@pytest.fixture(scope="module")
def etoks():
    tok = tk.Tokenizer.shapes()
    return (tk.EpisodeTokenizer(tok, IMAGE_SHAPE, PATCH),
            tk.EpisodeTokenizer(tok, IMAGE_SHAPE, PATCH, vit_patch=VIT_PATCH, vit_max_side=MAX_SIDE))


def make_episode(i: int = 0, context_sketch: bool = False) -> ep.Episode:
    """Plan, sketch, inspect with a fix, refined image: two images per episode. With
    `context_sketch` the sketch is the model's own drawing (clean + ViT copies, no noisy)."""
    o = Obj(shapes.SHAPES[i % 4], shapes.COLORS[i % 10], i % 3, (i // 3) % 3)
    new = o.replace(color="blue" if o.color != "blue" else "red")
    phrase = lambda x: f"{x.color} {x.shape} at r{x.row} c{x.col}"
    step = ep.Step(sketch=shapes.render([o]), ins=f"add {phrase(o)}", des=phrase(o),
                   inspect=f"plan ok ; image wrong : {phrase(o)} should be {new.color}",
                   refine=f"recolour {phrase(o)} to {new.color}", refined=shapes.render([new]),
                   sketch_target=not context_sketch)
    return ep.Episode(id=f"ep{i}", prompt=f"a photo of a {o.shape}", tag="single_object",
                      metadata={}, steps=[step],
                      kind="self_critique" if context_sketch else "critique")


def vit_blocks(out):
    """Block ids of the ViT copies, in order."""
    return sorted(set(out["blocks"][out["types"] == layout.VIT].tolist()))


def test_layout_around_each_vit_copy(etoks):
    _, etok = etoks
    for context in (False, True):
        e = make_episode(3, context_sketch=context)
        out = etok(e)
        images = [c for _, m, c in e.segments() if m != "text"]
        stages = [s for s, m, _ in e.segments() if m != "text"]
        n = len(out["tokens"])
        assert out["vit_patches"].shape == (n, VIT_PATCH * VIT_PATCH * 3)
        assert out["vit_patches"].dtype == np.uint8 and out["vit_pos"].dtype == np.int32
        assert len(vit_blocks(out)) == len(images) == 2
        for img, stage, b in zip(images, stages, vit_blocks(out)):
            idx = np.nonzero(out["blocks"] == b)[0]
            vs, vit, ve = idx[0], idx[1:-1], idx[-1]
            # <|vision_start|> [ViT] <|vision_end|>, right after the clean copy's <|vision_end|>.
            assert (np.diff(idx) == 1).all() and len(vit) == VIT_N
            assert out["tokens"][vs] == etok.tok.vision_start and out["types"][vs] == layout.TEXT
            assert out["tokens"][ve] == etok.tok.vision_end and out["types"][ve] == layout.TEXT
            assert (out["types"][vit] == layout.VIT).all()
            clean_end = vs - 1
            assert out["tokens"][clean_end] == etok.tok.vision_end
            assert out["blocks"][clean_end] == b - 1 and (out["types"][out["blocks"] == b - 1] != layout.NOISY).all()
            # BAGEL: clean (and noisy) copy at r, the ViT copy at r + 1, the next token r + 2.
            pos = out["positions"][clean_end]
            assert (out["positions"][out["blocks"] == b - 1] == pos).all()
            assert (out["positions"][idx] == pos + 1).all()
            assert out["positions"][ve + 1] == pos + 2
            # Pixels at the ViT patch size, in the ViT's (row, col) position ids.
            np.testing.assert_array_equal(out["vit_patches"][vit], tk.patchify(img, VIT_PATCH))
            side = shapes.CANVAS // VIT_PATCH
            want = [r * MAX_SIDE + c for r in range(side) for c in range(side)]
            assert out["vit_pos"][vit].tolist() == want
            assert (out["stages"][idx] == stage).all()
            assert (out["patches"][idx] == 0).all() and (out["patch_pos"][idx] == 0).all()
            # The ViT copy is placed, not predicted: only its closing marker has a CE target,
            # the token after the image, which the clean copy's marker no longer predicts.
            assert (out["targets"][idx[:-1]] == 0).all() and out["targets"][clean_end] == 0
            assert out["targets"][ve] == out["tokens"][ve + 1] > 0
            assert out["target_stages"][ve] == out["stages"][ve + 1]
        # Nothing but ViT tokens carries ViT fields.
        other = out["types"] != layout.VIT
        assert (out["vit_patches"][other] == 0).all() and (out["vit_pos"][other] == 0).all()


def test_without_vit_copies_the_layout_is_the_default(etoks):
    """Deleting the ViT copies from the ViT layout gives back the default layout exactly,
    except block numbering and the clean <|vision_end|>'s target (which moved to the ViT
    copy's closing marker)."""
    plain, etok = etoks
    for context in (False, True):
        e = make_episode(5, context_sketch=context)
        a, b = plain(e), etok(e)
        assert set(a) == set(layout.TOKEN_FIELDS) | {"patches"}
        keep = ~np.isin(b["blocks"], vit_blocks(b))
        assert len(a["tokens"]) + len(vit_blocks(b)) * (VIT_N + 2) == len(b["tokens"])
        for k in ("tokens", "types", "stages", "patch_pos", "patches"):
            np.testing.assert_array_equal(b[k][keep], a[k], err_msg=k)
        # Positions: each earlier ViT copy took one extra RoPE position.
        shift = np.cumsum(np.isin(np.arange(len(b["tokens"])) - 1,
                                  [np.nonzero(b["blocks"] == v)[0][-1] for v in vit_blocks(b)]))
        np.testing.assert_array_equal(b["positions"][keep] - shift[keep], a["positions"])
        np.testing.assert_array_equal(np.unique(b["blocks"][keep], return_inverse=True)[1],
                                      np.unique(a["blocks"], return_inverse=True)[1])
        moved = np.nonzero(b["tokens"][keep] == etok.tok.vision_end)[0]
        ends = np.nonzero((b["tokens"] == etok.tok.vision_end) & ~keep)[0]
        np.testing.assert_array_equal(b["targets"][ends], a["targets"][moved])
        assert (b["targets"][keep][moved] == 0).all()
        rest = np.setdiff1d(np.arange(len(a["tokens"])), moved)
        np.testing.assert_array_equal(b["targets"][keep][rest], a["targets"][rest])
    assert etok.image_tokens() == plain.image_tokens() + VIT_N + 2


def test_mask_later_tokens_see_clean_and_vit_copies_not_noisy(etoks):
    _, etok = etoks
    out = etok(make_episode(1))
    n = len(out["tokens"])
    mask = np.asarray(attention.generalized_causal_mask(
        np.ones((1, n), np.int32), out["blocks"][None], out["types"][None]))[0]
    types, blocks = out["types"], out["blocks"]
    vit_b = vit_blocks(out)[0]  # the sketch's ViT copy
    clean = blocks == vit_b - 1
    noisy = blocks == vit_b - 2
    vit = blocks == vit_b
    assert (types[noisy] == layout.NOISY).all() and (types[clean] == layout.CLEAN).sum() == etok.num_patches
    later = np.nonzero((types == layout.TEXT) & (blocks == 0) & (np.arange(n) > np.nonzero(vit)[0][-1]))[0][0]
    assert out["tokens"][later] == etok.tok.im_start  # the inspection opens
    assert mask[later][clean].all() and mask[later][vit].all()
    assert not mask[later][noisy].any()
    # The ViT copy: bidirectional within itself, sees the clean copy, never the noisy one.
    assert mask[np.ix_(vit, vit)].all() and mask[np.ix_(vit, clean)].all()
    assert not mask[np.ix_(vit, noisy)].any()
    # Earlier copies do not look ahead at the ViT copy.
    assert not mask[np.ix_(clean | noisy, vit)].any()


def test_bad_vit_settings_name_the_key():
    tok = tk.Tokenizer.shapes()
    with pytest.raises(ValueError, match="vit_patch: image 36x36 is not divisible"):
        tk.EpisodeTokenizer(tok, IMAGE_SHAPE, PATCH, vit_patch=7)
    with pytest.raises(ValueError, match="vit_max_side: a 4x4 ViT patch grid exceeds the 3x3"):
        tk.EpisodeTokenizer(tok, IMAGE_SHAPE, PATCH, vit_patch=9, vit_max_side=3)
    c = shapes_tiny.get_config("test")
    c.data.vit_copies = True
    with pytest.raises(ValueError, match="data.vit_copies needs model.vision"):
        loop.episode_tokenizer(c)


def test_packer_carries_vit_fields(etoks):
    _, etok = etoks
    recs = [make_episode(i, context_sketch=bool(i % 2)).to_bytes() for i in range(5)]
    seq_len, rows = 480, 2  # two episodes (about 200-240 tokens) per row
    it = pl.make_eval_iter(recs, etok, seq_len=seq_len, global_batch_size=rows, num_rows=2,
                           process_index=0, process_count=1)
    batches = list(it)
    dim = VIT_PATCH * VIT_PATCH * 3
    by_id = {}
    for r in recs:
        e = ep.Episode.from_bytes(r)
        by_id[etok(e)["tokens"].tobytes() + etok(e)["patches"].tobytes()] = etok(e)
    found, padded_rows = 0, 0
    for b in batches:
        assert set(b) == set(layout.ROW_FIELDS) | set(layout.VIT_FIELDS)
        assert b["vit_patches"].shape == (rows, seq_len, dim) and b["vit_patches"].dtype == np.uint8
        assert b["vit_pos"].shape == (rows, seq_len) and b["vit_pos"].dtype == np.int32
        for r in range(rows):
            row = {k: v[r] for k, v in b.items()}
            pad = row["segment_ids"] == 0
            padded_rows += int(pad.all())
            assert (row["vit_patches"][pad] == 0).all() and (row["vit_pos"][pad] == 0).all()
            image_ids = set()
            for s in range(1, int(row["segment_ids"].max()) + 1):
                idx = np.nonzero(row["segment_ids"] == s)[0]
                orig = by_id[row["tokens"][idx].tobytes() + row["patches"][idx].tobytes()]
                np.testing.assert_array_equal(row["vit_patches"][idx], orig["vit_patches"])
                np.testing.assert_array_equal(row["vit_pos"][idx], orig["vit_pos"])
                ids = set(row["blocks"][idx][row["types"][idx] == layout.VIT].tolist())
                assert len(ids) == 2 and not ids & image_ids  # the ViT groups images by block
                image_ids |= ids
                found += 1
    assert found == len(recs) and padded_rows >= 1  # the last batch is filled with empty rows
    empty = pl.empty_row(8, etok.tok.pad_id, etok.patch_dim, etok.vit_patch_dim)
    assert empty["vit_patches"].shape == (8, dim) and not empty["vit_patches"].any()
    # A packer expecting ViT fields refuses rows made without them, naming what is missing.
    plain, _ = etoks
    row = pl._Row()
    row.parts.append(plain(make_episode(0)))
    with pytest.raises(KeyError, match=r"episode #1 of the row lacks \['vit_patches', 'vit_pos'\]"):
        row.finish(seq_len, etok.tok.pad_id, etok.patch_dim, dim)


def _vit_config():
    """shapes_tiny:test with a tiny SigLIP tower and ViT copies switched on."""
    c = shapes_tiny.get_config("test")
    c.model.vision = dict(width=16, depth=1, heads=2, mlp=24, patch=VIT_PATCH, channels=3,
                          max_side=MAX_SIDE, norm_eps=1e-6, dtype="float32")
    c.data.vit_copies = True
    c.optim.update(warmup_steps=0)  # the first step's learning rate is not 0
    return c


@pytest.mark.slow
def test_jitted_train_step_trains_the_vision_tower():
    c = _vit_config()
    s = loop.setup(c)
    assert s.etok.vit_patch == VIT_PATCH and "vision" in s.state.params
    recs = [make_episode(i).to_bytes() for i in range(2)]
    it = pl.make_train_iter(recs, s.etok, seq_len=c.data.seq_len,
                            global_batch_size=c.data.batch_size, seed=0, num_threads=1,
                            prefetch=2, process_index=0, process_count=1)
    batch = loop._batch(next(it), s.mesh)
    assert set(batch) == set(layout.ROW_FIELDS) | set(layout.VIT_FIELDS)
    n_vit = int((np.asarray(batch["types"]) == layout.VIT).sum())
    assert n_vit > 0 and n_vit % VIT_N == 0
    lc = sp.LossConfig.from_config(c)

    # The gradient reaches every vision tower parameter, and only through the ViT fields.
    grads_fn = jax.jit(lambda p, b: sp.grads_and_sums(p, b, jax.random.PRNGKey(0), model=s.model,
                                                      lc=lc)[0]["vision"])
    norms = jax.tree_util.tree_map(lambda g: float(np.linalg.norm(np.asarray(g))),
                                   grads_fn(s.state.params, batch))
    flat = jax.tree_util.tree_flatten_with_path(norms)[0]
    assert flat and all(np.isfinite(v) and v > 0 for _, v in flat), flat
    no_vit = {k: v for k, v in batch.items() if k not in layout.VIT_FIELDS}
    zero = jax.tree_util.tree_leaves(grads_fn(s.state.params, no_vit))
    assert all(not np.asarray(g).any() for g in zero)

    train, _ = sp.jit_steps(s.model, s.tx, lc, s.mesh, s.shardings)
    before = jax.tree_util.tree_map(np.asarray, s.state.params["vision"])
    state, metrics = train(s.state, batch)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    moved = jax.tree_util.tree_map(lambda a, b: bool((np.asarray(b) != a).any()), before,
                                   state.params["vision"])
    assert all(jax.tree_util.tree_leaves(moved)), moved
