"""The uncached backend: every model call is a full forward pass over each example's whole
context (padded to a bucketed length), with the noisy block of an image being drawn placed
right after it. Slow but simple: the reference the KV-cache backend is tested against."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from strokes_jax.inference.generator import Example, SamplingOptions, StepOut, Token
from strokes_jax.sequence.layout import NOISY
from strokes_jax.sequence.tokenizer import EpisodeTokenizer


class UncachedBackend:
    def __init__(self, model, etok: EpisodeTokenizer, *, max_len: int,
                 buckets: Sequence[int] = (128, 256, 384, 512)):
        self.model, self.etok, self.max_len = model, etok, max_len
        # Few distinct lengths, so few compilations.
        self.buckets = sorted({b for b in buckets if b < max_len} | {max_len})
        self._fwd = jax.jit(self._forward)
        # The last call's sequence stays readable (host memory only) for inspection.
        self.buf: dict[str, np.ndarray] | None = None

    def _forward(self, params, tokens, types, positions, segment_ids, blocks, patch_pos,
                 latents, timesteps, q_index, img_start, vit_patches=None, vit_pos=None):
        vit = {} if vit_patches is None else dict(vit_patches=vit_patches, vit_pos=vit_pos)
        logits, vel = self.model.apply({"params": params}, tokens, types, positions, segment_ids,
                                       blocks, patch_pos, latents, timesteps, **vit)
        b = jnp.arange(tokens.shape[0])
        idx = img_start[:, None] + jnp.arange(self.etok.num_patches)[None, :]
        idx = jnp.clip(idx, 0, tokens.shape[1] - 1)
        return logits[b, q_index], jnp.take_along_axis(vel, idx[..., None], axis=1)

    def begin(self, batch: int, options: SamplingOptions, ts: np.ndarray) -> None:
        if options.guided:
            raise ValueError("classifier-free guidance (cfg_text_scale / cfg_img_scale != 1) "
                             "needs the KV-cache backend")
        self.ts = ts
        L, P = self.max_len, self.etok.codec.token_dim
        self.buf = {k: np.zeros((batch, L), np.int32) for k in
                    ("tokens", "types", "positions", "segment_ids", "blocks", "patch_pos")}
        self.buf["latents"] = np.zeros((batch, L, P), np.float32)
        self.buf["timesteps"] = np.zeros((batch, L), np.float32)
        if self.etok.vit_patch is not None:
            self.buf["vit_patches"] = np.zeros((batch, L, self.etok.vit_patch_dim), np.float32)
            self.buf["vit_pos"] = np.zeros((batch, L), np.int32)

    def end(self) -> None:
        pass  # nothing on the device outlives the call

    def put(self, i: int, n: int, tok: Token) -> None:
        b = self.buf
        b["tokens"][i, n], b["types"][i, n] = tok.token, tok.typ
        b["positions"][i, n], b["segment_ids"][i, n] = tok.pos, 1
        b["blocks"][i, n], b["patch_pos"][i, n] = tok.block, tok.ppos
        b["latents"][i, n] = 0.0 if tok.latent is None else tok.latent
        b["timesteps"][i, n] = 0.0
        if "vit_patches" in b:
            b["vit_patches"][i, n] = 0.0 if tok.vpatch is None else tok.vpatch
            b["vit_pos"][i, n] = tok.vpos

    def _write_noisy(self, i: int, ex: Example) -> None:
        # Past the context, where the clean copy will overwrite it once the image is done.
        n, P = ex.n, self.etok.num_patches
        b = self.buf
        sl = slice(n, n + P)
        b["tokens"][i, sl], b["types"][i, sl] = self.etok.tok.pad_id, NOISY
        b["positions"][i, sl], b["segment_ids"][i, sl] = ex.pos, 1
        b["blocks"][i, sl], b["patch_pos"][i, sl] = ex.block, np.arange(P)
        b["latents"][i, sl], b["timesteps"][i, sl] = ex.x, self.ts[ex.k]

    def step(self, params, exs: Sequence[Example]) -> list[StepOut | None]:
        for i, ex in enumerate(exs):
            if ex.mode == "image":
                self._write_noisy(i, ex)
        active = [ex for ex in exs if ex.mode != "done"]
        need = max(ex.n + (self.etok.num_patches if ex.mode == "image" else 0) for ex in active)
        L = next(b for b in self.buckets if b >= need)
        q = np.array([max(ex.n - 1, 0) for ex in exs], np.int32)
        img = np.array([ex.n if ex.mode == "image" else 0 for ex in exs], np.int32)
        args = {k: v[:, :L] for k, v in self.buf.items()}
        logits, vel = self._fwd(params, args["tokens"], args["types"], args["positions"],
                                args["segment_ids"], args["blocks"], args["patch_pos"],
                                args["latents"], args["timesteps"], q, img,
                                args.get("vit_patches"), args.get("vit_pos"))
        logits, vel = np.asarray(logits), np.asarray(vel)
        return [StepOut(logits=logits[i]) if ex.mode == "text" else
                StepOut(velocity=vel[i], evals=1) if ex.mode == "image" else None
                for i, ex in enumerate(exs)]
