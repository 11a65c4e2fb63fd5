"""`python -m strokes_jax convert <command>`:

  bagel   --ema ema.safetensors --ae ae.safetensors --out DIR [--tokenizer tokenizer.json]
          [--config bagel7b_process[:variant]] [--dtype float32|bfloat16|keep]
          [--init_gen_from_und] [--overwrite] [--allow_nonfinite] [--allow_dtype]
          BAGEL-7B-MoT safetensors -> DIR/params (Orbax {'model', 'vae'}) + conversion.json
  params  [--config ...]   parameter counts of the config's model from jax.eval_shape

`bagel` checks what it converts: a NaN/inf in any source tensor (--allow_nonfinite lets it
through), or a tensor of a dtype other than bfloat16/float16/float32 (--allow_dtype), is refused
naming the key and its file. An existing --out is refused before anything is read; --overwrite
replaces it once the conversion has succeeded (only a folder holding a previous conversion's
files: params, conversion.json, tokenizer.json).

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


def build_parser(prog: str = "python -m strokes_jax convert") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bagel", description="BAGEL-7B-MoT safetensors -> DIR/params (Orbax) + conversion.json. "
                       "Each tensor is checked as it is read: NaN/inf values and dtypes other than "
                       "bfloat16/float16/float32 are refused, naming the key and file.")
    b.add_argument("--ema", required=True)
    b.add_argument("--ae", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--tokenizer", default="")
    b.add_argument("--config", default=DEFAULT_CONFIG)
    # float32 by default: the model keeps float32 params (compute dtype is separate); `keep`
    # stores the checkpoint's own bfloat16 at half the disk.
    b.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "keep"))
    b.add_argument("--init_gen_from_und", action="store_true")
    b.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out folder (one holding only a previous conversion's files); "
                   "it is removed once the conversion has succeeded, just before writing")
    b.add_argument("--allow_nonfinite", action="store_true",
                   help="convert tensors holding NaN/inf values instead of refusing them")
    b.add_argument("--allow_dtype", action="store_true",
                   help="convert tensors stored in a dtype other than bfloat16/float16/float32 "
                   "(e.g. int32) instead of refusing them; --dtype still casts them")
    p = sub.add_parser("params")
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
    if args.cmd == "bagel" and os.path.lexists(args.out) and not args.overwrite:
        raise FileExistsError(f"--out {args.out}: exists; pass --overwrite to replace it")
    cfg, ae_cfg = configs_of(load_config(args.config))
    if args.cmd == "params":
        from strokes_jax.model.counts import format_counts, param_counts
        print(format_counts(param_counts(cfg, ae_cfg)))
        return 0
    import jax.numpy as jnp
    from strokes_jax.convert.bagel import convert_bagel
    dtype = None if args.dtype == "keep" else jnp.dtype(args.dtype)
    path = convert_bagel(args.ema, args.ae, args.out, cfg, ae_cfg, tokenizer=args.tokenizer or None,
                         dtype=dtype, init_gen_from_und=args.init_gen_from_und, overwrite=args.overwrite,
                         allow_nonfinite=args.allow_nonfinite, allow_dtype=args.allow_dtype)
    print(f"wrote {path}")
    return 0
