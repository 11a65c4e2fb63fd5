"""The interleaved sequence, named once: special tokens, token types, and the per-token
arrays of a packed row. The episode tokenizer writes these, the packer batches them, the
model, the training step and the generator read them.

One episode, in order (see sequence/tokenizer.py for the rules each part follows):

  <|im_start|> prompt <|im_end|>                                           prompt
  <|im_start|> <ins> .. </ins> <des> .. </des> <|im_end|>                   plan
  [noisy latents]  <|vision_start|> [clean latents] <|vision_end|>           sketch
  <|im_start|> <inspect> .. </inspect> [<refine> .. </refine>] <|im_end|>   inspect / refine
  [noisy] <|vision_start|> [clean] <|vision_end|>                            refined image
  ... next plan ... <|endofepisode|>
"""

from __future__ import annotations

PAD, UNK = "<pad>", "<unk>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
END_OF_EPISODE = "<|endofepisode|>"
TAGS = ("<ins>", "</ins>", "<des>", "</des>", "<inspect>", "</inspect>", "<refine>", "</refine>")
SPECIALS = (PAD, UNK, IM_START, IM_END, VISION_START, VISION_END, END_OF_EPISODE) + TAGS

# Token types decide the expert: latents (NOISY, CLEAN) go to the generation expert, TEXT and
# VIT patches to the understanding expert. NOISY tokens are hidden from every later token.
TEXT, NOISY, CLEAN, VIT = 0, 1, 2, 3

# Per-token int32 arrays the episode tokenizer writes for one episode.
TOKEN_FIELDS = ("tokens", "types", "stages", "targets", "target_stages", "positions", "blocks",
                "patch_pos")
# A packed row adds the latent patches ([n, patch_dim] float) and the episode's segment id.
ROW_FIELDS = TOKEN_FIELDS + ("patches", "segment_ids")
# Present when images are also packed as ViT copies: uint8 [n, vit_patch_dim] and int32 [n].
VIT_FIELDS = ("vit_patches", "vit_pos")


def batch_keys(row) -> tuple[str, ...]:
    """The keys a step reads from a packed row or batch: ROW_FIELDS, plus VIT_FIELDS when the
    rows pack ViT copies."""
    return ROW_FIELDS + (VIT_FIELDS if "vit_patches" in row else ())
