"""Parameter counts of a model config from `jax.eval_shape` (no memory is allocated), split
the way BAGEL's "14B total, 7B active" is meant: the two experts' block weights, what they
share (embedding, lm_head), the generation heads, the ViT + connector, and the autoencoder."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from strokes_jax.model.unified import ModelConfig, UnifiedModel
from strokes_jax.model.vae import AEConfig, AutoEncoder


def _size(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def abstract_params(cfg: ModelConfig):
    """ShapeDtypeStructs of the UnifiedModel's params (ViT included when configured)."""
    b, n = 1, 8
    z = jnp.zeros((b, n), jnp.int32)
    args = dict(tokens=z, types=z, positions=z, segment_ids=jnp.ones_like(z), blocks=z,
                patch_pos=z, latents=jnp.zeros((b, n, cfg.patch_dim)), timesteps=jnp.zeros((b, n)))
    if cfg.vision is not None:
        args.update(vit_patches=jnp.zeros((b, n, cfg.vision.patch_dim)), vit_pos=z)
    init = lambda: UnifiedModel(cfg).init(jax.random.PRNGKey(0), **args)["params"]
    return nn.unbox(jax.eval_shape(init))


def abstract_vae_params(cfg: AEConfig):
    x = jnp.zeros((1, 2 * cfg.downsample, 2 * cfg.downsample, cfg.in_channels))
    return nn.unbox(jax.eval_shape(lambda: AutoEncoder(cfg).init(jax.random.PRNGKey(0), x)["params"]))


def param_counts(cfg: ModelConfig, ae_cfg: AEConfig | None = None) -> dict[str, int]:
    p = abstract_params(cfg)
    # Each decoder leaf belongs to one expert by its module name (q_und, final_norm_gen, ...),
    # in the unscanned (layer_i/...) and the scanned (layers/block/...) layout alike.
    leaves = jax.tree_util.tree_flatten_with_path(p["decoder"])[0]
    expert = lambda path, tag: any(str(getattr(k, "key", k)).endswith(tag) for k in path)
    und = sum(int(np.prod(x.shape)) for path, x in leaves if expert(path, "_und"))
    gen = sum(int(np.prod(x.shape)) for path, x in leaves if expert(path, "_gen"))
    shared = _size(p["embed"]) + _size(p["lm_head"])
    heads = sum(_size(p[k]) for k in ("vae2llm", "llm2vae", "time_embedder", "canvas2llm")
                if k in p)
    vision = _size(p.get("vision", {}))
    out = dict(expert_und=und, expert_gen=gen, shared_embed_head=shared, gen_heads=heads,
               vision=vision, language_model=und + gen + shared,
               active_text_token=und + shared, active_latent_token=gen + shared + heads,
               model_total=_size(p))
    assert out["model_total"] == und + gen + shared + heads + vision, "unclassified params"
    if ae_cfg is not None:
        out["vae"] = _size(abstract_vae_params(ae_cfg))
        out["total_with_vae"] = out["model_total"] + out["vae"]
    return out


def format_counts(counts: dict[str, int]) -> str:
    return "\n".join(f"{k:>22s}  {v:>16,d}  ({v / 1e9:.3f}B)" for k, v in counts.items())
