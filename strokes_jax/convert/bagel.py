"""BAGEL-7B-MoT checkpoint -> Flax params: the key maps (BAGEL's tensor names) and the
conversion job (`ema.safetensors` + `ae.safetensors` -> one Orbax checkpoint).

The maps are written for the unscanned layout (`decoder/layer_{i}/...`); a scanned model gets
each layer written into its slot of the stacked params (`decoder_stacking`), so the per-key
map stays one line per source tensor.

Fixed tables stored in the checkpoint (`latent_pos_embed.pos_embed`, `vit_pos_embed.pos_embed`)
are not params here, the model computes them; the converter checks they equal our 2-D sin-cos
table, which catches a layout convention drifting (row/column halves, grid size).

Every source tensor is checked as it is read (keymap.check_tensor): a NaN/inf, or a dtype
other than bfloat16/float16/float32, is refused naming the key and file unless
`allow_nonfinite` / `allow_dtype`. The output folder's rules are output.py's; the tensors are
streamed into the checkpoint by writer.py, so host memory stays far below the output's size.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from strokes_jax.convert import output, writer
from strokes_jax.convert.hf_config import decoder_config_from_hf, vision_config_from_hf  # noqa: F401 (API)
from strokes_jax.convert.keymap import (
    CONV2D, CONV1X1_TO_LINEAR, LINEAR, ConversionError, Copy, Reader, Rule,
    bias_to_heads, check, check_tensor, conv_patch_to_linear, convert, linear_to_heads)
from strokes_jax.convert.output import load_converted  # noqa: F401 (API)
from strokes_jax.model.layers import sincos_2d
from strokes_jax.model.mot import DecoderConfig
from strokes_jax.model.unified import ModelConfig
from strokes_jax.model.vae import AEConfig
from strokes_jax.model.vision import VisionConfig

LM = "language_model"
VIT = "vit_model.vision_model"
EXPERTS = (("und", ""), ("gen", "_moe_gen"))  # (our suffix, BAGEL's suffix)
LATENT_TABLE, VIT_TABLE = "latent_pos_embed.pos_embed", "vit_pos_embed.pos_embed"


# --------------------------------------------------------------------------------------
# Key maps.


def _linear(src: str, dst: tuple, out: int, inp: int, bias: bool) -> list[Rule]:
    rules = [Rule(f"{src}.weight", dst + ("kernel",), (out, inp), LINEAR)]
    if bias:
        rules.append(Rule(f"{src}.bias", dst + ("bias",), (out,)))
    return rules


def _heads(src: str, dst: tuple, heads: int, head_dim: int, inp: int, bias: bool) -> list[Rule]:
    rules = [Rule(f"{src}.weight", dst + ("kernel",), (heads * head_dim, inp),
                  linear_to_heads(heads, head_dim))]
    if bias:
        rules.append(Rule(f"{src}.bias", dst + ("bias",), (heads * head_dim,),
                          bias_to_heads(heads, head_dim)))
    return rules


def decoder_rules(vocab: int, d: DecoderConfig, *, init_gen_from_und: bool = False, prefix: str = LM
                  ) -> tuple[list[Rule], list[Copy]]:
    """The Qwen2 MoT language model. With `init_gen_from_und` the checkpoint holds only the
    understanding expert (a plain Qwen2/Qwen3) and the generation expert is a copy of it, as
    BAGEL initialises it; otherwise every `*_moe_gen` key must be present. `prefix` is what
    precedes HF's own names (`model.layers...`, `lm_head`): BAGEL's `language_model`, or ""
    for a plain HF checkpoint."""
    rules, copies = [], []
    w, hd = d.width, d.head_dim
    lm = f"{prefix}." if prefix else ""
    for i in range(d.depth):
        pre, dst = f"{lm}model.layers.{i}", ("decoder", f"layer_{i}")
        for tag, sfx in EXPERTS:
            r = []
            r += _heads(f"{pre}.self_attn.q_proj{sfx}", dst + (f"q_{tag}",), d.heads, hd, w, d.qkv_bias)
            r += _heads(f"{pre}.self_attn.k_proj{sfx}", dst + (f"k_{tag}",), d.kv_heads, hd, w, d.qkv_bias)
            r += _heads(f"{pre}.self_attn.v_proj{sfx}", dst + (f"v_{tag}",), d.kv_heads, hd, w, d.qkv_bias)
            r += _linear(f"{pre}.self_attn.o_proj{sfx}", dst + (f"o_{tag}",), w, d.heads * hd, False)
            if d.qk_norm:
                r.append(Rule(f"{pre}.self_attn.q_norm{sfx}.weight", dst + (f"q_norm_{tag}", "scale"), (hd,)))
                r.append(Rule(f"{pre}.self_attn.k_norm{sfx}.weight", dst + (f"k_norm_{tag}", "scale"), (hd,)))
            for name in ("gate", "up"):
                r += _linear(f"{pre}.mlp{sfx}.{name}_proj", dst + (f"{name}_{tag}",), d.mlp, w, False)
            r += _linear(f"{pre}.mlp{sfx}.down_proj", dst + (f"down_{tag}",), w, d.mlp, False)
            r.append(Rule(f"{pre}.input_layernorm{sfx}.weight", dst + (f"input_norm_{tag}", "scale"), (w,)))
            r.append(Rule(f"{pre}.post_attention_layernorm{sfx}.weight",
                          dst + (f"post_norm_{tag}", "scale"), (w,)))
            rules += r
    for tag, sfx in EXPERTS:
        rules.append(Rule(f"{lm}model.norm{sfx}.weight", ("decoder", f"final_norm_{tag}", "scale"), (w,)))
    rules.append(Rule(f"{lm}model.embed_tokens.weight", ("embed",), (vocab, w)))
    rules += _linear(f"{lm}lm_head", ("lm_head",), vocab, w, False)
    if init_gen_from_und:
        und = [r for r in rules if "_moe_gen" not in r.src]
        gen = [r for r in rules if "_moe_gen" in r.src]
        copies = [Copy(g.dst, tuple(p.replace("_gen", "_und") for p in g.dst)) for g in gen]
        rules = und
    return rules, copies


def gen_head_rules(cfg: ModelConfig) -> list[Rule]:
    w, p = cfg.decoder.width, cfg.patch_dim
    return (_linear("vae2llm", ("vae2llm",), w, p, True)
            + _linear("llm2vae", ("llm2vae",), p, w, True)
            + _linear("time_embedder.mlp.0", ("time_embedder", "mlp_0"), w, 256, True)
            + _linear("time_embedder.mlp.2", ("time_embedder", "mlp_2"), w, w, True))


def vit_rules(v: VisionConfig, *, src: str = VIT, dst: tuple = ("vision", "vit"),
              conv_patch: bool = False) -> list[Rule]:
    """The SigLIP ViT under `src` (BAGEL's `vit_model.vision_model`, HF's `vision_model`, or ""
    for none). BAGEL stores the patch embedding as a Linear over (row, col, channel);
    `conv_patch` reads the stock SigLIP Conv2d form instead."""
    w = v.width
    src = f"{src}." if src else ""
    if conv_patch:
        rules = [Rule(f"{src}embeddings.patch_embedding.weight", dst + ("patch_embed", "kernel"),
                      (w, v.channels, v.patch, v.patch), conv_patch_to_linear(v.channels, v.patch)),
                 Rule(f"{src}embeddings.patch_embedding.bias", dst + ("patch_embed", "bias"), (w,))]
    else:
        rules = _linear(f"{src}embeddings.patch_embedding", dst + ("patch_embed",), w, v.patch_dim, True)
    rules.append(Rule(f"{src}embeddings.position_embedding.weight", dst + ("pos_embed",),
                      (v.max_side * v.max_side, w)))
    for j in range(v.depth):
        pre, lay = f"{src}encoder.layers.{j}", dst + (f"layer_{j}",)
        for name, ours in (("layer_norm1", "ln1"), ("layer_norm2", "ln2")):
            rules += [Rule(f"{pre}.{name}.weight", lay + (ours, "scale"), (w,)),
                      Rule(f"{pre}.{name}.bias", lay + (ours, "bias"), (w,))]
        for n in ("q", "k", "v"):
            rules += _heads(f"{pre}.self_attn.{n}_proj", lay + (n,), v.heads, v.head_dim, w, True)
        rules += _linear(f"{pre}.self_attn.out_proj", lay + ("o",), w, w, True)
        rules += _linear(f"{pre}.mlp.fc1", lay + ("fc1",), v.mlp, w, True)
        rules += _linear(f"{pre}.mlp.fc2", lay + ("fc2",), w, v.mlp, True)
    return rules + [Rule(f"{src}post_layernorm.weight", dst + ("post_norm", "scale"), (w,)),
                    Rule(f"{src}post_layernorm.bias", dst + ("post_norm", "bias"), (w,))]


def vision_rules(v: VisionConfig, llm_width: int, *, conv_patch: bool = False,
                 prefix: tuple = ("vision",)) -> list[Rule]:
    """SigLIP ViT + connector, under BAGEL's names."""
    con = prefix + ("connector",)
    return (vit_rules(v, dst=prefix + ("vit",), conv_patch=conv_patch)
            + _linear("connector.fc1", con + ("fc1",), llm_width, v.width, True)
            + _linear("connector.fc2", con + ("fc2",), llm_width, llm_width, True))


def _conv(src: str, dst: tuple, out: int, inp: int, k: int = 3) -> list[Rule]:
    return [Rule(f"{src}.weight", dst + ("kernel",), (out, inp, k, k), CONV2D),
            Rule(f"{src}.bias", dst + ("bias",), (out,))]


def _norm(src: str, dst: tuple, c: int) -> list[Rule]:
    return [Rule(f"{src}.weight", dst + ("scale",), (c,)), Rule(f"{src}.bias", dst + ("bias",), (c,))]


def _resnet(src: str, dst: tuple, inp: int, out: int) -> list[Rule]:
    r = (_norm(f"{src}.norm1", dst + ("norm1",), inp) + _conv(f"{src}.conv1", dst + ("conv1",), out, inp)
         + _norm(f"{src}.norm2", dst + ("norm2",), out) + _conv(f"{src}.conv2", dst + ("conv2",), out, out))
    if inp != out:
        r += _conv(f"{src}.nin_shortcut", dst + ("nin_shortcut",), out, inp, k=1)
    return r


def _mid(src: str, dst: tuple, c: int) -> list[Rule]:
    r = _resnet(f"{src}.mid.block_1", dst + ("mid_block_1",), c, c)
    a = dst + ("mid_attn_1",)
    r += _norm(f"{src}.mid.attn_1.norm", a + ("norm",), c)
    for n in ("q", "k", "v", "proj_out"):
        r += [Rule(f"{src}.mid.attn_1.{n}.weight", a + (n, "kernel"), (c, c, 1, 1), CONV1X1_TO_LINEAR),
              Rule(f"{src}.mid.attn_1.{n}.bias", a + (n, "bias"), (c,))]
    return r + _resnet(f"{src}.mid.block_2", dst + ("mid_block_2",), c, c)


def vae_rules(a: AEConfig) -> list[Rule]:
    """The FLUX autoencoder under its original names (as in `ae.safetensors`)."""
    enc, dec = ("encoder",), ("decoder",)
    r = _conv("encoder.conv_in", enc + ("conv_in",), a.ch, a.in_channels)
    c = a.ch
    for i, m in enumerate(a.ch_mult):
        for j in range(a.num_res_blocks):
            r += _resnet(f"encoder.down.{i}.block.{j}", enc + (f"down_{i}_block_{j}",), c, a.ch * m)
            c = a.ch * m
        if i != len(a.ch_mult) - 1:
            r += _conv(f"encoder.down.{i}.downsample.conv", enc + (f"down_{i}_downsample", "conv"), c, c)
    r += _mid("encoder", enc, c)
    r += _norm("encoder.norm_out", enc + ("norm_out",), c)
    r += _conv("encoder.conv_out", enc + ("conv_out",), 2 * a.z_channels, c)
    c = a.ch * a.ch_mult[-1]
    r += _conv("decoder.conv_in", dec + ("conv_in",), c, a.z_channels)
    r += _mid("decoder", dec, c)
    for i in reversed(range(len(a.ch_mult))):
        for j in range(a.num_res_blocks + 1):
            r += _resnet(f"decoder.up.{i}.block.{j}", dec + (f"up_{i}_block_{j}",), c, a.ch * a.ch_mult[i])
            c = a.ch * a.ch_mult[i]
        if i != 0:
            r += _conv(f"decoder.up.{i}.upsample.conv", dec + (f"up_{i}_upsample", "conv"), c, c)
    r += _norm("decoder.norm_out", dec + ("norm_out",), c)
    r += _conv("decoder.conv_out", dec + ("conv_out",), a.out_ch, c)
    return r


@dataclasses.dataclass(frozen=True)
class FixedTable:
    """A stored non-trainable table that must equal what the model computes."""

    src: str
    value: np.ndarray


def fixed_tables(cfg: ModelConfig, *, gen_heads: bool = True, vision: bool = True) -> list[FixedTable]:
    """The tables of the parts converted: a text-only conversion computes none, so a width the
    2-D table cannot take (not divisible by 4) converts."""
    g = cfg.latent_grid
    out = [FixedTable(LATENT_TABLE, sincos_2d(g[0], g[1], cfg.decoder.width))] if gen_heads else []
    if vision and cfg.vision is not None:
        s = cfg.vision.max_side
        out.append(FixedTable(VIT_TABLE, sincos_2d(s, s, cfg.decoder.width)))
    return out


def model_rules(cfg: ModelConfig, *, init_gen_from_und: bool = False, gen_heads: bool = True,
                vision: bool = True, conv_patch: bool = False) -> tuple[list[Rule], list[Copy]]:
    """The whole unified model's map (ema.safetensors). `gen_heads`/`vision` False leave those
    parts out (a plain Qwen checkpoint has neither; the caller keeps their fresh init)."""
    rules, copies = decoder_rules(cfg.vocab_size, cfg.decoder, init_gen_from_und=init_gen_from_und)
    if gen_heads:
        rules += gen_head_rules(cfg)
    if vision and cfg.vision is not None:
        rules += vision_rules(cfg.vision, cfg.decoder.width, conv_patch=conv_patch)
    return rules, copies


# --------------------------------------------------------------------------------------
# The job.


def check_fixed_tables(reader, tables: Sequence[FixedTable], atol: float = 2e-2, *,
                       allow_nonfinite: bool = False, allow_dtype: bool = False) -> None:
    """bfloat16 storage of values in [-1, 1] is exact to ~4e-3; a layout mix-up is O(1)."""
    for t in tables:
        if t.src not in reader.keys():
            raise ConversionError(f"missing keys (1): [{t.src!r}]")
        if reader.shape(t.src) != t.value.shape:
            raise ConversionError(f"key {t.src!r} has shape {reader.shape(t.src)}, expected {t.value.shape}")
        x = check_tensor(reader, t.src, reader.get(t.src), allow_nonfinite=allow_nonfinite,
                         allow_dtype=allow_dtype)
        err = float(np.max(np.abs(x.astype(np.float32) - t.value)))
        if err > atol:
            raise ConversionError(f"key {t.src!r} differs from the model's 2-D sin-cos table "
                                  f"(max abs {err:.3g}): a position-layout mismatch")


def decoder_stacking(cfg: ModelConfig):
    """With `scan_layers`, decoder/layer_{i}/... lands at index i of decoder/layers/block/...
    (nn.scan's layout, see model/mot.py); None for the unscanned layout."""
    depth = cfg.decoder.depth
    if not getattr(cfg.decoder, "scan_layers", False):
        return None

    def where(path):
        if len(path) > 2 and path[0] == "decoder" and path[1].startswith("layer_"):
            return ("decoder", "layers", "block") + tuple(path[2:]), int(path[1][6:]), depth
        return None
    return where


def model_map(reader, cfg: ModelConfig, *, init_gen_from_und: bool = False, allow_nonfinite: bool = False,
              allow_dtype: bool = False, **parts) -> tuple[list[Rule], list[Copy], list[str]]:
    """(rules, copies, source keys left unread) for ema.safetensors, after the header checks
    and the fixed-table check, so a wrong key, shape or dtype fails before any weight is read."""
    if "conv_patch" not in parts and cfg.vision is not None:
        key = f"{VIT}.embeddings.patch_embedding.weight"
        parts["conv_patch"] = key in reader.keys() and len(reader.shape(key)) == 4
    rules, copies = model_rules(cfg, init_gen_from_und=init_gen_from_und, **parts)
    tables = fixed_tables(cfg, gen_heads=parts.get("gen_heads", True), vision=parts.get("vision", True))
    ignore = [t.src for t in tables]
    check(reader, rules, ignore=ignore, allow_dtype=allow_dtype)
    check_fixed_tables(reader, tables, allow_nonfinite=allow_nonfinite, allow_dtype=allow_dtype)
    return rules, copies, ignore


def convert_model(reader, cfg: ModelConfig, *, init_gen_from_und: bool = False,
                  dtype=None, allow_nonfinite: bool = False, allow_dtype: bool = False, **parts) -> dict:
    """ema.safetensors reader -> UnifiedModel params (nested dict of numpy arrays in memory),
    in the scanned layout when the config scans the decoder."""
    checks = dict(allow_nonfinite=allow_nonfinite, allow_dtype=allow_dtype)
    rules, copies, ignore = model_map(reader, cfg, init_gen_from_und=init_gen_from_und, **checks, **parts)
    return convert(reader, rules, copies, dtype=dtype, ignore=ignore, stacking=decoder_stacking(cfg), **checks)


def convert_vae(reader, cfg: AEConfig, *, dtype=None, allow_nonfinite: bool = False,
                allow_dtype: bool = False) -> dict:
    return convert(reader, vae_rules(cfg), dtype=dtype, allow_nonfinite=allow_nonfinite, allow_dtype=allow_dtype)


def convert_bagel(ema: str, ae: str, out_dir: str, cfg: ModelConfig, ae_cfg: AEConfig, *,
                  tokenizer: str | None = None, dtype=None, init_gen_from_und: bool = False,
                  overwrite: bool = False, allow_nonfinite: bool = False, allow_dtype: bool = False,
                  progress: str | None = "converting") -> str:
    """Writes `out_dir/params` (Orbax, {'model': ..., 'vae': ...}), `out_dir/conversion.json`
    and a copy of the tokenizer. Returns the params path.

    An existing `out_dir` is refused before anything is read unless `overwrite`; it is then
    replaced only once both checkpoints have converted, so a refused source leaves it intact."""
    out_dir = output.check_out(out_dir, overwrite)
    if tokenizer and not os.path.isfile(tokenizer):  # found now, not after the conversion
        raise FileNotFoundError(f"{tokenizer}: no such file")
    checks = dict(allow_nonfinite=allow_nonfinite, allow_dtype=allow_dtype)
    ema_reader, ae_reader = Reader([ema]), Reader([ae])
    # Header-only (keys, shapes, dtypes): a bad ae.safetensors fails before the long model pass.
    check(ae_reader, vae_rules(ae_cfg), allow_dtype=allow_dtype)
    rules, copies, ignore = model_map(ema_reader, cfg, init_gen_from_und=init_gen_from_und, **checks)
    parts = [writer.part(ema_reader, ("model",), rules, copies, ignore=ignore, stacking=decoder_stacking(cfg),
                         dtype=dtype, allow_dtype=allow_dtype),
             writer.part(ae_reader, ("vae",), vae_rules(ae_cfg), dtype=dtype, allow_dtype=allow_dtype)]

    def copy_tokenizer(d):
        if tokenizer:
            from strokes_jax.sequence.qwen import QwenTokenizer
            QwenTokenizer.from_file(tokenizer, model_vocab=cfg.vocab_size).save(os.path.join(d, "tokenizer.json"))
    meta = dict(kind="bagel", ema=os.path.abspath(ema), ae=os.path.abspath(ae), tokenizer=tokenizer,
                init_gen_from_und=init_gen_from_und, model=_asdict(cfg), vae=dataclasses.asdict(ae_cfg))
    return output.write(out_dir, parts, meta, dtype=dtype, overwrite=overwrite, extra=copy_tokenizer,
                        progress=progress, **checks)


def _asdict(cfg: ModelConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["latent_grid"] = list(cfg.latent_grid)
    return d
