"""Image codecs: how an image becomes the generation expert's latent tokens, and back.

  pixels  the shapes world's identity "VAE": patch x patch pixel patches scaled to [-1, 1]
          (config world.latents = 'pixels', the default)
  ae      the FLUX autoencoder (BAGEL's generation path, model/vae.py): 8x downsampled
          latents with the AE's scale/shift, grouped 2x2 into one token of 4 * z_channels
          values (BAGEL's latent_patch_size 2), so one token covers 16 x 16 pixels
          (world.latents = 'ae', the AE's parameters from world.ae_path)

Three places read a codec: the packer (what a row's `patches` hold), the training step (which
turns `patches` into x_0) and the generator (which turns a denoised x into pixels and into the
clean copy later tokens see). With 'ae' a row's `patches` are one of two things:

  data.precompute_latents = True   float32 latent tokens, encoded once by `build-data`
                                   (data/latents.py), the way MaxDiffusion caches latents;
  data.precompute_latents = False  uint8 pixel patches of each token's 16 x 16 footprint,
                                   encoded inside the jitted step (`step_latents`), which
                                   reassembles each image from its tokens first.

Both encode the posterior mean (no sampling), so they agree to float tolerance. Encoding in
the step needs one image size (world.image_size); precomputed latents may differ in size,
each image resized by BAGEL's rules first (world.resize, sequence/images.py).
"""

from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from strokes_jax.model import vae
from strokes_jax.sequence.layout import CLEAN, NOISY
from strokes_jax.sequence.tokenizer import PixelCodec, to_pixels  # noqa: F401 (one home for codecs)


def to_latents(patches):
    """A row's `patches` as x_0: uint8 pixel patches scale to [-1, 1] (the identity "VAE");
    float patches are latents already (precomputed by the AE, or encoded in the step)."""
    if patches.dtype == jnp.uint8:
        return patches.astype(jnp.float32) / 127.5 - 1.0
    return patches.astype(jnp.float32)


class AECodec:
    """The FLUX autoencoder as the codec. `precomputed`: rows hold latent tokens (True) or
    pixel patches encoded in the step (False)."""

    kind = "ae"
    group = 2  # BAGEL's latent_patch_size

    def __init__(self, cfg: vae.AEConfig, params, image_shape: tuple[int, int, int],
                 precomputed: bool, rules=None):
        self.cfg, self.image_shape, self.rules = cfg, tuple(image_shape), rules
        if rules is not None and not precomputed:
            raise ValueError("config key data.precompute_latents: encoding in the step needs "
                             "one image size (world.resize off); precompute the latents")
        self.params = jax.tree_util.tree_map(jnp.asarray, params)
        self.precomputed, self.in_step = precomputed, not precomputed
        self.patch = cfg.downsample * self.group  # pixels per token side
        h, w, _ = self.image_shape
        if h % self.patch or w % self.patch:
            raise ValueError(f"config key world.image_size: {h}x{w} images do not split into "
                             f"{self.patch}-pixel latent tokens (AE downsample {cfg.downsample} "
                             f"x group {self.group})")
        self.token_dim = self.group * self.group * cfg.z_channels
        self.packed_dtype = np.float32 if precomputed else np.uint8
        self.model = vae.AutoEncoder(cfg)
        self._encode = jax.jit(self._encode_fn)
        self._decode = jax.jit(self._decode_fn, static_argnums=2)

    # -- whole images (build-data, the generator) --------------------------------------
    def _encode_fn(self, params, imgs):
        z = self.model.apply({"params": params}, imgs.astype(jnp.float32) / 127.5 - 1.0,
                             method=vae.AutoEncoder.encode)
        return vae.patchify_latents(z, self.group)

    def _decode_fn(self, params, tokens, hw):
        z = vae.unpatchify_latents(tokens, hw, self.group)
        return self.model.apply({"params": params}, z, method=vae.AutoEncoder.decode)

    def prepare(self, img: np.ndarray) -> np.ndarray:
        """The image as it is encoded: resized by the rules when set (sequence/images.py)."""
        return np.asarray(img) if self.rules is None else self.rules.resize(img)

    def encode(self, imgs: np.ndarray) -> np.ndarray:
        """uint8 [B, H, W, 3] (one size) -> float32 latent tokens [B, H/16 * W/16, token_dim]."""
        return np.asarray(self._encode(self.params, jnp.asarray(imgs)), np.float32)

    def decode(self, tokens: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
        """Latent tokens [B, T, token_dim] of (H, W) images -> uint8 [B, H, W, 3]."""
        grid = (hw[0] // self.cfg.downsample, hw[1] // self.cfg.downsample)
        return to_pixels(self._decode(self.params, jnp.asarray(tokens, jnp.float32), tuple(grid)))

    def image(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Denoised tokens -> (decoded uint8 image, the clean copy). BAGEL feeds the generated
        latents back as they are; only the picture goes through the decoder."""
        h, w, _ = self.image_shape
        return self.decode(np.asarray(x)[None], (h, w))[0], np.asarray(x, np.float32)

    def clean(self, img: np.ndarray) -> np.ndarray:
        """A uint8 image -> the clean copy's latent tokens (an image put in from outside the
        model, as error injection does)."""
        return self.encode(self.prepare(img)[None])[0]

    # -- inside the jitted step -------------------------------------------------------
    def step_latents(self, params, batch):
        """Pixel-patch rows -> latent-token rows, inside the step. The tokens of one image copy
        are one run with patch_pos 0..T-1 (sequence/tokenizer.py), so each run is scattered
        back into an image, every image of the row is encoded, and each token takes its own
        latent token back. A row holds at most L // T + 1 runs; slots past the row's own runs
        encode blank images, the price of static shapes. The AE is not trained here."""
        patches, types, ppos = batch["patches"], batch["types"], batch["patch_pos"]
        b, l, d = patches.shape
        h, w, c = self.image_shape
        gh, gw = h // self.patch, w // self.patch
        t = gh * gw
        m = l // t + 1
        is_img = (types == NOISY) | (types == CLEAN)
        start = is_img & (ppos == 0)
        idx = jnp.where(is_img, jnp.cumsum(start, axis=1) - 1, m)  # slot m: not an image
        idx = jnp.clip(idx, 0, m)
        slot = jnp.arange(b)[:, None] * (m + 1) + idx
        buf = jnp.zeros((b * (m + 1), t, d), patches.dtype)
        buf = buf.at[slot, jnp.where(is_img, ppos, 0)].set(patches)
        imgs = buf.reshape(b * (m + 1), gh, gw, self.patch, self.patch, c)
        imgs = imgs.transpose(0, 1, 3, 2, 4, 5).reshape(b * (m + 1), h, w, c)
        lat = jax.lax.stop_gradient(self._encode_fn(params, imgs))  # [b*(m+1), t, token_dim]
        out = lat[slot, jnp.where(is_img, ppos, 0)]
        return jnp.where(is_img[..., None], out, 0.0)

    def fingerprint(self) -> str:
        """Names the latents this AE writes: its config and a hash of its parameters (computed
        once: the parameters of a codec do not change, and a BAGEL AE is 330 MB to hash)."""
        if getattr(self, "_fingerprint", None) is None:
            hsh = hashlib.sha256(repr(self.cfg).encode())
            for leaf in jax.tree_util.tree_leaves(self.params):
                hsh.update(np.asarray(leaf).tobytes())
            self._fingerprint = f"ae-{hsh.hexdigest()[:12]}"
        return self._fingerprint
