"""Weight-only int8 of the decoder experts for inference, through qwix's PTQ.

`quantize(model, params)` returns a model whose `apply` takes UnifiedModel's inputs (full
forward and KV-cache decode mode) and params in which every expert projection kernel
(q/k/v/o and gate/up/down of `_und` and `_gen`, every layer) is a qwix QArray: int8 values
and one scale per output channel (absmax over the input axis). Everything else (embeddings,
norms, biases, lm_head, vae2llm/llm2vae, the time embedder, adaLN, the ViT) keeps its float
params, and activations stay in the model's compute dtype: qwix dequantizes the kernel into
the matmul's operand in that dtype, which XLA can fuse into the dot.

qwix intercepts jax.lax.dot_general and serves a Linen param's quantized replacement through
Module.param. Two steps of DenseGeneral's `jnp.tensordot(x, w.astype(dtype), axes=1)` it
does not handle, so the provider adds them to its intercept map:
  * the cast of a quantized kernel: qwix 0.1.8's WithAux.astype re-boxes its QArray as if it
    were a flax metadata box, which in a Linen apply it is not, and raises; casting the
    QArray itself (its scale: the dtype it dequantizes to) is what the cast means;
  * tensordot, which cannot take a WithAux: it becomes the same contraction as a
    dot_general, which qwix then quantizes.
"""

from __future__ import annotations

import dataclasses
import re

import flax.linen as nn
import jax
import numpy as np
import qwix
from qwix._src.providers import ptq

from strokes_jax.model import mot
from strokes_jax.model.unified import dummy_inputs

# Module paths of the expert projections, unscanned (layer_i) and scanned (layers/block).
EXPERT_KERNELS = r"decoder/(layer_\d+|layers/block)/(q|k|v|o|gate|up|down)_(und|gen)"
_PROJECTIONS = 7  # q, k, v, o, gate, up, down


class _Provider(qwix.PtqProvider):
    def _tensordot(self, a, b, axes=2, *, precision=None, preferred_element_type=None,
                   out_sharding=None):
        rule, _ = self._get_current_rule_and_op_id("dot_general", only_rule=True)
        if not isinstance(b, ptq.WithAux) and (rule is None or rule.weight_qtype is None):
            # Interception is off inside a handler: this is jax's own tensordot.
            return jax.numpy.tensordot(a, b, axes, precision=precision,
                                       preferred_element_type=preferred_element_type,
                                       out_sharding=out_sharding)
        if not isinstance(axes, int):
            raise NotImplementedError(f"quantized tensordot with axes={axes!r}")
        dims = ((tuple(range(a.ndim - axes, a.ndim)), tuple(range(axes))), ((), ()))
        return self.dot_general(a, b, dims, precision, preferred_element_type,
                                out_sharding=out_sharding)

    def get_intercept_map(self):
        cast = lambda w, dtype: w.replace(array=w.array.astype(dtype))
        aux = ptq.WithAux  # where it is defined moves between qwix versions
        return super().get_intercept_map() | {
            "jax.numpy.tensordot": self._tensordot,
            f"{aux.__module__}.{aux.__qualname__}.astype": cast,
        }


def rules(qtype="int8") -> list:
    return [qwix.QuantizationRule(module_path=EXPERT_KERNELS, weight_qtype=qtype)]


def quantize_model(model: nn.Module, qtype="int8") -> nn.Module:
    """The model with quantized expert kernels; its params come from `quantize_params`."""
    return qwix.quantize_model(model, _Provider(rules(qtype)))


def _flat(model: nn.Module) -> nn.Module:
    if hasattr(type(model), "_unquantized_type"):
        raise TypeError("pass the float model, not the quantized one")
    c = model.cfg
    return type(model)(dataclasses.replace(c, decoder=dataclasses.replace(c.decoder,
                                                                          scan_layers=False)))


def template(model: nn.Module, qtype="int8"):
    """qwix's abstract quantized params (which axes of each kernel get their own scale) for an
    unscanned copy of `model`: under nn.scan a kernel's entry describes one layer while the
    params are stacked, so scanned params are quantized layer by layer."""
    flat = _flat(model)
    qm = quantize_model(flat, qtype)
    inputs = dummy_inputs(1, 8, flat.cfg.patch_dim, flat.cfg.vision)
    t = jax.eval_shape(lambda: qm.init(jax.random.PRNGKey(0), **inputs))["params"]
    n = len(quantized_leaves(t))
    want = 2 * _PROJECTIONS * flat.cfg.decoder.depth
    if n != want:  # qwix leaves a kernel float when it cannot tell it is a param
        raise RuntimeError(f"qwix quantized {n} expert kernels, expected {want}")
    return t


def quantize_params(model: nn.Module, params, qtype="int8"):
    """Unboxed float params of `model` (scanned or not) -> the quantized model's params.
    Jitted: quantization is jnp arithmetic on the kernels; works under jax.eval_shape too."""
    tmpl = template(model, qtype)
    scanned = "layers" in params["decoder"]

    def run(p):
        if scanned:
            p = dict(p, decoder=mot.unstack_layers(p["decoder"]))
        q = qwix.quantize_params(p, tmpl)
        if scanned:
            q = dict(q, decoder=mot.stack_layers(q["decoder"], model.cfg.decoder.depth))
        return q
    return jax.jit(run)(params)


def quantize(model: nn.Module, params, qtype="int8"):
    """(quantized model, quantized params) from a UnifiedModel and its unboxed float params."""
    return quantize_model(model, qtype), quantize_params(model, params, qtype)


def quantized_leaves(params) -> dict:
    """'/'-joined path -> QArray (qvalue, scale) of every quantized kernel."""
    is_q = lambda x: isinstance(x, ptq.WithAux)
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_q)[0]
    return {"/".join(str(k.key) for k in path if hasattr(k, "key")): leaf.array
            for path, leaf in leaves if is_q(leaf)}


def is_expert_kernel(path: str) -> bool:
    return re.fullmatch(EXPERT_KERNELS + "/kernel", path) is not None


def nbytes(tree) -> int:
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize
                   for x in jax.tree_util.tree_leaves(tree)))
