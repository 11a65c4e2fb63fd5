"""The KV-cache backend: the same contexts as the uncached one, decoded incrementally.

The prompt is prefilled once; a chosen text token is run alone against the cache and
appended (its logits give the next decision); an image's noisy block is run against the
cache every flow step without being written; the finished image's clean copy
<|vision_start|> latents <|vision_end|> is run once and appended, and its last logits give the
decision after the image. Rows of a batch are in different phases, so each call carries a
slab of new tokens per row (one text token, a noisy block, a clean block or a prompt chunk),
padded to a common width from `slab_widths` (width 1 when every row decodes text).

CFG as BAGEL does it: each example also has one unconditional row per guided condition,
each its own cache with its own RoPE positions. cfg_text_scale != 1: the text-free context
(BAGEL's cfg_text_context: the same stream with images only; empty for text-to-image).
cfg_img_scale != 1: the image-free context (BAGEL's cfg_img_context: the text only, so it
equals the conditional context until the first image). Inside cfg_interval the velocity is
flow.cfg_combine (text guidance, then image guidance, then global renorm). NFE counts
denoising steps, the paper's unit; `nfe_evals` on each result counts model evaluations
(steps x contexts evaluated).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from strokes_jax.inference.generator import Example, SamplingOptions, StepOut, Token
from strokes_jax.model import cache as kvc
from strokes_jax.model import flow
from strokes_jax.sequence.layout import NOISY
from strokes_jax.sequence.tokenizer import EpisodeTokenizer

_FIELDS = ("tokens", "types", "positions", "blocks", "patch_pos", "timesteps")


class KVCacheBackend:
    def __init__(self, model, etok: EpisodeTokenizer, *, max_len: int, slab_widths=(1,)):
        self.model, self.etok, self.max_len = model, etok, max_len
        # A clean or ViT block must fit one call (bidirectional).
        self.width = max(etok.num_patches, etok.vit_num_patches) + 2
        self.widths = sorted({w for w in slab_widths if 0 < w < self.width} | {self.width})
        self._step = kvc.make_decode_step(model.apply)
        # The cache holds no latents, so a noisy block's canvas comes from the host.
        self.canvas = bool(getattr(model.cfg, "canvas_skip", False))
        self.cache = None

    # -- one call's contexts: the cache on device, pending tokens on the host -------------
    def begin(self, batch: int, options: SamplingOptions, ts: np.ndarray) -> None:
        self.opts, self.ts = options, ts
        # The unconditional contexts kept, in row-slot order after the conditional rows.
        self.uncond = tuple(k for k, s in (("text", options.cfg_text_scale),
                                           ("img", options.cfg_img_scale)) if s != 1.0)
        self.batch = batch
        self.rows = batch * (1 + len(self.uncond))
        self.cache = kvc.init_cache(self.model.cfg, self.rows, self.max_len)
        self.pending: list[list[Token]] = [[] for _ in range(self.rows)]
        self.u_pos = {k: [0] * batch for k in self.uncond}  # next RoPE position per context

    def end(self) -> None:
        self.cache = None  # freed between calls; the next call allocates its own

    def _urow(self, kind: str, i: int) -> int:
        return (1 + self.uncond.index(kind)) * self.batch + i

    def put(self, i: int, n: int, tok: Token) -> None:
        self.pending[i].append(tok)
        for kind in self.uncond:
            # Image tokens (block > 0) go to the text-free context, text to the image-free.
            if (tok.block > 0) != (kind == "text"):
                continue
            pos = self.u_pos[kind]
            self.pending[self._urow(kind, i)].append(dataclasses.replace(tok, pos=pos[i]))
            if kind == "img" or tok.token == self.etok.tok.vision_end:
                pos[i] += 1

    # -- one call ------------------------------------------------------------------------
    def _chunk(self, pending: list[Token]) -> int:
        """How many pending tokens go in the next call: a whole image block, or text up to
        the slab width and not into a block."""
        if pending[0].block > 0:
            n = 1
            while n < len(pending) and pending[n].block == pending[0].block:
                n += 1
            return n
        n = 1
        while n < min(len(pending), self.width) and pending[n].block == 0:
            n += 1
        return n

    def _cfg_on(self, ex: Example) -> bool:
        t = float(self.ts[ex.k])
        lo, hi = self.opts.cfg_interval
        return bool(self.uncond) and lo < t <= hi

    def step(self, params, exs: Sequence[Example]) -> list[StepOut | None]:
        P, B = self.etok.num_patches, self.batch
        # Per row: ("write", n) | ("noisy", example) | None.
        plan: list = [None] * self.rows
        for i, ex in enumerate(exs):
            if ex.mode == "done":
                continue
            urows = [self._urow(k, i) for k in self.uncond]
            for r in [i] + urows:
                if self.pending[r]:
                    plan[r] = ("write", self._chunk(self.pending[r]))
            if ex.mode == "image" and plan[i] is None:
                if not self._cfg_on(ex):
                    plan[i] = ("noisy", ex)
                elif all(plan[r] is None for r in urows):  # unconditional contexts up to date
                    for r in [i] + urows:
                        plan[r] = ("noisy", ex)
        need = max(((P if p[0] == "noisy" else p[1]) for p in plan if p is not None), default=1)
        W = next(w for w in self.widths if w >= need)
        slab = {k: np.zeros((self.rows, W), np.float32 if k == "timesteps" else np.int32)
                for k in _FIELDS}
        slab["latents"] = np.zeros((self.rows, W, self.etok.codec.token_dim), np.float32)
        slab["valid"] = np.zeros((self.rows, W), bool)
        if self.etok.vit_patch is not None:
            slab["vit_patches"] = np.zeros((self.rows, W, self.etok.vit_patch_dim), np.float32)
            slab["vit_pos"] = np.zeros((self.rows, W), np.int32)
        if self.canvas:
            slab["canvas"] = np.zeros((self.rows, W, self.etok.codec.token_dim), np.float32)
        n_write = np.zeros(self.rows, np.int32)
        q = np.zeros(self.rows, np.int32)
        for r, p in enumerate(plan):
            if p is None:
                continue
            if p[0] == "write":
                for j, tok in enumerate(self.pending[r][:p[1]]):
                    _set(slab, r, j, tok)
                n_write[r], q[r] = p[1], p[1] - 1
            else:
                ex = p[1]
                pos = ex.pos if r < B else self.u_pos[self.uncond[r // B - 1]][r % B]
                sl = slice(0, P)
                slab["tokens"][r, sl], slab["types"][r, sl] = self.etok.tok.pad_id, NOISY
                slab["positions"][r, sl], slab["blocks"][r, sl] = pos, ex.block
                slab["patch_pos"][r, sl], slab["latents"][r, sl] = np.arange(P), ex.x
                slab["timesteps"][r, sl], slab["valid"][r, sl] = self.ts[ex.k], True
                # The image-free context paints on a blank canvas.
                if self.canvas and ex.canvas is not None and (
                        r < B or self.uncond[r // B - 1] != "img"):
                    slab["canvas"][r, sl] = ex.canvas
        logits, vel, self.cache = self._step(params, self.cache,
                                             {k: jnp.asarray(v) for k, v in slab.items()},
                                             jnp.asarray(n_write), jnp.asarray(q))
        logits, vel = np.asarray(logits), np.asarray(vel)
        for r, p in enumerate(plan):
            if p is not None and p[0] == "write":
                del self.pending[r][:p[1]]
        outs: list[StepOut | None] = [None] * len(exs)
        for i, ex in enumerate(exs):
            p = plan[i]
            if p is None:
                continue
            if p[0] == "write":
                # The logits after a written chunk decide only once the context is complete.
                if not self.pending[i] and ex.mode == "text":
                    outs[i] = StepOut(logits=logits[i])
                continue
            v, evals = vel[i, :P], 1
            if self.uncond and plan[self._urow(self.uncond[0], i)] is not None:
                u = {k: vel[self._urow(k, i), :P][None] for k in self.uncond}
                evals += len(u)
                o = self.opts
                v = np.asarray(flow.cfg_combine(v[None], u.get("text"), o.cfg_text_scale,
                                                o.cfg_renorm, u.get("img"),
                                                o.cfg_img_scale))[0]
            outs[i] = StepOut(velocity=v, evals=evals)
        return outs


def _set(slab, r, j, tok: Token):
    slab["tokens"][r, j], slab["types"][r, j] = tok.token, tok.typ
    slab["positions"][r, j], slab["blocks"][r, j] = tok.pos, tok.block
    slab["patch_pos"][r, j] = tok.ppos
    if tok.latent is not None:
        slab["latents"][r, j] = tok.latent
    if tok.vpatch is not None:
        slab["vit_patches"][r, j], slab["vit_pos"][r, j] = tok.vpatch, tok.vpos
    slab["valid"][r, j] = True
