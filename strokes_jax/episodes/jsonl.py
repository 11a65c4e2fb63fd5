"""Real-data episodes from a JSONL manifest: one JSON object per line, one episode each.

    {"id": "cat-01", "prompt": "a cat on a red sofa", "tag": "pets", "kind": "additive",
     "metadata": {...},
     "steps": [{"ins": "draw the sofa", "des": "a red sofa", "image": "cat-01/0.png",
                "inspect": "plan ok ; image ok"},
               {"ins": ..., "des": ..., "image": {"bytes_b64": "..."}, "inspect": ...,
                "refine": "make the cat grey", "refined": "cat-01/1b.jpg"}]}

Text is free (not the shapes grammar). An image is a path relative to the manifest's folder
(an absolute path is used as is) or inline base64 bytes, in any format Pillow reads and any
size and aspect ratio; it is decoded to uint8 RGB [H, W, 3]. Lines parse into the same typed
`Episode` / `Step` as the shapes world; `"context_only": true` is `Step.sketch_target=False`.

Every error is one line that names the file, the line and (where it applies) the step,
counted from 0: `manifest.jsonl:7: step 2: image 'a/b.png' not found`. `ManifestError.reason`
is a short category, so a builder can count skips by kind (`REASONS`).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import os
from typing import Any, Iterator, Mapping

import numpy as np
from PIL import Image, ImageOps

from strokes_jax.episodes import episode as ep

REASONS = ("malformed", "missing_image", "corrupt_image", "small_image", "long_text", "invalid",
           "duplicate_id")
TEXT_FIELDS = ("ins", "des", "inspect", "refine")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What a usable record must satisfy beyond being well-formed. 0 disables a bound."""

    min_side: int = 0  # the shorter side of every image, in pixels
    max_text_chars: int = 0  # per text field: the prompt, each ins / des / inspect / refine
    max_steps: int = 8


class DataError(ValueError):
    """The input as a whole cannot be used (too many bad records, an unreadable shard), as
    opposed to one bad record; the command line shows it as one line."""


class ManifestError(ep.EpisodeError):
    """One unusable manifest line. str() is the whole one-line message."""

    locator = "line"  # what `line` counts; other sources count rows or name samples

    def __init__(self, path: str, line: int, reason: str, message: str):
        super().__init__(f"{path}:{line}: {message}")
        self.path, self.line, self.reason, self.detail = path, line, reason, message


class BadRecord(Exception):
    """Raised while parsing one record; the caller adds the file and line (or row, or sample)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# -- images --------------------------------------------------------------------------------
def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes -> uint8 RGB [H, W, 3]. Raises ValueError naming what is wrong."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # decodes fully now: a truncated file fails here, not in training
            im = ImageOps.exif_transpose(im)  # phone photos are stored sideways plus a tag
            return _to_rgb(im)
    except Image.UnidentifiedImageError:  # its message holds the repr of our BytesIO
        raise ValueError("not an image format Pillow knows") from None
    except Exception as e:  # Pillow's plugins raise OSError, SyntaxError, ValueError, ...
        raise ValueError(str(e) or type(e).__name__) from None


def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode.startswith("I;16"):
        # Pillow's convert clips 16-bit values at 255 instead of scaling them.
        a = np.asarray(im).astype(np.uint32)
        return np.repeat(((a * 255 + 32767) // 65535).astype(np.uint8)[..., None], 3, axis=2)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # Transparent pixels keep arbitrary colour under a plain convert; white is what a
        # viewer shows them on, so composite onto white.
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(canvas, rgba)
    return np.array(im.convert("RGB"), dtype=np.uint8)


def load_image(ref: Any, base_dir: str | Mapping[str, bytes]) -> np.ndarray:
    """A manifest image reference (a path or {"bytes_b64": ...}) -> uint8 RGB. Raises BadRecord.
    `base_dir` is the folder paths are relative to, or the members of a tar sample by name."""
    name = _name(ref)
    if isinstance(ref, str) and isinstance(base_dir, Mapping):
        if ref not in base_dir:
            raise BadRecord("missing_image", f"{name} is not a member of the sample")
        data = base_dir[ref]
    elif isinstance(ref, str):
        try:
            with open(os.path.join(base_dir, ref), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise BadRecord("missing_image", f"{name} not found") from None
        except OSError as e:
            raise BadRecord("missing_image", f"{name} cannot be read ({e.strerror or e})") from None
    elif isinstance(ref, dict) and set(ref) == {"bytes_b64"} and isinstance(ref["bytes_b64"], str):
        try:
            data = base64.b64decode(ref["bytes_b64"], validate=True)
        except binascii.Error as e:
            raise BadRecord("malformed", f"{name} is not valid base64 ({e})") from None
    else:
        raise BadRecord("malformed", f"must be a path or {{\"bytes_b64\": ...}}, not {_json(ref)}")
    try:
        return decode_image(data)
    except ValueError as e:
        raise BadRecord("corrupt_image", f"{name} is not a readable image ({e})") from None


# -- one line ------------------------------------------------------------------------------
def _name(ref: Any) -> str:
    return repr(ref) if isinstance(ref, str) else "<bytes_b64>"


def _json(value: Any) -> str:
    s = json.dumps(value)
    return s if len(s) <= 40 else s[:37] + "..."


def _field(obj: dict, key: str, types: type | tuple, where: str = "", required: bool = True,
           default: Any = None) -> Any:
    if key not in obj:
        if required:
            raise BadRecord("malformed", f"{where}missing field {key!r}")
        return default
    value = obj[key]
    if not isinstance(value, types):
        types = types if isinstance(types, tuple) else (types,)
        names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        raise BadRecord("malformed", f"{where}field {key!r} must be {names}, not {_json(value)}")
    return value


def check_text(value: str | None, what: str, limits: Limits) -> str | None:
    if value is not None and limits.max_text_chars and len(value) > limits.max_text_chars:
        raise BadRecord("long_text", f"{what} is {len(value)} characters, more than "
                                     f"max_text_chars {limits.max_text_chars}")
    return value


def _image(step: dict, key: str, where: str, base_dir, limits: Limits) -> np.ndarray:
    try:
        img = load_image(step[key], base_dir)
    except BadRecord as e:
        raise BadRecord(e.reason, f"{where}{key} {e}") from None
    check_size(img, f"{where}{key} {_name(step[key])}", limits)
    return img


def check_size(img: np.ndarray, what: str, limits: Limits) -> None:
    if limits.min_side and min(img.shape[:2]) < limits.min_side:
        raise BadRecord("small_image", f"{what} is {img.shape[1]}x{img.shape[0]}, shorter side "
                                       f"below min_side {limits.min_side}")


def parse_episode(obj: Any, base_dir: str | Mapping[str, bytes], limits: Limits = Limits()
                  ) -> ep.Episode:
    """A decoded manifest object -> a validated Episode (images loaded). Raises BadRecord.
    Image paths are relative to `base_dir`, or name members of a tar sample (a mapping)."""
    if not isinstance(obj, dict):
        raise BadRecord("malformed", f"a line must be a JSON object, not {_json(obj)}")
    eid = _field(obj, "id", str)
    if not eid.strip():
        raise BadRecord("malformed", "field 'id' is empty")
    prompt = check_text(_field(obj, "prompt", str), "prompt", limits)
    raw_steps = _field(obj, "steps", list)
    steps = []
    for i, s in enumerate(raw_steps):
        where = f"step {i}: "
        if not isinstance(s, dict):
            raise BadRecord("malformed", f"{where}a step must be a JSON object, not {_json(s)}")
        # ins / des / inspect must be present (null: no plan, no inspection), so a typo in a
        # key name is an error rather than a step that silently lost its text.
        texts = {k: check_text(_field(s, k, (str, type(None)), where, required=k != "refine"),
                          f"{where}{k}", limits) for k in TEXT_FIELDS}
        context_only = _field(s, "context_only", bool, where, required=False, default=False)
        for key in ("image", "refined"):
            if key in s and s[key] is None:
                raise BadRecord("malformed", f"{where}field {key!r} must be a path or bytes, not null")
        if "image" not in s:
            raise BadRecord("malformed", f"{where}missing field 'image'")
        sketch = _image(s, "image", where, base_dir, limits)
        refined = _image(s, "refined", where, base_dir, limits) if "refined" in s else None
        steps.append(ep.Step(sketch=sketch, refined=refined, sketch_target=not context_only, **texts))
    one_pass = len(steps) == 1 and steps[0].ins is None
    kind = _field(obj, "kind", str, required=False, default="single_pass" if one_pass else "additive")
    episode = ep.Episode(id=eid, prompt=prompt, tag=_field(obj, "tag", str, required=False, default=""),
                         metadata=_field(obj, "metadata", dict, required=False, default={}),
                         steps=steps, kind=kind)
    try:
        return episode.validate(None, max_steps=limits.max_steps)
    except ep.EpisodeError as e:
        raise BadRecord("invalid", str(e)) from None


def parse_line(text: str | bytes, path: str, line: int, limits: Limits = Limits()) -> ep.Episode:
    """One manifest line -> Episode; raises ManifestError `path:line: ...`. Image paths are
    relative to `path`'s folder."""
    try:
        try:
            obj = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRecord("malformed", f"not valid JSON ({e})") from None
        return parse_episode(obj, os.path.dirname(os.path.abspath(path)), limits)
    except BadRecord as e:
        raise ManifestError(path, line, e.reason, str(e)) from None


# -- a whole file --------------------------------------------------------------------------
def manifest_lines(path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line) for every non-blank line."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 BOM some editors write
                raw = raw[3:]
            if raw.strip():
                yield n, raw


def count_records(path: str | os.PathLike) -> int:
    return sum(1 for _ in manifest_lines(path))


def iter_manifest(path: str | os.PathLike, limits: Limits = Limits(), seen: set[str] | None = None
                  ) -> Iterator[tuple[int, ep.Episode | ManifestError]]:
    """(line, Episode or ManifestError) per non-blank line, in file order; one bad line never
    stops the rest. `seen` collects ids across calls (e.g. train and eval manifests), and a
    repeated id is a `duplicate_id` error on its later line."""
    path = os.fspath(path)
    seen = set() if seen is None else seen
    first: dict[str, int] = {}
    for n, raw in manifest_lines(path):
        try:
            e = parse_line(raw, path, n, limits)
        except ManifestError as err:
            yield n, err
            continue
        if e.id in seen:
            before = f" (first on line {first[e.id]})" if e.id in first else ""
            yield n, ManifestError(path, n, "duplicate_id", f"id {e.id!r} already used{before}")
            continue
        seen.add(e.id)
        first[e.id] = n
        yield n, e


def load_manifest(path: str | os.PathLike, limits: Limits = Limits()) -> list[ep.Episode]:
    """Every episode of a manifest; raises the first line's ManifestError."""
    out = []
    for _, e in iter_manifest(path, limits):
        if isinstance(e, ManifestError):
            raise e
        out.append(e)
    return out


def write_manifest(episodes, out_dir: str | os.PathLike, name: str = "manifest.jsonl") -> str:
    """The inverse of `load_manifest`: every image as a PNG under `out_dir/<episode id>/`,
    one JSON line per episode in `out_dir/name`; returns the manifest's path. Exporting the
    shapes world this way runs it through the same path as a user's own images."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        for e in episodes:
            folder = "".join(c if c.isalnum() or c in "-_." else "_" for c in e.id)
            os.makedirs(os.path.join(out_dir, folder), exist_ok=True)

            def png(img, stem):
                rel = f"{folder}/{stem}.png"
                Image.fromarray(np.asarray(img, np.uint8)).save(os.path.join(out_dir, rel))
                return rel

            steps = []
            for i, s in enumerate(e.steps):
                d = {"ins": s.ins, "des": s.des, "image": png(s.sketch, str(i)), "inspect": s.inspect}
                if s.refine is not None:
                    d.update(refine=s.refine, refined=png(s.refined, f"{i}r"))
                if not s.sketch_target:
                    d["context_only"] = True
                steps.append(d)
            f.write(json.dumps({"id": e.id, "prompt": e.prompt, "tag": e.tag, "kind": e.kind,
                                "metadata": e.metadata, "steps": steps}) + "\n")
    return path
