"""Generation: the process-driven loop (plan -> sketch -> inspect -> [refine] -> ... -> end)
and the single-pass baseline (prompt -> image), with the same model, batched over prompts.

Every example advances by one model call per loop turn: either one text token (greedy, read
at the last position) or one Euler step of the image it is drawing (its noisy block sits
after the context; noisy tokens are invisible to the rest, as in training). A finished image
is written back as its clean copy `<|vision_start|> latents <|vision_end|>` and decoding
continues from `<|vision_end|>`. The model decides when to open an image and when to end the
episode; structural tokens are constrained so the stream stays well-formed, and caps bound
text length and iterations. No KV cache here: each call recomputes the context at a bucketed
length; generate_cached.CachedGenerator is the same loop over a KV cache.

Each example draws its noise from its own stream (seeded by the generator's seed, the call
and its index in the batch), so its images do not depend on when other examples in the batch
open theirs; this is what lets the cached and uncached loops, whose turns differ, agree.

NFE counts velocity evaluations (denoising steps), the paper's unit.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from strokes_jax import episode as ep
from strokes_jax import flow
from strokes_jax.tokenizer import (CLEAN, NOISY, TEXT, VIT, EpisodeTokenizer, patchify,
                                   unpatchify)


@dataclasses.dataclass
class Generated:
    prompt: str
    mode: str  # "process" | "single_pass"
    text: str  # the whole stream, images shown as <image>
    images: list[np.ndarray]
    nfe: int
    episode: ep.Episode | None  # None when the stream is not a well-formed episode
    error: str | None
    hit_cap: bool
    nfe_evals: int = 0  # model evaluations for denoising: NFE x contexts (CFG) evaluated

    @property
    def final_image(self) -> np.ndarray | None:
        return self.images[-1] if self.images else None


@dataclasses.dataclass
class _Ex:
    n: int  # used context length
    pos: int  # next RoPE position
    block: int
    mode: str = "text"  # text | image | done
    seg_tokens: int = 0  # tokens in the current text segment
    in_segment: bool = False
    sketches: int = 0
    x: np.ndarray | None = None  # latents being denoised
    k: int = 0  # flow step index
    nfe: int = 0
    evals: int = 0
    hit_cap: bool = False
    stream: list = dataclasses.field(default_factory=list)  # ints and images
    rng: np.random.Generator | None = None  # this example's noise
    canvas: np.ndarray | None = None  # latents of its last finished image (model.canvas_skip)


def pick_token(logits: np.ndarray, allowed: np.ndarray, temperature: float,
               rng: np.random.Generator) -> int:
    """The next text token among the allowed ones: the argmax, or a sample from
    softmax(logits / temperature) when temperature > 0 and more than one token is allowed
    (a forced token draws nothing, so greedy and sampled runs share their noise until they
    first differ)."""
    masked = np.where(allowed, logits.astype(np.float64), -np.inf)
    if temperature <= 0 or allowed.sum() < 2:
        return int(np.argmax(masked))
    z = (masked - masked.max()) / temperature
    p = np.exp(z)
    return int(rng.choice(len(p), p=p / p.sum()))


class Generator:
    def __init__(self, model, params, etok: EpisodeTokenizer, *, max_len: int,
                 flow_steps: int, shift: float, max_iterations: int, max_text_tokens: int,
                 buckets: Sequence[int] = (128, 256, 384, 512), seed: int = 0):
        self.model, self.params, self.etok = model, params, etok
        self.tok = etok.tok
        self.max_len = max_len
        self.buckets = sorted({b for b in buckets if b < max_len} | {max_len})
        self.ts = flow.schedule(flow_steps, shift)
        self.flow_steps = flow_steps
        self.max_iterations, self.max_text_tokens = max_iterations, max_text_tokens
        self.rng = np.random.default_rng(seed)
        # 0: greedy text. > 0: text sampled at this temperature from each example's own RNG,
        # for self-sampled critiques that explore the model's plan errors (the paper's
        # text-side critiques are sampled traces); evaluation stays greedy.
        self.text_temperature = 0.0
        self._fwd = jax.jit(self._forward)
        t = self.tok
        self.top_level = np.zeros(t.vocab_size, bool)
        self.top_level[[t.im_start, t.vision_start, t.end_of_episode]] = True
        self.in_text = np.ones(t.vocab_size, bool)
        self.in_text[[t.pad_id, t.unk_id, t.im_start, t.vision_start, t.vision_end,
                      t.end_of_episode]] = False

    def _forward(self, params, tokens, types, positions, segment_ids, blocks, patch_pos,
                 latents, timesteps, q_index, img_start, vit_patches=None, vit_pos=None):
        vit = {} if vit_patches is None else dict(vit_patches=vit_patches, vit_pos=vit_pos)
        logits, vel = self.model.apply({"params": params}, tokens, types, positions, segment_ids,
                                       blocks, patch_pos, latents, timesteps, **vit)
        b = jnp.arange(tokens.shape[0])
        idx = img_start[:, None] + jnp.arange(self.etok.num_patches)[None, :]
        idx = jnp.clip(idx, 0, tokens.shape[1] - 1)
        return logits[b, q_index], jnp.take_along_axis(vel, idx[..., None], axis=1)

    # -- sequence buffers ---------------------------------------------------------------
    def _alloc(self, batch: int):
        L, P = self.max_len, self.etok.patch_dim
        self.buf = {k: np.zeros((batch, L), np.int32) for k in
                    ("tokens", "types", "positions", "segment_ids", "blocks", "patch_pos")}
        self.buf["latents"] = np.zeros((batch, L, P), np.float32)
        self.buf["timesteps"] = np.zeros((batch, L), np.float32)
        if self.etok.vit_patch is not None:
            self.buf["vit_patches"] = np.zeros((batch, L, self.etok.vit_patch_dim), np.float32)
            self.buf["vit_pos"] = np.zeros((batch, L), np.int32)

    def _put(self, i: int, ex: _Ex, token: int, typ: int, block: int = 0, ppos: int = 0,
             latent=None, t: float = 0.0, vpatch=None, vpos: int = 0):
        if ex.n >= self.max_len:
            raise OverflowError
        b = self.buf
        b["tokens"][i, ex.n], b["types"][i, ex.n] = token, typ
        b["positions"][i, ex.n], b["segment_ids"][i, ex.n] = ex.pos, 1
        b["blocks"][i, ex.n], b["patch_pos"][i, ex.n] = block, ppos
        b["latents"][i, ex.n] = 0.0 if latent is None else latent
        b["timesteps"][i, ex.n] = t
        if "vit_patches" in b:
            b["vit_patches"][i, ex.n] = 0.0 if vpatch is None else vpatch
            b["vit_pos"][i, ex.n] = vpos
        ex.n += 1

    def _text(self, i, ex, token):
        self._put(i, ex, token, TEXT)
        ex.pos += 1
        ex.stream.append(int(token))

    # -- the loop ------------------------------------------------------------------------
    def __call__(self, prompts: Sequence[str], mode: str = "process") -> list[Generated]:
        if mode not in ("process", "single_pass"):
            raise ValueError(f"unknown generation mode {mode!r}")
        t = self.tok
        self._alloc(len(prompts))
        call_seed = int(self.rng.integers(2 ** 63))
        exs = [_Ex(n=0, pos=0, block=0, rng=np.random.default_rng([call_seed, i]))
               for i in range(len(prompts))]
        for i, (ex, p) in enumerate(zip(exs, prompts)):
            for tok in [t.im_start] + t.encode(p, f"prompt {i}") + [t.im_end]:
                self._text(i, ex, tok)
            # The mode is chosen by the first decision after the prompt.
            self._open(i, ex, t.im_start if mode == "process" else t.vision_start)
        while any(ex.mode != "done" for ex in exs):
            self._turn(exs, mode)
        return [self._result(p, ex, mode) for p, ex in zip(prompts, exs)]

    def _turn(self, exs, mode):
        active = [ex for ex in exs if ex.mode != "done"]
        need = max(ex.n + (self.etok.num_patches if ex.mode == "image" else 0) for ex in active)
        L = next(b for b in self.buckets if b >= need)
        q = np.array([max(ex.n - 1, 0) for ex in exs], np.int32)
        img = np.array([ex.n if ex.mode == "image" else 0 for ex in exs], np.int32)
        args = {k: v[:, :L] for k, v in self.buf.items()}
        logits, vel = self._fwd(self.params, args["tokens"], args["types"], args["positions"],
                                args["segment_ids"], args["blocks"], args["patch_pos"],
                                args["latents"], args["timesteps"], q, img,
                                args.get("vit_patches"), args.get("vit_pos"))
        logits, vel = np.asarray(logits), np.asarray(vel)
        for i, ex in enumerate(exs):
            if ex.mode == "text":
                self._decode(i, ex, logits[i], mode)
            elif ex.mode == "image":
                ex.evals += 1
                self._denoise(i, ex, vel[i])

    def _decode(self, i, ex, logits, mode):
        t = self.tok
        capped = ex.sketches >= self.max_iterations
        if ex.in_segment:
            allowed = self.in_text.copy()
            if ex.seg_tokens >= self.max_text_tokens:
                allowed[:] = False
                allowed[t.im_end] = True
                ex.hit_cap = True
            elif ex.seg_tokens == 0 and capped:
                allowed[t.ids["<ins>"]] = False  # no new iteration past the cap
        else:
            allowed = self.top_level.copy()
            allowed[t.vision_start] = False
            last, image_since = self._last_segment(ex)
            if not image_since and last in ("plan", "refine"):
                allowed[:] = False  # a plan or a <refine> is always followed by its image
                allowed[t.vision_start] = True
            elif mode == "single_pass" or (capped and (last == "inspect" or
                                                       (last == "refine" and image_since))):
                ex.hit_cap |= mode == "process"
                allowed[:] = False
                allowed[t.end_of_episode] = True
        token = pick_token(logits, allowed, self.text_temperature, ex.rng)
        self._open(i, ex, token)

    def _open(self, i, ex, token):
        t = self.tok
        try:
            if token == t.vision_start:
                ex.mode, ex.k, ex.block = "image", 0, ex.block + 1
                ex.x = ex.rng.standard_normal((self.etok.num_patches, self.etok.patch_dim)).astype(np.float32)
                self._write_noisy(i, ex)
                return
            if token == t.end_of_episode:
                self._text(i, ex, token)
                ex.mode = "done"
                return
            self._text(i, ex, token)
            if token == t.im_start:
                ex.in_segment, ex.seg_tokens = True, 0
            elif token == t.im_end:
                ex.in_segment = False
            else:
                ex.seg_tokens += 1
        except OverflowError:
            ex.mode, ex.hit_cap = "done", True

    def _write_noisy(self, i, ex):
        n, P = ex.n, self.etok.num_patches
        if n + P > self.max_len:
            ex.mode, ex.hit_cap = "done", True
            return
        b = self.buf
        sl = slice(n, n + P)
        b["tokens"][i, sl], b["types"][i, sl] = self.tok.pad_id, NOISY
        b["positions"][i, sl], b["segment_ids"][i, sl] = ex.pos, 1
        b["blocks"][i, sl], b["patch_pos"][i, sl] = ex.block, np.arange(P)
        b["latents"][i, sl], b["timesteps"][i, sl] = ex.x, self.ts[ex.k]

    def _drop_noisy(self, i, ex):
        # Replace the noisy block by the clean copy; later tokens see only this.
        self.buf["segment_ids"][i, ex.n:ex.n + self.etok.num_patches] = 0

    def _denoise(self, i, ex, v):
        ex.x = ex.x - v * (self.ts[ex.k] - self.ts[ex.k + 1])
        ex.k += 1
        ex.nfe += 1
        if ex.k < self.flow_steps:
            self._write_noisy(i, ex)
            return
        self._drop_noisy(i, ex)
        pixels = np.clip(np.round((ex.x + 1.0) * 127.5), 0, 255).astype(np.uint8)
        h, w, c = self.etok.image_shape
        img = unpatchify(pixels, (h, w), self.etok.patch, c)
        clean = pixels.astype(np.float32) / 127.5 - 1.0
        ex.canvas = clean
        ex.block += 1
        try:
            self._put(i, ex, self.tok.vision_start, TEXT, ex.block)
            for j in range(self.etok.num_patches):
                self._put(i, ex, self.tok.pad_id, CLEAN, ex.block, j, clean[j])
            self._put(i, ex, self.tok.vision_end, TEXT, ex.block)
            ex.pos += 1
            if self.etok.vit_patch is not None:
                self._put_vit(i, ex, img)
        except OverflowError:
            ex.stream.append(img)
            ex.mode, ex.hit_cap = "done", True
            return
        ex.stream.append(img)
        last, _ = self._last_segment(ex)
        if last in ("plan", "prompt"):  # a refined image is not a new iteration
            ex.sketches += 1
        ex.mode = "text"

    def _put_vit(self, i, ex, img):
        """The ViT copy of a finished image, as in training (tokenizer.py): its own block at
        the next RoPE position, pixels scaled like train/step.py's to_vit_pixels."""
        e = self.etok
        vp = patchify(img, e.vit_patch).astype(np.float32) / 127.5 - 1.0
        ex.block += 1
        self._put(i, ex, self.tok.vision_start, TEXT, ex.block)
        for j in range(e.vit_num_patches):
            self._put(i, ex, self.tok.pad_id, VIT, ex.block, vpatch=vp[j], vpos=int(e.vit_pos[j]))
        self._put(i, ex, self.tok.vision_end, TEXT, ex.block)
        ex.pos += 1

    def _last_segment(self, ex) -> tuple[str, bool]:
        """Kind of the most recent text segment ('prompt' | 'plan' | 'inspect' | 'refine' |
        'other') and whether an image came after it."""
        t, image_since = self.tok, False
        for j in range(len(ex.stream) - 1, -1, -1):
            s = ex.stream[j]
            if isinstance(s, np.ndarray):
                image_since = True
            elif s == t.im_start:
                seg = [x for x in ex.stream[j:] if not isinstance(x, np.ndarray)]
                if j == 0:
                    return "prompt", image_since
                for tag, kind in (("<ins>", "plan"), ("<refine>", "refine"), ("<inspect>", "inspect")):
                    if t.ids[tag] in seg:
                        return kind, image_since
                return "other", image_since
        return "other", image_since

    # -- results -------------------------------------------------------------------------
    def _result(self, prompt, ex, mode) -> Generated:
        parts, images, cur = [], [], []
        for s in ex.stream:
            if isinstance(s, np.ndarray):
                parts.append(("text", self.tok.decode(cur)))
                cur = []
                parts.append(("image", s))
                images.append(s)
            else:
                cur.append(s)
        parts.append(("text", self.tok.decode(cur)))
        text = " ".join(c if m == "text" else "<image>" for m, c in parts if m == "image" or c)
        episode, error = None, None
        try:
            episode = parse_stream(prompt, parts, mode, self.etok.image_shape)
        except ep.EpisodeError as e:
            error = str(e)
        return Generated(prompt, mode, text, images, ex.nfe, episode, error, ex.hit_cap,
                         ex.evals)


_SEG_RE = re.compile(r"<\|im_start\|>(.*?)<\|im_end\|>", re.S)


def parse_stream(prompt: str, parts, mode: str, image_shape) -> ep.Episode:
    """Rebuild an Episode from a generated stream; raises EpisodeError if malformed."""
    items = []  # ("text", str) | ("image", arr) in order, prompt segment dropped
    for m, c in parts:
        if m == "image":
            items.append(("image", c))
        else:
            items.extend(("text", s.strip()) for s in _SEG_RE.findall(c))
    where = f"generated episode for {prompt!r}"
    if not items or items[0] != ("text", prompt):
        raise ep.EpisodeError(f"{where}: stream does not start with the prompt")
    items = items[1:]
    steps: list[ep.Step] = []
    i = 0
    while i < len(items):
        m, c = items[i]
        if m == "text":
            plan = re.fullmatch(r"<ins>(.*?)</ins>\s*<des>(.*?)</des>", c, re.S)
            if not plan:
                raise ep.EpisodeError(f"{where}: expected a plan, got {c!r}")
            if i + 1 >= len(items) or items[i + 1][0] != "image":
                raise ep.EpisodeError(f"{where}: plan {c!r} has no sketch")
            step = ep.Step(sketch=items[i + 1][1], ins=plan.group(1).strip(), des=plan.group(2).strip())
            i += 2
        elif mode == "single_pass" and not steps:
            step = ep.Step(sketch=c)
            i += 1
        else:
            raise ep.EpisodeError(f"{where}: image without a plan")
        if i < len(items) and items[i][0] == "text" and items[i][1].startswith("<inspect>"):
            insp = re.fullmatch(r"<inspect>(.*?)</inspect>(?:\s*<refine>(.*?)</refine>)?",
                                items[i][1], re.S)
            if not insp:
                raise ep.EpisodeError(f"{where}: malformed inspection {items[i][1]!r}")
            step.inspect = insp.group(1).strip()
            i += 1
            if insp.group(2) is not None:
                if i >= len(items) or items[i][0] != "image":
                    raise ep.EpisodeError(f"{where}: refine without a refined image")
                step.refine, step.refined = insp.group(2).strip(), items[i][1]
                i += 1
        steps.append(step)
    if not steps:
        raise ep.EpisodeError(f"{where}: no image was generated")
    kind = "single_pass" if mode == "single_pass" else "additive"
    e = ep.Episode(id=f"gen:{prompt}", prompt=prompt, tag="", metadata={}, steps=steps, kind=kind)
    return e.validate(image_shape, max_steps=64)
