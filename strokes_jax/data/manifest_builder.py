"""TFDS builder that writes real-data episodes from a JSONL manifest to ArrayRecord.

The manifest format is `episodes/jsonl.py`'s (docs/data_format.md). Each example holds one
`Episode.to_bytes()` record, so `pipeline.decode_item` reads it like a shapes record, plus
`id`, `tag` and `kind` as text. The train split comes from `ManifestConfig.manifest`; an
eval split is written only when `eval_manifest` names a second manifest (a held-out set is
the user's choice of images, not a random fraction of them). Ids are unique across both.

Bad lines (malformed JSON or fields, a missing, corrupt or too-small image, over-long text,
a repeated id) are skipped, never silently: each is named `file:line: ...`, counted by
reason and written to `skipped.jsonl` in the version folder next to the ArrayRecord files.
More than `max_bad_fraction` of a manifest's records bad stops the build with one line
naming the file, and nothing is written.

    cfg = ManifestConfig(name="my_photos", manifest="data/train.jsonl", min_side=256)
    summary = build(data_dir, cfg)          # writes once; reuses a directory already written
    print(summary)                          # written / skipped counts, by reason
    src = data_source(data_dir, cfg, "train")
    episode = pipeline.decode_item(src[0])

`RecordsConfig` and `EpisodeRecords` are what every file-backed episode builder shares (the
features, the saved input hashes and limits, the bounded skips); `t2i_builders` builds parquet
and webdataset sources on them.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tqdm import tqdm

from strokes_jax.data import shapes_builder as sb
from strokes_jax.episodes import jsonl

SKIPPED = "skipped.jsonl"


class TooManyBadRecords(jsonl.DataError):
    pass


@dataclasses.dataclass(eq=False)
class RecordsConfig(tfds.core.BuilderConfig):
    """The limits every file-backed source shares. Subclasses name their inputs: `inputs()`
    maps each split to what the user gave (a path or a pattern), `files()` expands one."""

    max_bad_fraction: float = 0.01  # of a split's records
    min_side: int = 64  # pixels, the shorter side of every image
    max_text_chars: int = 2000  # per text field
    max_steps: int = 8

    def limits(self) -> jsonl.Limits:
        return jsonl.Limits(min_side=self.min_side, max_text_chars=self.max_text_chars,
                            max_steps=self.max_steps)

    def inputs(self) -> dict[str, str]:
        raise NotImplementedError

    def files(self, spec: str) -> list[str]:
        return [spec]

    def _limit_params(self) -> dict:
        return {"max_bad_fraction": float(self.max_bad_fraction), "min_side": self.min_side,
                "max_text_chars": self.max_text_chars, "max_steps": self.max_steps}


@dataclasses.dataclass(eq=False)
class ManifestConfig(RecordsConfig):
    """`name` identifies the data on disk. The manifests' contents (by hash) and the limits
    are saved with the data; opening the name again with others raises."""

    manifest: str = ""
    eval_manifest: str = ""  # optional second manifest, written as the "eval" split

    def manifests(self) -> dict[str, str]:
        return {"train": self.manifest, **({"eval": self.eval_manifest} if self.eval_manifest else {})}

    def inputs(self) -> dict[str, str]:
        return self.manifests() if self.manifest else {}

    def params(self) -> dict:
        # Hashes rather than paths: moving a manifest is harmless, editing it is not. Images
        # are not hashed (that would read the whole data set); edit them under a new name.
        return {"manifests": {s: file_sha256(p) for s, p in self.manifests().items()},
                **self._limit_params()}


_HASHES: dict[tuple, str] = {}


def file_sha256(path: str) -> str:
    """A file's sha256, remembered per (path, size, mtime) for this process: a builder asks
    for its params several times per open, and parquet or tar inputs can be large."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


@dataclasses.dataclass
class BuildSummary:
    data_dir: str  # the version folder holding the ArrayRecord files and skipped.jsonl
    written: dict[str, int]  # split -> records written
    skipped: dict[str, int]  # split -> records skipped
    reasons: dict[str, int]  # reason -> records skipped, over all splits
    skipped_path: str

    def __str__(self) -> str:
        splits = ", ".join(f"{s} {n} written, {self.skipped.get(s, 0)} skipped"
                           for s, n in self.written.items())
        why = ", ".join(f"{r} {n}" for r, n in sorted(self.reasons.items()))
        return f"{self.data_dir}: {splits}" + (f" ({why}; see {self.skipped_path})" if why else "")


class EpisodeRecords(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """One `Episode.to_bytes()` record per usable input record, with id, tag and kind; the
    skips counted, bounded and listed. Subclasses give `_records`."""

    # Input order on disk (keys count up); the pipeline shuffles at read time.
    DISABLE_SHUFFLING = True
    RECORDS_ARE = "records"  # what a split's records are called in the no-usable-record error
    progress = True

    def _records(self, spec: str, seen: set[str]):
        """-> (records in `spec`, iterator of (position, Episode | ManifestError))."""
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        inputs = cfg.inputs()  # empty for the registered "default" config: nothing to hash
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "record": tfds.features.Tensor(shape=(), dtype=np.object_),
                "id": tfds.features.Text(),
                "tag": tfds.features.Text(),
                "kind": tfds.features.Text(),
            }),
            disable_shuffling=self.DISABLE_SHUFFLING,
            metadata=tfds.core.MetadataDict(
                generation=cfg.params() if inputs else {},
                sources={s: [os.path.abspath(p) for p in cfg.files(spec)] for s, spec in inputs.items()}),
            description=type(self).__doc__,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # the inputs are local files
        seen: set[str] = set()  # ids are unique across the splits
        return {split: self._generate_examples(split, spec, seen)
                for split, spec in self.builder_config.inputs().items()}

    def _generate_examples(self, split: str, spec: str, seen: set[str]):
        cfg = self.builder_config
        total, records = self._records(spec, seen)
        allowed = int(round(cfg.max_bad_fraction * total, 6))  # 0.29 * 100 is 28.999...
        skipped, written = [], 0
        bar = tqdm(total=total, desc=f"{cfg.name} {split}", unit="rec", disable=not self.progress)
        with bar:
            for n, (_, e) in enumerate(records):
                bar.update()
                if isinstance(e, jsonl.ManifestError):
                    skipped.append(e)
                    if len(skipped) > allowed:
                        raise TooManyBadRecords(
                            f"{spec}: more than {allowed} of {total} records bad (max_bad_fraction "
                            f"{cfg.max_bad_fraction}); stopped at {e}")
                    continue
                yield n, {"record": e.to_bytes(), "id": e.id, "tag": e.tag, "kind": e.kind}
                written += 1
        if not written:
            raise TooManyBadRecords(f"{spec}: no usable records ({total} {self.RECORDS_ARE})")
        # Inside download_and_prepare, `data_dir` is TFDS's temporary folder, renamed into
        # place only when every split succeeded: the skip list is published with the data.
        with open(os.path.join(self.data_dir, SKIPPED), "a") as f:
            for s in skipped:
                f.write(json.dumps({"split": split, "file": s.path, s.locator: s.line,
                                    "reason": s.reason, "message": str(s)}) + "\n")


class ManifestEpisodes(EpisodeRecords):
    """Real-data episodes from a JSONL manifest and its images, one record each."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Episode.to_bytes records (SJEP1 or SJEP2) with id, tag and kind."}
    BUILDER_CONFIGS = [ManifestConfig(name="default")]
    RECORDS_ARE = "non-blank lines"
    code_path = epath.Path(__file__)  # see ShapesEpisodes.code_path

    def _records(self, spec: str, seen: set[str]):
        return jsonl.count_records(spec), jsonl.iter_manifest(spec, self.builder_config.limits(), seen)


def builder(data_dir: str | os.PathLike, config: ManifestConfig) -> ManifestEpisodes:
    if not config.manifest:
        raise ValueError(f"manifest config {config.name!r} names no manifest")
    for split, path in config.manifests().items():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{split} manifest {path!r} not found")
    b = ManifestEpisodes(config=config, data_dir=os.fspath(data_dir), file_format="array_record")
    return sb.check_params(b, config.params(), "built")


def build(data_dir: str | os.PathLike, config: ManifestConfig, progress: bool = True) -> BuildSummary:
    """Parse, check and write the splits as ArrayRecord (nothing downloaded); a directory
    already built with the same manifests and limits is reused. Raises TooManyBadRecords."""
    return prepare(builder(data_dir, config), progress)


def prepare(b: EpisodeRecords, progress: bool = True) -> BuildSummary:
    """Writes an opened builder's splits (or reuses them) and returns their counts."""
    b.progress = progress
    sb.prepare(b)  # also quiets TFDS's notices for a config made in code (shapes_builder)
    return summary(b)


def summary(b: EpisodeRecords) -> BuildSummary:
    """Counts of a written directory, read back from its split info and skipped.jsonl."""
    path = os.path.join(b.data_dir, SKIPPED)
    skipped, reasons = collections.Counter(), collections.Counter()
    if os.path.exists(path):
        with open(path) as f:
            for row in map(json.loads, f):
                skipped[row["split"]] += 1
                reasons[row["reason"]] += 1
    written = {s: b.info.splits[s].num_examples for s in b.builder_config.inputs()}
    return BuildSummary(b.data_dir, written, dict(skipped), dict(reasons), path)


def data_source(data_dir: str | os.PathLike, config: ManifestConfig, split: str):
    """Random-access source over a written split, items {"record", "id", "tag", "kind"};
    `pipeline.decode_item` turns an item into an Episode. Raises if the split is not built."""
    return builder(data_dir, config).as_data_source(split=split)
