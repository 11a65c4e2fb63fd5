"""The Qwen2 tokenizer (BAGEL's) from its `tokenizer.json`, with the same surface as
`tokenizer.Tokenizer` so `EpisodeTokenizer` runs on it unchanged.

Qwen2 already has the image/segment markers (<|im_start|>, <|im_end|>, <|vision_start|>,
<|vision_end|>; ids 151644/151645/151652/151653 in the real vocabulary). The episode tags
(<ins>, <des>, ... and <|endofepisode|>) are not in it (our choice; the paper is silent): they
are added as special tokens, which takes ids from the spare rows of BAGEL's embedding (the
tokenizer has 151,665 entries, the embedding 152,064), so converted weights need no resize.
Byte-level BPE has no unknown token, so every text encodes.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import tokenizers

from strokes_jax.sequence.tokenizer import (END_OF_EPISODE, IM_END, IM_START, TAGS, VISION_END,
                                   VISION_START, TokenizerError)

QWEN_SPECIALS = (IM_START, IM_END, VISION_START, VISION_END)
PAD = "<|endoftext|>"  # Qwen2's padding token


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
