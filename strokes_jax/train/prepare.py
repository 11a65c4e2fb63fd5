"""Building the data a config trains on, once, and handing back its train and eval sources:
the shapes world's episodes, the same episodes exported as pictures (PNG files and a JSONL
manifest at world.image_size, read back through the manifest source), or the user's own
manifest, parquet or webdataset files. With world.latents='ae' and data.precompute_latents,
every image is then encoded once by the autoencoder (data/latents.py).
"""

from __future__ import annotations

import os
import time

import jax
import tensorflow_datasets as tfds

from strokes_jax.configs import schema
from strokes_jax.data import shapes_builder


def data_config(config) -> shapes_builder.ShapesConfig:
    """The shapes episodes a config trains on. Episodes are made to fit data.seq_len as the
    world's tokenizer counts them; for pictures, at the canvas patch that gives the same
    tokens per image (a 96-pixel picture in 16-pixel tokens is a 36 canvas in 6-pixel ones)."""
    d, w = config.data, config.world
    mix = dict(d.mix)
    tag = "_".join(f"{k}{v:g}" for k, v in sorted(mix.items()))
    patch = int(w["patch"])
    hard = int(d.get("hard_max_objects", 0))
    if d.source == "pictures":
        from strokes_jax.worlds import shapes
        per_side = int(w["image_size"]) // patch
        if shapes.CANVAS % per_side:
            raise schema.ConfigKeyError(f"config key world.patch: {per_side} tokens per side do "
                                        f"not tile the {shapes.CANVAS}-pixel shapes canvas")
        patch = shapes.CANVAS // per_side
    text = w["tokenizer"]
    suffix = text
    if text not in ("", "bpe"):  # a tokenizer.json: episodes fit as it counts, named by hash
        from strokes_jax.data import manifest_builder
        if not os.path.exists(text):
            raise FileNotFoundError(f"config key world.tokenizer: {text} not found")
        suffix = "tok" + manifest_builder.file_sha256(text)[:10]
        text = os.path.abspath(text)
    if hard:
        _check_hard_fits(d, patch, text, hard)
    return shapes_builder.ShapesConfig(
        name=(f"s{d.seed}_n{d.num_train}_{d.num_eval}_L{d.seq_len}_p{patch}_{tag}"
              + (f"_h{hard}" if hard else "") + (f"_{suffix}" if suffix else "")).replace(".", "p"),
        seed=d.seed, num_train=d.num_train, num_eval=d.num_eval, mix=mix, max_tokens=d.seq_len,
        patch=patch, tokenizer=text, hard_max_objects=hard)


def _check_hard_fits(d, patch: int, text: str, hard: int) -> None:
    """Before any data is written: do the first hard prompts' episodes fit data.seq_len? (The
    builder checks every episode; this fails in a second instead of part way through.)"""
    from strokes_jax.episodes import mixer
    fits = shapes_builder.fits_within(d.seq_len, patch, text)
    try:
        for _ in mixer.generate_episodes(d.seed, 8 * 7, {"additive": 1.0}, fits=fits,
                                         hard_max_objects=hard):
            pass
    except mixer.HardPromptTooLong as e:
        raise schema.ConfigKeyError(str(e)) from None


def data_dir(config, workdir: str) -> str:
    return config.data.data_dir or os.path.join(workdir, "data")


def _prepare_manifest(config, workdir: str, need_eval: bool):
    """data.source='manifest': write the user's episodes (once) and return the sources (None
    when there is no eval manifest and `need_eval` is False: `build-data` alone)."""
    from strokes_jax.data import manifest_builder
    m = config.data.manifest
    if need_eval and not m.eval_path:
        raise schema.ConfigKeyError("config key data.manifest.eval_path: training needs a held-out "
                                    "manifest for the eval loss (build-data alone does not)")
    mcfg = manifest_builder.ManifestConfig(
        name=m.name or os.path.splitext(os.path.basename(m.path))[0], manifest=m.path,
        eval_manifest=m.eval_path, max_bad_fraction=m.max_bad_fraction, min_side=m.min_side,
        max_text_chars=m.max_text_chars, max_steps=m.max_steps)
    ddir = data_dir(config, workdir)
    summary = manifest_builder.build(ddir, mcfg, progress=jax.process_index() == 0)
    if jax.process_index() == 0:
        print(f"data: {summary}", flush=True)
    if not m.eval_path:
        return None, mcfg.name
    return (manifest_builder.data_source(ddir, mcfg, "train"),
            manifest_builder.data_source(ddir, mcfg, "eval")), mcfg.name


def _prepare_t2i(config, workdir: str, need_eval: bool):
    """data.source='parquet' or 'webdataset': as `_prepare_manifest`, from those files."""
    from strokes_jax.data import t2i_builders
    from strokes_jax.episodes import sources
    src, d = config.data.source, config.data[config.data.source]
    limits = dict(max_bad_fraction=d.max_bad_fraction, min_side=d.min_side, max_text_chars=d.max_text_chars)
    if src == "parquet":
        keys = {"train": "data.parquet.path", "eval": "data.parquet.eval_path"}
        cfg = t2i_builders.ParquetConfig(name=d.name or t2i_builders.default_name(d.path), path=d.path,
                                         eval_path=d.eval_path, image_column=d.image_column,
                                         caption_column=d.caption_column, **limits)
    else:
        keys = {"train": "data.webdataset.pattern", "eval": "data.webdataset.eval_pattern"}
        cfg = t2i_builders.WebDatasetConfig(name=d.name or t2i_builders.default_name(d.pattern),
                                            pattern=d.pattern, eval_pattern=d.eval_pattern,
                                            max_steps=d.max_steps, **limits)
    if need_eval and "eval" not in cfg.inputs():
        raise schema.ConfigKeyError(f"config key {keys['eval']}: training needs held-out data for the "
                                    "eval loss (build-data alone does not)")
    for split, spec in cfg.inputs().items():
        try:
            cfg.files(spec)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"config key {keys[split]}: {e}") from None
    ddir = data_dir(config, workdir)
    try:
        summary = t2i_builders.build(ddir, cfg, progress=jax.process_index() == 0)
    except sources.ColumnError as e:
        raise schema.ConfigKeyError(f"config key data.parquet.{e.key}: {e}") from None
    if jax.process_index() == 0:
        print(f"data: {summary}", flush=True)
    if "eval" not in cfg.inputs():
        return None, cfg.name
    return (t2i_builders.data_source(ddir, cfg, "train"),
            t2i_builders.data_source(ddir, cfg, "eval")), cfg.name


def prepare_data(config, workdir: str, need_eval: bool = True):
    """Build the episodes (once) and return the train and eval sources: the shapes world's,
    its pictures (data.source='pictures'), or with data.source='manifest' / 'parquet' /
    'webdataset' the user's own (`need_eval` False allows data without an eval split, for
    `build-data`). With precomputed AE latents the sources also carry them."""
    src = config.data.source
    w = config.world
    if (w["latents"] == "ae" and w["name"] == "shapes" and src in ("shapes", "pictures")
            and not os.path.exists(os.path.join(w["ae_path"], "conversion.json"))):
        _ensure_ae(config)
    if src == "manifest":
        sources, name = _prepare_manifest(config, workdir, need_eval)
    elif src in ("parquet", "webdataset"):
        sources, name = _prepare_t2i(config, workdir, need_eval)
    elif src == "pictures":
        sources, name = _prepare_pictures(config, workdir)
    else:
        sources, name = _prepare_shapes(config, workdir), data_config(config).name
    if sources is None or config.world["latents"] != "ae" or not config.data.precompute_latents:
        return sources
    return _with_latents(config, workdir, sources, name)


def _ensure_ae(config) -> None:
    """The shapes world trains its own autoencoder on its pictures (once, into world.ae_path);
    a user's data needs a trained or converted one there already."""
    from strokes_jax.train import autoencoder
    report = autoencoder.train_ae(config, config.world["ae_path"],
                                  progress=jax.process_index() == 0)
    print(f"autoencoder: {autoencoder.summary(report)}", flush=True)


def _prepare_shapes(config, workdir: str):
    dcfg, ddir = data_config(config), data_dir(config, workdir)
    tfds.disable_progress_bar()
    t0 = time.time()
    found = shapes_builder.builder(ddir, dcfg).is_prepared()
    if jax.process_count() == 1:
        shapes_builder.build(ddir, dcfg)
    else:  # process 0 writes; the others then find it (shared storage) or write their own copy
        from jax.experimental import multihost_utils
        if jax.process_index() == 0:
            shapes_builder.build(ddir, dcfg)
        multihost_utils.sync_global_devices("strokes_jax: data written by process 0")
        if jax.process_index() > 0:
            shapes_builder.build(ddir, dcfg)
        multihost_utils.sync_global_devices("strokes_jax: data ready on every process")
    if jax.process_index() == 0:
        print(f"data: {dcfg.num_train} train + {dcfg.num_eval} eval episodes "
              f"{'found' if found else 'written'} in {ddir} ({time.time() - t0:.0f}s)", flush=True)
    return (shapes_builder.data_source(ddir, dcfg, "train"),
            shapes_builder.data_source(ddir, dcfg, "eval"))


def _prepare_pictures(config, workdir: str):
    """data.source='pictures': the shapes episodes with every image a world.image_size
    picture (worlds/pictures.py), written as PNG files and a JSONL manifest per split (once),
    then built exactly as a user's manifest is. Single-process: the export is small."""
    from strokes_jax.data import manifest_builder
    from strokes_jax.episodes import jsonl
    from strokes_jax.worlds import pictures
    size = int(config.world["image_size"])
    shapes_src = _prepare_shapes(config, workdir)
    name = f"{data_config(config).name}_px{size}"
    root = os.path.join(data_dir(config, workdir), "pictures", name)
    paths = {}
    for split, src in zip(("train", "eval"), shapes_src):
        folder = os.path.join(root, split)
        paths[split] = os.path.join(folder, "manifest.jsonl")
        if os.path.exists(os.path.join(folder, "done")):
            continue
        from strokes_jax.data import pipeline
        eps = (pictures.episode_as_pictures(pipeline.decode_item(src[i], f"#{i}"), size)
               for i in range(len(src)))
        jsonl.write_manifest(eps, folder)
        open(os.path.join(folder, "done"), "w").close()
    m = config.data.manifest
    mcfg = manifest_builder.ManifestConfig(
        name=name, manifest=paths["train"], eval_manifest=paths["eval"], max_bad_fraction=0.0,
        min_side=size, max_text_chars=m.max_text_chars, max_steps=m.max_steps)
    ddir = data_dir(config, workdir)
    summary = manifest_builder.build(ddir, mcfg, progress=jax.process_index() == 0)
    print(f"data: pictures {summary}", flush=True)
    return ((manifest_builder.data_source(ddir, mcfg, "train"),
             manifest_builder.data_source(ddir, mcfg, "eval")), name)


def _with_latents(config, workdir: str, sources, name: str):
    """Each split's latents, encoded once by the world's autoencoder (data/latents.py)."""
    from strokes_jax.data import latents
    from strokes_jax.train import inputs
    if config.data.extra_sources:
        raise schema.ConfigKeyError("config key data.extra_sources: precomputed latents cover "
                                    "the main split only; set data.precompute_latents=False")
    codec = inputs.image_codec(config)
    folder = latents.latents_dir(data_dir(config, workdir), name, codec)
    out = []
    for split, src in zip(("train", "eval"), sources):
        path = os.path.join(folder, f"{split}.array_record")
        t0 = time.time()
        n = latents.precompute(src, codec, path, progress=jax.process_index() == 0)
        print(f"data: {split} latents of {n} episodes in {path} ({time.time() - t0:.0f}s)",
              flush=True)
        out.append(latents.WithLatents(src, path))
    return tuple(out)
