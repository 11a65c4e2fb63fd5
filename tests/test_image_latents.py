"""The AE latent path: precomputed latents and latents encoded inside the step give the same
rows and losses, latents records travel with their episodes through the pipeline, and the
Qwen2-style BPE carries every episode tag."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from strokes_jax.configs import shapes_tiny
from strokes_jax.data import latents, pipeline
from strokes_jax.episodes import episode as ep
from strokes_jax.episodes import mixer
from strokes_jax.model import codec as cd
from strokes_jax.model import vae
from strokes_jax.model.unified import ModelConfig, UnifiedModel
from strokes_jax.sequence import qwen
from strokes_jax.sequence import tokenizer as tk
from strokes_jax.sequence.layout import CLEAN, NOISY, TAGS
from strokes_jax.train import step as sp

SIZE = 96
AE = vae.AEConfig(ch=8, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=4, groups=4,
                  scale_factor=0.7, shift_factor=0.1)


def _pic(img):
    return np.asarray(Image.fromarray(img).resize((SIZE, SIZE), Image.BOX))


@pytest.fixture(scope="module")
def bpe():
    return qwen.shapes_bpe()


@pytest.fixture(scope="module")
def codecs():
    params = vae.AutoEncoder(AE).init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)))["params"]
    return (cd.AECodec(AE, params, (SIZE, SIZE, 3), precomputed=True),
            cd.AECodec(AE, params, (SIZE, SIZE, 3), precomputed=False))


@pytest.fixture(scope="module")
def episodes():
    out = []
    for e in mixer.generate_episodes(3, 4, {"additive": 1.0, "critique": 1.0}):
        steps = [dataclasses.replace(s, sketch=_pic(s.sketch),
                                     refined=None if s.refined is None else _pic(s.refined))
                 for s in e.steps]
        out.append(dataclasses.replace(e, steps=steps))
    return out


def _with_latents(e, codec):
    e = dataclasses.replace(e)
    e.latents = [codec.encode(im[None])[0] for im in e.images()]
    return e


def _batch(etok, eps, seq_len=512):
    rows = [pipeline.single_row(etok(e), seq_len, etok.tok.pad_id, etok.patch_dim) for e in eps]
    return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


def test_precomputed_and_in_step_latents_agree(bpe, codecs, episodes):
    pre, fly = codecs
    et_pre = tk.EpisodeTokenizer(bpe, (SIZE, SIZE, 3), 16, codec=pre)
    et_fly = tk.EpisodeTokenizer(bpe, (SIZE, SIZE, 3), 16, codec=fly)
    b_pre = _batch(et_pre, [_with_latents(e, pre) for e in episodes])
    b_fly = _batch(et_fly, episodes)
    assert b_pre["patches"].dtype == jnp.float32 and b_pre["patches"].shape[-1] == 16
    assert b_fly["patches"].dtype == jnp.uint8 and b_fly["patches"].shape[-1] == 16 * 16 * 3
    for k in ("tokens", "types", "positions", "blocks", "patch_pos", "targets"):
        np.testing.assert_array_equal(b_pre[k], b_fly[k])
    # 36 latent tokens per image copy: each image's noisy copy is one run of 36.
    noisy = np.asarray(b_pre["types"][0] == NOISY)
    assert noisy.sum() % 36 == 0 and noisy.sum() > 0
    encoded = jax.jit(fly.step_latents)(fly.params, b_fly)
    img = np.asarray((b_pre["types"] == NOISY) | (b_pre["types"] == CLEAN))
    # Batched convolutions sum in another order than one image at a time.
    np.testing.assert_allclose(np.asarray(encoded)[img], np.asarray(b_pre["patches"])[img],
                               atol=5e-4, rtol=0)
    assert float(jnp.abs(encoded[~img]).max()) == 0.0
    c = shapes_tiny.get_config("test")
    mc = ModelConfig.from_config({**c.model.to_dict(), "vocab_size": bpe.vocab_size,
                                  "patch_dim": 16, "latent_grid": (6, 6)})
    model = UnifiedModel(mc)
    b = b_pre
    params = model.init(jax.random.PRNGKey(1), b["tokens"], b["types"], b["positions"],
                        b["segment_ids"], b["blocks"], b["patch_pos"],
                        jnp.zeros(b["patches"].shape), jnp.zeros(b["tokens"].shape))["params"]
    lc = sp.LossConfig.from_config(c)
    rng = jax.random.PRNGKey(5)
    l_pre, _ = sp.loss_fn(params, b_pre, rng, model=model, lc=lc)
    l_fly, _ = sp.loss_fn(params, sp.encoded(b_fly, fly.params, fly.step_latents), rng,
                          model=model, lc=lc)
    np.testing.assert_allclose(float(l_pre), float(l_fly), rtol=1e-4)


def test_decoded_image_and_clean_copy(codecs):
    pre, _ = codecs
    x = np.random.default_rng(0).standard_normal((36, 16)).astype(np.float32)
    img, clean = pre.image(x)
    assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8
    np.testing.assert_array_equal(clean, x)  # generated latents are fed back as they are
    px = cd.PixelCodec((36, 36, 3), 6)
    img, clean = px.image(np.zeros((36, 108), np.float32))
    assert img.shape == (36, 36, 3) and (img == 128).all()  # round((0 + 1) * 127.5)
    np.testing.assert_allclose(clean, np.float32(128) / np.float32(127.5) - 1.0, rtol=1e-6)


def test_latents_records_travel_with_their_episodes(tmp_path, codecs, episodes):
    pre, _ = codecs
    src = [e.to_bytes() for e in episodes] + [b"not an episode"]
    path = str(tmp_path / "lat" / "train.array_record")
    assert latents.precompute(src, pre, path, progress=False) == len(src)
    mtime = (tmp_path / "lat" / "train.array_record").stat().st_mtime_ns
    assert latents.precompute(src, pre, path, progress=False) == len(src)  # reused
    assert (tmp_path / "lat" / "train.array_record").stat().st_mtime_ns == mtime
    with_lat = latents.WithLatents(src, path)
    e = pipeline.decode_item(with_lat[1], "#1")
    want = [pre.encode(im[None])[0] for im in episodes[1].images()]
    assert len(e.latents) == len(want)
    for a, b in zip(e.latents, want):
        np.testing.assert_allclose(a, b, atol=5e-4)
    # The corrupt record has no latents; reading it is a named error, so the pipeline skips it.
    with pytest.raises(ep.EpisodeError, match="#4"):
        ep.latents_from_bytes(with_lat[4]["latents"], "#4")
    with pytest.raises(ValueError, match="latents records"):
        latents.WithLatents(src[:2], path)


def test_a_missing_latent_is_a_named_error(bpe, codecs, episodes):
    pre, _ = codecs
    etok = tk.EpisodeTokenizer(bpe, (SIZE, SIZE, 3), 16, codec=pre)
    e = _with_latents(episodes[0], pre)
    e.latents = e.latents[:-1]
    with pytest.raises(ep.EpisodeError, match="precomputed latents for"):
        etok(e)
    e.latents = None
    with pytest.raises(ep.EpisodeError, match="build-data"):
        etok(e)


def test_qwen_style_bpe_round_trips_every_tag(bpe, episodes):
    assert bpe.vocab_size % 8 == 0
    for t in TAGS + (tk.END_OF_EPISODE,):
        ids = bpe.encode(t)
        assert len(ids) == 1 and bpe.decode(ids) == t, t
    for e in episodes:
        for s in e.steps:
            for text in (s.ins, s.des, s.inspect, s.refine):
                if text:
                    assert bpe.decode(bpe.encode(text)) == text
    etok = tk.EpisodeTokenizer(bpe, (SIZE, SIZE, 3), 16)
    row = etok(episodes[0])
    text = bpe.decode(row["tokens"][row["types"] == 0])
    for t in ("<ins>", "</ins>", "<des>", "</des>", "<inspect>", "</inspect>", "<|endofepisode|>"):
        assert t in text
    assert qwen.shapes_bpe().fingerprint() == bpe.fingerprint()  # deterministic training


def test_images_of_any_size_take_their_own_token_counts(bpe, codecs):
    """BAGEL's resize rules in the packer: each image is resized (longest side <= 96, shortest
    >= 32, multiples of 16; the ViT copy 56 / 28 / 14), and takes as many latent and ViT tokens
    as its resized grid, with 2-D positions in the 6-wide table; precomputed latents follow
    the same rules."""
    from strokes_jax.sequence import images
    pre, _ = codecs
    vae_rules = images.ImageRules(96, 32, 16)
    vit_rules = images.ImageRules(56, 28, 14)
    rules_codec = cd.AECodec(pre.cfg, pre.params, (SIZE, SIZE, 3), precomputed=True, rules=vae_rules)
    etok = tk.EpisodeTokenizer(bpe, (SIZE, SIZE, 3), 16, codec=rules_codec, vit_patch=14,
                               vit_max_side=4, vit_rules=vit_rules)
    rng = np.random.default_rng(0)
    sizes = [(96, 96), (40, 120), (200, 60), (33, 47)]
    steps = [ep.Step(sketch=rng.integers(0, 256, (h, w, 3), dtype=np.uint8), ins="add a thing",
                     des="a thing", inspect="plan ok ; image ok") for h, w in sizes]
    e = ep.Episode(id="sizes", prompt="a photo of things", tag="", metadata={}, steps=steps)
    e.latents = [rules_codec.encode(rules_codec.prepare(s.sketch)[None])[0] for s in steps]
    row = etok(e)
    noisy = row["types"] == NOISY
    starts = np.nonzero(noisy & ~np.roll(noisy, 1))[0]
    runs = [int(np.argmax(~noisy[s:]) or len(noisy) - s) for s in starts]
    want = [(a // 16) * (b // 16) for a, b in (vae_rules.dims(h, w) for h, w in sizes)]
    assert runs == want and len(set(want)) > 1
    for s, n, (h, w) in zip(starts, runs, sizes):
        gh, gw = (d // 16 for d in vae_rules.dims(h, w))
        rr, cc = np.divmod(row["patch_pos"][s:s + n], 6)
        assert rr.max() == gh - 1 and cc.max() == gw - 1 and len(set(zip(rr, cc))) == n
    vit = row["types"] == 3
    want_vit = sum((a // 14) * (b // 14) for a, b in (vit_rules.dims(h, w) for h, w in sizes))
    assert vit.sum() == want_vit and row["vit_pos"][vit].max() < 16
    # A latents array of the wrong grid is refused, naming the image.
    e.latents[2] = e.latents[2][:-1]
    with pytest.raises(ep.EpisodeError, match="latents of image 2"):
        etok(e)


def test_latents_record_format_round_trips_and_names_a_truncated_record():
    import io
    import threading
    arrays = [np.random.default_rng(i).normal(size=(36, 16)).astype(np.float32) for i in range(3)]
    data = ep.latents_to_bytes(arrays)
    for a, b in zip(ep.latents_from_bytes(data), arrays):
        np.testing.assert_array_equal(a, b)
    buf = io.BytesIO()  # the .npz that earlier versions wrote still reads
    np.savez(buf, *arrays)
    for a, b in zip(ep.latents_from_bytes(buf.getvalue()), arrays):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ep.EpisodeError, match=r"record #9: unreadable precomputed latents"):
        ep.latents_from_bytes(data[:-5], "#9")
    # Reader threads decode at once, as Grain's do; none may fail.
    errors = []

    def read():
        try:
            for _ in range(300):
                ep.latents_from_bytes(data)
                ep.latents_from_bytes(buf.getvalue())
        except Exception as e:  # noqa: BLE001  (collected, then reported)
            errors.append(e)
    threads = [threading.Thread(target=read) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:1]
