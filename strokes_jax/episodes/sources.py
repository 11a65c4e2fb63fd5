"""Text-to-image data as episodes: BAGEL's parquet layout and webdataset tars.

Each row or sample becomes the same typed `Episode` as a manifest line (`episodes/jsonl.py`):
a caption and its image make a one-step single-pass episode (the caption is the prompt, the
image the step's sketch, with no plan and no inspection), as in BAGEL's text-to-image data.

**Parquet** (BAGEL's `data/t2i_dataset.py` layout): one row per image. The image column holds
the encoded file's bytes, or a struct with a `bytes` field (Hugging Face's image feature). The
caption column holds plain text, a list of captions, or BAGEL's `captions`: a JSON object
string of named captions. The first non-empty caption is the prompt; when there are several,
all are kept in the episode's metadata. By default the caption column is `captions` (BAGEL's),
else `caption`. Rows are read in small batches, so a file need not fit in memory.

**Webdataset tars**: members grouped into samples by key as webdataset groups them (the path
up to the first dot of the file name: `0001.jpg`, `0001.json`). The sample's `json` holds
either a caption (`caption` or `captions`, as the parquet column) beside one image member, or
a whole manifest episode (it has `steps`) whose image paths name members of the same sample
(`0001.0.png`, or just `0.png`).

Every error is one line naming the file and the row (counted from 0) or sample key:
`train.parquet:row 3: image is not a readable image (...)`, `shard-0.tar:0002: no 0002.json
member (...)`, with a `reason` from `jsonl.REASONS` for counting.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import tarfile
from typing import Any, Iterator

from strokes_jax.episodes import episode as ep
from strokes_jax.episodes import jsonl

# Extensions Pillow reads that webdataset writers use for a sample's image.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
CAPTION_KEYS = ("caption", "captions")  # in a sample's json, the first present is used
BATCH_ROWS = 32  # parquet rows decoded at a time: bounds memory by 32 encoded images


class RecordError(jsonl.ManifestError):
    """One unusable row (`locator` "row") or tar sample (`locator` "key")."""

    def __init__(self, path: str, locator: str, at: int | str, reason: str, message: str):
        super().__init__(path, f"row {at}" if locator == "row" else at, reason, message)
        self.line, self.locator = at, locator


class ColumnError(ValueError):
    """A parquet file lacks a named column; `key` is the Columns field that named it."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


# -- shared ---------------------------------------------------------------------------------
def expand(spec: str, ext: str) -> list[str]:
    """Comma-separated files, folders (their `*.ext` files) or globs -> sorted file paths per
    item, in the order given. Raises FileNotFoundError naming an item that matches nothing."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if os.path.isdir(item):
            found = sorted(glob.glob(os.path.join(glob.escape(item), f"*.{ext}")))
        elif glob.has_magic(item):
            found = sorted(p for p in glob.glob(item) if os.path.isfile(p))
        else:
            found = [item] if os.path.isfile(item) else []
        if not found:
            raise FileNotFoundError(f"{item!r} matches no file")
        out += found
    if not out:
        raise FileNotFoundError(f"{spec!r} names no file")
    return out


def captions(value: Any, what: str = "caption") -> tuple[str, list[str]]:
    """A caption cell or json field -> (prompt, every caption): plain text, a list, an object
    of named captions, or a JSON string of either (BAGEL's `captions`). Raises BadRecord."""
    if isinstance(value, bytes):
        try:
            value = value.decode()
        except UnicodeDecodeError as e:
            raise jsonl.BadRecord("malformed", f"{what} is not UTF-8 ({e})") from None
    if isinstance(value, str) and value.lstrip()[:1] in ("{", "["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            if value.lstrip()[:1] == "{":  # BAGEL's layout: a broken object is not a caption
                raise jsonl.BadRecord("malformed", f"{what} is not a valid JSON object") from None
    if isinstance(value, str):
        value = [value]
    elif isinstance(value, dict):
        value = list(value.values())
    if not isinstance(value, (list, tuple)) or not all(isinstance(c, str) for c in value):
        raise jsonl.BadRecord("malformed", f"{what} must be text, a list of texts or an object of "
                                           f"texts, not {_short(value)}")
    caps = [c.strip() for c in value if c.strip()]
    if not caps:
        raise jsonl.BadRecord("invalid", f"{what} is empty")
    return caps[0], caps


def one_step(eid: str, caption: Any, image: bytes, metadata: dict, limits: jsonl.Limits,
             what: str = "image", caption_what: str = "caption") -> ep.Episode:
    """A caption and an encoded image -> a validated single-pass episode. Raises BadRecord."""
    prompt, caps = captions(caption, caption_what)
    jsonl.check_text(prompt, caption_what, limits)
    try:
        img = jsonl.decode_image(image)
    except ValueError as e:
        raise jsonl.BadRecord("corrupt_image", f"{what} is not a readable image ({e})") from None
    jsonl.check_size(img, what, limits)
    if len(caps) > 1:
        metadata = {**metadata, "captions": caps}
    e = ep.Episode(id=eid, prompt=prompt, tag="", metadata=metadata, steps=[ep.Step(sketch=img)],
                   kind="single_pass")
    try:
        return e.validate(None, max_steps=limits.max_steps)
    except ep.EpisodeError as err:
        raise jsonl.BadRecord("invalid", str(err)) from None


def _short(value: Any) -> str:
    s = repr(value)
    return s if len(s) <= 40 else s[:37] + "..."


def _stem(path: str) -> str:
    return os.path.basename(path).split(".", 1)[0]


def _dedupe(items, seen: set[str]):
    """(at, Episode | RecordError, path, locator) -> the same with a repeated id as an error."""
    first: dict[str, Any] = {}
    for at, e, path, locator in items:
        if isinstance(e, ep.Episode):
            if e.id in seen:
                before = f" (first at {first[e.id]})" if e.id in first else ""
                e = RecordError(path, locator, at, "duplicate_id", f"id {e.id!r} already used{before}")
            else:
                seen.add(e.id)
                first[e.id] = f"row {at}" if locator == "row" else at
        yield at, e


# -- parquet --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Columns:
    image: str = "image"
    caption: str = ""  # "" = "captions" (BAGEL's JSON object of captions), else "caption"


def _columns(schema, columns: Columns, path: str) -> tuple[str, str]:
    names = list(schema.names)
    have = ", ".join(names)
    if columns.image not in names:
        raise ColumnError("image_column", f"{path} has no column {columns.image!r} (its columns: {have})")
    caption = columns.caption or next((c for c in ("captions", "caption") if c in names), "")
    if not caption or caption not in names:
        wanted = repr(columns.caption) if columns.caption else "'captions' or 'caption'"
        raise ColumnError("caption_column", f"{path} has no column {wanted} (its columns: {have})")
    if caption == columns.image:
        raise ColumnError("caption_column", f"{path}: the caption column is the image column {caption!r}")
    return columns.image, caption


def check_columns(path: str, columns: Columns) -> None:
    """Raises ColumnError before anything is read when a named column is missing."""
    import pyarrow.parquet as pq
    _columns(pq.read_schema(path), columns, path)


def count_rows(path: str) -> int:
    import pyarrow.parquet as pq
    return pq.ParquetFile(path).metadata.num_rows  # from the footer: no data read


def _image_bytes(cell: Any) -> bytes:
    if isinstance(cell, dict):  # Hugging Face's image struct {bytes, path}
        if cell.get("bytes") is None:
            path = f" (path {cell['path']!r} only)" if cell.get("path") else ""
            raise jsonl.BadRecord("missing_image", f"image has no bytes{path}")
        cell = cell["bytes"]
    if cell is None:
        raise jsonl.BadRecord("missing_image", "image is null")
    if not isinstance(cell, bytes):
        raise jsonl.BadRecord("malformed", f"image must be bytes, not {type(cell).__name__}")
    return cell


def _parquet_rows(path: str, columns: Columns, limits: jsonl.Limits):
    import pyarrow.parquet as pq  # here, not at the top: only parquet sources need it
    f = pq.ParquetFile(path)
    image, caption = _columns(f.schema_arrow, columns, path)
    source, row = os.path.basename(path), 0
    for batch in f.iter_batches(batch_size=BATCH_ROWS, columns=[image, caption]):
        for img, cap in zip(batch.column(image).to_pylist(), batch.column(caption).to_pylist()):
            try:
                e = one_step(f"{_stem(path)}:{row}", cap, _image_bytes(img),
                             {"source": source, "row": row}, limits)
            except jsonl.BadRecord as err:
                e = RecordError(path, "row", row, err.reason, str(err))
            yield row, e, path, "row"
            row += 1


def iter_parquet(path: str, columns: Columns = Columns(), limits: jsonl.Limits = jsonl.Limits(),
                 seen: set[str] | None = None) -> Iterator[tuple[int, ep.Episode | RecordError]]:
    """(row, Episode or RecordError) per row, in file order; one bad row never stops the rest.
    Ids are `<file stem>:<row>`; `seen` collects them across calls, as in `iter_manifest`."""
    yield from _dedupe(_parquet_rows(os.fspath(path), columns, limits), set() if seen is None else seen)


# -- webdataset tars ------------------------------------------------------------------------
# The stdlib's tarfile rather than the `webdataset` library: its stream reader would read
# every image once just to count samples (tarfile lists headers by seeking), and its error
# handlers either stop at the first bad sample or drop it with a warning, where each bad
# sample must be a named, counted skip. Only its grouping rule is needed, copied here.
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_META = re.compile(r"__[^/]*__($|/)")  # webdataset skips members such as __index__


def _grouped(tar: tarfile.TarFile) -> Iterator[tuple[str, list[tuple[str, tarfile.TarInfo]]]]:
    """(key, [(extension, member)]) per run of consecutive members with one key."""
    key, group = None, []
    for info in tar:
        if not info.isfile() or _META.match(info.name):
            continue
        m = _KEY.match(info.name)
        if not m:
            continue  # no extension: not part of any sample, as in webdataset
        if m.group(1) != key and group:
            yield key, group
            group = []
        key = m.group(1)
        group.append((m.group(2).lower(), info))
    if group:
        yield key, group


class ShardError(jsonl.DataError):
    """A shard that cannot be read as a tar at all (rather than one bad sample in it)."""


def _open_tar(path: str) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise ShardError(f"{path}: not a readable tar ({e})") from None


def count_samples(path: str) -> int:
    """Samples in a shard, from its member headers (no member data read)."""
    with _open_tar(path) as tar:
        try:
            return sum(1 for _ in _grouped(tar))
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ShardError(f"{path}: not a readable tar ({e})") from None


def _sample(key: str, members: dict[str, bytes], path: str, limits: jsonl.Limits) -> ep.Episode:
    name = key.rsplit("/", 1)[-1]
    have = ", ".join(sorted(members))
    if "json" not in members:
        raise jsonl.BadRecord("malformed", f"no {name}.json member (the sample has: {have})")
    try:
        obj = json.loads(members["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise jsonl.BadRecord("malformed", f"{name}.json is not valid JSON ({e})") from None
    if isinstance(obj, dict) and "steps" in obj:
        # Both spellings of a member: its extension (webdataset's sample keys) and file name.
        refs = {**members, **{f"{name}.{x}": data for x, data in members.items()}}
        return jsonl.parse_episode(obj, refs, limits)
    if not isinstance(obj, dict) or not any(k in obj for k in CAPTION_KEYS):
        raise jsonl.BadRecord("malformed", f"{name}.json has neither 'steps' nor 'caption'")
    cap = obj[next(k for k in CAPTION_KEYS if k in obj)]
    images = [x for x in members if x.rsplit(".", 1)[-1] in IMAGE_EXTS]
    if not images:
        raise jsonl.BadRecord("missing_image", f"no image member (the sample has: {have})")
    if len(images) > 1:
        raise jsonl.BadRecord("malformed", f"{len(images)} image members ({', '.join(images)}) for "
                                           f"one caption; a json with 'steps' says which is which")
    return one_step(f"{_stem(path)}:{key}", cap, members[images[0]],
                    {"source": os.path.basename(path), "key": key}, limits,
                    what=f"{name}.{images[0]}", caption_what=f"{name}.json caption")


def _tar_samples(path: str, limits: jsonl.Limits):
    with _open_tar(path) as tar:
        try:
            yield from _tar_samples_of(tar, path, limits)
        except (tarfile.TarError, EOFError) as e:  # a header, not one member: the rest is lost
            raise ShardError(f"{path}: not a readable tar ({e})") from None


def _tar_samples_of(tar: tarfile.TarFile, path: str, limits: jsonl.Limits):
    for key, group in _grouped(tar):
        try:
            members: dict[str, bytes] = {}
            for ext, info in group:
                if ext in members:
                    raise jsonl.BadRecord("malformed", f"member {info.name!r} appears twice")
                try:
                    members[ext] = tar.extractfile(info).read()
                except (tarfile.TarError, OSError, EOFError) as e:
                    raise jsonl.BadRecord("malformed", f"member {info.name!r} cannot be read "
                                                       f"({e})") from None
            e = _sample(key, members, path, limits)
        except jsonl.BadRecord as err:
            e = RecordError(path, "key", key, err.reason, str(err))
        yield key, e, path, "key"


def iter_tar(path: str, limits: jsonl.Limits = jsonl.Limits(), seen: set[str] | None = None
             ) -> Iterator[tuple[str, ep.Episode | RecordError]]:
    """(key, Episode or RecordError) per sample, in shard order. Caption samples get the id
    `<shard stem>:<key>`, episode samples their json's `id`; `seen` as in `iter_parquet`."""
    yield from _dedupe(_tar_samples(os.fspath(path), limits), set() if seen is None else seen)
