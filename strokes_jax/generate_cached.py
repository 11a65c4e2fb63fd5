"""The generation loop of generate.py over a KV cache (issue 5, part 2).

Same state machine, constraints, caps, NFE counting and outputs as Generator; only the model
calls differ. The prompt is prefilled once; a chosen text token is run alone against the
cache and appended (its logits give the next decision); an image's noisy block is run
against the cache every flow step without being written; the finished image's clean copy
<|vision_start|> latents <|vision_end|> is run once and appended, and its last logits give the
decision after the image. Rows of a batch are in different phases, so each call carries a
slab of new tokens per row (one text token, a noisy block, a clean block or a prompt chunk),
padded to a common width from `slab_widths` (width 1 when every row decodes text).

Text CFG as BAGEL does it (cfg_text_scale > 1): each example also has an unconditional row
whose context is the same stream without any text (BAGEL's cfg_text_context: images only,
with their own RoPE positions; empty for text-to-image). Inside cfg_interval the velocity is
flow.cfg_combine(v_cond, v_uncond, scale) with global renorm; NFE still counts steps. Image
CFG (the uncond context without images) is not implemented.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from strokes_jax import flow
from strokes_jax.generate import Generator
from strokes_jax.model import cache as kvc
from strokes_jax.tokenizer import NOISY

_FIELDS = ("tokens", "types", "positions", "blocks", "patch_pos", "timesteps")


@dataclasses.dataclass
class _Pending:
    """A token waiting to be run and written into the cache."""

    token: int
    typ: int
    pos: int
    block: int
    ppos: int
    latent: np.ndarray | None
    t: float


class CachedGenerator(Generator):
    def __init__(self, model, params, etok, *, cfg_text_scale: float = 1.0,
                 cfg_interval: tuple[float, float] = (0.4, 1.0), cfg_renorm: str = "global",
                 slab_widths=(1,), **kw):
        super().__init__(model, params, etok, **kw)
        self.width = etok.num_patches + 2  # a clean block must fit one call (bidirectional)
        self.widths = sorted({w for w in slab_widths if 0 < w < self.width} | {self.width})
        self.cfg_text_scale, self.cfg_interval, self.cfg_renorm = cfg_text_scale, cfg_interval, cfg_renorm
        self.cfg = cfg_text_scale != 1.0
        self._step = kvc.make_decode_step(model.apply)

    # -- buffers: the cache on device, pending tokens on the host ------------------------
    def _alloc(self, batch: int):
        self.batch = batch
        self.rows = batch * (2 if self.cfg else 1)
        self.cache = kvc.init_cache(self.model.cfg, self.rows, self.max_len)
        self.pending = [[] for _ in range(self.rows)]
        self.u_pos = [0] * batch  # next RoPE position of each unconditional row

    def _put(self, i, ex, token, typ, block=0, ppos=0, latent=None, t=0.0):
        if ex.n >= self.max_len:  # the same bound as the uncached buffer
            raise OverflowError
        self.pending[i].append(_Pending(int(token), typ, ex.pos, block, ppos, latent, t))
        if self.cfg and block > 0:  # image tokens also go to the text-free context
            self.pending[self.batch + i].append(
                _Pending(int(token), typ, self.u_pos[i], block, ppos, latent, t))
            if token == self.tok.vision_end:
                self.u_pos[i] += 1
        ex.n += 1

    def _write_noisy(self, i, ex):
        # Nothing to write; keep the uncached loop's room check so both stop alike.
        if ex.n + self.etok.num_patches > self.max_len:
            ex.mode, ex.hit_cap = "done", True

    def _drop_noisy(self, i, ex):
        pass  # never written

    # -- one call ------------------------------------------------------------------------
    def _chunk(self, pending: list[_Pending]) -> int:
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

    def _cfg_on(self, ex) -> bool:
        t = float(self.ts[ex.k])
        return self.cfg and self.cfg_interval[0] < t <= self.cfg_interval[1]

    def _turn(self, exs, mode):
        P, B = self.etok.num_patches, self.batch
        # Per row: ("write", n) | ("noisy", example) | None.
        plan: list = [None] * self.rows
        for i, ex in enumerate(exs):
            if ex.mode == "done":
                continue
            if self.pending[i]:
                plan[i] = ("write", self._chunk(self.pending[i]))
            if self.cfg and self.pending[B + i]:
                plan[B + i] = ("write", self._chunk(self.pending[B + i]))
            if ex.mode == "image" and plan[i] is None:
                if not self._cfg_on(ex):
                    plan[i] = ("noisy", ex)
                elif plan[B + i] is None:  # the unconditional context is up to date
                    plan[i] = plan[B + i] = ("noisy", ex)
        need = max(((P if p[0] == "noisy" else p[1]) for p in plan if p is not None), default=1)
        W = next(w for w in self.widths if w >= need)
        slab = {k: np.zeros((self.rows, W), np.float32 if k == "timesteps" else np.int32)
                for k in _FIELDS}
        slab["latents"] = np.zeros((self.rows, W, self.etok.patch_dim), np.float32)
        slab["valid"] = np.zeros((self.rows, W), bool)
        n_write = np.zeros(self.rows, np.int32)
        q = np.zeros(self.rows, np.int32)
        for r, p in enumerate(plan):
            if p is None:
                continue
            if p[0] == "write":
                for j, tok in enumerate(self.pending[r][:p[1]]):
                    self._set(slab, r, j, tok.token, tok.typ, tok.pos, tok.block, tok.ppos,
                              tok.latent, tok.t)
                n_write[r], q[r] = p[1], p[1] - 1
            else:
                ex = p[1]
                pos = ex.pos if r < B else self.u_pos[r - B]
                sl = slice(0, P)
                slab["tokens"][r, sl], slab["types"][r, sl] = self.tok.pad_id, NOISY
                slab["positions"][r, sl], slab["blocks"][r, sl] = pos, ex.block
                slab["patch_pos"][r, sl], slab["latents"][r, sl] = np.arange(P), ex.x
                slab["timesteps"][r, sl], slab["valid"][r, sl] = self.ts[ex.k], True
        logits, vel, self.cache = self._step(self.params, self.cache,
                                             {k: jnp.asarray(v) for k, v in slab.items()},
                                             jnp.asarray(n_write), jnp.asarray(q))
        logits, vel = np.asarray(logits), np.asarray(vel)
        for r, p in enumerate(plan):
            if p is not None and p[0] == "write":
                del self.pending[r][:p[1]]
        for i, ex in enumerate(exs):
            p = plan[i]
            if p is None:
                continue
            if p[0] == "write":
                if not self.pending[i] and ex.mode == "text":
                    self._decode(i, ex, logits[i], mode)
            else:
                v = vel[i, :P]
                if self.cfg and plan[B + i] is not None and plan[B + i][0] == "noisy":
                    v = np.asarray(flow.cfg_combine(v[None], vel[B + i, :P][None],
                                                    self.cfg_text_scale, self.cfg_renorm))[0]
                self._denoise(i, ex, v)

    @staticmethod
    def _set(slab, r, j, token, typ, pos, block, ppos, latent, t):
        slab["tokens"][r, j], slab["types"][r, j] = token, typ
        slab["positions"][r, j], slab["blocks"][r, j] = pos, block
        slab["patch_pos"][r, j], slab["timesteps"][r, j] = ppos, t
        if latent is not None:
            slab["latents"][r, j] = latent
        slab["valid"][r, j] = True
