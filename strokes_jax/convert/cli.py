"""`python -m strokes_jax convert <command>`:

  bagel    --ema ema.safetensors --ae ae.safetensors --out DIR [--tokenizer tokenizer.json]
           [--config bagel7b_process[:variant]] [--init_gen_from_und]
           BAGEL-7B-MoT safetensors -> DIR/params (Orbax {'model', 'vae'}) + conversion.json
  qwen2    --checkpoint DIR|FILE --out DIR [--config ...]
           a Hugging Face Qwen2/Qwen2.5/Qwen3 decoder -> DIR/params {'model': embed, lm_head,
           decoder}, both MoT experts from it (as BAGEL was initialised)
  flux-ae  --checkpoint DIR|FILE --out DIR [--config ...]
           a diffusers AutoencoderKL with FLUX's settings (FLUX.1-dev/vae) -> DIR/params {'vae'}
  siglip   --checkpoint DIR|FILE --out DIR [--config ...] [--keep_last_layer]
           an HF SiglipVisionModel or SiglipModel -> DIR/params {'model': {'vision': {'vit'}}}
  params   [--config ...]   parameter counts of the config's model from jax.eval_shape

All conversions take [--dtype float32|bfloat16|keep] [--overwrite] [--allow_nonfinite]
[--allow_dtype]. --checkpoint is a folder (model.safetensors, diffusion_pytorch_model.safetensors
or their sharded *.index.json), one .safetensors file or an index; the config.json beside it
gives the architecture, and a --config that disagrees with it is refused naming the key.

Each checks what it converts: a NaN/inf in any source tensor (--allow_nonfinite lets it
through), or a tensor of a dtype other than bfloat16/float16/float32 (--allow_dtype), is refused
naming the key and its file. An existing --out is refused before anything is read; --overwrite
replaces it once the conversion has succeeded (only a folder holding a previous conversion's
files: params, conversion.json, tokenizer.json). Tensors stream into the checkpoint one at a
time (a progress bar on a terminal), so host memory stays well below the output's size.

Errors in the checkpoint or its paths print one line, `error: ...`, and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_CONFIG = "bagel7b_process"


def load_config(spec: str):
    """`NAME[:ARG]` or `PATH[:ARG]` -> the checked ConfigDict (strokes_jax.configs.load)."""
    from strokes_jax import configs
    return configs.load(spec)


def configs_of(config):
    from strokes_jax.model.unified import ModelConfig
    from strokes_jax.model.vae import AEConfig
    vae = dict(config.vae)
    vae["ch_mult"] = tuple(vae["ch_mult"])
    return ModelConfig.from_config(config.model), AEConfig(**vae)


def _common(p: argparse.ArgumentParser, config_default) -> None:
    p.add_argument("--out", required=True)
    p.add_argument("--config", default=config_default,
                   help=None if config_default else "check config.json against this config and convert to its "
                   "layout (default: config.json's architecture)")
    # float32 by default: the model keeps float32 params (compute dtype is separate); `keep`
    # stores the checkpoint's own bfloat16 at half the disk.
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "keep"))
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out folder (one holding only a previous conversion's files); "
                   "it is replaced once the conversion has succeeded")
    p.add_argument("--allow_nonfinite", action="store_true",
                   help="convert tensors holding NaN/inf values instead of refusing them")
    p.add_argument("--allow_dtype", action="store_true",
                   help="convert tensors stored in a dtype other than bfloat16/float16/float32 "
                   "(e.g. int32) instead of refusing them; --dtype still casts them")


HF_COMMANDS = {
    "qwen2": "a Hugging Face Qwen2/Qwen2.5/Qwen3 decoder (safetensors + config.json) -> DIR/params "
             "{'model': embed, lm_head, decoder}; both MoT experts start from its weights, as BAGEL's did",
    "flux-ae": "a diffusers AutoencoderKL with FLUX's settings (e.g. FLUX.1-dev/vae) -> DIR/params {'vae'}",
    "siglip": "an HF SiglipVisionModel, or the vision tower of a SiglipModel -> DIR/params "
              "{'model': {'vision': {'vit'}}}, its last layer dropped as in BAGEL",
}


def build_parser(prog: str = "python -m strokes_jax convert") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bagel", help="BAGEL-7B-MoT's ema.safetensors + ae.safetensors -> DIR/params",
                       description="BAGEL-7B-MoT safetensors -> DIR/params (Orbax) + conversion.json. "
                       "Each tensor is checked as it is read: NaN/inf values and dtypes other than "
                       "bfloat16/float16/float32 are refused, naming the key and file.")
    b.add_argument("--ema", required=True)
    b.add_argument("--ae", required=True)
    b.add_argument("--tokenizer", default="")
    b.add_argument("--init_gen_from_und", action="store_true")
    _common(b, DEFAULT_CONFIG)
    for name, what in HF_COMMANDS.items():
        h = sub.add_parser(name, help=what.split(" -> ")[0], description=what + ". The architecture comes from "
                           "the config.json beside "
                           "the weights; a --config that disagrees with it is refused, naming the key.")
        h.add_argument("--checkpoint", required=True,
                       help="a folder, one .safetensors file, or a sharded checkpoint's *.safetensors.index.json")
        if name == "siglip":
            h.add_argument("--keep_last_layer", action="store_true",
                           help="keep every encoder layer (BAGEL drops the last)")
        _common(h, "")
    p = sub.add_parser("params", help="parameter counts of the config's model (jax.eval_shape)")
    p.add_argument("--config", default=DEFAULT_CONFIG)
    return ap


def _one_line(e: BaseException) -> str:
    """A multi-line problem list ("...:\n  a\n  b") as "...: a; b"."""
    out = ""
    for line in (s.strip() for s in str(e).splitlines()):
        if line:
            out += line if not out else (" " if out.endswith(":") else "; ") + line
    return out or type(e).__name__


def main(argv=None, prog: str = "python -m strokes_jax convert") -> int:
    """Runs a conversion command; argv without the program name (sys.argv[1:] by default).
    A bad checkpoint or path prints `error: ...` (one line) and returns 2; argparse's usage
    errors exit 2 as argparse does."""
    from strokes_jax.convert.keymap import ConversionError
    args = build_parser(prog).parse_args(argv)
    try:
        return _run(args)
    except (ConversionError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.cmd != "params" and os.path.lexists(args.out) and not args.overwrite:
        raise FileExistsError(f"--out {args.out}: exists; pass --overwrite to replace it")
    if args.cmd == "params":
        from strokes_jax.model.counts import format_counts, param_counts
        print(format_counts(param_counts(*configs_of(load_config(args.config)))))
        return 0
    cfg, ae_cfg = configs_of(load_config(args.config)) if args.config else (None, None)
    import jax.numpy as jnp
    dtype = None if args.dtype == "keep" else jnp.dtype(args.dtype)
    common = dict(dtype=dtype, overwrite=args.overwrite, allow_nonfinite=args.allow_nonfinite,
                  allow_dtype=args.allow_dtype)
    if args.cmd == "bagel":
        from strokes_jax.convert.bagel import convert_bagel
        path = convert_bagel(args.ema, args.ae, args.out, cfg, ae_cfg, tokenizer=args.tokenizer or None,
                             init_gen_from_und=args.init_gen_from_und, **common)
    else:
        from strokes_jax.convert import hf
        from strokes_jax.convert.keymap import ConversionError
        if args.cmd == "qwen2":
            path = hf.convert_qwen2(args.checkpoint, args.out, cfg, **common)
        elif args.cmd == "flux-ae":
            path = hf.convert_flux_ae(args.checkpoint, args.out, ae_cfg, **common)
        else:
            if cfg is not None and cfg.vision is None:
                raise ConversionError(f"--config {args.config}: has no model.vision to check SigLIP against")
            path = hf.convert_siglip(args.checkpoint, args.out, None if cfg is None else cfg.vision,
                                     drop_last_layer=not args.keep_last_layer, **common)
    print(f"wrote {path}")
    return 0
