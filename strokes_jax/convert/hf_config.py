"""Our configs from the `config.json` that ships beside a Hugging Face or diffusers checkpoint,
and the check that a config a converter was told agrees with it.

A converter told `--config` compares every architecture field with what config.json says and
refuses on the first disagreement, naming the config.json key(s) and our config key: a wrong
default (GroupNorm groups, latent scale, layer count, position grid) would otherwise convert
without complaint and only show up as a model that computes something else.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Mapping, Sequence

from strokes_jax.convert.keymap import ConversionError
from strokes_jax.model.mot import DecoderConfig
from strokes_jax.model.vae import AEConfig
from strokes_jax.model.vision import VisionConfig


def read_config(folder: str) -> tuple[dict, str]:
    """(the parsed config.json in `folder`, its path)."""
    path = os.path.join(os.path.abspath(folder), "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (the converter reads the architecture from the "
                                "config.json beside the weights)")
    try:
        with open(path) as f:
            return json.load(f), path
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from e


# Our field -> the config.json key(s) it is read from, for the messages.
DECODER_KEYS = dict(width=("hidden_size",), depth=("num_hidden_layers",), heads=("num_attention_heads",),
                    kv_heads=("num_key_value_heads",), head_dim=("head_dim", "hidden_size", "num_attention_heads"),
                    mlp=("intermediate_size",), rope_theta=("rope_theta",), qk_norm=("model_type",),
                    qkv_bias=("model_type", "attention_bias"), norm_eps=("rms_norm_eps",))
VISION_KEYS = dict(width=("hidden_size",), depth=("num_hidden_layers",), heads=("num_attention_heads",),
                   mlp=("intermediate_size",), patch=("patch_size",), channels=("num_channels",),
                   max_side=("image_size", "patch_size"), norm_eps=("layer_norm_eps",))
AE_KEYS = dict(ch=("block_out_channels",), ch_mult=("block_out_channels",), num_res_blocks=("layers_per_block",),
               z_channels=("latent_channels",), in_channels=("in_channels",), out_ch=("out_channels",),
               groups=("norm_num_groups",), scale_factor=("scaling_factor",), shift_factor=("shift_factor",))


def decoder_config_from_hf(c: Mapping, *, bagel: bool = False, allow_tied: bool = False, dtype: str = "float32"
                           ) -> tuple[int, DecoderConfig]:
    """(vocab, DecoderConfig) from a Qwen2/Qwen3 `config.json` (or BAGEL's llm_config.json;
    `bagel` applies what BAGEL's loader forces: QK-norm on, untied head). `allow_tied` lets a
    tied head through, for a converter that unties it."""
    mt = c.get("model_type", "qwen2")
    if mt not in ("qwen2", "qwen3"):
        raise ConversionError(f"llm config model_type {mt!r}: expected 'qwen2' or 'qwen3'")
    rope = c.get("rope_parameters") or {}
    theta = c.get("rope_theta", rope.get("rope_theta"))
    scaling = c.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if theta is None or scaling:
        raise ConversionError(f"llm config: need plain RoPE with rope_theta, got {rope or scaling}")
    if c.get("tie_word_embeddings", False) and not (bagel or allow_tied):
        raise ConversionError("llm config key tie_word_embeddings=true: the model needs an untied lm_head")
    if c.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"llm config key hidden_act={c['hidden_act']!r}: expected silu")
    if c.get("use_sliding_window", False):
        raise ConversionError("llm config key use_sliding_window=true is not supported")
    heads = int(c["num_attention_heads"])
    qk_norm = True if (bagel or mt == "qwen3") else bool(c.get("qk_norm", False))
    qkv_bias = True if mt == "qwen2" else bool(c.get("attention_bias", False))
    return int(c["vocab_size"]), DecoderConfig(
        width=int(c["hidden_size"]), depth=int(c["num_hidden_layers"]), heads=heads,
        kv_heads=int(c.get("num_key_value_heads", heads)),
        head_dim=int(c.get("head_dim") or c["hidden_size"] // heads), mlp=int(c["intermediate_size"]),
        rope_theta=float(theta), qk_norm=qk_norm, qkv_bias=qkv_bias,
        norm_eps=float(c.get("rms_norm_eps", 1e-6)), dtype=dtype)


def siglip_vision_part(c: Mapping) -> Mapping:
    """The vision tower's config: a SiglipVisionModel's config.json, or the `vision_config` of
    a whole SiglipModel's (text tower included, as google/siglip-* ship)."""
    mt = c.get("model_type", "siglip_vision_model")
    if mt == "siglip" and "vision_config" in c:
        return c["vision_config"]
    if mt != "siglip_vision_model":
        raise ConversionError(f"vit config model_type {mt!r}: expected 'siglip_vision_model' or 'siglip' "
                              "(SigLIP2's NaFlex variant has another patch embedding)")
    return c


def vision_config_from_hf(c: Mapping, *, max_side: int | None = None, drop_last_layer: bool = True,
                          dtype: str = "float32") -> VisionConfig:
    """VisionConfig from a SigLIP (vision) config.json; BAGEL drops the last encoder layer. The
    learned position table covers image_size // patch_size patches a side unless `max_side`
    says otherwise (BAGEL's llm-side config does)."""
    c = siglip_vision_part(c)
    if c.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise ConversionError(f"vit config key hidden_act={c['hidden_act']!r}: expected gelu_pytorch_tanh")
    patch = int(c["patch_size"])
    grid = int(c.get("image_size", 224)) // patch
    return VisionConfig(width=int(c["hidden_size"]),
                        depth=int(c["num_hidden_layers"]) - int(drop_last_layer),
                        heads=int(c["num_attention_heads"]), mlp=int(c["intermediate_size"]),
                        patch=patch, channels=int(c.get("num_channels", 3)),
                        max_side=grid if max_side is None else max_side,
                        norm_eps=float(c.get("layer_norm_eps", 1e-6)), dtype=dtype)


def ae_config_from_diffusers(c: Mapping, *, dtype: str = "float32") -> AEConfig:
    """AEConfig from a diffusers AutoencoderKL config.json with FLUX's design: no quant convs,
    attention in the middle, SiLU, plain down/up blocks, one latent scale and shift."""
    def refuse(key, why):
        raise ConversionError(f"ae config key {key}={json.dumps(c.get(key))}: {why}")
    if c.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        refuse("_class_name", "expected AutoencoderKL")
    for key in ("use_quant_conv", "use_post_quant_conv"):
        if c.get(key, True):
            refuse(key, "FLUX's autoencoder has no quant convs")
    if not c.get("mid_block_add_attention", True):
        refuse("mid_block_add_attention", "FLUX's autoencoder has attention in the middle block")
    if c.get("act_fn", "silu") != "silu":
        refuse("act_fn", "expected silu")
    for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if any(t != want for t in c.get(key, ())):
            refuse(key, f"expected only {want}")
    for key in ("latents_mean", "latents_std"):
        if c.get(key) is not None:
            refuse(key, "per-channel latent statistics are not supported (one scale and shift)")
    chans = [int(x) for x in c["block_out_channels"]]
    if any(x % chans[0] for x in chans):
        refuse("block_out_channels", "each must be a multiple of the first")
    shift = c.get("shift_factor")
    return AEConfig(ch=chans[0], ch_mult=tuple(x // chans[0] for x in chans),
                    num_res_blocks=int(c.get("layers_per_block", 1)), z_channels=int(c.get("latent_channels", 4)),
                    in_channels=int(c.get("in_channels", 3)), out_ch=int(c.get("out_channels", 3)),
                    groups=int(c.get("norm_num_groups", 32)), scale_factor=float(c.get("scaling_factor", 1.0)),
                    shift_factor=0.0 if shift is None else float(shift), dtype=dtype)


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return tuple(a) == tuple(b) if isinstance(a, (tuple, list)) else a == b


def check_agrees(told, derived, keys: Mapping[str, Sequence[str]], c: Mapping, where: str, path: str, *,
                 skip: Sequence[str] = (), hints: Mapping[str, str] | None = None) -> None:
    """Every field of `keys` (our field -> config.json keys) equal in `told` (the config the
    converter was told) and `derived` (read from config.json `c`, at `path`); otherwise one
    line naming the config.json key(s), what they give, and our config key (+ `hints[field]`)."""
    for name, src in keys.items():
        if name in skip:
            continue
        a, b = getattr(told, name), getattr(derived, name)
        if not _same(a, b):
            given = ", ".join(f"{k}={json.dumps(c.get(k))}" for k in src if k in c) or f"{src[0]} (unset)"
            hint = f" ({hints[name]})" if hints and name in hints else ""
            raise ConversionError(f"{path}: {given} gives {where}.{name}={_show(b)}, but the config has "
                                  f"{_show(a)}{hint}")


def _show(v) -> str:
    return repr(tuple(v)) if isinstance(v, list) else repr(v)


def architecture(cfg) -> dict:
    """The config as JSON-ready data (conversion.json)."""
    d = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
