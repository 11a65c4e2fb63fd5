"""How much memory a training step needs per device, before anything compiles.

`python -m strokes_jax memory --config NAME --devices N` prints, for the config's mesh on N
devices and for each freezing choice (train.freeze), the bytes per device of:

  params      the float32 parameters, as the sharding rules split them (exact)
  ema         the EMA copy, when optim.ema_decay > 0 (exact)
  optimizer   Adam's two float32 moments, trained parameters only (exact)
  grads       float32 gradients of the trained parameters (exact)
  activations what the backward pass keeps plus one layer's working set, under the remat
              policy and attention implementation of the config (an estimate, below)
  batch       the packed input rows

The parameter, optimizer and gradient sizes come from the abstract train state
(`jax.eval_shape`), so they are the program's own. Activations are a model of what XLA keeps,
fitted to `compiled.memory_analysis()` of the CPU compile at test sizes (tests check the total
within 20%); on GPU and TPU fusion usually keeps less, so read them as an upper estimate.
The einsum ("xla") attention materialises batch x heads x L x L scores, which at BAGEL's
33K-token rows dominates everything else: that line tells you to use a fused kernel.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
import flax.linen as nn

from strokes_jax.model.unified import ModelConfig, UnifiedModel
from strokes_jax.train import flops as fl
from strokes_jax.train import sharding as shd
from strokes_jax.train import state as st

GB = 1e9
# Memory per chip (GB) of the accelerators users ask about, for the "fits" column.
DEVICE_GB = {"h100": 80, "h200": 141, "a100": 80, "v5p": 95, "v5e": 16, "v6e": 32, "v4": 32}
# The freezing choices compared by default, after the config's own.
CHOICES = ((), ("vit",), ("vit", "und"), ("vit", "und", "embeddings"))


@dataclasses.dataclass(frozen=True)
class Plan:
    freeze: tuple
    params: float
    ema: float
    optimizer: float
    grads: float
    activations: float
    batch: float
    detail: dict  # the activation terms

    @property
    def total(self) -> float:
        return self.params + self.ema + self.optimizer + self.grads + self.activations + self.batch


def _local_elems(shape, names, rules, mesh: dict) -> int:
    """Elements of one parameter on one device under the logical-axis rules."""
    spec = nn.logical_to_mesh_axes(names, rules)
    n = 1
    for dim, axes in zip(shape, spec):
        axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        n *= math.ceil(dim / int(np.prod([mesh[a] for a in axes])))
    return n


def _boxed_bytes(tree, rules, mesh: dict) -> float:
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
        if isinstance(leaf, nn.Partitioned):
            total += _local_elems(leaf.value.shape, leaf.names, rules, mesh) * leaf.value.dtype.itemsize
        elif hasattr(leaf, "shape"):  # unpartitioned (scalars: Adam's step count)
            total += int(np.prod(leaf.shape)) * leaf.dtype.itemsize
    return float(total)


def _trained_subtree(params, labels):
    box = lambda x: isinstance(x, nn.Partitioned)
    unbox = lambda x: x.value if box(x) else x
    return jax.tree_util.tree_map(lambda p, lab: p if unbox(lab) == "train" else None, params,
                                  labels, is_leaf=box)


def activation_terms(mc: ModelConfig, rows: int, seq_len: int, tensor: int) -> dict:
    """Bytes per device that the backward pass keeps, plus one layer's working set.

    Fitted to XLA's buffer assignment (CPU compile, memory_analysis) of the test configs:
    per layer, a scanned stack without remat keeps about 3 copies of the attention scores
    and an unscanned one 2; remat "full" under scan keeps only the layer inputs (2 float32
    copies of the residual stream), "dots" also the matmul outputs and the scores, while an
    unscanned stack keeps its activations whatever the policy (XLA merges the recomputation
    back). The backward of one layer needs about 4
    score-sized buffers (with a fused kernel: about two copies of its own intermediates,
    not fitted), and the text head keeps float32 logits, log-softmax and gradient."""
    d = mc.decoder
    c = np.dtype(d.dtype).itemsize
    t = rows * seq_len  # tokens on this device
    h, kv, mlp = d.heads / tensor, d.kv_heads / tensor, d.mlp / tensor
    layer_tok = (4 * d.width + 2 * (h + 2 * kv) * d.head_dim + 2 * mlp) * c
    # Attention scores, float32, all rows of this device; fused kernels never hold them.
    scores = rows * h * seq_len * seq_len * 4 if d.attention == "xla" else 0.0
    if d.scan_layers and d.remat != "none":
        keep = 2 * t * d.width * 4
        if d.remat in ("dots", "dots_no_batch"):  # the projections' outputs too
            keep += t * ((h + 2 * kv) * d.head_dim + 2 * mlp) * c
        if d.remat == "dots":  # and the score einsum's, a dot with batch dimensions
            keep += scores
        saved = d.depth * keep
    else:
        saved = d.depth * (t * layer_tok + (3.0 if d.scan_layers else 2.0) * scores)
    # A fused kernel holds no scores; then one layer's own intermediates are the working set.
    working = 4.0 * scores if scores else 2.0 * t * layer_tok
    return {"saved": float(saved), "layer_working_set": float(working),
            "text_head": float(t * (mc.vocab_size / tensor) * 4 * 4),
            "mask": float(rows * seq_len * seq_len)}  # boolean, built once per step


def abstract_state(config, mc: ModelConfig, freeze: tuple):
    """The boxed train state's shapes (no arrays, no compile). Traced with the einsum
    attention: parameter shapes do not depend on the kernel, and a GPU kernel cannot be
    traced on a machine without one."""
    model = UnifiedModel(dataclasses.replace(mc, decoder=dataclasses.replace(mc.decoder,
                                                                             attention="xla")))
    tx = st.make_optimizer(config.optim, config.train.steps, freeze)
    init = st.init_fn(model, tx, mc.patch_dim, ema=config.optim.ema_decay > 0)
    return jax.eval_shape(init, jax.random.PRNGKey(0)), tx


def plan(config, mc: ModelConfig, devices: int, freeze: tuple | None = None) -> Plan:
    freeze = tuple(config.train.freeze) if freeze is None else tuple(freeze)
    mesh = dict(zip(shd.MESH_AXES, shd.mesh_shape(config.mesh["shape"], devices)))
    rules = shd.rules_tuple(config.rules)
    state, _ = abstract_state(config, mc, freeze)
    params = _boxed_bytes(state.params, rules, mesh)
    labels = (st.freeze_labels(state.params, freeze) if freeze
              else jax.tree_util.tree_map(lambda _: "train", state.params))
    grads = _boxed_bytes(_trained_subtree(state.params, labels), rules, mesh)
    rows = config.data.batch_size // (mesh["data"] * mesh["fsdp"] * config.train.accum_steps)
    acts = activation_terms(mc, max(rows, 1), config.data.seq_len, mesh["tensor"])
    batch = config.data.batch_size / (mesh["data"] * mesh["fsdp"]) * config.data.seq_len * (
        10 * 4 + mc.patch_dim)
    return Plan(freeze=freeze, params=params,
                ema=params if state.ema_params is not None else 0.0,
                optimizer=_boxed_bytes(state.opt_state, rules, mesh), grads=grads,
                activations=float(sum(acts.values())), batch=float(batch), detail=acts)


def table(plans, device_gb: float | None = None) -> str:
    cols = ("params", "ema", "optimizer", "grads", "activations", "batch", "total")
    head = f"{'train.freeze':<28}" + "".join(f"{c:>12}" for c in cols)
    if device_gb:
        head += f"{'fits ' + format(device_gb, 'g') + ' GB':>14}"
    lines = [head, "-" * len(head)]
    unit, scale = ("G", GB) if max(p.total for p in plans) >= GB else ("M", 1e6)
    for p in plans:
        row = f"{','.join(p.freeze) or '(none)':<28}" + "".join(
            f"{getattr(p, c) / scale:>11.2f}{unit}" for c in cols)
        if device_gb:
            row += f"{'yes' if p.total <= device_gb * GB else 'NO':>14}"
        lines.append(row)
    return "\n".join(lines)


def compiled(config, mc: ModelConfig, devices=None) -> dict:
    """XLA's own numbers for the same step: the train step lowered on abstract shapes (no
    arrays are created) and compiled for `devices`, then `memory_analysis()`, per device."""
    from strokes_jax.model import routing
    from strokes_jax.sequence import layout
    from strokes_jax.train import bench
    from strokes_jax.train import step as sp

    mesh = shd.make_mesh(config.mesh["shape"], devices)
    rules = shd.rules_tuple(config.rules)
    state, tx = abstract_state(config, mc, tuple(config.train.freeze))
    shardings = shd.state_shardings(state, mesh, rules)
    unboxed = nn.unbox(state)
    abstract = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), unboxed, shardings)
    model = routing.sparse(UnifiedModel(mc), tuple(config.train.sparse_routing))
    train_step, _ = sp.jit_steps(model, tx, sp.LossConfig.from_config(config), mesh, shardings,
                                 accum_steps=config.train.accum_steps,
                                 ema_decay=config.optim.ema_decay)
    local = bench.synthetic_batch(config.data.batch_size, config.data.seq_len, mc.vocab_size,
                                  mc.patch_dim, mc.latent_grid[0] * mc.latent_grid[1],
                                  config.bench.text_len)
    bs = shd.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct(local[k].shape, local[k].dtype, sharding=bs)
             for k in layout.ROW_FIELDS}
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        exe = train_step.compile(abstract, batch)
    m = exe.fn.memory_analysis()
    return {"arguments": float(m.argument_size_in_bytes), "outputs": float(m.output_size_in_bytes),
            "temp": float(m.temp_size_in_bytes), "alias": float(m.alias_size_in_bytes),
            "peak": float(m.argument_size_in_bytes + m.temp_size_in_bytes),
            "xla_flops": fl.xla_flops(exe.fn)}


def model_config_of(config) -> ModelConfig:
    """The config's model: its own sizes when it states them (the BAGEL configs), else the
    ones the world's tokenizer implies."""
    m = config.model
    if m.vocab_size and m.patch_dim and all(m.latent_grid):
        return ModelConfig.from_config({**m.to_dict(), "latent_grid": tuple(m.latent_grid)})
    from strokes_jax.train import loop
    return loop.model_config(config, loop.episode_tokenizer(config))


def device_gb(name: str | None) -> float | None:
    """'h100' -> 80; a number of GB as text -> that number; None -> None."""
    if not name:
        return None
    try:
        return float(name)
    except ValueError:
        pass
    key = name.lower().replace(" ", "")
    if key not in DEVICE_GB:
        raise ValueError(f"--device {name}: not one of {', '.join(DEVICE_GB)} (or give GB)")
    return float(DEVICE_GB[key])


def report(config, devices: int, device: str | None = None, with_compile: bool = False) -> str:
    mc = model_config_of(config)
    own = tuple(config.train.freeze)
    choices = [own] + [f for f in CHOICES if f != own]
    plans = []
    for f in choices:
        try:
            plans.append(plan(config, mc, devices, f))
        except ValueError:  # a group this model does not have (no ViT)
            continue
    mesh = dict(zip(shd.MESH_AXES, shd.mesh_shape(config.mesh["shape"], devices)))
    d = mc.decoder
    lines = [f"per device, {devices} devices, mesh {mesh}, batch {config.data.batch_size} x "
             f"{config.data.seq_len} tokens, remat {d.remat!r}, attention {d.attention!r}, "
             f"scan_layers {d.scan_layers}", table(plans, device_gb(device))]
    act = plans[0].detail
    lines.append("activations of the first row: " + ", ".join(
        f"{k} {v / GB:.2f}G" for k, v in act.items()))
    if with_compile:
        m = compiled(config, mc, jax.devices()[:devices])
        lines.append(f"XLA ({jax.devices()[0].platform} compile, memory_analysis) for the first "
                     f"row: arguments {m['arguments'] / GB:.2f}G + temp {m['temp'] / GB:.2f}G = "
                     f"{m['peak'] / GB:.2f}G (the plan: {plans[0].total / GB:.2f}G)")
        if m["xla_flops"]:
            model = fl.train_step_flops(mc, config.data.batch_size, config.data.seq_len).model
            lines.append(f"XLA's FLOPs of the compiled step, per device: {m['xla_flops'] / 1e12:.2f}T, "
                         f"{m['xla_flops'] * devices / model:.2f}x the analytic model FLOPs"
                         + (" (XLA counts a scanned loop's body once: compare with "
                            "--config.model.scan_layers=False)" if d.scan_layers else ""))
    return "\n".join(lines)
