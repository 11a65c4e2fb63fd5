"""Device memory of one generation call with bf16 weights and with int8 expert kernels.

`python -m strokes_jax bench-int8 --config bagel7b_process` lowers the KV-cache
decode step (cache.make_decode_step, the call KVCacheBackend makes) for `--rows` rows against
a cache of `--context` tokens, on abstract params (ShapeDtypeStructs: no weights are
created), compiles it and prints XLA's memory_analysis() for both weight formats. `--slab`
is the number of new tokens in the call: 1 is a text token; an image's latent tokens (4096
at 1024 px, 1024 at 512 px) make a denoising step, which costs what a prefill chunk of that
size does.

bf16 means every float param cast to bfloat16 (the converter's `--dtype bfloat16`); int8 is
that with the expert kernels quantized (model/quantize.py). `weights` counts every param;
`arguments` only those the call reads (jit drops the ViT's here) plus the cache. The einsum
attention is used whatever the config says: it compiles everywhere; its scores are in
`temp`, which a fused kernel would not need.

`--topology v5e:1x1` compiles for that TPU instead of this machine, without the chip (with
the libtpu that jax[tpu] pins importable; it need not be installed in the project's
environment: `pip install --target DIR libtpu==0.0.42.*` and PYTHONPATH=DIR). The TPU
compiler refuses a program that does not fit its HBM; that is printed, and the figures are
then also given from 2 and 1 layers scaled linearly. Prefer the TPU figures: XLA:CPU has no
bf16 matmul, converts bf16 operands to f32 and, under the layer scan, hoists that convert of
the whole stacked kernels out of the loop, so the CPU `temp` of bf16 weights is about twice
the weights (and not linear in depth); the int8 kernels are dequantized inside the loop.

`--depth N` compiles N and N - 1 decoder layers and extends each field linearly to the
config's depth, for machines where the full depth does not compile.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import flax.linen as nn

from strokes_jax.model import cache as kvc
from strokes_jax.model import quantize as qz
from strokes_jax.model.unified import ModelConfig, UnifiedModel, dummy_inputs

FIELDS = ("arguments", "outputs", "alias", "temp", "code")


def _abstract_params(model: UnifiedModel, dtype=jnp.bfloat16):
    mc = model.cfg
    inputs = dummy_inputs(1, 8, mc.patch_dim, mc.vision)
    p = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **inputs))["params"])
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), p)


def _abstract_call(mc: ModelConfig, rows: int, context: int, slab: int):
    d = mc.decoder
    kv = jax.ShapeDtypeStruct((d.depth, rows, context + slab, d.kv_heads, d.head_dim), d.jdtype)
    cache = {"k": kv, "v": kv, "lengths": jax.ShapeDtypeStruct((rows,), jnp.int32)}
    i = jax.ShapeDtypeStruct((rows, slab), jnp.int32)
    s = {k: i for k in ("tokens", "types", "positions", "blocks", "patch_pos")}
    s.update(valid=jax.ShapeDtypeStruct((rows, slab), bool),
             latents=jax.ShapeDtypeStruct((rows, slab, mc.patch_dim), jnp.float32),
             timesteps=jax.ShapeDtypeStruct((rows, slab), jnp.float32))
    r = jax.ShapeDtypeStruct((rows,), jnp.int32)
    return cache, s, r, r


def tpu_device(topology: str):
    """A device of a TPU topology such as 'v5e:1x1', to compile for without the chip: needs
    the libtpu that jax[tpu] pins importable (`pip install libtpu==0.0.42.*`)."""
    from jax.experimental import topologies
    shape = topology.partition(":")[2].split("x")
    hosts = tuple(int(n) for n in shape) + (1,) * (3 - len(shape))
    return topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                        chips_per_host_bounds=hosts).devices[0]


def measure(mc: ModelConfig, rows: int = 1, context: int = 4096, slab: int = 1,
            device=None) -> dict:
    """{"bf16" | "int8": {field: bytes, "weights": bytes, "compile_s": s}} of one decode call,
    compiled for `device` (None: this machine's default)."""
    mc = dataclasses.replace(mc, decoder=dataclasses.replace(mc.decoder, attention="xla"))
    model = UnifiedModel(mc)
    params = _abstract_params(model)
    qparams = jax.eval_shape(lambda p: qz.quantize_params(model, p), params)
    call = _abstract_call(mc, rows, context, slab)
    if device is not None:
        on = jax.sharding.SingleDeviceSharding(device)
        put = lambda t: jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on), t)
        params, qparams, call = put(params), put(qparams), put(call)
    out = {}
    for name, m, p in (("bf16", model, params), ("int8", qz.quantize_model(model), qparams)):
        t = time.time()
        try:
            exe = kvc.make_decode_step(m.apply).lower(p, *call).compile()
        except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses what does not fit
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            out[name] = {"error": str(e).splitlines()[0], "weights": qz.nbytes(p)}
            continue
        a = exe.memory_analysis()
        out[name] = {"arguments": a.argument_size_in_bytes, "outputs": a.output_size_in_bytes,
                     "alias": a.alias_size_in_bytes, "temp": a.temp_size_in_bytes,
                     "code": a.generated_code_size_in_bytes, "weights": qz.nbytes(p),
                     "compile_s": time.time() - t}
    return out


def scaled(mc: ModelConfig, depth: int, **kw) -> dict:
    """measure() at `depth` and depth - 1 layers, extended linearly to mc's depth."""
    full = mc.decoder.depth
    at = lambda n: measure(dataclasses.replace(mc, decoder=dataclasses.replace(mc.decoder, depth=n)), **kw)
    if depth >= full:
        return at(full)
    hi, lo = at(depth), at(depth - 1)
    return {k: hi[k] if "error" in hi[k] else
            {f: hi[k][f] + (hi[k][f] - lo[k][f]) * (full - depth) if f != "compile_s" else hi[k][f]
             for f in hi[k]} for k in hi}


def peak(r: dict) -> int:
    """Live at once: inputs, the outputs not written over a donated input, and temporaries."""
    return r["arguments"] + r["outputs"] - r["alias"] + r["temp"]


def table(res: dict) -> str:
    cols = ("weights",) + FIELDS + ("peak",)
    lines = [f"{'':<6}" + "".join(f"{c:>12}" for c in cols) + f"{'compile':>10}"]
    for k, r in res.items():
        if "error" in r:
            lines.append(f"{k:<6}{r['weights'] / 1e9:>11.3f}G  does not compile: {r['error']}")
            continue
        vals = [r[c] for c in cols[:-1]] + [peak(r)]
        lines.append(f"{k:<6}" + "".join(f"{v / 1e9:>11.3f}G" for v in vals)
                     + f"{r['compile_s']:>9.1f}s")
    return "\n".join(lines)


def main(argv=None, prog: str = "python -m strokes_jax bench-int8") -> int:
    from strokes_jax.configs import load
    from strokes_jax.train.memory import model_config_of
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="bagel7b_process")
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--slab", type=int, default=1)
    ap.add_argument("--depth", type=int, default=0, help="layers to compile (0: the config's)")
    ap.add_argument("--topology", default=None,
                    help="compile for this TPU topology instead (e.g. v5e:1x1; needs libtpu)")
    a = ap.parse_args(argv)
    mc = model_config_of(load(a.config))
    depth = a.depth or mc.decoder.depth
    device = tpu_device(a.topology) if a.topology else None
    res = scaled(mc, depth, rows=a.rows, context=a.context, slab=a.slab, device=device)
    how = "compiled" if depth >= mc.decoder.depth else f"compiled at {depth} and {depth - 1}, scaled"
    target = f"TPU {a.topology}" if a.topology else jax.devices()[0].platform
    print(f"{a.config}: {mc.decoder.depth} layers ({how}), {a.rows} row(s), {a.context} cached + "
          f"{a.slab} new tokens, {target} memory_analysis, GB = 1e9 bytes")
    print(table(res))
    if depth >= mc.decoder.depth and any("error" in r for r in res.values()):
        print("\nfrom 2 and 1 layers, scaled to the config's depth linearly:")
        print(table(scaled(mc, 2, rows=a.rows, context=a.context, slab=a.slab, device=device)))
    return 0
