"""The typed episode: a prompt, then iterations of plan / sketch / inspect / [refine].

An episode flattens to a list of typed segments (see `segments`), which the tokenizer turns
into tokens; it serialises to one bytes record (JSON header + raw uint8 images) for
ArrayRecord. Validation errors name the episode id.
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
from typing import Iterator

import numpy as np

# Stage ids, one per token: losses, metrics and ablations are per stage.
PROMPT, PLAN, SKETCH, INSPECT, REFINE = range(5)
STAGE_NAMES = ("prompt", "plan", "sketch", "inspect", "refine")

# Episode kinds (how the data was made); "single_pass" is prompt -> final image.
KINDS = ("single_pass", "additive", "edit", "critique", "self_critique")

_MAGIC = b"SJEP1"


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

    # -- structure ---------------------------------------------------------------------
    def segments(self) -> Iterator[tuple[int, str, object]]:
        """(stage, modality, content) in sequence order; modality is 'text', 'image' (a flow
        target) or 'context_image' (seen, not learned). Text content is the exact text
        between <|im_start|> and <|im_end|>."""
        yield PROMPT, "text", self.prompt
        for s in self.steps:
            if s.ins is not None:
                yield PLAN, "text", f"<ins> {s.ins} </ins> <des> {s.des} </des>"
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
    def validate(self, image_shape: tuple[int, int, int], max_steps: int = 8) -> "Episode":
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
                if img.dtype != np.uint8 or img.shape != tuple(image_shape):
                    raise EpisodeError(f"{at}: {name} image is {img.dtype}{list(img.shape)}, "
                                       f"expected uint8{list(image_shape)}")
            if (s.ins is None) != (s.des is None):
                raise EpisodeError(f"{at}: a plan needs both <ins> and <des>")
            if (s.refine is None) != (s.refined is None):
                raise EpisodeError(f"{at}: <refine> text and refined image must come together")
            if s.refine is not None and s.inspect is None:
                raise EpisodeError(f"{at}: <refine> without an inspection")
            for name in ("ins", "des", "inspect", "refine"):
                text = getattr(s, name)
                if text is not None and (not text.strip() or _TAG_RE.search(text)):
                    raise EpisodeError(f"{at}: {name} text {text!r} is empty or contains a tag")
        if _TAG_RE.search(self.prompt):
            raise EpisodeError(f"{where}: prompt contains a tag: {self.prompt!r}")
        return self

    # -- serialisation -------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        images, steps = [], []
        for s in self.steps:
            d = {k: getattr(s, k) for k in ("ins", "des", "inspect", "refine")}
            d["sketch"] = len(images)
            if not s.sketch_target:
                d["sketch_target"] = False
            images.append(np.ascontiguousarray(s.sketch, np.uint8))
            if s.refined is not None:
                d["refined"] = len(images)
                images.append(np.ascontiguousarray(s.refined, np.uint8))
            steps.append(d)
        shape = list(images[0].shape) if images else []
        header = json.dumps({"id": self.id, "prompt": self.prompt, "tag": self.tag,
                             "metadata": self.metadata, "kind": self.kind, "steps": steps,
                             "image_shape": shape}).encode()
        return _MAGIC + struct.pack("<I", len(header)) + header + b"".join(i.tobytes() for i in images)

    @classmethod
    def from_bytes(cls, data: bytes, record: str = "?") -> "Episode":
        if not data.startswith(_MAGIC):
            raise EpisodeError(f"record {record}: not an episode record (bad magic)")
        try:
            (n,) = struct.unpack("<I", data[len(_MAGIC):len(_MAGIC) + 4])
            start = len(_MAGIC) + 4
            h = json.loads(data[start:start + n])
            shape = tuple(h["image_shape"])
            size = int(np.prod(shape))
            blob = np.frombuffer(data, np.uint8, offset=start + n)
            count = sum(1 + ("refined" in s) for s in h["steps"])
            if blob.size != size * count:
                raise EpisodeError(f"record {record} (episode {h.get('id')!r}): image bytes "
                                   f"{blob.size} != {count} images of shape {list(shape)}")
            imgs = blob.reshape((count,) + shape)
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


_TAG_RE = re.compile(r"<\|?/?[a-z_]+\|?>")
