"""TFDS builder that writes shapes-world episodes to ArrayRecord.

Each example holds one `Episode.to_bytes()` record (the single serialisation format; the
pipeline decodes it with `Episode.from_bytes`), plus `tag` and `kind` as text so a split
can be inspected or filtered without decoding images.

The episodes come from a generator named by `ShapesConfig.source` ("module:function",
called as `fn(seed=, num=, mix=)`), imported when the examples are generated. Naming the
callable in the config, rather than registering it somewhere, keeps the builder free of
global state and lets tests substitute a tiny hand-made generator.

    cfg = ShapesConfig(name="v1_small", seed=0, num_train=10_000, num_eval=500)
    build(data_dir, cfg)                      # writes once; a no-op when already written
    src = data_source(data_dir, cfg, "train") # random access, items: {"record", "tag", "kind"}
    episode = pipeline.decode_item(src[0])
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import logging
import os
from typing import Callable, Iterator

import numpy as np
from etils import epath
import tensorflow_datasets as tfds

from strokes_jax.episodes import episode as ep

DEFAULT_SOURCE = "strokes_jax.episodes.mixer:generate_episodes"
SPLITS = ("train", "eval")


class QuietBuilderNotices(logging.Filter):
    """Drops TFDS's notices that are expected for a builder configured in code (a custom
    config, a version folder written for the first time); any other warning passes."""

    EXPECTED = ("Using custom data configuration", "has no dataset_info.json")

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(e in msg for e in self.EXPECTED)


logging.getLogger("absl").addFilter(QuietBuilderNotices())


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    """Generation parameters. `name` identifies the config on disk; the parameters are saved
    with the data, and opening a directory written with other parameters raises."""

    seed: int = 0
    num_train: int = 1000
    num_eval: int = 100
    # Episode kind -> sampling weight, passed through to the generator unchanged.
    mix: dict[str, float] = dataclasses.field(default_factory=lambda: {"additive": 1.0})
    source: str = DEFAULT_SOURCE
    # When > 0, episodes are made to tokenize to at most this many positions (the generator
    # falls back to a shorter path of the same scene), so nothing is skipped as too long.
    max_tokens: int = 0
    patch: int = 6  # the model's patch size, which sets the tokens per image
    # How text is counted for max_tokens: "" words, "bpe" (sequence/qwen.py) or a tokenizer.json.
    tokenizer: str = ""
    hard_max_objects: int = 0  # > 0: the `hard` category joins the prompts, up to this size

    def params(self) -> dict:
        return {"seed": self.seed, "num_train": self.num_train, "num_eval": self.num_eval,
                "mix": {k: float(v) for k, v in sorted(self.mix.items())},
                "source": self.source,
                **({"hard_max_objects": self.hard_max_objects} if self.hard_max_objects else {}),
                **({"tokenizer": os.path.basename(self.tokenizer)} if self.tokenizer else {})}


def resolve_source(spec: str) -> Callable[..., Iterator[ep.Episode]]:
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"episode source {spec!r} must look like 'package.module:function'")
    fn = getattr(importlib.import_module(module), attr, None)
    if not callable(fn):
        raise ValueError(f"episode source {spec!r} is not a callable")
    return fn


def split_seed(seed: int, split: str) -> int:
    """Independent streams per split, so eval never repeats train episodes by construction
    of the seed (nearby seeds would only be as independent as the generator makes them)."""
    return int(np.random.SeedSequence([seed, SPLITS.index(split)]).generate_state(1)[0])


class ShapesEpisodes(tfds.core.GeneratorBasedBuilder):
    """Shapes-world episodes (prompt / plan / sketch / inspect / refine), one record each."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Episode.to_bytes records with tag and kind.",
                     "1.1.0": "Image-side symbolic critique sketches are context, not targets."}
    BUILDER_CONFIGS = [ShapesConfig(name="default")]
    # The pipeline shuffles globally at read time; keeping generation order on disk makes a
    # split reproducible to inspect and skips TFDS's hash-bucket shuffle at write time.
    DISABLE_SHUFFLING = True
    # TFDS 4.9.10 finds a builder's source file through `importlib_resources`, a package it
    # only requires on Python < 3.9, so on 3.11 that lookup fails unless the backport happens
    # to be installed; naming the file directly avoids the lookup.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "record": tfds.features.Tensor(shape=(), dtype=np.object_),
                "tag": tfds.features.Text(),
                "kind": tfds.features.Text(),
            }),
            disable_shuffling=self.DISABLE_SHUFFLING,
            metadata=tfds.core.MetadataDict(generation=self.builder_config.params()),
            description=__doc__,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # everything is synthesised
        cfg = self.builder_config
        return {"train": self._generate_examples("train", cfg.num_train),
                "eval": self._generate_examples("eval", cfg.num_eval)}

    def _generate_examples(self, split: str, num: int):
        cfg = self.builder_config
        fn = resolve_source(cfg.source)
        count = 0
        kwargs = {"fits": fits_within(cfg.max_tokens, cfg.patch, cfg.tokenizer)} if cfg.max_tokens else {}
        if cfg.hard_max_objects:
            kwargs["hard_max_objects"] = cfg.hard_max_objects
        for i, episode in enumerate(fn(seed=split_seed(cfg.seed, split), num=num,
                                       mix=dict(cfg.mix), **kwargs)):
            # Keys fix the on-disk order (shuffling is disabled), so they follow generation.
            yield i, {"record": episode.to_bytes(), "tag": episode.tag, "kind": episode.kind}
            count += 1
        if count != num:
            raise ValueError(f"episode source {cfg.source!r} made {count} {split} episodes, "
                             f"asked for {num}")


def fits_within(max_tokens: int, patch: int, tokenizer: str = "") -> Callable[[ep.Episode], bool]:
    from strokes_jax.sequence import qwen
    from strokes_jax.sequence import tokenizer as tk
    from strokes_jax.worlds import shapes

    if tokenizer == "bpe":
        text = qwen.shapes_bpe()
    elif tokenizer:  # a Qwen2 tokenizer.json
        text = qwen.QwenTokenizer.from_file(tokenizer)
    else:
        text = tk.Tokenizer.shapes()
    etok = tk.EpisodeTokenizer(text, (shapes.CANVAS, shapes.CANVAS, 3), patch)
    return lambda e: len(etok(e)["tokens"]) <= max_tokens


def builder(data_dir: str | os.PathLike, config: ShapesConfig) -> ShapesEpisodes:
    b = ShapesEpisodes(config=config, data_dir=os.fspath(data_dir), file_format="array_record")
    return check_params(b, config.params(), "generated")


def check_params(b: tfds.core.DatasetBuilder, params: dict, made: str) -> tfds.core.DatasetBuilder:
    """TFDS keys a directory by config name and version only: a written directory whose stored
    parameters differ from `params` would silently train on other data, so it raises."""
    stored = b.info.metadata.get("generation") if b.info.metadata is not None else None
    if b.is_prepared() and stored != params:
        raise ValueError(f"{b.data_dir} was {made} with {stored}, not {params}; "
                         f"give this config another name")
    return b


def build(data_dir: str | os.PathLike, config: ShapesConfig) -> ShapesEpisodes:
    """Generate and write both splits as ArrayRecord (no Beam, nothing downloaded)."""
    b = builder(data_dir, config)
    prepare(b)
    return b


def prepare(b: tfds.core.DatasetBuilder) -> None:
    """Writes a builder's splits as ArrayRecord, reusing a finished directory. TFDS prints
    "Downloading and preparing dataset ..." to stdout though nothing is downloaded; the
    callers report what was written instead."""
    with contextlib.redirect_stdout(io.StringIO()):
        b.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(
                download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS,
                # Nothing to checksum or download; keep TFDS from touching the network.
                register_checksums=False, try_download_gcs=False),
        )


def data_source(data_dir: str | os.PathLike, config: ShapesConfig, split: str):
    """Random-access source over a written split, items {"record", "tag", "kind"} (bytes);
    `pipeline.decode_item` turns an item into an Episode. Raises if the split is not built."""
    return builder(data_dir, config).as_data_source(split=split)
