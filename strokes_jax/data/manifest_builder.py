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


class TooManyBadRecords(ValueError):
    pass


@dataclasses.dataclass(eq=False)
class ManifestConfig(tfds.core.BuilderConfig):
    """`name` identifies the data on disk. The manifests' contents (by hash) and the limits
    are saved with the data; opening the name again with others raises."""

    manifest: str = ""
    eval_manifest: str = ""  # optional second manifest, written as the "eval" split
    max_bad_fraction: float = 0.01  # of a manifest's non-blank lines
    min_side: int = 64  # pixels, the shorter side of every image
    max_text_chars: int = 2000  # per text field
    max_steps: int = 8

    def limits(self) -> jsonl.Limits:
        return jsonl.Limits(min_side=self.min_side, max_text_chars=self.max_text_chars,
                            max_steps=self.max_steps)

    def manifests(self) -> dict[str, str]:
        return {"train": self.manifest, **({"eval": self.eval_manifest} if self.eval_manifest else {})}

    def params(self) -> dict:
        # Hashes rather than paths: moving a manifest is harmless, editing it is not. Images
        # are not hashed (that would read the whole data set); edit them under a new name.
        return {"manifests": {s: _sha256(p) for s, p in self.manifests().items()},
                "max_bad_fraction": float(self.max_bad_fraction), "min_side": self.min_side,
                "max_text_chars": self.max_text_chars, "max_steps": self.max_steps}


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


class ManifestEpisodes(tfds.core.GeneratorBasedBuilder):
    """Real-data episodes from a JSONL manifest and its images, one record each."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Episode.to_bytes records (SJEP1 or SJEP2) with id, tag and kind."}
    BUILDER_CONFIGS = [ManifestConfig(name="default")]
    # Manifest order on disk (keys are line numbers); the pipeline shuffles at read time.
    DISABLE_SHUFFLING = True
    code_path = epath.Path(__file__)  # see ShapesEpisodes.code_path
    progress = True

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "record": tfds.features.Tensor(shape=(), dtype=np.object_),
                "id": tfds.features.Text(),
                "tag": tfds.features.Text(),
                "kind": tfds.features.Text(),
            }),
            disable_shuffling=self.DISABLE_SHUFFLING,
            metadata=tfds.core.MetadataDict(
                generation=cfg.params() if cfg.manifest else {},
                sources={s: os.path.abspath(p) for s, p in cfg.manifests().items()} if cfg.manifest else {}),
            description=__doc__,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # the images are local files
        seen: set[str] = set()
        return {split: self._generate_examples(split, path, seen)
                for split, path in self.builder_config.manifests().items()}

    def _generate_examples(self, split: str, path: str, seen: set[str]):
        cfg = self.builder_config
        total = jsonl.count_records(path)
        allowed = int(round(cfg.max_bad_fraction * total, 6))  # 0.29 * 100 is 28.999...
        skipped, written = [], 0
        bar = tqdm(total=total, desc=f"{cfg.name} {split}", unit="rec", disable=not self.progress)
        with bar:
            for line, e in jsonl.iter_manifest(path, cfg.limits(), seen):
                bar.update()
                if isinstance(e, jsonl.ManifestError):
                    skipped.append(e)
                    if len(skipped) > allowed:
                        raise TooManyBadRecords(
                            f"{path}: more than {allowed} of {total} records bad (max_bad_fraction "
                            f"{cfg.max_bad_fraction}); stopped at {e}")
                    continue
                yield line, {"record": e.to_bytes(), "id": e.id, "tag": e.tag, "kind": e.kind}
                written += 1
        if not written:
            raise TooManyBadRecords(f"{path}: no usable records ({total} non-blank lines)")
        # Inside download_and_prepare, `data_dir` is TFDS's temporary folder, renamed into
        # place only when every split succeeded: the skip list is published with the data.
        with open(os.path.join(self.data_dir, SKIPPED), "a") as f:
            for s in skipped:
                f.write(json.dumps({"split": split, "file": s.path, "line": s.line,
                                    "reason": s.reason, "message": str(s)}) + "\n")


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
    b = builder(data_dir, config)
    b.progress = progress
    sb.prepare(b)  # also quiets TFDS's notices for a config made in code (shapes_builder)
    return summary(b)


def summary(b: ManifestEpisodes) -> BuildSummary:
    """Counts of a written directory, read back from its split info and skipped.jsonl."""
    path = os.path.join(b.data_dir, SKIPPED)
    skipped, reasons = collections.Counter(), collections.Counter()
    if os.path.exists(path):
        with open(path) as f:
            for row in map(json.loads, f):
                skipped[row["split"]] += 1
                reasons[row["reason"]] += 1
    written = {s: b.info.splits[s].num_examples for s in b.builder_config.manifests()}
    return BuildSummary(b.data_dir, written, dict(skipped), dict(reasons), path)


def data_source(data_dir: str | os.PathLike, config: ManifestConfig, split: str):
    """Random-access source over a written split, items {"record", "id", "tag", "kind"};
    `pipeline.decode_item` turns an item into an Episode. Raises if the split is not built."""
    return builder(data_dir, config).as_data_source(split=split)
