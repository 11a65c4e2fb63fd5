"""Converters for the checkpoints users have: a plain Hugging Face Qwen2/Qwen2.5/Qwen3 decoder,
a diffusers `AutoencoderKL` with FLUX's settings, and an HF SigLIP vision model. Each reads
safetensors (one file, or shards listed by `*.safetensors.index.json`) and the config.json
beside them, and writes the same folder as `convert bagel` (output.py) holding the part of
the unified model it fills:

  qwen2    {'model': {'embed', 'lm_head', 'decoder'}}, both MoT experts from the one decoder
           (BAGEL's initialisation); QK-norm scales, which Qwen2 lacks, start at one when the
           config asks for QK-norm, and a tied head is untied as a copy of the embedding
  flux-ae  {'vae': ...}
  siglip   {'model': {'vision': {'vit': ...}}}, the last encoder layer dropped as BAGEL does

Merge a part into a fresh init with keymap.merge; what the part lacks (the generation heads,
the connector) keeps its initialisation. Told a config, each converter refuses one that disagrees with
config.json (hf_config.check_agrees); without one it converts config.json's architecture.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Sequence

from strokes_jax.convert import bagel, output, writer
from strokes_jax.convert.hf_config import (
    AE_KEYS, DECODER_KEYS, VISION_KEYS, ae_config_from_diffusers, architecture, check_agrees,
    decoder_config_from_hf, read_config, siglip_vision_part, vision_config_from_hf)
from strokes_jax.convert.keymap import CONV1X1_TO_LINEAR, LINEAR, ConversionError, Fill, Reader, Rule
from strokes_jax.model.mot import DecoderConfig
from strokes_jax.model.unified import ModelConfig
from strokes_jax.model.vae import AEConfig
from strokes_jax.model.vision import VisionConfig

WEIGHT_FILES = ("model.safetensors", "diffusion_pytorch_model.safetensors")


def open_checkpoint(path: str) -> tuple[Reader, str, list[str]]:
    """(reader, folder of config.json, files) for a checkpoint folder, one .safetensors file, or
    a `*.safetensors.index.json`; an index must list exactly the keys its shards hold."""
    path = os.path.abspath(path)
    index = None
    if os.path.isdir(path):
        folder = path
        for name in WEIGHT_FILES:
            if os.path.isfile(os.path.join(path, name + ".index.json")):
                index = os.path.join(path, name + ".index.json")
                break
            if os.path.isfile(os.path.join(path, name)):
                files = [os.path.join(path, name)]
                break
        else:
            found = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
            if len(found) != 1:
                raise FileNotFoundError(f"{path}: no {' or '.join(WEIGHT_FILES)} (or its .index.json)"
                                        + (f"; {len(found)} other .safetensors files: name one" if found else ""))
            files = [os.path.join(path, found[0])]
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    else:
        folder = os.path.dirname(path)
        index, files = (path, None) if path.endswith(".index.json") else (None, [path])
    if index is None:
        return Reader(files), folder, files
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConversionError(f"{index}: not a safetensors index (no weight_map: {e})") from e
    files = [os.path.join(os.path.dirname(index), n) for n in sorted(set(weight_map.values()))]
    reader = Reader(files)
    have = set(reader.keys())
    for key, shard in sorted(weight_map.items()):
        if key not in have or os.path.basename(reader.file(key)) != os.path.basename(shard):
            raise ConversionError(f"{index} lists key {key!r} in {shard}, which does not hold it")
    extra = sorted(have - set(weight_map))
    if extra:
        raise ConversionError(f"{index} does not list key {extra[0]!r} (in {reader.file(extra[0])})")
    return reader, folder, files


def _parse(fn, c, path):
    try:
        return fn(c)
    except KeyError as e:
        raise ConversionError(f"{path}: key {e.args[0]} is missing") from e


# --------------------------------------------------------------------------------------
# Key maps under HF / diffusers names.


def qwen2_map(vocab: int, d: DecoderConfig, *, has_qk_norm: bool, tied: bool
              ) -> tuple[list[Rule], list, list[Fill]]:
    """(rules, copies, fills) for a plain HF decoder: BAGEL's map without the prefix and with
    the generation expert copied from the understanding one."""
    rules, copies = bagel.decoder_rules(vocab, d, init_gen_from_und=True, prefix="")
    fills = []
    if d.qk_norm and not has_qk_norm:
        norms = [r for r in rules if re.search(r"\.self_attn\.[qk]_norm\.weight$", r.src)]
        fills = [Fill(r.dst, r.shape, 1.0) for r in norms]
        rules = [r for r in rules if r not in norms]
    if tied:  # our head is its own param: a copy of the embedding, transposed like a Linear
        rules = [r for r in rules if r.dst != ("lm_head", "kernel")]
        rules.append(Rule("model.embed_tokens.weight", ("lm_head", "kernel"), (vocab, d.width), LINEAR))
    return rules, copies, fills


def diffusers_name(flux: str, levels: int) -> str:
    """An original FLUX autoencoder key (`ae.safetensors`) -> diffusers AutoencoderKL's."""
    up = lambda m: levels - 1 - int(m[1])
    rename = [
        (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
        (r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2."),
        (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
        # diffusers numbers the decoder's levels from the lowest resolution up, FLUX the reverse.
        (r"^decoder\.up\.(\d+)\.block\.(\d+)\.", lambda m: f"decoder.up_blocks.{up(m)}.resnets.{m[2]}."),
        (r"^decoder\.up\.(\d+)\.upsample\.", lambda m: f"decoder.up_blocks.{up(m)}.upsamplers.0."),
        (r"\.mid\.block_1\.", ".mid_block.resnets.0."),
        (r"\.mid\.block_2\.", ".mid_block.resnets.1."),
        (r"\.mid\.attn_1\.norm\.", ".mid_block.attentions.0.group_norm."),
        (r"\.mid\.attn_1\.([qkv])\.", r".mid_block.attentions.0.to_\1."),
        (r"\.mid\.attn_1\.proj_out\.", ".mid_block.attentions.0.to_out.0."),
        (r"\.nin_shortcut\.", ".conv_shortcut."),
    ]
    for pat, rep in rename:
        flux = re.sub(pat, rep, flux)
    return flux


def flux_ae_rules(a: AEConfig) -> list[Rule]:
    """The FLUX autoencoder's map under diffusers' names; diffusers stores the attention
    projections as Linear layers where FLUX has 1x1 convs."""
    out = []
    for r in bagel.vae_rules(a):
        name = diffusers_name(r.src, len(a.ch_mult))
        out.append(Rule(name, r.dst, r.shape[:2], LINEAR) if r.transform is CONV1X1_TO_LINEAR
                   else dataclasses.replace(r, src=name))
    return out


HF_VIT = "vision_model"


def siglip_prefix(keys: Sequence[str]) -> str:
    """Where the ViT's names start: `vision_model.` in a SiglipModel and in SiglipVisionModels
    saved by transformers 4, nowhere in those saved by transformers 5."""
    return HF_VIT if f"{HF_VIT}.embeddings.patch_embedding.weight" in keys else ""


def siglip_ignored(keys: Sequence[str], depth: int, prefix: str = HF_VIT) -> list[str]:
    """Source keys a SigLIP checkpoint may hold that the ViT does not use: the text tower and
    logit scale of a whole SiglipModel, the pooling head, the dropped last layer(s)."""
    p = f"{prefix}." if prefix else ""
    layer = re.compile(rf"^{re.escape(p)}encoder\.layers\.(\d+)\.")
    return [k for k in keys if k.startswith(("text_model.", f"{p}head.")) or k in ("logit_scale", "logit_bias")
            or k.endswith(".position_ids") or ((m := layer.match(k)) and int(m[1]) >= depth)]


# --------------------------------------------------------------------------------------
# The jobs.


def _meta(kind, checkpoint, files, config_path, cfg, **extra) -> dict:
    return dict(kind=kind, checkpoint=os.path.abspath(checkpoint), files=files, hf_config=config_path,
                config=architecture(cfg), **extra)


def convert_qwen2(checkpoint: str, out_dir: str, cfg: ModelConfig | None = None, *, dtype=None,
                  overwrite: bool = False, allow_nonfinite: bool = False, allow_dtype: bool = False,
                  progress: str | None = "converting") -> str:
    """A plain HF Qwen2/Qwen2.5/Qwen3 decoder -> `out_dir/params` {'model': {embed, lm_head,
    decoder}} in `cfg`'s layout (scanned if it scans). Returns the params path."""
    out_dir = output.check_out(out_dir, overwrite)
    reader, folder, files = open_checkpoint(checkpoint)
    c, path = read_config(folder)
    tied = bool(c.get("tie_word_embeddings", False))
    vocab, derived = _parse(lambda c: decoder_config_from_hf(c, allow_tied=True), c, path)
    has_qk_norm = derived.qk_norm
    if cfg is None:
        cfg = ModelConfig(vocab_size=vocab, patch_dim=4, latent_grid=(2, 2), decoder=derived)
    else:
        if cfg.vocab_size != vocab:
            raise ConversionError(f"{path}: vocab_size={vocab} gives model.vocab_size={vocab}, "
                                  f"but the config has {cfg.vocab_size}")
        # QK-norm asked for on a checkpoint without it is BAGEL's own start from Qwen2.5 (scales at one).
        skip = ("qk_norm",) if cfg.decoder.qk_norm and not has_qk_norm else ()
        check_agrees(cfg.decoder, derived, DECODER_KEYS, c, "model", path, skip=skip)
    rules, copies, fills = qwen2_map(vocab, cfg.decoder, has_qk_norm=has_qk_norm, tied=tied)
    ignore = [k for k in reader.keys() if k.endswith(".rotary_emb.inv_freq") or (tied and k == "lm_head.weight")]
    part = writer.part(reader, ("model",), rules, copies, fills, ignore=ignore,
                       stacking=bagel.decoder_stacking(cfg), dtype=dtype, allow_dtype=allow_dtype)
    meta = _meta("qwen2", checkpoint, files, path, cfg.decoder, vocab_size=vocab, init_gen_from_und=True,
                 tied_lm_head=tied, filled=sorted("/".join(f.dst) for f in fills))
    return output.write(out_dir, [part], meta, dtype=dtype, overwrite=overwrite, allow_nonfinite=allow_nonfinite,
                        allow_dtype=allow_dtype, progress=progress)


def convert_flux_ae(checkpoint: str, out_dir: str, cfg: AEConfig | None = None, *, dtype=None,
                    overwrite: bool = False, allow_nonfinite: bool = False, allow_dtype: bool = False,
                    progress: str | None = "converting") -> str:
    """A diffusers AutoencoderKL with FLUX's settings (e.g. FLUX.1-dev/vae) -> `out_dir/params`
    {'vae': ...}. Returns the params path."""
    out_dir = output.check_out(out_dir, overwrite)
    reader, folder, files = open_checkpoint(checkpoint)
    c, path = read_config(folder)
    derived = _parse(ae_config_from_diffusers, c, path)
    if cfg is None:
        cfg = derived
    else:
        check_agrees(cfg, derived, AE_KEYS, c, "vae", path)
    part = writer.part(reader, ("vae",), flux_ae_rules(cfg), dtype=dtype, allow_dtype=allow_dtype)
    return output.write(out_dir, [part], _meta("flux-ae", checkpoint, files, path, cfg), dtype=dtype,
                        overwrite=overwrite, allow_nonfinite=allow_nonfinite, allow_dtype=allow_dtype,
                        progress=progress)


def convert_siglip(checkpoint: str, out_dir: str, cfg: VisionConfig | None = None, *,
                   drop_last_layer: bool = True, dtype=None, overwrite: bool = False,
                   allow_nonfinite: bool = False, allow_dtype: bool = False,
                   progress: str | None = "converting") -> str:
    """An HF SiglipVisionModel (or the vision tower of a SiglipModel) -> `out_dir/params`
    {'model': {'vision': {'vit': ...}}}; `drop_last_layer` as BAGEL, which reads the features
    after the second-to-last layer. Returns the params path."""
    out_dir = output.check_out(out_dir, overwrite)
    reader, folder, files = open_checkpoint(checkpoint)
    c, path = read_config(folder)
    derived = _parse(lambda c: vision_config_from_hf(c, drop_last_layer=drop_last_layer), c, path)
    if cfg is None:
        cfg = derived
    else:
        hints = dict(depth="BAGEL drops the last layer; --keep_last_layer keeps it" if drop_last_layer
                     else "every layer kept")
        check_agrees(cfg, derived, VISION_KEYS, siglip_vision_part(c), "model.vision", path, hints=hints)
    prefix = siglip_prefix(reader.keys())
    rules = bagel.vit_rules(cfg, src=prefix, dst=("vision", "vit"), conv_patch=True)
    part = writer.part(reader, ("model",), rules, ignore=siglip_ignored(reader.keys(), cfg.depth, prefix),
                       dtype=dtype, allow_dtype=allow_dtype)
    meta = _meta("siglip", checkpoint, files, path, cfg, drop_last_layer=drop_last_layer)
    return output.write(out_dir, [part], meta, dtype=dtype, overwrite=overwrite, allow_nonfinite=allow_nonfinite,
                        allow_dtype=allow_dtype, progress=progress)
