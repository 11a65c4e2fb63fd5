"""BAGEL's image sizing and normalisation (strokes_jax/sequence/images.py): hand-worked cases of
the resize rule, its quirks, invariants over random sizes, token counts and the pixel range."""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import pytest
from PIL import Image

from strokes_jax.sequence.images import (BAGEL_MAX_PIXELS, VAE_RULES, VIT_RULES, ImageRules, patch_grid, resize,
                                         resize_dims, vae_tokens, vit_pixels, vit_tokens)


def test_presets_are_bagels_numbers():
    assert (VAE_RULES.max_side, VAE_RULES.min_side, VAE_RULES.stride) == (1024, 512, 16)
    assert (VIT_RULES.max_side, VIT_RULES.min_side, VIT_RULES.stride) == (980, 378, 14)
    assert VAE_RULES.max_pixels == VIT_RULES.max_pixels == BAGEL_MAX_PIXELS == 1_806_336
    with pytest.raises(dataclasses.FrozenInstanceError):
        VAE_RULES.max_side = 2048


# (h, w) -> (new_h, new_w) under the VAE rule (1024 / 512 / 16), worked by hand.
@pytest.mark.parametrize("hw, expected", [
    ((1024, 1024), (1024, 1024)),  # square, already fits: untouched
    ((2048, 2048), (1024, 1024)),  # larger than max side: scale 0.5
    ((768, 512), (768, 512)),      # within bounds and already multiples of 16
    ((24, 24), (512, 512)),        # smaller than min side: enlarged by 512 / 24
    ((100, 200), (512, 1024)),     # enlarged until the short side is 512
    ((300, 200), (768, 512)),
    ((700, 900), (704, 896)),      # in bounds, only rounded to the nearest multiples of 16
    # Very wide: the min side first makes it 512 x 2048, then the max side wins: 256 x 1024.
    ((500, 2000), (256, 1024)),
    # Very tall: 0.512 gives 1536 x 512, then 1024 / 1536 gives 1024 x 341.33 -> 336.
    ((3000, 1000), (1024, 336)),
    # Extreme: the side floors at one stride, never at zero.
    ((10, 20000), (16, 1024)),
])
def test_vae_rule_by_hand(hw, expected):
    assert resize_dims(*hw, 1024, 512, 16) == expected == VAE_RULES.dims(*hw)


@pytest.mark.parametrize("hw, expected", [
    ((1024, 1024), (980, 980)),  # scale 980 / 1024: 70 x 70 patches
    ((200, 300), (378, 560)),    # enlarged by 378 / 200; 567 / 14 = 40.5 rounds to even: 560
    # The min side makes it 378 x 2835 -> 2828, then the max side wins: 130.99 -> 131 -> 126.
    ((400, 3000), (126, 980)),
])
def test_vit_rule_by_hand(hw, expected):
    assert VIT_RULES.dims(*hw) == expected


def test_quirk_halves_round_to_even():
    """BAGEL rounds with Python's round(): 1000 / 16 = 62.5 -> 62, so 1000 goes to 992, not
    1008; 1016 / 16 = 63.5 -> 64 goes up. Reproduced, since BAGEL's sizes are the contract."""
    assert VAE_RULES.dims(1000, 1000) == (992, 992)
    assert VAE_RULES.dims(968, 1016) == (960, 1024)


def test_quirk_pixel_budget_scales_sides_by_the_area_ratio():
    """Over max_pixels, BAGEL scales each side by max_pixels / area (not its square root): a
    2000 x 2000 image with a 1e6 budget goes to 500 -> 496 a side (246k pixels, not ~1e6)."""
    rules = ImageRules(max_side=2048, min_side=16, stride=16, max_pixels=1_000_000)
    assert rules.dims(2000, 2000) == (496, 496)
    # ... and the max-side check comes last, so it is never exceeded.
    assert resize_dims(4000, 10, 1024, 512, 16, max_pixels=1_000_000)[0] == 1024


def test_max_side_beats_min_side():
    """Nothing runs after the max-side check, so when both cannot hold the short side loses."""
    h, w = VAE_RULES.dims(500, 4000)
    assert w == 1024 and h < 512


@pytest.mark.parametrize("rules", [VAE_RULES, VIT_RULES], ids=["vae", "vit"])
def test_invariants_over_random_sizes(rules):
    rng = np.random.default_rng(0)
    sizes = [tuple(int(s) for s in rng.integers(1, 5000, 2)) for _ in range(3000)]
    sizes += [tuple(int(s) for s in rng.integers(1, 400, 2)) for _ in range(1000)]
    for h, w in sizes:
        nh, nw = rules.dims(h, w)
        short, long_, new_short, new_long = min(h, w), max(h, w), min(nh, nw), max(nh, nw)
        assert nh % rules.stride == 0 and nw % rules.stride == 0 and min(nh, nw) >= rules.stride
        assert new_long <= rules.max_side, (h, w)
        if rules.min_side * long_ / short <= rules.max_side:  # the min side is reachable
            assert new_short >= rules.min_side, (h, w)
        if rules.min_side <= short and long_ <= rules.max_side:  # in bounds: rounding only
            assert abs(nh - h) <= rules.stride / 2 and abs(nw - w) <= rules.stride / 2, (h, w)
        if new_short > rules.stride:  # aspect ratio kept within one stride (unless floored)
            assert abs(new_short - new_long * short / long_) < rules.stride, (h, w)
        if h != w and nh != nw:
            assert (h > w) == (nh > nw), (h, w)


def test_token_counts():
    assert patch_grid(1024, 1024, 16) == (64, 64)
    assert vae_tokens(1024, 1024) == 64 * 64 == 4096  # 8x VAE, then 2x2 latents per token
    assert vae_tokens(*VAE_RULES.dims(3000, 1000)) == 64 * 21
    h, w = VIT_RULES.dims(1024, 1024)
    assert patch_grid(h, w, 14) == (70, 70) and vit_tokens(h, w) == 4900
    assert vit_tokens(378, 560) == 27 * 40
    assert patch_grid(30, 47, 14) == (2, 3)  # floors, as BAGEL's position ids do


def test_vit_pixels_range_and_values():
    img = np.array([[[0, 255, 128]]], np.uint8)
    x = vit_pixels(img)
    assert x.dtype == np.float32 and x.shape == (1, 1, 3)
    np.testing.assert_array_equal(x[0, 0, :2], [-1.0, 1.0])
    np.testing.assert_allclose(x[0, 0, 2], 128 / 127.5 - 1, atol=1e-7)
    rnd = np.random.default_rng(1).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    y = vit_pixels(rnd)
    assert y.min() >= -1.0 and y.max() <= 1.0
    np.testing.assert_allclose(y, rnd / 127.5 - 1, atol=1e-6)
    with pytest.raises(ValueError):
        vit_pixels(rnd.astype(np.float32))


def test_resize_is_pillow_bicubic_at_the_rule_size():
    img = np.random.default_rng(2).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    out = resize(img, 1024, 512, 16)
    assert out.dtype == np.uint8 and out.shape == (768, 512, 3)
    np.testing.assert_array_equal(out, np.asarray(Image.fromarray(img).resize((512, 768), Image.BICUBIC)))
    np.testing.assert_array_equal(VAE_RULES.resize(img), out)
    flat = np.full((3000, 1000, 3), 77, np.uint8)
    assert np.all(VAE_RULES.resize(flat) == 77) and VAE_RULES.resize(flat).shape == (1024, 336, 3)
    same = np.random.default_rng(3).integers(0, 256, (768, 512, 3), dtype=np.uint8)
    kept = resize(same, 1024, 512, 16)
    np.testing.assert_array_equal(kept, same)
    assert kept is not same
    with pytest.raises(ValueError):
        resize(img[..., 0], 1024, 512, 16)


def _torchvision():
    if importlib.util.find_spec("torchvision") is None:  # checked first: importing torch is slow
        pytest.skip("torchvision not installed")
    try:  # a broken install (C ops for another torch) raises more than ImportError
        from torchvision import transforms
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as F
    except Exception:
        pytest.skip("torch / torchvision not importable")
    return transforms, F, InterpolationMode


def test_matches_torchvision_when_available():
    """BAGEL's own path: torchvision resize (bicubic, antialias) on PIL, ToTensor, Normalize."""
    transforms, F, mode = _torchvision()
    img = np.random.default_rng(4).integers(0, 256, (411, 1333, 3), dtype=np.uint8)
    h, w = VIT_RULES.dims(*img.shape[:2])
    ref = F.resize(Image.fromarray(img), (h, w), mode.BICUBIC, antialias=True)
    ref = transforms.Normalize([0.5] * 3, [0.5] * 3)(transforms.ToTensor()(ref)).numpy().transpose(1, 2, 0)
    np.testing.assert_array_equal(vit_pixels(VIT_RULES.resize(img)), ref)
