"""TFDS builders that write text-to-image data (parquet files, webdataset tars) to ArrayRecord.

The inputs are read by `episodes/sources.py` (formats in docs/data_format.md); the builders
are the manifest one's (`manifest_builder.EpisodeRecords`): one `Episode.to_bytes()` record
per usable row or sample with `id`, `tag` and `kind`, bad ones named, counted by reason and
listed in `skipped.jsonl`, the build stopped past `max_bad_fraction` of a split's records.
`train` comes from `path` / `pattern`, `eval` only from `eval_path` / `eval_pattern`.

Unlike a manifest, these files hold the images, so the saved hashes cover them: reopening a
name hashes the files again (every byte is read once more), and another file, column or
limit under the same name raises.

    cfg = ParquetConfig(name="laion_cats", path="data/cats.parquet", min_side=256)
    summary = build(data_dir, cfg)
    src = data_source(data_dir, cfg, "train")   # items {"record", "id", "tag", "kind"}
"""

from __future__ import annotations

import dataclasses
import os
import re

import tensorflow_datasets as tfds
from etils import epath

from strokes_jax.data import manifest_builder as mb
from strokes_jax.data import shapes_builder as sb
from strokes_jax.episodes import sources


@dataclasses.dataclass(eq=False)
class ParquetConfig(mb.RecordsConfig):
    """Parquet files in BAGEL's text-to-image layout, one row per image."""

    path: str = ""  # a file, a folder of *.parquet, or a glob; several comma-separated
    eval_path: str = ""
    image_column: str = "image"
    caption_column: str = ""  # "" = "captions" if the file has it, else "caption"

    def inputs(self) -> dict[str, str]:
        return _splits(self.path, self.eval_path)

    def files(self, spec: str) -> list[str]:
        return sources.expand(spec, "parquet")

    def columns(self) -> sources.Columns:
        return sources.Columns(image=self.image_column, caption=self.caption_column)

    def params(self) -> dict:
        return {"inputs": _hashes(self), "image_column": self.image_column,
                "caption_column": self.caption_column, **self._limit_params()}


@dataclasses.dataclass(eq=False)
class WebDatasetConfig(mb.RecordsConfig):
    """Webdataset tar shards: an image and a json per sample (a caption or a whole episode)."""

    pattern: str = ""  # a shard, a folder of *.tar, or a glob; several comma-separated
    eval_pattern: str = ""

    def inputs(self) -> dict[str, str]:
        return _splits(self.pattern, self.eval_pattern)

    def files(self, spec: str) -> list[str]:
        return sources.expand(spec, "tar")

    def params(self) -> dict:
        return {"inputs": _hashes(self), **self._limit_params()}


def _splits(train: str, held_out: str) -> dict[str, str]:
    return {"train": train, **({"eval": held_out} if held_out else {})} if train else {}


def _hashes(cfg: mb.RecordsConfig) -> dict[str, list[str]]:
    return {s: [mb.file_sha256(p) for p in cfg.files(spec)] for s, spec in cfg.inputs().items()}


class ParquetEpisodes(mb.EpisodeRecords):
    """One-step text-to-image episodes from parquet rows."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Single-pass Episode.to_bytes records with id, tag and kind."}
    BUILDER_CONFIGS = [ParquetConfig(name="default")]
    RECORDS_ARE = "rows"
    code_path = epath.Path(__file__)  # see ShapesEpisodes.code_path

    def _records(self, spec: str, seen: set[str]):
        cfg = self.builder_config
        files = cfg.files(spec)
        rows = (r for f in files for r in sources.iter_parquet(f, cfg.columns(), cfg.limits(), seen))
        return sum(map(sources.count_rows, files)), rows


class WebDatasetEpisodes(mb.EpisodeRecords):
    """Episodes from webdataset samples: captioned images, or whole episodes as json."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Episode.to_bytes records (SJEP1 or SJEP2) with id, tag and kind."}
    BUILDER_CONFIGS = [WebDatasetConfig(name="default")]
    RECORDS_ARE = "samples"
    code_path = epath.Path(__file__)

    def _records(self, spec: str, seen: set[str]):
        cfg = self.builder_config
        files = cfg.files(spec)
        samples = (r for f in files for r in sources.iter_tar(f, cfg.limits(), seen))
        return sum(map(sources.count_samples, files)), samples


_BUILDERS = {ParquetConfig: ParquetEpisodes, WebDatasetConfig: WebDatasetEpisodes}


def builder(data_dir: str | os.PathLike, config: ParquetConfig | WebDatasetConfig) -> mb.EpisodeRecords:
    """Opens (not builds) the data; raises FileNotFoundError naming an input that matches no
    file, sources.ColumnError naming a parquet column a file lacks."""
    if not config.inputs():
        raise ValueError(f"{type(config).__name__} {config.name!r} names no input")
    for split, spec in config.inputs().items():
        try:
            files = config.files(spec)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{split} input: {e}") from None
        if isinstance(config, ParquetConfig):
            for f in files:
                sources.check_columns(f, config.columns())
    b = _BUILDERS[type(config)](config=config, data_dir=os.fspath(data_dir), file_format="array_record")
    return sb.check_params(b, config.params(), "built")


def build(data_dir: str | os.PathLike, config, progress: bool = True) -> mb.BuildSummary:
    """Read, check and write the splits as ArrayRecord; a directory already built from the
    same files, columns and limits is reused. Raises manifest_builder.TooManyBadRecords."""
    return mb.prepare(builder(data_dir, config), progress)


def data_source(data_dir: str | os.PathLike, config, split: str):
    """Random-access source over a written split, as `manifest_builder.data_source`."""
    return builder(data_dir, config).as_data_source(split=split)


def default_name(spec: str) -> str:
    """A data name from the first input's file name: `shards/cats-*.tar` -> `cats-_`."""
    first = spec.split(",")[0].strip().rstrip("/")
    return re.sub(r"[^A-Za-z0-9_-]", "_", os.path.basename(first).split(".")[0]) or "data"
