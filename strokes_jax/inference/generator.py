"""Generation: the process-driven loop (plan -> sketch -> inspect -> [refine] -> ... -> end)
and the single-pass baseline (prompt -> image), with the same model, batched over prompts.

Every example advances by one model call per loop turn: either one text token (greedy, read
at the last position) or one Euler step of the image it is drawing (its noisy block sits
after the context; noisy tokens are invisible to the rest, as in training). A finished image
is written back as its clean copy `<|vision_start|> latents <|vision_end|>` and decoding
continues from `<|vision_end|>`. The model decides when to open an image and when to end the
episode; structural tokens are constrained so the stream stays well-formed, and caps bound
text length and iterations.

`Generator` is that state machine; the model-facing work is its backend's: `put` appends a
token to an example's context, `step` runs one model call and returns, per example, the
logits to decide its next token from or the velocity of its image. uncached.UncachedBackend
recomputes the whole context every call; kv_cache.KVCacheBackend decodes from a KV cache.
Both see the same tokens in the same order, so they produce the same episodes.

Each example draws its noise from its own stream (seeded by one draw from the call's RNG, and
its index in the batch), so its images do not depend on when other examples in the batch
open theirs; this is what lets the backends, whose turns differ, agree.

NFE counts velocity evaluations (denoising steps), the paper's unit.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Protocol, Sequence

import numpy as np

from strokes_jax.episodes import episode as ep
from strokes_jax.model import flow
from strokes_jax.sequence.layout import CLEAN, TEXT, VIT
from strokes_jax.sequence.tokenizer import EpisodeTokenizer


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


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """How one call samples. text_temperature 0 decodes greedily; > 0 samples text from each
    example's own RNG, for self-sampled critiques that explore the model's plan errors (the
    paper's text-side critiques are sampled traces). The cfg_* fields are BAGEL's guidance
    (kv_cache.py): a scale of 1 turns that context off."""

    flow_steps: int
    shift: float
    max_iterations: int  # plan/sketch iterations before the episode is made to end
    max_text_tokens: int  # per text segment
    text_temperature: float = 0.0
    cfg_text_scale: float = 1.0
    cfg_img_scale: float = 1.0
    cfg_interval: tuple[float, float] = (0.4, 1.0)  # t range where guidance applies
    cfg_renorm: str = "global"  # global | none

    def __post_init__(self):
        if self.cfg_renorm not in ("global", "none"):
            raise ValueError(f"SamplingOptions cfg_renorm: {self.cfg_renorm!r} is not "
                             "'global' or 'none'")

    @property
    def guided(self) -> bool:
        return self.cfg_text_scale != 1.0 or self.cfg_img_scale != 1.0


@dataclasses.dataclass(frozen=True)
class Token:
    """One context token, as a backend appends it."""

    token: int
    typ: int
    pos: int  # RoPE position
    block: int = 0
    ppos: int = 0
    latent: np.ndarray | None = None  # a clean token's latent patch
    vpatch: np.ndarray | None = None  # a ViT token's pixels
    vpos: int = 0


@dataclasses.dataclass
class Example:
    """One prompt's generation state; backends read it, only the Generator changes it."""

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
    forced: list = dataclasses.field(default_factory=list)  # text tokens an Injector imposes


@dataclasses.dataclass
class StepOut:
    """What one model call gave an example: logits to pick its next token from, or the
    velocity of its noisy block after `evals` evaluations (more than one under CFG)."""

    logits: np.ndarray | None = None
    velocity: np.ndarray | None = None
    evals: int = 0


class Injector(Protocol):
    """Puts known mistakes into a process episode (evaluate/injection.py): the model then
    goes on from them, to inspect and refine as it would its own. k counts iterations (the
    sketch being planned or drawn), from 0."""

    def plan(self, i: int, k: int) -> str | None:
        """The text of example i's k-th plan segment, from <ins> on, to impose once the model
        opens that plan; None leaves the model's own."""

    def sketch(self, i: int, k: int, plan: str, img: np.ndarray) -> np.ndarray | None:
        """A uint8 image to put in place of example i's k-th sketch (drawn for the plan
        segment text `plan`), or None to keep the model's."""


class Backend(Protocol):
    model: object
    etok: EpisodeTokenizer
    max_len: int

    def begin(self, batch: int, options: SamplingOptions, ts: np.ndarray) -> None:
        """Allocate the contexts of one call."""

    def put(self, i: int, n: int, token: Token) -> None:
        """Append `token` to example i's context, at index n."""

    def step(self, params, exs: Sequence[Example]) -> list[StepOut | None]:
        """One model call over every example that is not done."""

    def end(self) -> None:
        """Release what `begin` allocated on the device."""


def pick_token(logits: np.ndarray, allowed: np.ndarray, temperature: float,
               rng: np.random.Generator) -> int:
    """The next text token among the allowed ones: the argmax, or a sample from
    softmax(logits / temperature) when temperature > 0 and more than one token is allowed
    (a forced token draws nothing, so greedy and sampled runs share their noise until they
    first differ)."""
    # A converted model's embedding has spare rows past the tokenizer's ids (BAGEL: 152,064
    # rows for 151,674 ids): never valid, so they are cut off rather than masked.
    masked = np.where(allowed, logits[: len(allowed)].astype(np.float64), -np.inf)
    if temperature <= 0 or allowed.sum() < 2:
        return int(np.argmax(masked))
    z = (masked - masked.max()) / temperature
    p = np.exp(z)
    return int(rng.choice(len(p), p=p / p.sum()))


class Generator:
    """gen(prompts, mode, options=, params=, rng=) -> one Generated per prompt.

    `params`, `options` and `seed` given here are the defaults of every call; a call's own
    arguments override them. Without an `rng` a call draws from the generator's stream
    (seeded by `seed`), so successive calls get fresh noise; pass
    np.random.default_rng(seed) to repeat a call's noise exactly.
    """

    def __init__(self, backend: Backend, params=None, *, options: SamplingOptions | None = None,
                 seed: int = 0):
        self.backend = backend
        self.etok, self.tok = backend.etok, backend.etok.tok
        self.max_len = backend.max_len
        self.options = options
        self._params = params
        self._rng = np.random.default_rng(seed)
        t = self.tok
        self.top_level = np.zeros(t.vocab_size, bool)
        self.top_level[[t.im_start, t.vision_start, t.end_of_episode]] = True
        self.in_text = np.ones(t.vocab_size, bool)
        self.in_text[[t.pad_id, t.unk_id, t.im_start, t.vision_start, t.vision_end,
                      t.end_of_episode]] = False

    def __call__(self, prompts: Sequence[str], mode: str = "process", *,
                 options: SamplingOptions | None = None, params=None,
                 rng: np.random.Generator | None = None,
                 inject: Injector | None = None) -> list[Generated]:
        if mode not in ("process", "single_pass"):
            raise ValueError(f"unknown generation mode {mode!r}")
        opts = options if options is not None else self.options
        params = params if params is not None else self._params
        if opts is None or params is None:
            raise ValueError("Generator: no sampling options or parameters, at construction "
                             "or in the call")
        call_seed = int((self._rng if rng is None else rng).integers(2 ** 63))
        call = _Call(self, opts, mode, inject)
        self.backend.begin(len(prompts), opts, call.ts)
        try:
            exs = call.run(prompts, params, call_seed)
        finally:
            self.backend.end()
        return [self._result(p, ex, mode) for p, ex in zip(prompts, exs)]

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


class _Call:
    """The state machine of one call: its options, its flow schedule, its examples."""

    def __init__(self, gen: Generator, opts: SamplingOptions, mode: str,
                 inject: Injector | None = None):
        self.gen, self.opts, self.mode, self.inject = gen, opts, mode, inject
        self.backend, self.etok, self.tok = gen.backend, gen.etok, gen.tok
        self.ts = flow.schedule(opts.flow_steps, opts.shift)

    def run(self, prompts, params, call_seed: int) -> list[Example]:
        t = self.tok
        exs = [Example(n=0, pos=0, block=0, rng=np.random.default_rng([call_seed, i]))
               for i in range(len(prompts))]
        for i, (ex, p) in enumerate(zip(exs, prompts)):
            for tok in self.etok.text_ids(ep.PROMPT, p, f"prompt {i}")[0]:
                self._text(i, ex, tok)
            # The mode is chosen by the first decision after the prompt.
            self._open(i, ex, t.im_start if self.mode == "process" else t.vision_start)
        while any(ex.mode != "done" for ex in exs):
            for i, (ex, out) in enumerate(zip(exs, self.backend.step(params, exs))):
                if out is None:
                    continue
                if out.logits is not None:
                    self._decode(i, ex, out.logits)
                else:
                    ex.evals += out.evals
                    self._denoise(i, ex, out.velocity)
        return exs

    # -- the context ---------------------------------------------------------------------
    def _put(self, i: int, ex: Example, token: int, typ: int, block: int = 0, ppos: int = 0,
             latent=None, vpatch=None, vpos: int = 0):
        if ex.n >= self.gen.max_len:
            raise OverflowError
        self.backend.put(i, ex.n, Token(int(token), typ, ex.pos, block, ppos, latent, vpatch,
                                        vpos))
        ex.n += 1

    def _text(self, i, ex, token):
        self._put(i, ex, token, TEXT)
        ex.pos += 1
        ex.stream.append(int(token))

    def _room_for_noisy(self, ex) -> None:
        # The noisy block sits after the context while it is denoised.
        if ex.n + self.etok.num_patches > self.gen.max_len:
            ex.mode, ex.hit_cap = "done", True

    # -- decisions -----------------------------------------------------------------------
    def _decode(self, i, ex, logits):
        t, opts, g = self.tok, self.opts, self.gen
        if ex.forced:  # the backend still ran its call; an imposed plan ignores it
            self._open(i, ex, ex.forced.pop(0))
            return
        capped = ex.sketches >= opts.max_iterations
        if ex.in_segment:
            allowed = g.in_text.copy()
            if ex.seg_tokens >= opts.max_text_tokens:
                allowed[:] = False
                allowed[t.im_end] = True
                ex.hit_cap = True
            elif ex.seg_tokens == 0 and capped:
                allowed[t.ids["<ins>"]] = False  # no new iteration past the cap
        else:
            allowed = g.top_level.copy()
            allowed[t.vision_start] = False
            last, image_since = self._last_segment(ex)
            if not image_since and last in ("plan", "refine"):
                allowed[:] = False  # a plan or a <refine> is always followed by its image
                allowed[t.vision_start] = True
            elif self.mode == "single_pass" or (capped and (last == "inspect" or
                                                            (last == "refine" and image_since))):
                ex.hit_cap |= self.mode == "process"
                allowed[:] = False
                allowed[t.end_of_episode] = True
        token = pick_token(logits, allowed, opts.text_temperature, ex.rng)
        if (self.inject is not None and ex.in_segment and ex.seg_tokens == 0
                and token == t.ids["<ins>"]):
            text = self.inject.plan(i, ex.sketches)
            if text is not None:
                ids = t.encode(text, f"injected plan of example {i}")
                if not ids or ids[0] != token:
                    raise ValueError(f"injected plan {text!r} does not start with <ins>")
                ex.forced = ids[1:] + [t.im_end]
        self._open(i, ex, token)

    def _open(self, i, ex, token):
        t = self.tok
        try:
            if token == t.vision_start:
                ex.mode, ex.k, ex.block = "image", 0, ex.block + 1
                ex.x = ex.rng.standard_normal((self.etok.num_patches, self.etok.codec.token_dim)).astype(np.float32)
                self._room_for_noisy(ex)
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

    # -- images --------------------------------------------------------------------------
    def _denoise(self, i, ex, v):
        ex.x = ex.x - v * (self.ts[ex.k] - self.ts[ex.k + 1])
        ex.k += 1
        ex.nfe += 1
        if ex.k < self.opts.flow_steps:
            self._room_for_noisy(ex)
            return
        # The codec (model/codec.py) gives the picture and the clean copy: pixels quantised
        # as training packs them, or AE latents kept as they are with the decoded picture.
        img, clean = self.etok.codec.image(ex.x)
        last, _ = self._last_segment(ex)
        if self.inject is not None and last == "plan":
            new = self.inject.sketch(i, ex.sketches, self._segment_text(ex), img)
            if new is not None:
                img, clean = np.asarray(new, np.uint8), self.etok.codec.clean(new)
        ex.canvas = clean
        ex.block += 1
        try:
            # The clean copy replaces the noisy block, at its position (tokenizer.py).
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
        if last in ("plan", "prompt"):  # a refined image is not a new iteration
            ex.sketches += 1
        ex.mode = "text"

    def _put_vit(self, i, ex, img):
        """The ViT copy of a finished image, as in training (tokenizer.py): its own block at
        the next RoPE position, pixels scaled like train/step.py's to_vit_pixels."""
        e = self.etok
        vp, vpos = e.vit_image(img)
        vp = vp.astype(np.float32) / 127.5 - 1.0
        ex.block += 1
        self._put(i, ex, self.tok.vision_start, TEXT, ex.block)
        for j in range(len(vp)):
            self._put(i, ex, self.tok.pad_id, VIT, ex.block, vpatch=vp[j], vpos=int(vpos[j]))
        self._put(i, ex, self.tok.vision_end, TEXT, ex.block)
        ex.pos += 1

    def _segment_text(self, ex) -> str:
        """The text of the most recent segment, without its <|im_start|> / <|im_end|>."""
        t, seg = self.tok, []
        for s in reversed(ex.stream):
            if isinstance(s, np.ndarray) or s == t.im_start:
                break
            seg.append(s)
        return self.tok.decode([s for s in reversed(seg) if s != t.im_end])

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


_SEG_RE = re.compile(r"<\|im_start\|>(.*?)<\|im_end\|>", re.S)
PLAN_RE = re.compile(r"<ins>(.*?)</ins>\s*<des>(.*?)</des>", re.S)  # ep.plan_text, read back


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
            plan = PLAN_RE.fullmatch(c)
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
