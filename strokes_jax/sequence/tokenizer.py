"""Tokenizers: an HF `tokenizers` word-level vocabulary for the shapes world (plus special
tokens), and the episode tokenizer that lays an Episode out as the model's interleaved
sequence.

Sequence layout of one episode (sequence/layout.py names its tokens and fields):

  <|im_start|> prompt <|im_end|>                                  PROMPT
  <|im_start|> <ins> .. </ins> <des> .. </des> <|im_end|>          PLAN
  [noisy latents]  <|vision_start|> [clean latents] <|vision_end|>  SKETCH
  <|im_start|> <inspect> .. </inspect> [<refine> .. </refine>] <|im_end|>  INSPECT / REFINE
  [noisy] <|vision_start|> [clean] <|vision_end|>                   REFINE (when refined)
  ... ; <|endofepisode|>                                           PLAN (the stop decision)

Noisy latents carry the flow loss and are hidden from every later token; the clean copy,
with its markers, is what later tokens see. A text token's CE target is the next token of
the sequence with noisy segments removed, so `<|im_end|>` learns to predict
`<|vision_start|>` (the modality switch) and `<|vision_end|>` predicts what follows the image.

With `vit_patch` set (BAGEL's understanding path), every image, generated or context, is
followed by a ViT copy, its own bidirectional block:

  [noisy] <|vision_start|> [clean] <|vision_end|> <|vision_start|> [ViT] <|vision_end|>

ViT tokens (type VIT) carry uint8 pixel patches at the ViT patch size (`vit_patches`) and
their index into the ViT's learned position table (`vit_pos` = row * vit_max_side + col).
As in BAGEL's pack_sequence, each image element holds one RoPE position: the noisy and clean
copies share position r (the clean copy replaces the noisy one at inference), the ViT copy
with its markers is the next element at r + 1, and the following text starts at r + 2. The
mask needs no new rule: the ViT block comes after the clean one, so it sees the clean copy
and what came before (as BAGEL's "full" split does), never the noisy copy, and every later
token sees both clean and ViT copies. The ViT copy is forced by the layout, not predicted:
the clean copy's `<|vision_end|>` has no CE target and
the ViT copy's `<|vision_end|>` predicts what follows the image.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import numpy as np
import tokenizers
from tokenizers import models, pre_tokenizers

from strokes_jax.episodes import episode as ep
from strokes_jax.sequence.layout import (CLEAN, END_OF_EPISODE, IM_END, IM_START, NOISY, PAD, SPECIALS,
                                        TAGS, TEXT, TOKEN_FIELDS, UNK, VISION_END,
                                        VISION_START, VIT)

class TokenizerError(ValueError):
    pass


class Tokenizer:
    """Thin wrapper over an HF `tokenizers.Tokenizer` that refuses unknown words."""

    def __init__(self, tok: tokenizers.Tokenizer):
        self.tok = tok
        vocab = tok.get_vocab()
        missing = [s for s in SPECIALS if s not in vocab]
        if missing:
            raise TokenizerError(f"tokenizer lacks special tokens {missing}")
        self.pad_id, self.unk_id = vocab[PAD], vocab[UNK]
        self.im_start, self.im_end = vocab[IM_START], vocab[IM_END]
        self.vision_start, self.vision_end = vocab[VISION_START], vocab[VISION_END]
        self.end_of_episode = vocab[END_OF_EPISODE]
        self.ids = {t: vocab[t] for t in TAGS}
        self.vocab_size = tok.get_vocab_size()

    @classmethod
    def for_words(cls, words: Sequence[str], pad_to: int = 1) -> "Tokenizer":
        """Specials, then the words sorted; `pad_to` > 1 appends unused `<reserved_i>` tokens
        up to a multiple of it, so the vocabulary axis splits evenly over a tensor-parallel
        mesh axis whatever words the world adds."""
        names = list(SPECIALS) + sorted(set(words) - set(SPECIALS))
        names += [f"<reserved_{i}>" for i in range(-len(names) % pad_to)]
        vocab = {w: i for i, w in enumerate(names)}
        tok = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.add_special_tokens(list(SPECIALS))
        return cls(tok)

    @classmethod
    def shapes(cls) -> "Tokenizer":
        from strokes_jax.worlds import grammar
        return cls.for_words(grammar.vocabulary(), pad_to=8)

    @classmethod
    def from_file(cls, path: str) -> "Tokenizer":
        return cls(tokenizers.Tokenizer.from_file(os.fspath(path)))

    def save(self, path: str) -> None:
        self.tok.save(os.fspath(path))

    def encode(self, text: str, record: str = "?") -> list[int]:
        enc = self.tok.encode(text, add_special_tokens=False)
        bad = [text[a:b] for (a, b), i in zip(enc.offsets, enc.ids) if i == self.unk_id]
        if bad:
            raise TokenizerError(f"record {record}: unknown token(s) {bad} in {text!r}")
        return list(enc.ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def fingerprint(self) -> str:
        return json.dumps(self.tok.get_vocab(), sort_keys=True)


def patchify(img: np.ndarray, patch: int) -> np.ndarray:
    """uint8 [H, W, C] -> [H/p * W/p, p*p*C], patches row-major, (row, col, channel) inside."""
    h, w, c = img.shape
    if h % patch or w % patch:
        raise ValueError(f"image {h}x{w} is not divisible by patch size {patch}")
    x = img.reshape(h // patch, patch, w // patch, patch, c).transpose(0, 2, 1, 3, 4)
    return x.reshape((h // patch) * (w // patch), patch * patch * c)


def unpatchify(tokens: np.ndarray, hw: tuple[int, int], patch: int, channels: int = 3) -> np.ndarray:
    h, w = hw
    x = tokens.reshape(h // patch, w // patch, patch, patch, channels).transpose(0, 2, 1, 3, 4)
    return x.reshape(h, w, channels)


def to_pixels(x: np.ndarray) -> np.ndarray:
    """Latents in [-1, 1] -> uint8 pixels (rounded, clipped)."""
    return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


class PixelCodec:
    """The shapes world's identity codec: patch x patch x 3 uint8 pixel patches are the
    latents, scaled to [-1, 1] (model/codec.py has the autoencoder's)."""

    kind = "pixels"
    in_step = False  # nothing to encode inside the training step
    params = None

    def __init__(self, image_shape: tuple[int, int, int], patch: int, rules=None):
        self.image_shape, self.patch, self.rules = tuple(image_shape), patch, rules
        self.token_dim = patch * patch * image_shape[2]
        self.packed_dtype = np.uint8  # what a packed row's `patches` hold

    def image(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Denoised tokens [T, token_dim] -> (uint8 image, the clean copy's tokens). The clean
        copy is the image quantised to pixels, exactly what training packs for it."""
        px = to_pixels(x)
        h, w, c = self.image_shape
        return unpatchify(px, (h, w), self.patch, c), px.astype(np.float32) / 127.5 - 1.0

    def clean(self, img: np.ndarray) -> np.ndarray:
        """A uint8 image -> the clean copy's tokens, as image() gives them for a drawn one."""
        return patchify(np.asarray(img), self.patch).astype(np.float32) / 127.5 - 1.0

    def fingerprint(self) -> str:
        return f"pixels:{self.patch}"


def vit_positions(h_patches: int, w_patches: int, max_side: int) -> np.ndarray:
    """BAGEL's "extrapolate" ViT position ids, row * max_side + col, row-major like patchify."""
    rows, cols = np.meshgrid(np.arange(h_patches), np.arange(w_patches), indexing="ij")
    return (rows * max_side + cols).reshape(-1).astype(np.int32)


class EpisodeTokenizer:
    """Episode -> per-token numpy arrays (see module doc), one entry per sequence position:

    tokens (text id, pad for latents), types (TEXT/NOISY/CLEAN), stages, targets (next clean
    text token, 0 = no CE target), target_stages, positions (RoPE: text advances per token,
    an image with its markers and both copies holds one position), blocks (bidirectional
    group: 0 for text, 1.. for each image copy), patch_pos (index into the 2-D table),
    patches (uint8 [n, patch_dim]); with `vit_patch` set also vit_patches (uint8
    [n, vit_patch_dim], zero outside ViT copies) and vit_pos (int32, 0 outside them).

    vit_patch: None packs no ViT copy (the default layout, unchanged); an int packs one per
    image at that patch size. vit_max_side: side of the ViT's learned position table
    (BAGEL: 70), which sets vit_pos and bounds the image's patch grid.
    """

    def __init__(self, tokenizer: Tokenizer, image_shape: tuple[int, int, int], patch: int,
                 vit_patch: int | None = None, vit_max_side: int = 70, codec=None,
                 vit_rules=None):
        self.tok = tokenizer
        self.image_shape = tuple(image_shape)
        self.patch = patch
        h, w, c = self.image_shape
        self.num_patches = (h // patch) * (w // patch)
        self.grid_w = w // patch  # width of the 2-D latent position table
        # The codec (model/codec.py) decides what a row's patches hold: pixel patches (uint8,
        # patch * patch * c values) or, with precomputed AE latents, latent tokens (float32).
        self.codec = codec if codec is not None else PixelCodec(self.image_shape, patch)
        if self.codec.patch != patch:
            raise ValueError(f"config key world.patch: {patch} pixels per token, but the "
                             f"{self.codec.kind} codec's tokens cover {self.codec.patch}")
        # codec.rules (sequence/images.py ImageRules) resize every image as BAGEL does, so
        # images of any size and aspect ratio take their own token counts; image_shape is then
        # the largest image (the position table, and what the generator paints). Without
        # rules every image must have image_shape.
        self.rules = getattr(self.codec, "rules", None)
        self.vit_rules = vit_rules
        self.latent_input = getattr(self.codec, "precomputed", False)
        self.patch_dim = self.codec.token_dim if self.latent_input else patch * patch * c
        self.patch_dtype = self.codec.packed_dtype
        self.vit_patch, self.vit_max_side = vit_patch, vit_max_side
        self.vit_num_patches, self.vit_patch_dim = 0, None
        if vit_patch is not None:
            if vit_rules is None:
                self._check_vit(vit_patch, vit_max_side)
                self.vit_num_patches = (h // vit_patch) * (w // vit_patch)
                self.vit_pos = vit_positions(h // vit_patch, w // vit_patch, vit_max_side)
            else:
                if vit_rules.stride != vit_patch or vit_rules.max_side > vit_patch * vit_max_side:
                    raise ValueError(f"config key world.vit_max_image_size: {vit_rules.max_side} "
                                     f"pixels in {vit_patch}-pixel patches exceed the "
                                     f"{vit_max_side}-patch position table, or the stride "
                                     f"{vit_rules.stride} is not the patch")
                gh, gw = vit_rules.dims(h, w)
                self.vit_num_patches = (gh // vit_patch) * (gw // vit_patch)
            self.vit_patch_dim = vit_patch * vit_patch * c

    def _check_vit(self, vit_patch: int, max_side: int) -> None:
        # Every episode's images have image_shape (Episode.validate), so the ViT grid is
        # checked once here rather than per record.
        h, w, _ = self.image_shape
        if not isinstance(vit_patch, int) or vit_patch <= 0:
            raise ValueError(f"EpisodeTokenizer vit_patch: {vit_patch!r} is not a positive int")
        if h % vit_patch or w % vit_patch:
            raise ValueError(f"EpisodeTokenizer vit_patch: image {h}x{w} is not divisible by "
                             f"ViT patch size {vit_patch}")
        if h // vit_patch > max_side or w // vit_patch > max_side:
            raise ValueError(f"EpisodeTokenizer vit_max_side: a {h // vit_patch}x{w // vit_patch} "
                             f"ViT patch grid exceeds the {max_side}x{max_side} position table")

    def _latents(self, episode: ep.Episode, rec: str) -> list[np.ndarray] | None:
        """Precomputed latent tokens, one [tokens, patch_dim] array per image in segment order
        (data/latents.py attaches them when the record is read); None for pixel rows."""
        if not self.latent_input:
            return None
        lat = episode.latents
        images = episode.images()
        if lat is None or len(lat) != len(images):
            raise ep.EpisodeError(f"{rec}: {0 if lat is None else len(lat)} precomputed latents "
                                  f"for {len(images)} images (rebuild them: build-data)")
        for i, (a, img) in enumerate(zip(lat, images)):
            gh, gw = self.latent_grid(np.asarray(img).shape)
            if tuple(a.shape) != (gh * gw, self.patch_dim):
                raise ep.EpisodeError(f"{rec}: precomputed latents of image {i} have shape "
                                      f"{list(a.shape)}, not {[gh * gw, self.patch_dim]}")
        return lat

    def latent_grid(self, shape) -> tuple[int, int]:
        """(rows, cols) of latent tokens for an image of `shape`, after the resize rules."""
        h, w = shape[:2] if self.rules is None else self.rules.dims(shape[0], shape[1])
        return h // self.patch, w // self.patch

    def image_patches(self, img: np.ndarray, latent: np.ndarray | None = None):
        """(what a row holds for the image's tokens, their patch_pos): the precomputed latent
        tokens or the (resized) image's pixel patches, and row * table width + col."""
        gh, gw = self.latent_grid(np.asarray(img).shape)  # from the image before resizing
        if latent is None:
            img = np.asarray(img) if self.rules is None else self.rules.resize(img)
            latent = patchify(img, self.patch)
        rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
        return latent, (rows * self.grid_w + cols).reshape(-1)

    def vit_image(self, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 ViT patches, their vit_pos) of an image's ViT copy (resized by the ViT's
        rules when set)."""
        if self.vit_rules is None:
            return patchify(np.asarray(img), self.vit_patch), self.vit_pos
        img = self.vit_rules.resize(img)
        gh, gw = img.shape[0] // self.vit_patch, img.shape[1] // self.vit_patch
        return patchify(img, self.vit_patch), vit_positions(gh, gw, self.vit_max_side)

    def image_tokens(self) -> int:
        """Sequence positions one generated image takes: noisy copy + markers + clean copy
        (+ markers + ViT copy when packed)."""
        vit = self.vit_num_patches + 2 if self.vit_patch is not None else 0
        return 2 * self.num_patches + 2 + vit

    def text_ids(self, stage: int, text: str, record: str) -> tuple[list[int], list[int]]:
        """Ids and per-token stages of <|im_start|> text <|im_end|>; <refine> spans are REFINE."""
        ids = [self.tok.im_start] + self.tok.encode(text, record) + [self.tok.im_end]
        stages, cur = [], stage
        for i in ids:
            if i == self.tok.ids["<refine>"]:
                cur = ep.REFINE
            stages.append(cur)
        return ids, stages

    def __call__(self, episode: ep.Episode, drop: "CondDrop | None" = None) -> dict[str, np.ndarray]:
        """The episode's arrays; `drop` leaves conditions out (CFG dropout): the prompt, or
        an image's clean / ViT copy (its noisy copy, a flow target, always stays). A dropped
        element takes no RoPE position, and the token before it gets no CE target (what
        follows it in the clean stream is not what the layout would have put there)."""
        episode.validate(self.image_shape if self.rules is None else None)
        drop = drop or CondDrop()
        rec = f"episode {episode.id!r}"
        cols = {k: [] for k in TOKEN_FIELDS}
        patches: list[np.ndarray] = []
        zero_patch = np.zeros((self.patch_dim,), self.patch_dtype)
        latents = self._latents(episode, rec)
        pos, block, image_k = 0, 0, -1
        vit = self.vit_patch is not None
        vit_patches: list[np.ndarray] = []
        vit_pos: list[int] = []
        forced: list[int] = []  # positions the layout places, which no token predicts
        force_next = [False]  # the next non-noisy token put is such a position
        zero_vit = np.zeros((self.vit_patch_dim,), np.uint8) if vit else None

        def put(tok, typ, stage, position, blk, ppos, patch, vpatch=None, vpos=0):
            if force_next[0] and typ != NOISY:
                forced.append(len(patches))
                force_next[0] = False
            for k, v in zip(TOKEN_FIELDS, (tok, typ, stage, 0, 0, position, blk, ppos)):
                cols[k].append(v)
            patches.append(patch)
            if vit:
                vit_patches.append(zero_vit if vpatch is None else vpatch)
                vit_pos.append(vpos)

        for stage, modality, content in episode.segments():
            if modality == "text":
                if stage == ep.PROMPT and drop.prompt:
                    continue
                ids, stages = self.text_ids(stage, content, rec)
                for i, s in zip(ids, stages):
                    put(i, TEXT, s, pos, 0, 0, zero_patch)
                    pos += 1
                continue
            image_k += 1
            p, ppos = self.image_patches(content, None if latents is None else latents[image_k])
            at_pos = modality == "image"
            if at_pos:  # a flow target: its noisy copy carries the loss
                block += 1
                for j in range(len(p)):
                    put(self.tok.pad_id, NOISY, stage, pos, block, int(ppos[j]), p[j])
            if image_k in drop.clean:
                force_next[0] = True
            else:  # the clean copy shares the noisy copy's position
                at_pos = True
                block += 1
                put(self.tok.vision_start, TEXT, stage, pos, block, 0, zero_patch)
                for j in range(len(p)):
                    put(self.tok.pad_id, CLEAN, stage, pos, block, int(ppos[j]), p[j])
                put(self.tok.vision_end, TEXT, stage, pos, block, 0, zero_patch)
            pos += int(at_pos)
            if vit and image_k not in drop.vit:  # its own element, the next position (BAGEL)
                block += 1
                force_next[0] = True
                vp, vpos = self.vit_image(content)
                put(self.tok.vision_start, TEXT, stage, pos, block, 0, zero_patch)
                for j in range(len(vp)):
                    put(self.tok.pad_id, VIT, stage, pos, block, 0, zero_patch, vp[j],
                        int(vpos[j]))
                put(self.tok.vision_end, TEXT, stage, pos, block, 0, zero_patch)
                pos += 1
        put(self.tok.end_of_episode, TEXT, ep.PLAN, pos, 0, 0, zero_patch)

        out = {k: np.asarray(v, np.int32) for k, v in cols.items()}
        out["patches"] = np.stack(patches).astype(self.patch_dtype)
        if vit:
            out["vit_patches"] = np.stack(vit_patches).astype(np.uint8)
            out["vit_pos"] = np.asarray(vit_pos, np.int32)
        _set_targets(out, self.tok.vision_start, forced)
        return out


@dataclasses.dataclass(frozen=True)
class CondDrop:
    """Conditions left out of one training sequence (BAGEL's CFG dropout): the prompt, and
    by image index (segment order) clean latent copies and ViT copies."""

    prompt: bool = False
    clean: frozenset = frozenset()
    vit: frozenset = frozenset()

    @classmethod
    def draw(cls, rng: np.random.Generator, n_images: int, text: float = 0.0,
             vae: float = 0.0, vit: float = 0.0) -> "CondDrop":
        """Independent draws: the prompt with probability `text`, each image's clean copy
        with `vae`, each ViT copy with `vit` (BAGEL's text / vae / vit cond dropout)."""
        return cls(bool(rng.random() < text),
                   frozenset(int(i) for i in np.nonzero(rng.random(n_images) < vae)[0]),
                   frozenset(int(i) for i in np.nonzero(rng.random(n_images) < vit)[0]))


def _set_targets(out: dict[str, np.ndarray], vision_start: int, forced=()) -> None:
    """targets[i] = next token of the clean stream, for text tokens outside image blocks and
    for <|vision_end|> (which closes its block); latents, ViT tokens and <|vision_start|> get
    none, nor does a token followed by a `forced` position (a ViT copy's opening marker)."""
    types, blocks, tokens = out["types"], out["blocks"], out["tokens"]
    forced = set(forced)
    clean = np.nonzero(types != NOISY)[0]
    for a, b in zip(clean[:-1], clean[1:]):
        if types[a] != TEXT or types[b] != TEXT or b in forced:
            continue
        if blocks[a] != 0 and tokens[a] == vision_start:
            continue
        out["targets"][a] = tokens[b]
        out["target_stages"][a] = out["stages"][b]
