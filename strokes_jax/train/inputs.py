"""What a config's world feeds the model: the text tokenizer (world.tokenizer), the image
codec (world.latents, model/codec.py) and the episode tokenizer built from both."""

from __future__ import annotations

import os

from strokes_jax.configs import schema
from strokes_jax.sequence import tokenizer as tk

# 'shapes': the embedded world and its own text; 'bagel': BAGEL's Qwen2 text and FLUX latents
# (converted weights), on the user's data or the shapes world's pictures.
WORLDS = ("shapes", "bagel")


def episode_tokenizer(config) -> tk.EpisodeTokenizer:
    w = config.world
    if w["name"] not in WORLDS:
        raise ValueError(f"config key world.name: unknown world {w['name']!r} "
                         f"(one of {', '.join(WORLDS)})")
    if w["name"] == "bagel" and (w["latents"] != "ae" or w["tokenizer"] in ("", "bpe")):
        raise schema.ConfigKeyError("config key world.name: the 'bagel' world reads a Qwen2 "
                                    "tokenizer.json (world.tokenizer) and FLUX latents "
                                    "(world.latents='ae')")
    return tk.EpisodeTokenizer(text_tokenizer(config), (w["image_size"], w["image_size"], 3),
                               w["patch"], codec=image_codec(config), **vit_packing(config))


def resize_rules(config):
    """(VAE-path rules, ViT-path rules) when world.resize, else (None, None)."""
    from strokes_jax.sequence import images
    w = config.world
    if not w["resize"]:
        return None, None
    vae = images.ImageRules(int(w["image_size"]), int(w["min_image_size"]), int(w["patch"]))
    vit = None
    if config.data.vit_copies:
        patch = int(config.model.vision["patch"])
        vit = images.ImageRules(int(w["vit_max_image_size"]) or int(w["image_size"]) // patch * patch,
                                int(w["vit_min_image_size"]), patch)
    return vae, vit


def text_tokenizer(config):
    """world.tokenizer: '' the shapes world's word-level vocabulary, 'bpe' a Qwen2-style BPE
    trained on the world's text, else a Qwen2 tokenizer.json (sequence/qwen.py)."""
    from strokes_jax.sequence import qwen
    spec = config.world["tokenizer"]
    if not spec:
        return tk.Tokenizer.shapes()
    if spec == "bpe":
        return qwen.shapes_bpe()
    if not os.path.exists(spec):
        raise FileNotFoundError(f"config key world.tokenizer: {spec} not found")
    return qwen.QwenTokenizer.from_file(spec, model_vocab=config.model.vocab_size or None)


def image_codec(config):
    """world.latents: pixel patches, or the FLUX autoencoder saved at world.ae_path."""
    from strokes_jax.model import codec
    w = config.world
    shape = (int(w["image_size"]), int(w["image_size"]), 3)
    rules = resize_rules(config)[0]
    if w["latents"] == "pixels":
        return codec.PixelCodec(shape, int(w["patch"]), rules)
    cfg, params = load_autoencoder(w["ae_path"])
    return codec.AECodec(cfg, params, shape, precomputed=bool(config.data.precompute_latents),
                         rules=rules)


def load_autoencoder(path: str):
    """(AEConfig, params) from a `train-ae` folder or a `convert bagel` / `convert flux-ae`
    output folder (its 'vae' part and the AE config it was converted under)."""
    import dataclasses
    from strokes_jax import files
    from strokes_jax.model import vae
    if not path:
        raise schema.ConfigKeyError("config key world.ae_path: world.latents='ae' needs an "
                                    "autoencoder (a `train-ae` or `convert` output folder)")
    meta = files.read_json(os.path.join(path, "conversion.json"))
    if meta is None:
        from strokes_jax.train import autoencoder
        if not os.path.exists(path):
            raise FileNotFoundError(f"config key world.ae_path: {path} not found")
        return autoencoder.load_ae(path)
    # `convert bagel` records the AE config as 'vae', `convert flux-ae` as its 'config'.
    ae = meta.get("vae") or (meta.get("config") if meta.get("kind") == "flux-ae" else None)
    if not ae:
        raise schema.ConfigKeyError(f"config key world.ae_path: {path} is a "
                                    f"{meta.get('kind', '?')} conversion without an autoencoder")
    from strokes_jax.convert import output
    known = {f.name for f in dataclasses.fields(vae.AEConfig)}
    cfg = vae.AEConfig(**{k: tuple(v) if isinstance(v, list) else v
                          for k, v in ae.items() if k in known})
    return cfg, output.load_part(path, "vae")


def resolve_paths(config, workdir: str) -> None:
    """Paths a config leaves unset. With world.latents='ae' and no world.ae_path: the
    conversion that train.init_converted names (BAGEL's ae.safetensors is in it), else
    <workdir>/ae (where the shapes world trains its own). The 'bagel' world with no
    world.tokenizer reads the tokenizer.json `convert bagel` copied next to the weights."""
    from strokes_jax.train import init_weights
    w, conv = config.world, init_weights.converted_paths(config.train.init_converted)
    if w["latents"] == "ae" and not w["ae_path"]:
        w["ae_path"] = (conv and (init_weights.holding(conv, "vae") or conv[0])
                        or os.path.join(workdir, "ae"))
    if w["name"] == "bagel" and not w["tokenizer"] and conv:
        found = [c for c in conv if os.path.isfile(os.path.join(c, "tokenizer.json"))]
        w["tokenizer"] = os.path.join((found or conv)[0], "tokenizer.json")


def vit_packing(config) -> dict:
    """data.vit_copies: pack a ViT copy of every image (sequence/tokenizer.py). Its patch size and
    position table come from model.vision, so data and model cannot disagree."""
    if not config.data.vit_copies:
        return {}
    vision = config.model.vision
    if not vision:
        raise ValueError("config key data.vit_copies needs model.vision (the ViT to read them)")
    return dict(vit_patch=int(vision["patch"]), vit_max_side=int(vision["max_side"]),
                vit_rules=resize_rules(config)[1])


def world_episode(etok, episode):
    """A shapes-canvas episode (the inspection probe's, the checker's re-renders) as the
    world's tokenizer reads it: pictures at its image size, with latents attached when the
    rows take precomputed ones. Episodes already at the world's size pass unchanged."""
    from strokes_jax.worlds import pictures
    out = pictures.episode_as_pictures(episode, etok.image_shape[0])
    if etok.latent_input:
        out.latents = [etok.codec.encode(etok.codec.prepare(im)[None])[0] for im in out.images()]
    return out
