"""`python -m strokes_jax convert <command>`:

  bagel   --ema ema.safetensors --ae ae.safetensors --out DIR [--tokenizer tokenizer.json]
          [--config bagel7b_process[:variant]] [--dtype float32|bfloat16|keep]
          [--init_gen_from_und]
          BAGEL-7B-MoT safetensors -> DIR/params (Orbax {'model', 'vae'}) + conversion.json
  params  [--config ...]   parameter counts of the config's model from jax.eval_shape
"""

from __future__ import annotations

import argparse

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
    b = sub.add_parser("bagel")
    b.add_argument("--ema", required=True)
    b.add_argument("--ae", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--tokenizer", default="")
    b.add_argument("--config", default=DEFAULT_CONFIG)
    # float32 by default: the model keeps float32 params (compute dtype is separate); `keep`
    # stores the checkpoint's own bfloat16 at half the disk.
    b.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "keep"))
    b.add_argument("--init_gen_from_und", action="store_true")
    p = sub.add_parser("params")
    p.add_argument("--config", default=DEFAULT_CONFIG)
    return ap


def main(argv=None, prog: str = "python -m strokes_jax convert") -> int:
    """Runs a conversion command; argv without the program name (sys.argv[1:] by default)."""
    args = build_parser(prog).parse_args(argv)

    cfg, ae_cfg = configs_of(load_config(args.config))
    if args.cmd == "params":
        from strokes_jax.model.counts import format_counts, param_counts
        print(format_counts(param_counts(cfg, ae_cfg)))
        return 0
    import jax.numpy as jnp
    from strokes_jax.convert.bagel import convert_bagel
    dtype = None if args.dtype == "keep" else jnp.dtype(args.dtype)
    path = convert_bagel(args.ema, args.ae, args.out, cfg, ae_cfg, tokenizer=args.tokenizer or None,
                         dtype=dtype, init_gen_from_und=args.init_gen_from_und)
    print(f"wrote {path}")
    return 0
