"""Grain input pipeline: episode records -> tokenized episodes -> packed rows -> batches.

    source (random access: raw bytes or TFDS dicts with "record")
      .map_with_index(decode)            # source index, for messages; runs lazily per item
      [process_index::process_count]     # each host reads a disjoint slice
      .shuffle(seed) .repeat()           # reshuffled every epoch
      .to_iter_dataset(threads) [mp_prefetch(workers)]   # decoding is the expensive part
      PackIterDataset (main process)     # first-fit packing, counts and skips bad records
      .batch(per-process rows)
    to_global(batch, mesh)               # -> jax.Arrays sharded over the data axes

Bad records never stop a run silently or loudly one by one: decoding returns a `Skip`
marker instead of raising, and the packer counts it in a `SkipCounter`, which raises
`TooManyBadRecords` once skips pass the configured bound. Counting happens in the packer,
after any worker processes, so the counts are deterministic and live in iterator state.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import logging
from typing import Any, Sequence

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from strokes_jax.episodes import episode as ep
from strokes_jax.sequence import tokenizer as tk
from strokes_jax.sequence import layout

log = logging.getLogger(__name__)



class TooManyBadRecords(RuntimeError):
    pass


# -- decoding ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Skip:
    """Marker for a record that could not be used; travels through the pipeline in place
    of the episode so that counting happens at a single deterministic point."""

    index: int
    reason: str  # unreadable | corrupt | invalid | unknown_token | too_long
    message: str


@dataclasses.dataclass(frozen=True)
class Unreadable:
    """What SafeSource returns for a record the storage layer could not read."""

    where: str  # the shard file and the record's index in it
    message: str


def record_location(source: Any, index: int) -> str:
    """'<shard file> record <n>' for an ArrayRecord source (TFDS or array_record), else
    'record #<index>'. Reads the array_record source's read instructions, which name the
    file behind each global index."""
    ds = getattr(source, "data_source", source)
    try:
        reader, position = ds._reader_idx_and_position(index)
        ins = ds._read_instructions[reader]
        return f"{ins.filename} record {ins.start + position}"
    except Exception:  # another kind of source: its index is all there is
        return f"record #{index}"


class SafeSource:
    """Random access over `source` in which a record that cannot be read (a storage hash
    mismatch, a truncated shard) becomes an Unreadable marker naming the shard and the
    record, so the packer counts it as a skip instead of the run crashing mid-way."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        try:
            item = self.source[index]
        except Exception as e:  # array_record/riegeli raise plain RuntimeError/ValueError
            return Unreadable(record_location(self.source, index),
                              f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
        # A shard that does not open (truncated: its footer is gone) yields None records
        # through TFDS rather than an error.
        if item is None or (isinstance(item, dict) and item.get("record", b"") is None):
            return Unreadable(record_location(self.source, index),
                              "no data (a truncated or unreadable shard)")
        return item


def record_bytes(item: Any) -> bytes:
    """The episode bytes of a source item: a TFDS feature dict or raw ArrayRecord bytes."""
    if isinstance(item, dict):
        item = item.get("record")
    if isinstance(item, np.ndarray) and item.shape == ():
        item = item.item()
    if not isinstance(item, (bytes, bytearray, memoryview)):
        raise ep.EpisodeError(f"source item is {type(item).__name__}, not episode bytes")
    return bytes(item)


def decode_item(item: Any, record: str = "?") -> ep.Episode:
    """The item's Episode, with its precomputed latents attached when the item carries them
    (a `latents.WithLatents` source)."""
    episode = ep.Episode.from_bytes(record_bytes(item), record=record)
    if isinstance(item, dict) and "latents" in item:
        episode.latents = ep.latents_from_bytes(item["latents"], record)
    return episode


class ReadEpisode:
    """(source index, item) -> (index, Episode), or a Skip for bytes that do not decode. A
    plain class rather than a closure so that it pickles into mp_prefetch workers."""

    def __call__(self, index: int, item: Any):
        if isinstance(item, Unreadable):
            return Skip(index, "unreadable", f"{item.where}: {item.message}")
        try:
            return index, decode_item(item, record=f"#{index}")
        except ep.EpisodeError as e:
            return Skip(index, "corrupt", str(e))
        except Exception as e:  # a malformed header field that the format checks missed
            return Skip(index, "corrupt", f"record #{index}: {type(e).__name__}: {e}")


DROPOUT_KEYS = ("text", "vae", "vit")


class TokenizeEpisode:
    """(index, Episode) -> tokenized arrays, or a Skip naming the record. With `dropout`
    (probabilities {'text', 'vae', 'vit'}: BAGEL's CFG condition dropout, config key
    data.cfg_dropout) it runs as a Grain random map after shuffle and repeat, so each epoch
    draws which conditions each episode loses afresh, reproducibly from the seed."""

    def __init__(self, tokenizer: tk.EpisodeTokenizer, seq_len: int, dropout=None):
        self.tokenizer, self.seq_len = tokenizer, seq_len
        dropout = dict(dropout or {})
        unknown = set(dropout) - set(DROPOUT_KEYS)
        if unknown:
            raise ValueError(f"config key data.cfg_dropout: unknown keys {sorted(unknown)}; "
                             f"expected {DROPOUT_KEYS}")
        bad = {k: v for k, v in dropout.items() if not 0.0 <= float(v) <= 1.0}
        if bad:
            raise ValueError(f"config key data.cfg_dropout: probabilities {bad} not in [0, 1]")
        self.dropout = {k: float(v) for k, v in dropout.items() if float(v) > 0}

    def __call__(self, x, rng: np.random.Generator | None = None):
        if isinstance(x, Skip):
            return x
        index, episode = x
        where = f"record #{index}"
        drop = None
        if self.dropout and rng is not None:
            drop = tk.CondDrop.draw(rng, len(episode.images()), **self.dropout)
        try:
            arrays = self.tokenizer(episode, drop)
        except ep.EpisodeError as e:
            return Skip(index, "invalid", f"{where}: {e}")
        except tk.TokenizerError as e:
            return Skip(index, "unknown_token", f"{where}: {e}")
        n = len(arrays["tokens"])
        if n > self.seq_len:
            return Skip(index, "too_long", f"{where}: episode {episode.id!r} has {n} tokens, "
                                           f"more than seq_len {self.seq_len}")
        return arrays


class SkipCounter:
    """Counts records seen and skipped (per reason) and enforces the skip bound: more than
    `max_skips` skips, or a skipped fraction above `max_skip_fraction` once `min_records`
    records were seen. Read `seen`, `skipped`, `by_reason` and `recent` from the caller."""

    def __init__(self, max_skip_fraction: float = 0.01, min_records: int = 100,
                 max_skips: int | None = None, keep_messages: int = 20):
        self.max_skip_fraction = max_skip_fraction
        self.min_records = min_records
        self.max_skips = max_skips
        self.seen = 0
        self.skipped = 0
        self.by_reason: collections.Counter[str] = collections.Counter()
        self.recent: collections.deque[str] = collections.deque(maxlen=keep_messages)

    def ok(self) -> None:
        self.seen += 1
        self._check(None)

    def skip(self, s: Skip) -> None:
        self.seen += 1
        self.skipped += 1
        self.by_reason[s.reason] += 1
        self.recent.append(s.message)
        log.warning("skipping bad record (%s): %s", s.reason, s.message)
        self._check(s)

    def _check(self, last: Skip | None) -> None:
        over_abs = self.max_skips is not None and self.skipped > self.max_skips
        over_frac = (self.seen >= self.min_records
                     and self.skipped > self.max_skip_fraction * self.seen)
        if over_abs or over_frac:
            reasons = ", ".join(f"{r}: {n}" for r, n in self.by_reason.most_common())
            bound = (f"max_skips={self.max_skips}" if over_abs
                     else f"max_skip_fraction={self.max_skip_fraction}")
            raise TooManyBadRecords(
                f"skipped {self.skipped} of {self.seen} records, over {bound} "
                f"(by reason: {reasons}); last: {last.message if last else self.recent[-1]}")

    def get_state(self) -> dict[str, Any]:
        return {"seen": self.seen, "skipped": self.skipped, "by_reason": dict(self.by_reason)}

    def set_state(self, state: dict[str, Any]) -> None:
        self.seen, self.skipped = int(state["seen"]), int(state["skipped"])
        self.by_reason = collections.Counter({k: int(v) for k, v in state["by_reason"].items()})


# -- packing -------------------------------------------------------------------------------
class _Row:
    """One row being filled: the episodes placed in it, in order."""

    def __init__(self):
        self.parts: list[dict[str, np.ndarray]] = []
        self.length = 0

    def finish(self, seq_len: int, pad_id: int, patch_dim: int,
               vit_patch_dim: int | None = None, patch_dtype=np.uint8) -> dict[str, np.ndarray]:
        """The packed row; with `vit_patch_dim`, also the ViT copy's fields (layout.VIT_FIELDS),
        zero on padding and outside ViT tokens."""
        out = {k: np.zeros((seq_len,), np.int32) for k in layout.TOKEN_FIELDS + ("segment_ids",)}
        out["tokens"][:] = pad_id
        # uint8 pixel patches, or float32 precomputed latents (the tokenizer's codec).
        out["patches"] = np.zeros((seq_len, patch_dim), patch_dtype)
        fields = layout.TOKEN_FIELDS
        if vit_patch_dim is not None:
            out["vit_patches"] = np.zeros((seq_len, vit_patch_dim), np.uint8)
            out["vit_pos"] = np.zeros((seq_len,), np.int32)
            fields = layout.TOKEN_FIELDS + layout.VIT_FIELDS
        at, block_base = 0, 0
        for seg, part in enumerate(self.parts, start=1):
            n = len(part["tokens"])
            sl = slice(at, at + n)
            missing = [k for k in fields if k not in part]
            if missing:  # a tokenizer without the ViT copy feeding a ViT packer, or vice versa
                raise KeyError(f"packed episode #{seg} of the row lacks {missing}")
            for k in fields:
                out[k][sl] = part[k]
            # Attention groups images by block id; offsetting keeps two episodes' images in
            # distinct groups within the row, while 0 (text) stays 0.
            blocks = part["blocks"]
            out["blocks"][sl] = np.where(blocks > 0, blocks + block_base, 0)
            block_base += int(blocks.max(initial=0))
            out["patches"][sl] = part["patches"]
            out["segment_ids"][sl] = seg
            at += n
        return out


@dataclasses.dataclass
class _Read:
    pre_state: dict[str, Any]    # parent state before this element was read
    pre_counter: dict[str, Any]  # counter state before it was counted
    arrays: dict[str, np.ndarray]


class PackIterator(grain.DatasetIterator):
    """First-fit packing into `num_rows` open rows at a time.

    Rows are packed in chunks: episodes go into the first open row with room until one fits
    in none, then the whole chunk is emitted and that episode starts the next. Chunking is
    what makes the state small: (parent state at the chunk's first episode, rows already
    emitted, counter state there). Restoring replays the chunk from the parent and drops the
    emitted rows; packing is deterministic, so the rows come out identical. (Warnings for
    bad records inside the replayed chunk are logged again; the counts are not doubled.)
    """

    def __init__(self, parent: grain.DatasetIterator, *, seq_len: int, num_rows: int,
                 pad_id: int, patch_dim: int, skips: SkipCounter,
                 vit_patch_dim: int | None = None, patch_dtype=np.uint8):
        super().__init__(parent)
        self._seq_len, self._num_rows = seq_len, num_rows
        self._pad_id, self._patch_dim, self._vit_patch_dim = pad_id, patch_dim, vit_patch_dim
        self._patch_dtype = patch_dtype
        self._skips = skips
        self._rows: list[dict[str, np.ndarray]] | None = None
        self._emitted = 0
        self._carry: _Read | None = None
        self._anchor = copy.deepcopy(self._parent.get_state())
        self._anchor_counter = skips.get_state()

    def _read(self) -> _Read | None:
        while True:
            # Copied: some Grain iterators hand out their live state object.
            pre_state = copy.deepcopy(self._parent.get_state())
            pre_counter = self._skips.get_state()
            try:
                x = next(self._parent)
            except StopIteration:
                return None
            if isinstance(x, Skip):
                self._skips.skip(x)
                continue
            self._skips.ok()
            return _Read(pre_state, pre_counter, x)

    def _pack(self) -> None:
        first = self._carry or self._read()
        self._carry = None
        if first is None:
            self._rows = []
            self._anchor = copy.deepcopy(self._parent.get_state())
            self._anchor_counter = self._skips.get_state()
            return
        self._anchor, self._anchor_counter = first.pre_state, first.pre_counter
        rows: list[_Row] = []
        item: _Read | None = first
        while item is not None:
            n = len(item.arrays["tokens"])
            row = next((r for r in rows if r.length + n <= self._seq_len), None)
            if row is None:
                if len(rows) == self._num_rows:
                    self._carry = item
                    break
                row = _Row()
                rows.append(row)
            row.parts.append(item.arrays)
            row.length += n
            item = self._read()
        self._rows = [r.finish(self._seq_len, self._pad_id, self._patch_dim,
                               self._vit_patch_dim, self._patch_dtype) for r in rows]

    def __next__(self) -> dict[str, np.ndarray]:
        while self._rows is None or self._emitted >= len(self._rows):
            if self._rows is not None:
                self._emitted = 0
            self._pack()
            if not self._rows:
                raise StopIteration
        row = self._rows[self._emitted]
        self._emitted += 1
        return row

    def get_state(self) -> dict[str, Any]:
        return {"parent": copy.deepcopy(self._anchor), "emitted": self._emitted,
                "counter": dict(self._anchor_counter)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._skips.set_state(state["counter"])
        self._anchor = copy.deepcopy(state["parent"])
        self._anchor_counter = dict(state["counter"])
        self._emitted = int(state["emitted"])
        self._rows, self._carry = None, None


class PackIterDataset(grain.IterDataset):
    """Packs tokenized episodes (or Skip markers) into rows of `seq_len`; see PackIterator.
    Each iterator counts into `skips`, so make one iterator per counter."""

    def __init__(self, parent: grain.IterDataset, *, seq_len: int, pad_id: int,
                 patch_dim: int, skips: SkipCounter, num_rows: int = 8,
                 vit_patch_dim: int | None = None, patch_dtype=np.uint8):
        super().__init__(parent)
        self._kw = dict(seq_len=seq_len, num_rows=num_rows, pad_id=pad_id,
                        patch_dim=patch_dim, skips=skips, vit_patch_dim=vit_patch_dim,
                        patch_dtype=patch_dtype)

    def __iter__(self) -> PackIterator:
        return PackIterator(self._parent.__iter__(), **self._kw)

    def __str__(self) -> str:
        return f"PackIterDataset(seq_len={self._kw['seq_len']}, rows={self._kw['num_rows']})"


def empty_row(seq_len: int, pad_id: int, patch_dim: int,
              vit_patch_dim: int | None = None, patch_dtype=np.uint8) -> dict[str, np.ndarray]:
    return _Row().finish(seq_len, pad_id, patch_dim, vit_patch_dim, patch_dtype)


def single_row(part: dict[str, np.ndarray], seq_len: int, pad_id: int, patch_dim: int,
               vit_patch_dim: int | None = None, record: str = "?") -> dict[str, np.ndarray]:
    """One tokenized episode alone in a padded row (probes that read per-episode logits)."""
    if len(part["tokens"]) > seq_len:
        raise ValueError(f"{record}: {len(part['tokens'])} tokens do not fit data.seq_len={seq_len}")
    row = _Row()
    row.parts, row.length = [part], len(part["tokens"])
    return row.finish(seq_len, pad_id, patch_dim, vit_patch_dim, part["patches"].dtype)


# -- construction --------------------------------------------------------------------------
def _per_process(global_batch_size: int, process_count: int) -> int:
    if global_batch_size % process_count:
        raise ValueError(f"global batch {global_batch_size} is not divisible by "
                         f"{process_count} processes")
    return global_batch_size // process_count


def _mixed(source) -> grain.MapDataset:
    if isinstance(source, list) and source and isinstance(source[0], tuple):
        parts = [(grain.MapDataset.source(SafeSource(s)), float(w)) for s, w in source if len(s)]
        if not parts:
            raise ValueError("every source of the mixture is empty")
        return grain.MapDataset.mix([p for p, _ in parts], [w for _, w in parts])
    return grain.MapDataset.source(SafeSource(source))


def make_dataset(source: Sequence[Any], tokenizer: tk.EpisodeTokenizer, *, seq_len: int,
                 batch_size: int, seed: int, shuffle: bool = True, repeat: bool = True,
                 skips: SkipCounter, num_rows: int = 8, num_threads: int = 4,
                 prefetch: int = 64, num_workers: int = 0, process_index: int = 0,
                 process_count: int = 1, drop_remainder: bool = True,
                 cond_dropout=None) -> grain.IterDataset:
    """The pipeline as a Grain IterDataset of per-process batches of `batch_size` rows.
    `source` is one random-access source, or a list of (source, weight) to mix (e.g. the
    shapes episodes with a self-sampled critique split). `cond_dropout`: see
    TokenizeEpisode."""
    ds = _mixed(source).map_with_index(ReadEpisode())
    if process_count > 1:
        ds = ds[process_index::process_count]
    if shuffle:
        ds = ds.shuffle(seed)
    if repeat:
        ds = ds.repeat()
    tokenize = TokenizeEpisode(tokenizer, seq_len, cond_dropout)
    ds = ds.random_map(tokenize, seed=seed) if tokenize.dropout else ds.map(tokenize)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                              prefetch_buffer_size=prefetch))
    if num_workers:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    it = PackIterDataset(it, seq_len=seq_len, pad_id=tokenizer.tok.pad_id,
                         patch_dim=tokenizer.patch_dim, skips=skips, num_rows=num_rows,
                         vit_patch_dim=tokenizer.vit_patch_dim, patch_dtype=tokenizer.patch_dtype)
    return it.batch(batch_size, drop_remainder=drop_remainder)


def make_train_iter(source: Sequence[Any], tokenizer: tk.EpisodeTokenizer, *, seq_len: int,
                    global_batch_size: int, seed: int, shuffle: bool = True,
                    repeat: bool = True, skips: SkipCounter | None = None,
                    num_rows: int = 8, num_threads: int = 4, prefetch: int = 64,
                    num_workers: int = 0, process_index: int | None = None,
                    process_count: int | None = None, cond_dropout=None) -> grain.DatasetIterator:
    """Checkpointable iterator of per-process batches (global_batch_size / process_count
    rows, remainder dropped): dict of numpy arrays [rows, seq_len] (patches
    [rows, seq_len, patch_dim] uint8; with the tokenizer's ViT copy also vit_patches
    [rows, seq_len, vit_patch_dim] uint8 and vit_pos). Pass `skips` to read the bad-record
    counters."""
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    skips = SkipCounter() if skips is None else skips
    ds = make_dataset(source, tokenizer, seq_len=seq_len,
                      batch_size=_per_process(global_batch_size, pc), seed=seed,
                      shuffle=shuffle, repeat=repeat, skips=skips,
                      num_rows=num_rows, num_threads=num_threads, prefetch=prefetch,
                      num_workers=num_workers, process_index=pi, process_count=pc,
                      cond_dropout=cond_dropout)
    return iter(ds)


def make_eval_iter(source: Sequence[Any], tokenizer: tk.EpisodeTokenizer, *, seq_len: int,
                   global_batch_size: int, skips: SkipCounter | None = None,
                   num_rows: int = 8, num_threads: int = 4, prefetch: int = 64,
                   process_index: int | None = None,
                   process_count: int | None = None) -> grain.DatasetIterator:
    """One pass in source order; the last batch is filled with empty rows (segment_ids 0)
    so that every record is evaluated and every batch has the same shape."""
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    rows = _per_process(global_batch_size, pc)
    skips = SkipCounter() if skips is None else skips
    ds = make_dataset(source, tokenizer, seq_len=seq_len, batch_size=rows, seed=0,
                      shuffle=False, repeat=False, skips=skips,
                      num_rows=num_rows, num_threads=num_threads, prefetch=prefetch,
                      process_index=pi, process_count=pc, drop_remainder=False)
    empty = empty_row(seq_len, tokenizer.tok.pad_id, tokenizer.patch_dim,
                      tokenizer.vit_patch_dim, tokenizer.patch_dtype)
    return iter(ds.map(lambda b: pad_batch(b, rows, empty)))


def pad_batch(batch: dict[str, np.ndarray], rows: int,
              empty: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n = len(batch["tokens"])
    if n == rows:
        return batch
    return {k: np.concatenate([v, np.repeat(empty[k][None], rows - n, axis=0)])
            for k, v in batch.items()}


# -- device --------------------------------------------------------------------------------
def to_global(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh,
              data_axes: tuple[str, ...] = ("data", "fsdp")) -> dict[str, jax.Array]:
    """Per-process batch -> global jax.Arrays: the batch dim sharded over `data_axes`, the
    rest replicated. Every process must call this with its own equally sized batch."""
    sharding = NamedSharding(mesh, P(data_axes))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}


class RowSlice(grain.DatasetIterator):
    """This process's rows of each global batch from a full (single-process) iterator; its
    state is the wrapped iterator's, so Grain's per-process checkpoint files stay valid."""

    def __init__(self, parent: grain.DatasetIterator, process_index: int, process_count: int):
        super().__init__()
        self._it, self._pi, self._pc = parent, process_index, process_count

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)
        n = len(batch["tokens"]) // self._pc
        return {k: v[self._pi * n:(self._pi + 1) * n] for k, v in batch.items()}

    def get_state(self):
        return self._it.get_state()

    def set_state(self, state):
        self._it.set_state(state)
