"""Starting a run from converted weights (`python -m strokes_jax convert ...` output): one
whole conversion, or several parts (a Qwen2 decoder, a SigLIP ViT, a FLUX AE) side by side.

The converted params are read straight into the train state's shardings: Orbax (tensorstore)
reads only the slices each process's devices hold, so no process makes a full host copy of a
14B-parameter tree. Before anything is read, the checkpoint's tree (from its metadata) is
compared with the model's: every missing, unexpected or mis-shaped parameter is named in one
error, and the conversion's numerics (RoPE base, norm epsilon, QK-norm, head layout, what the
image head predicts) must match the config's, since a mismatch there loads cleanly and only
shows up as a model that trains or paints badly.
"""

from __future__ import annotations

import os

import jax
from flax import traverse_util

from strokes_jax import files
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


def listing(names) -> str:
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
        problems.append(f"missing {len(missing)}: {listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {listing(unexpected)}")
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


# conversion.json kinds that hold the whole model; every other kind (qwen2, siglip,
# flux-ae) is a part, and what no part holds keeps its initialisation.
WHOLE = ("bagel",)


def converted_paths(value) -> list[str]:
    """train.init_converted as folders: one path, comma-separated paths, or a tuple."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [str(p).strip() for p in items if str(p).strip()]


def _conversion(d: str) -> dict:
    return files.read_json(os.path.join(os.path.dirname(d), "conversion.json")) or {}


def holding(paths, part: str) -> str | None:
    """The first conversion folder of `paths` whose params hold top-level `part` ('vae')."""
    import orbax.checkpoint as ocp
    for path in converted_paths(paths):
        d = params_dir(path, "train.init_converted")
        meta = ocp.StandardCheckpointer().metadata(d).item_metadata
        if part in (meta.tree if hasattr(meta, "tree") else meta):
            return path
    return None


def restore(path, params, shardings, model_cfg: dict, key: str = "train.init_converted"):
    """The model params from one conversion or several parts (`converted_paths`), placed on
    `shardings` and cast to the dtypes of `params`; returns (params, the paths no part held,
    which keep their values in `params`). A whole conversion (`convert bagel`) must cover the
    model; parts may leave some of it (BAGEL started from Qwen2 with fresh generation heads),
    but may not overlap. A converted AE is not read here."""
    import orbax.checkpoint as ocp

    wanted = shapes_by_path(params)
    owner: dict[str, str] = {}
    reads, whole = [], False
    for p in converted_paths(path):
        d = params_dir(p, key)
        meta = ocp.StandardCheckpointer().metadata(d).item_metadata
        tree = meta.tree if hasattr(meta, "tree") else meta
        wrapped = isinstance(tree, dict) and "model" in tree
        if isinstance(tree, dict) and not wrapped and "vae" in tree:
            continue  # an AE alone: world.ae_path reads it (train/inputs.py)
        saved = shapes_by_path(tree["model"] if wrapped else tree)
        conversion = _conversion(d)
        is_whole = conversion.get("kind", "bagel") in WHOLE
        whole |= is_whole
        compare(saved, {k: v for k, v in wanted.items() if is_whole or k in saved}, d)
        both = sorted(k for k in saved if k in owner)
        if both:
            raise WeightsMismatch(f"config key {key}: {d} and {owner[both[0]]} both hold "
                                  f"{len(both)} parameters: {listing(both)}")
        owner.update({k: d for k in saved})
        check_numerics(conversion.get("model", {}), model_cfg, d, key)
        reads.append((d, wrapped, sorted(saved)))
    if not reads:
        raise WeightsMismatch(f"config key {key}: {path} holds no model parameters")
    missing = set(wanted) - set(owner)
    if whole and missing:
        compare(owner, wanted, ", ".join(d for d, _, _ in reads))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    flat_params = {st.param_path(q): x for q, x in leaves}
    flat_shard = {st.param_path(q): x for q, x in jax.tree_util.tree_flatten_with_path(shardings)[0]}
    out = dict(flat_params)
    for d, wrapped, names in reads:
        target = traverse_util.unflatten_dict(
            {k: jax.ShapeDtypeStruct(flat_params[k].shape, flat_params[k].dtype,
                                     sharding=flat_shard[k]) for k in names}, sep="/")
        item = {"model": target} if wrapped else target
        got = ocp.PyTreeCheckpointer().restore(d, args=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True))
        got = got["model"] if wrapped else got
        out.update({st.param_path(q): x for q, x in jax.tree_util.tree_flatten_with_path(got)[0]})
    return jax.tree_util.tree_unflatten(treedef, [out[k] for k in flat_params]), sorted(missing)
