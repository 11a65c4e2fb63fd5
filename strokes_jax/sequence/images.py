"""Images as BAGEL sees them: the size an image is resized to before it is encoded, the
resize itself, SigLIP's pixel normalisation and the token counts that follow from the size.

BAGEL resizes every image twice over, once per path, with the same rule and different numbers:
the VAE (generation) path wants sides that are multiples of 16 (8x VAE downsampling, then 2x2
latent patches), the SigLIP ViT (understanding) path multiples of 14 (its patch size). The rule
and the numbers here follow BAGEL's data/transforms.py (`MaxLongEdgeMinShortEdgeResize`,
`ImageTransform`); where the numbers come from is written next to each preset.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

# `ImageTransform`'s default pixel budget (14*14*9*1024 = 1_806_336); BAGEL's eval/gen scripts
# and app.py never override it. Its vlm_sft training config raises it to 2_007_040.
BAGEL_MAX_PIXELS = 14 * 14 * 9 * 1024


def _to_stride(value: float, stride: int) -> int:
    # `_make_divisible`: the nearest multiple, never below one stride. Python's round() rounds
    # halves to even, so 1000 / 16 = 62.5 goes to 62 (992), not 63; that is kept on purpose.
    return max(stride, int(round(value / stride) * stride))


def _scaled(h: float, w: float, scale: float, stride: int) -> tuple[int, int]:
    # `_apply_scale`: round to whole pixels first, then to the stride (two roundings, as BAGEL).
    return _to_stride(round(h * scale), stride), _to_stride(round(w * scale), stride)


def resize_dims(h: int, w: int, max_side: int, min_side: int, stride: int,
                max_pixels: float = BAGEL_MAX_PIXELS) -> tuple[int, int]:
    """(new_h, new_w) for an h x w image, as `MaxLongEdgeMinShortEdgeResize.forward` picks it.

    1. One scale: shrink so the long side fits max_side (never enlarge for that), then enlarge
       if the short side is under min_side. The min side wins here, so a very wide image can
       come out of this step longer than max_side; step 3 takes it back.
    2. If the area exceeds max_pixels, rescale by max_pixels / area. BAGEL applies that *area*
       ratio as a *side* scale, so the area shrinks by its square: the image ends well under
       the budget, not at it. Kept as BAGEL does it.
    3. If the long side still exceeds max_side, rescale it to max_side. Nothing runs after this,
       so max_side always wins over min_side (a 4:1 image at 1024 / 512 ends 1024 x 256), and
       the result can exceed max_side only if max_side is not itself a multiple of stride.
    Each step rounds to pixels and then to the stride, from the previous step's rounded sides.
    For a budget shared by n images (BAGEL's `img_num`) pass max_pixels / n.
    """
    if h < 1 or w < 1:
        raise ValueError(f"image sides must be positive, got {h} x {w}")
    scale = min(max_side / max(h, w), 1.0)
    scale = max(scale, min_side / min(h, w))
    new_h, new_w = _scaled(h, w, scale, stride)
    if new_h * new_w > max_pixels:
        new_h, new_w = _scaled(new_h, new_w, max_pixels / (new_h * new_w), stride)
    if max(new_h, new_w) > max_side:
        new_h, new_w = _scaled(new_h, new_w, max_side / max(new_h, new_w), stride)
    return new_h, new_w


def resize(img: np.ndarray, max_side: int, min_side: int, stride: int,
           max_pixels: float = BAGEL_MAX_PIXELS) -> np.ndarray:
    """The uint8 H x W x 3 image resized to `resize_dims`. BAGEL hands PIL images to
    torchvision's `F.resize(..., InterpolationMode.BICUBIC, antialias=True)`, which for PIL
    input is exactly `Image.resize((w, h), Image.BICUBIC)` (Pillow always antialiases when it
    shrinks), so this calls Pillow directly and matches BAGEL bit for bit."""
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected a uint8 H x W x 3 image, got {img.dtype} {img.shape}")
    h, w = img.shape[:2]
    new_h, new_w = resize_dims(h, w, max_side, min_side, stride, max_pixels)
    if (new_h, new_w) == (h, w):  # torchvision returns the input untouched at the same size
        return img.copy()
    return np.asarray(Image.fromarray(img).resize((new_w, new_h), Image.BICUBIC))


def vit_pixels(img: np.ndarray) -> np.ndarray:
    """uint8 H x W x C -> float32 in [-1, 1], H x W x C (channels last, as JAX wants).

    SigLIP's normalisation, as BAGEL's `ImageTransform` does it (ToTensor, then Normalize with
    mean 0.5 and std 0.5 per channel), in the same float32 steps so the values agree exactly.
    BAGEL uses the same mean and std for its VAE transform, so this also gives the VAE input."""
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {img.dtype}")
    x = img.astype(np.float32) / np.float32(255.0)
    return (x - np.float32(0.5)) / np.float32(0.5)


def patch_grid(h: int, w: int, patch: int) -> tuple[int, int]:
    """(rows, cols) of patch x patch cells. Floor division, as BAGEL's position ids and latent
    shapes take it; sides from `resize_dims` are multiples already, so nothing is dropped."""
    return h // patch, w // patch


def vae_tokens(h: int, w: int, downsample: int = 8, group: int = 2) -> int:
    """Latent tokens of an h x w image: the VAE downsamples by `downsample`, then BAGEL groups
    group x group latents into one token (`latent_downsample` = downsample * latent_patch_size)."""
    rows, cols = patch_grid(h, w, downsample * group)
    return rows * cols


def vit_tokens(h: int, w: int, patch: int = 14) -> int:
    """ViT patch tokens of an h x w image (SigLIP patch 14)."""
    rows, cols = patch_grid(h, w, patch)
    return rows * cols


@dataclass(frozen=True)
class ImageRules:
    """One path's resize rule: longest side at most max_side, shortest at least min_side (when
    both can hold), both sides multiples of stride, within max_pixels (see `resize_dims`)."""
    max_side: int
    min_side: int
    stride: int
    max_pixels: float = BAGEL_MAX_PIXELS

    def dims(self, h: int, w: int) -> tuple[int, int]:
        return resize_dims(h, w, self.max_side, self.min_side, self.stride, self.max_pixels)

    def resize(self, img: np.ndarray) -> np.ndarray:
        return resize(img, self.max_side, self.min_side, self.stride, self.max_pixels)


# VAE path: `ImageTransform(1024, 512, 16)` in BAGEL's app.py, inference.ipynb and
# eval/gen/gen_images_mp_*.py; data/configs/example.yaml `image_transform_args` says the same
# (image_stride 16, max_image_size 1024, min_image_size 512).
VAE_RULES = ImageRules(max_side=1024, min_side=512, stride=16)

# ViT path: `ImageTransform(980, 378, 14)` in BAGEL's eval/gen/gen_images_mp_*.py and
# eval/gen/gedit/gen_images_gedit.py; example.yaml's vlm_sft uses 980 / 378 / 14 too (with
# max_pixels 2_007_040). 980 = 70 * 14, BAGEL's `vit_max_num_patch_per_side`. Note that app.py
# and inference.ipynb use a min side of 224 instead, and the unified_edit config 518 / 224 / 14.
VIT_RULES = ImageRules(max_side=980, min_side=378, stride=14)
