"""Precomputed AE latents: every image of a split encoded once, stored beside its episodes.

With world.latents = 'ae' and data.precompute_latents = True, `build-data` (and `train`,
which builds what is missing) writes for each split one ArrayRecord file whose record i holds
the latent tokens of episode record i's images, in segment order, as an uncompressed `.npz`.
The file sits under the AE's fingerprint (its config and a hash of its parameters), so a
retrained or different AE writes new latents instead of reading stale ones. Training then
reads (episode, latents) pairs through `WithLatents` (the bytes: `episode.latents_to_bytes`),
and the packer puts the latent tokens where pixel patches would go (model/codec.py).

A record that cannot be read or decoded gets an empty latents record: the episode record is
skipped by the pipeline anyway, and counted there with its reason.
"""

from __future__ import annotations

import os

import numpy as np
from tqdm import tqdm

from strokes_jax import files
from strokes_jax.episodes import episode as ep

BATCH = 32  # images per AE call


def latents_dir(data_dir: str, name: str, codec) -> str:
    return os.path.join(data_dir, "latents", name, codec.fingerprint())


def _images(source, i: int) -> list[np.ndarray] | None:
    from strokes_jax.data import pipeline
    item = pipeline.SafeSource(source)[i]
    if isinstance(item, pipeline.Unreadable):
        return None
    try:
        return [np.asarray(im) for im in pipeline.decode_item(item, f"#{i}").images()]
    except (ep.EpisodeError, ValueError, KeyError):
        return None


def _encode_all(codec, episodes: list[list[np.ndarray] | None]) -> list[bytes]:
    """One AE call per BATCH images of one size, over a chunk of episodes."""
    flat = [(e, k, codec.prepare(im)) for e, ims in enumerate(episodes) if ims
            for k, im in enumerate(ims)]
    out: dict[tuple[int, int], np.ndarray] = {}
    by_shape: dict[tuple, list] = {}
    for e, k, im in flat:
        by_shape.setdefault(im.shape, []).append((e, k, im))
    for group in by_shape.values():
        for a in range(0, len(group), BATCH):
            part = group[a:a + BATCH]
            lat = codec.encode(np.stack([im for _, _, im in part]))
            for (e, k, _), z in zip(part, lat):
                out[(e, k)] = z
    return [ep.latents_to_bytes([out[(e, k)] for k in range(len(ims))]) if ims else b""
            for e, ims in enumerate(episodes)]


def precompute(source, codec, path: str, progress: bool = True) -> int:
    """Writes `path` (one latents record per record of `source`) unless a complete file is
    there; returns the number of records. Written to a temporary name first, so an
    interrupted run leaves nothing that looks complete."""
    import grain
    from array_record.python.array_record_module import ArrayRecordWriter
    n = len(source)
    if os.path.exists(path) and len(grain.sources.ArrayRecordDataSource(path)) == n:
        return n
    files.makedirs(os.path.dirname(path))
    tmp = path + ".tmp"
    w = ArrayRecordWriter(tmp, "group_size:1")
    chunk = 64
    with tqdm(total=n, desc=f"latents {os.path.basename(path)}", unit="episode",
              disable=not progress) as bar:
        for a in range(0, n, chunk):
            eps = [_images(source, i) for i in range(a, min(n, a + chunk))]
            for rec in _encode_all(codec, eps):
                w.write(rec)
            bar.update(len(eps))
    w.close()
    os.replace(tmp, path)
    return n


class WithLatents:
    """Random access to (episode record, its latents) as {'record', 'latents'} items, which
    `pipeline.decode_item` turns into an Episode with `latents` attached."""

    def __init__(self, source, path: str):
        import grain
        self.source, self.path = source, path
        # pipeline.record_location names the episode shard behind an index through this.
        self.data_source = getattr(source, "data_source", source)
        self.latents = grain.sources.ArrayRecordDataSource(path)
        if len(self.latents) != len(source):
            raise ValueError(f"{path}: {len(self.latents)} latents records for {len(source)} "
                             "episodes (rebuild them: build-data)")

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        from strokes_jax.data import pipeline
        item = self.source[index]
        if item is None or (isinstance(item, dict) and item.get("record") is None):
            return item  # SafeSource names it
        return {"record": pipeline.record_bytes(item), "latents": self.latents[index]}
