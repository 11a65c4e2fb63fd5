"""Starting a run from converted weights (`python -m strokes_jax convert ...` output).

The converted params are read straight into the train state's shardings: Orbax (tensorstore)
reads only the slices each process's devices hold, so no process makes a full host copy of a
14B-parameter tree. Before anything is read, the checkpoint's tree (from its metadata) is
compared with the model's: every missing, unexpected or mis-shaped parameter is named in one
error, and the conversion's numerics (RoPE base, norm epsilon, QK-norm, head layout, what the
image head predicts) must match the config's, since a mismatch there loads cleanly and only
shows up as a model that trains or paints badly.
"""

from __future__ import annotations

import json
import os

import jax

from strokes_jax.train import state as st

# conversion.json "model" keys whose values change the function the weights compute.
_NUMERICS = ("decoder.rope_theta", "decoder.norm_eps", "decoder.qk_norm", "decoder.qkv_bias",
             "decoder.heads", "decoder.kv_heads", "decoder.head_dim", "prediction", "time_scale",
             "vision.norm_eps", "vision.heads")
_SHOWN = 12  # names listed per kind of problem; the rest are counted


class WeightsMismatch(ValueError):
    """The converted checkpoint does not fit the model the config builds."""


def params_dir(path: str, key: str) -> str:
    """`path` is a `convert` output folder (holding params/) or its params folder itself."""
    for p in (os.path.join(path, "params"), path):
        if os.path.isfile(os.path.join(p, "_METADATA")) or os.path.isfile(
                os.path.join(p, "_CHECKPOINT_METADATA")):
            return os.path.abspath(p)
    raise FileNotFoundError(f"config key {key}: {path} holds no converted params (expected "
                            f"the folder written by `python -m strokes_jax convert`)")


def shapes_by_path(tree) -> dict[str, tuple]:
    """{'/'-joined parameter path: shape}, the paths train.freeze matches."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {st.param_path(p): tuple(x.shape) for p, x in leaves}


def _listing(names) -> str:
    names = sorted(names)
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def compare(saved: dict[str, tuple], wanted: dict[str, tuple], where: str) -> None:
    """Raises WeightsMismatch naming every missing, unexpected and mis-shaped parameter."""
    missing = set(wanted) - set(saved)
    unexpected = set(saved) - set(wanted)
    shaped = {k for k in set(saved) & set(wanted) if saved[k] != wanted[k]}
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {_listing(unexpected)}")
    if shaped:
        shown = [f"{k} {saved[k]} (model {wanted[k]})" for k in sorted(shaped)[:_SHOWN]]
        more = f" and {len(shaped) - _SHOWN} more" if len(shaped) > _SHOWN else ""
        problems.append(f"mis-shaped {len(shaped)}: {', '.join(shown)}{more}")
    if problems:
        raise WeightsMismatch(f"{where} does not fit the config's model: " + "; ".join(problems))


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def check_numerics(conversion: dict, model_cfg: dict, where: str, key: str) -> None:
    bad = []
    for k in _NUMERICS:
        a, b = _get(conversion, k), _get(model_cfg, k)
        if a is not None and b is not None and a != b:
            bad.append(f"model.{k.split('.', 1)[-1] if k.startswith('decoder.') else k} is "
                       f"{b!r}, the converted weights' {a!r}")
    if bad:
        raise WeightsMismatch(f"config key {key}: {where} was converted for another model: "
                              + "; ".join(bad))


def restore(path: str, params, shardings, model_cfg: dict, key: str = "train.init_converted"):
    """The converted model params, placed on `shardings` and cast to the dtypes of `params`
    (the state's, possibly abstract). The converted AE, when present, is not read."""
    import orbax.checkpoint as ocp

    d = params_dir(path, key)
    meta = ocp.StandardCheckpointer().metadata(d).item_metadata
    tree = meta.tree if hasattr(meta, "tree") else meta
    model_tree = tree.get("model", tree) if isinstance(tree, dict) else tree
    compare(shapes_by_path(model_tree), shapes_by_path(params), d)
    conv = os.path.join(os.path.dirname(d), "conversion.json")
    if os.path.isfile(conv):
        with open(conv) as f:
            check_numerics(json.load(f).get("model", {}), model_cfg, conv, key)
    target = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings)
    item = {"model": target} if "model" in tree else target
    out = ocp.PyTreeCheckpointer().restore(d, args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True))
    return out["model"] if "model" in tree else out
