"""The typed episode: a prompt, then iterations of plan / sketch / inspect / [refine].

An episode flattens to a list of typed segments (see `segments`), which the tokenizer turns
into tokens; it serialises to one bytes record (JSON header + raw uint8 images) for
ArrayRecord. Validation errors name the episode id.

Two record formats share one layout (magic, header length, JSON header, raw images):
`SJEP1` stores one `image_shape` for every image of the episode (the shapes world, where all
images are the canvas); `SJEP2` stores `image_shapes`, one per image, for real data whose
images differ in size. `to_bytes` writes SJEP1 whenever all images share a shape, so records
of the shapes world stay byte-identical; `from_bytes` reads both.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import struct
import threading
from typing import Iterator

import numpy as np

# Stage ids, one per token: losses, metrics and ablations are per stage.
PROMPT, PLAN, SKETCH, INSPECT, REFINE = range(5)
STAGE_NAMES = ("prompt", "plan", "sketch", "inspect", "refine")

# Episode kinds (how the data was made); "single_pass" is prompt -> final image.
KINDS = ("single_pass", "additive", "edit", "critique", "self_critique")

_MAGIC = b"SJEP1"
_MAGIC2 = b"SJEP2"  # same length as _MAGIC: the header length sits at the same offset


class EpisodeError(ValueError):
    """A malformed episode; the message names the record."""


@dataclasses.dataclass
class Step:
    """One iteration. `ins`/`des` are None only in single-pass episodes (no plan); `inspect`
    is None when the iteration has no inspection; `refine` and `refined` come together.
    `sketch_target` False marks a sketch the model drew itself (self-sampled critiques): it is
    context for the inspection, packed as a clean copy only, with no flow loss, so training
    never imitates the model's own imperfect drawing."""

    sketch: np.ndarray
    ins: str | None = None
    des: str | None = None
    inspect: str | None = None
    refine: str | None = None
    refined: np.ndarray | None = None
    sketch_target: bool = True


@dataclasses.dataclass
class Episode:
    id: str
    prompt: str
    tag: str
    metadata: dict
    steps: list[Step]
    kind: str = "additive"
    # Precomputed AE latent tokens, one array per image in segment order, attached when a
    # record is read with its latents (data/latents.py); never serialised with the episode.
    latents: list | None = dataclasses.field(default=None, compare=False, repr=False)

    # -- structure ---------------------------------------------------------------------
    def segments(self) -> Iterator[tuple[int, str, object]]:
        """(stage, modality, content) in sequence order; modality is 'text', 'image' (a flow
        target) or 'context_image' (seen, not learned). Text content is the exact text
        between <|im_start|> and <|im_end|>."""
        yield PROMPT, "text", self.prompt
        for s in self.steps:
            if s.ins is not None:
                yield PLAN, "text", plan_text(s.ins, s.des)
            yield SKETCH, "image" if s.sketch_target else "context_image", s.sketch
            if s.inspect is not None:
                text = f"<inspect> {s.inspect} </inspect>"
                if s.refine is not None:
                    text += f" <refine> {s.refine} </refine>"
                yield INSPECT, "text", text
            if s.refined is not None:
                yield REFINE, "image", s.refined

    def images(self) -> list[np.ndarray]:
        return [c for _, m, c in self.segments() if m != "text"]

    def final_image(self) -> np.ndarray:
        last = self.steps[-1]
        return last.refined if last.refined is not None else last.sketch

    # -- validation ----------------------------------------------------------------------
    def validate(self, image_shape: tuple[int, int, int] | None, max_steps: int = 8) -> "Episode":
        """Checks structure and images; `image_shape` None accepts any HxWx3 uint8 image
        (real data), a shape requires exactly that one (the shapes world's canvas)."""
        where = f"episode {self.id!r}"
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise EpisodeError(f"{where}: empty prompt")
        if self.kind not in KINDS:
            raise EpisodeError(f"{where}: unknown kind {self.kind!r}; expected one of {KINDS}")
        if not self.steps:
            raise EpisodeError(f"{where}: no steps")
        if len(self.steps) > max_steps:
            raise EpisodeError(f"{where}: {len(self.steps)} steps, more than {max_steps}")
        for i, s in enumerate(self.steps):
            at = f"{where}, step {i}"
            for name, img in (("sketch", s.sketch), ("refined", s.refined)):
                if img is None:
                    if name == "sketch":
                        raise EpisodeError(f"{at}: missing sketch image")
                    continue
                img = np.asarray(img)
                if image_shape is None:
                    ok = img.ndim == 3 and img.shape[2] == 3 and min(img.shape) > 0
                    want = "uint8[H, W, 3]"
                else:
                    ok = img.shape == tuple(image_shape)
                    want = f"uint8{list(image_shape)}"
                if img.dtype != np.uint8 or not ok:
                    raise EpisodeError(f"{at}: {name} image is {img.dtype}{list(img.shape)}, "
                                       f"expected {want}")
            if (s.ins is None) != (s.des is None):
                raise EpisodeError(f"{at}: a plan needs both <ins> and <des>")
            if (s.refine is None) != (s.refined is None):
                raise EpisodeError(f"{at}: <refine> text and refined image must come together")
            if s.refine is not None and s.inspect is None:
                raise EpisodeError(f"{at}: <refine> without an inspection")
            for name in ("ins", "des", "inspect", "refine"):
                text = getattr(s, name)
                if text is not None and not isinstance(text, str):
                    raise EpisodeError(f"{at}: {name} is {type(text).__name__}, not text")
                if text is not None and (not text.strip() or _TAG_RE.search(text)):
                    raise EpisodeError(f"{at}: {name} text {text!r} is empty or contains a tag")
        if _TAG_RE.search(self.prompt):
            raise EpisodeError(f"{where}: prompt contains a tag: {self.prompt!r}")
        return self

    # -- serialisation -------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        images, steps = [], []
        for i, s in enumerate(self.steps):
            d = {k: getattr(s, k) for k in ("ins", "des", "inspect", "refine")}
            d["sketch"] = len(images)
            if not s.sketch_target:
                d["sketch_target"] = False
            images.append(self._raw(s.sketch, i, "sketch"))
            if s.refined is not None:
                d["refined"] = len(images)
                images.append(self._raw(s.refined, i, "refined"))
            steps.append(d)
        shapes = [list(i.shape) for i in images]
        fields = {"id": self.id, "prompt": self.prompt, "tag": self.tag, "metadata": self.metadata,
                  "kind": self.kind, "steps": steps}
        if all(sh == shapes[0] for sh in shapes):
            # Key order and magic exactly as before per-image shapes existed: one-shape
            # episodes (all of the shapes world) keep their bytes.
            magic, fields["image_shape"] = _MAGIC, shapes[0] if shapes else []
        else:
            magic, fields["image_shapes"] = _MAGIC2, shapes
        header = json.dumps(fields).encode()
        return magic + struct.pack("<I", len(header)) + header + b"".join(i.tobytes() for i in images)

    def _raw(self, img, step: int, name: str) -> np.ndarray:
        # A float image in [0, 1] would cast to (almost) all zeros without a word; refusing
        # any non-uint8 array makes the caller scale and round on purpose.
        img = np.asarray(img)
        if img.dtype != np.uint8:
            raise EpisodeError(f"episode {self.id!r}, step {step}: {name} image is {img.dtype}"
                               f"{list(img.shape)}, not uint8; scale it to 0..255 and cast first")
        return np.ascontiguousarray(img)

    @classmethod
    def from_bytes(cls, data: bytes, record: str = "?") -> "Episode":
        if not data.startswith((_MAGIC, _MAGIC2)):
            raise EpisodeError(f"record {record}: not an episode record (bad magic)")
        try:
            (n,) = struct.unpack("<I", data[len(_MAGIC):len(_MAGIC) + 4])
            start = len(_MAGIC) + 4
            h = json.loads(data[start:start + n])
            blob = np.frombuffer(data, np.uint8, offset=start + n)
            count = sum(1 + ("refined" in s) for s in h["steps"])
            if data.startswith(_MAGIC):
                shape = tuple(h["image_shape"])
                if blob.size != int(np.prod(shape)) * count:
                    raise EpisodeError(f"record {record} (episode {h.get('id')!r}): image bytes "
                                       f"{blob.size} != {count} images of shape {list(shape)}")
                imgs = list(blob.reshape((count,) + shape))
            else:
                imgs = _split_images(blob, [tuple(sh) for sh in h["image_shapes"]], count,
                                     f"record {record} (episode {h.get('id')!r})")
            steps = [Step(sketch=imgs[s["sketch"]], ins=s["ins"], des=s["des"],
                          inspect=s["inspect"], refine=s["refine"],
                          refined=imgs[s["refined"]] if "refined" in s else None,
                          sketch_target=s.get("sketch_target", True))
                     for s in h["steps"]]
            return cls(id=h["id"], prompt=h["prompt"], tag=h["tag"], metadata=h["metadata"],
                       steps=steps, kind=h["kind"])
        except EpisodeError:
            raise
        except (KeyError, ValueError, struct.error, TypeError) as e:
            raise EpisodeError(f"record {record}: corrupt episode record ({e})") from None

    def to_text(self) -> str:
        """Human-readable transcript, images shown as [image HxW]."""
        out = []
        for stage, mod, c in self.segments():
            out.append(f"[{STAGE_NAMES[stage]}] " + (c if mod == "text" else
                                                     f"<{mod} {'x'.join(map(str, c.shape[:2]))}>"))
        return "\n".join(out)


def _split_images(blob: np.ndarray, shapes: list[tuple[int, ...]], count: int,
                  where: str) -> list[np.ndarray]:
    sizes = [int(np.prod(sh)) for sh in shapes]
    if len(shapes) != count or blob.size != sum(sizes):
        raise EpisodeError(f"{where}: image bytes {blob.size} do not match {count} images of "
                           f"shapes {[list(sh) for sh in shapes]}")
    offsets = np.cumsum([0] + sizes)
    return [blob[a:b].reshape(sh) for a, b, sh in zip(offsets[:-1], offsets[1:], shapes)]


_TAG_RE = re.compile(r"<\|?/?[a-z_]+\|?>")


def plan_text(ins: str, des: str) -> str:
    """A plan segment's text, as the sequence holds it between its markers."""
    return f"<ins> {ins} </ins> <des> {des} </des>"


_LATENTS_MAGIC = b"SJLAT1\n"
_NPZ = threading.Lock()


def latents_to_bytes(arrays) -> bytes:
    """An episode's precomputed latents (one float32 array per image), the record format of
    data/latents.py: a magic, a JSON list of shapes, then the little-endian float32 data.
    Not .npz: numpy parses an .npy header with ast.literal_eval, which CPython before 3.11.8
    can fail on ("AST constructor recursion depth mismatch") when Grain's reader threads call
    it at once, and a record would be skipped as corrupt for nothing."""
    arrays = [np.ascontiguousarray(a, "<f4") for a in arrays]
    header = json.dumps([list(a.shape) for a in arrays]).encode()
    return (_LATENTS_MAGIC + struct.pack("<I", len(header)) + header
            + b"".join(a.tobytes() for a in arrays))


def latents_from_bytes(data, record: str = "?") -> list[np.ndarray]:
    if isinstance(data, np.ndarray) and data.shape == ():
        data = data.item()
    if not data:
        raise EpisodeError(f"record {record}: no precomputed latents (the record did not "
                           "decode when they were written)")
    data = bytes(data)
    try:
        if not data.startswith(_LATENTS_MAGIC):  # .npz, as earlier versions wrote them
            with _NPZ, np.load(io.BytesIO(data)) as z:
                return [z[f"arr_{i}"] for i in range(len(z.files))]
        start = len(_LATENTS_MAGIC) + 4
        (n,) = struct.unpack("<I", data[len(_LATENTS_MAGIC):start])
        shapes = json.loads(data[start:start + n])
        offset, out = start + n, []
        for shape in shapes:
            count = int(np.prod(shape))
            out.append(np.frombuffer(data, "<f4", count, offset).reshape(shape))
            offset += 4 * count
        if offset != len(data):
            raise ValueError(f"{len(data) - offset} bytes after {len(shapes)} arrays")
        return out
    except Exception as e:
        raise EpisodeError(f"record {record}: unreadable precomputed latents "
                           f"({type(e).__name__}: {e})") from None
