"""The Qwen2 tokenizer (BAGEL's) from its `tokenizer.json`, with the same surface as
`tokenizer.Tokenizer` so `EpisodeTokenizer` runs on it unchanged.

Qwen2 already has the image/segment markers (<|im_start|>, <|im_end|>, <|vision_start|>,
<|vision_end|>; ids 151644/151645/151652/151653 in the real vocabulary). The episode tags
(<ins>, <des>, ... and <|endofepisode|>) are not in it (our choice; the paper is silent): they
are added as special tokens, which takes ids from the spare rows of BAGEL's embedding (the
tokenizer has 151,665 entries, the embedding 152,064), so converted weights need no resize.
Byte-level BPE has no unknown token, so every text encodes.

`train_bpe` builds a tokenizer of the same kind (Qwen2's pre-tokenizer regex, byte-level BPE,
its special tokens) from a corpus: the shapes world's `:images` variant trains one on the
world's own text (config world.tokenizer = 'bpe'), so the embedded default runs the text
path a converted BAGEL runs, without downloading Qwen's vocabulary.
"""

from __future__ import annotations

import functools

import json
import os
from typing import Sequence

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from strokes_jax.sequence.tokenizer import (END_OF_EPISODE, IM_END, IM_START, TAGS, VISION_END,
                                   VISION_START, TokenizerError)

QWEN_SPECIALS = (IM_START, IM_END, VISION_START, VISION_END)
PAD = "<|endoftext|>"  # Qwen2's padding token
# Qwen2's pre-tokenizer split (its tokenizer.json): contractions, letter runs with one leading
# non-letter, single digits, punctuation runs, newlines, spaces.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


class QwenTokenizer:
    def __init__(self, tok: tokenizers.Tokenizer, model_vocab: int | None = None):
        vocab = tok.get_vocab(with_added_tokens=True)
        missing = [s for s in QWEN_SPECIALS + (PAD,) if s not in vocab]
        if missing:
            raise TokenizerError(f"tokenizer.json lacks Qwen2 special tokens {missing}")
        extra = [t for t in (END_OF_EPISODE,) + TAGS if t not in vocab]
        if extra:
            tok.add_special_tokens(extra)
            vocab = tok.get_vocab(with_added_tokens=True)
        self.tok = tok
        self.pad_id = self.unk_id = vocab[PAD]  # no unknowns in byte-level BPE
        self.im_start, self.im_end = vocab[IM_START], vocab[IM_END]
        self.vision_start, self.vision_end = vocab[VISION_START], vocab[VISION_END]
        self.end_of_episode = vocab[END_OF_EPISODE]
        self.ids = {t: vocab[t] for t in TAGS}
        self.vocab_size = max(vocab.values()) + 1
        if model_vocab is not None and self.vocab_size > model_vocab:
            raise TokenizerError(f"tokenizer needs {self.vocab_size} ids but the model's "
                                 f"embedding has {model_vocab} rows (config key model.vocab_size)")

    @classmethod
    def from_file(cls, path: str, model_vocab: int | None = None) -> "QwenTokenizer":
        return cls(tokenizers.Tokenizer.from_file(os.fspath(path)), model_vocab)

    def save(self, path: str) -> None:
        self.tok.save(os.fspath(path))

    def encode(self, text: str, record: str = "?") -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def fingerprint(self) -> str:
        return json.dumps(self.tok.get_vocab(with_added_tokens=True), sort_keys=True)


def train_bpe(texts, vocab_size: int = 512, pad_to: int = 8) -> QwenTokenizer:
    """A Qwen2-style byte-level BPE trained on `texts`: Qwen2's normaliser, split regex and
    byte-level decoder, its special tokens first, then `<reserved_i>` tokens up to a multiple
    of `pad_to` once the episode tags are added (the vocabulary axis then splits evenly over a
    tensor-parallel mesh axis). The trainer is deterministic for a given corpus."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, *QWEN_SPECIALS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    n = tok.get_vocab_size(with_added_tokens=True) + 1 + len(TAGS)
    tok.add_special_tokens([f"<reserved_{i}>" for i in range(-n % pad_to)])
    return QwenTokenizer(tok)


@functools.lru_cache(maxsize=1)
def shapes_bpe() -> QwenTokenizer:
    """The shapes world's text through a Qwen2-style BPE: trained on every word of the
    grammar and on the text of a fixed set of episodes of every kind, so merges follow the
    world's real word frequencies. Trained once per process (it is deterministic); callers
    share the instance and must not change it."""
    from strokes_jax.episodes import mixer
    from strokes_jax.worlds import grammar
    texts = [" ".join(grammar.vocabulary())]
    mix = {"single_pass": 1.0, "additive": 1.0, "edit": 1.0, "critique": 1.0}
    for e in mixer.generate_episodes(7, 400, mix):
        texts.append(e.prompt)
        for st in e.steps:
            texts.extend(t for t in (st.ins, st.des, st.inspect, st.refine) if t)
    return train_bpe(texts)
