"""The worker stream: one (rank, worker) slot's pieces -> batches, as a chain of generator stages.

``EpochDataset`` (a torch ``IterableDataset``) is what every DataLoader worker of one rank runs
for one epoch; its ``EpochSpec`` says everything the workers need. Each worker runs the stages of
``_Worker.items()``::

    pieces -> tar samples -> checked samples (bad: counted, dropped) -> shuffle buffer
      -> [train: refill passes] -> numbered (raw position) -> [resume: consumed part dropped]
      -> decoded + cropped -> [resume without raw cursor: consumed part dropped] -> batches

and yields ``StreamItem(batch, report)``: the batch dict and, beside it, the worker's control
state (``WorkerReport``: raw position, skip and refill counters, ``end`` once its stream was
read to the end); its last item carries only the report (``final``). Across a process boundary the batch travels packed (``pack_batch`` /
``unpack_batch``: see the transport note below).

Bad samples are counted only on pass 0 and only outside the replayed part of a resumed epoch
(those were counted before the checkpoint), and warned about at most once per reason per
``WARN_INTERVAL_S`` per process.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import random
import signal
import time
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from mmpretrain.data.plan import Piece, Plan
from mmpretrain.data.remote import IOStats, RemoteOptions
from mmpretrain.data.shardio import IMAGE_EXTS, hash_text, iter_shard_samples, stable_hash
from mmpretrain.data.tokenizer import tokenize_np
from mmpretrain.data.transforms import BadSample, decode_and_crop_hwc

log = logging.getLogger("mmpretrain.data")

WARN_INTERVAL_S = 30.0

_last_warning: dict[str, float] = {}


# ----------------------------------------------------------------------------- samples


def _warn_skip(reason: str, detail: str) -> None:
    now = time.monotonic()
    if now - _last_warning.get(reason, -1e9) >= WARN_INTERVAL_S:
        _last_warning[reason] = now
        log.warning("skipping bad sample (%s): %s [at most one warning per reason per %.0f s; "
                    "counts in loader.skipped]", reason, detail, WARN_INTERVAL_S)


def ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader workers ignore the stop signals. A launcher forwards SIGTERM with killpg and
    SLURM signals the whole process group, which reached the workers too: they died, and the
    rank with them, before it could checkpoint. The main process alone decides to stop (it
    finishes the step, checkpoints, then shuts its workers down; a worker whose parent is gone
    exits by itself)."""
    for name in ("SIGTERM", "SIGINT", "SIGUSR1"):
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)


@dataclasses.dataclass(slots=True)
class _RawSample:
    key: str
    image: bytes
    caption: str
    image_id: int
    pass_no: int
    url: str = ""  # the shard it came from (named in skip warnings)


def check_sample(sample: dict, max_pixels: int) -> tuple[str, bytes, str, int]:
    """Cheap checks before the shuffle buffer: (key, image bytes, caption, image id hash).
    Raises ``BadSample`` for missing image / caption, empty caption, bad json, duplicate key.
    Image bytes are checked (header, pixel guard, decode) after the buffer."""
    if "__bad__" in sample:
        raise BadSample(sample["__bad__"], f"{sample.get('__url__')} {sample.get('__key__')}")
    key = sample["__key__"]
    image = None
    for ext in IMAGE_EXTS:
        if ext in sample:
            image = sample[ext]
            break
    if image is None:
        raise BadSample("missing_image", key)
    txt = sample.get("txt")
    if txt is None:
        raise BadSample("missing_caption", key)
    try:
        caption = txt.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise BadSample("bad_caption", f"{key}: not UTF-8") from None
    if not caption:
        raise BadSample("empty_caption", key)
    image_id: Any = key
    meta_bytes = sample.get("json")
    if meta_bytes is not None:
        try:
            meta = json.loads(meta_bytes.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise BadSample("bad_json", key) from None
        if isinstance(meta, dict) and isinstance(meta.get("status"), str) and meta["status"] != "success":
            raise BadSample("failed_download", f"{key}: img2dataset status {meta['status']!r}")
        if isinstance(meta, dict) and meta.get("image_id") is not None:
            image_id = meta["image_id"]
    return key, image, caption, stable_hash(image_id)


# ----------------------------------------------------------------------------- what travels


@dataclasses.dataclass(frozen=True)
class EpochSpec:
    """What every DataLoader worker of one rank needs for one epoch (built by ``ShardLoader``)."""

    plan: Plan
    rank: int
    num_workers: int
    """Worker slots per rank (1 for a loader without worker processes)."""
    epoch: int
    seed: int
    train: bool
    batch: int
    """Samples per batch on this rank."""
    tokenizer: Any
    max_length: int
    image_size: int
    max_pixels: int
    train_crop: str
    train_crop_scale: tuple[float, float]
    shuffle_buffer: int
    skip_batches: list[int] | None
    """Resume: batches each worker yielded before the cursor (None: start of the epoch)."""
    skip_raw: list[int] | None
    """Resume: each worker's raw-stream position at the cursor (None: not known, decode and drop
    ``skip_batches`` batches instead)."""
    rotate: int
    """The slot DataLoader worker 0 plays (batches done % num_workers): DataLoader polls its
    workers round-robin from worker 0, a resumed epoch continues with the next slot."""
    finished: frozenset[int] = frozenset()
    """Resume in the same process: the slots whose stream end was consumed (a report with
    ``end``). They yield only an empty final report: replaying them would count the skips read
    after their last batch (eval: the tail of the last shard) a second time."""
    remote: RemoteOptions = RemoteOptions()
    """Retry policy of remote shard reads (http(s), fsspec)."""


@dataclasses.dataclass(frozen=True)
class WorkerReport:
    """A worker's control state as of one item of its stream (it travels beside the batch)."""

    worker: int
    """The slot (0 .. num_workers - 1)."""
    raw: int
    """Raw-stream position of the item's last sample (the resume cursor)."""
    skipped: dict[str, int]
    """Bad samples by reason so far this epoch (not counting a replayed part)."""
    refilled: int
    """Samples of refill passes put into batches so far this epoch."""
    final: bool = False
    """The worker's last item: no batch, the counters at the end of its stream."""
    end: bool = False
    """The worker's stream was read to its end before this item (its final item; an eval
    worker's last, partial batch): the counters include the skips read after ``raw``."""
    retries: int = 0
    """Remote reads retried so far this epoch by this worker (every retry, a replayed part too:
    they are network events, not properties of the data)."""


class StreamItem(NamedTuple):
    batch: dict | None
    """The batch dict (packed by ``pack_batch`` in a worker process); None on the final item."""
    report: WorkerReport


# ----------------------------------------------------------------------------- the stages


class _Worker:
    """One (rank, worker) slot's stream for one epoch. The stages share the worker's counters."""

    def __init__(self, spec: EpochSpec, wid: int, pack: bool):
        self.spec = spec
        self.wid = wid
        self.pack = pack  # results cross a process boundary: see pack_batch
        self.skipped: collections.Counter = collections.Counter()
        self.good = 0
        self.refilled = 0
        self.raw_pos = 0
        self.io = IOStats()  # remote read retries of this worker
        # True while a resumed worker replays what was consumed before the checkpoint: those
        # skips and refills are already in the loader's restored counters (state_dict)
        self.replaying = False

    def items(self) -> Iterator[StreamItem]:
        spec = self.spec
        slot = spec.rank * spec.num_workers + self.wid
        pieces = spec.plan.slots[slot]
        planned = spec.plan.batches[slot] if spec.train else None
        done = spec.skip_batches[self.wid] if spec.skip_batches else 0
        skip_raw = spec.skip_raw[self.wid] if spec.skip_raw is not None else None
        skip_decoded = 0 if skip_raw is not None else done * spec.batch
        if (planned is not None and done >= planned) or self.wid in spec.finished:
            yield self._final()
            return
        self.replaying = bool(skip_raw) or skip_decoded > 0
        # checked samples of the slot's pieces: pass 0, then (train) refill passes, each pass
        # through its own seeded shuffle buffer
        samples = self._passes(pieces)
        # the same; self.raw_pos = the position of the current one (the resume cursor)
        samples = self._numbered(samples)
        # without the first skip_raw samples (resume: consumed before the checkpoint or the stop)
        samples = self._skip_consumed_raw(samples, skip_raw)
        # (sample, HWC uint8 image): decoded, resized and cropped; undecodable ones dropped
        decoded = self._decoded(samples)
        # without the first skip_decoded ones (resume without a raw cursor: consumed before)
        decoded = self._skip_consumed_decoded(decoded, skip_decoded)
        # StreamItems with full batches (eval: then the last, partial one), at most the rest of
        # the planned number (train)
        yield from self._batched(decoded, None if planned is None else planned - done)
        # the final item: the counters at the end of the stream
        yield self._final()

    def _count(self, reason: str, detail: str, pass_no: int) -> None:
        if pass_no == 0 and not self.replaying:
            self.skipped[reason] += 1
            _warn_skip(reason, detail)

    def _checked(self, pieces: list[Piece], pass_no: int) -> Iterator[_RawSample]:
        """The samples of the pieces that pass ``check_sample``, in shard order."""
        spec = self.spec
        for piece in pieces:
            for idx, sample in iter_shard_samples(piece.url, stop=piece.stop, remote=spec.remote, stats=self.io):
                if idx >= 0 and idx not in piece:
                    continue
                try:
                    key, image, caption, iid = check_sample(sample, spec.max_pixels)
                except BadSample as e:  # the warning names the shard and the key
                    self._count(e.reason, f"{piece.url} {sample.get('__key__', '?')}: {e}", pass_no)
                    continue
                yield _RawSample(key, image, caption, iid, pass_no, piece.url)

    def _shuffled(self, it: Iterator[_RawSample], rng: random.Random) -> Iterator[_RawSample]:
        size = self.spec.shuffle_buffer if self.spec.train else 0
        if size <= 1:
            yield from it
            return
        buf: list[_RawSample] = []
        for s in it:
            if len(buf) < size:
                buf.append(s)
                continue
            i = rng.randrange(len(buf))
            buf[i], s = s, buf[i]
            yield s
        rng.shuffle(buf)
        yield from buf

    def _passes(self, pieces: list[Piece]) -> Iterator[_RawSample]:
        """Pass 0 over the pieces, then (train) refill passes, each through its own buffer. A
        refill pass is needed when skips leave the planned batches short; the stream ends only
        when the batching stage stops pulling."""
        spec = self.spec
        pass_no = 0
        while True:
            good_before = self.good
            rng = random.Random(f"buffer:{spec.seed}:{spec.epoch}:{spec.rank}:{self.wid}:{pass_no}")
            yield from self._shuffled(self._checked(pieces, pass_no), rng)
            if not spec.train:
                return
            if pass_no > 0 and self.good == good_before:
                raise RuntimeError(
                    f"loader worker {self.wid} of rank {spec.rank}: its shards {sorted({p.url for p in pieces})} "
                    f"yield no usable sample (skipped: {dict(self.skipped)}); cannot fill its "
                    "planned batches")
            pass_no += 1

    def _numbered(self, samples: Iterator[_RawSample]) -> Iterator[_RawSample]:
        for s in samples:
            self.raw_pos += 1
            yield s

    def _skip_consumed_raw(self, samples: Iterator[_RawSample], skip_raw: int | None) -> Iterator[_RawSample]:
        if skip_raw:
            for _ in samples:
                self.good += 1  # consumed before the checkpoint (decoded fine then)
                if self.raw_pos == skip_raw:
                    self.replaying = False  # the next raw sample is new: count from here
                    break
        yield from samples

    def _decoded(self, samples: Iterator[_RawSample]) -> Iterator[tuple[_RawSample, np.ndarray]]:
        spec = self.spec
        size, max_pixels, train, crop = spec.image_size, spec.max_pixels, spec.train, spec.train_crop
        crop_scale = tuple(spec.train_crop_scale)
        # crop seed = stable_hash((seed, epoch, key, pass_no)): the tuple's text, built from a prefix
        seed_prefix = str((spec.seed, spec.epoch))[:-1] + ", "
        for s in samples:
            crop_seed = hash_text(f"{seed_prefix}{s.key!r}, {s.pass_no!r})")
            try:
                hwc = decode_and_crop_hwc(s.image, size, max_pixels=max_pixels, train=train, crop=crop,
                                          seed=crop_seed, scale=crop_scale)
            except BadSample as e:
                self._count(e.reason, f"{s.url} {s.key}: {e}", s.pass_no)
                continue
            self.good += 1
            yield s, hwc

    def _skip_consumed_decoded(self, decoded: Iterator[tuple[_RawSample, np.ndarray]],
                               skip: int) -> Iterator[tuple[_RawSample, np.ndarray]]:
        if skip > 0:  # no raw cursor: decode and drop what was consumed (counted then)
            for _ in decoded:
                skip -= 1
                if skip == 0:
                    self.replaying = False
                    break
        yield from decoded

    def _batched(self, decoded: Iterator[tuple[_RawSample, np.ndarray]],
                 limit: int | None) -> Iterator[StreamItem]:
        spec = self.spec
        b, size = spec.batch, spec.image_size
        pixels = np.empty((b, 3, size, size), dtype=np.uint8)  # the batch, filled in place
        buf: list[_RawSample] = []
        n = 0
        for s, hwc in decoded:
            if s.pass_no > 0:
                self.refilled += 1
            pixels[len(buf)] = hwc.transpose(2, 0, 1)
            buf.append(s)
            if len(buf) == b:
                n += 1
                yield self._collate(buf, pixels)
                buf = []
                pixels = np.empty((b, 3, size, size), dtype=np.uint8)
                if limit is not None and n >= limit:
                    return
        if buf and not spec.train:
            yield self._collate(buf, pixels[:len(buf)].copy(), end=True)

    def _report(self, final: bool = False, end: bool = False) -> WorkerReport:
        return WorkerReport(self.wid, self.raw_pos, dict(self.skipped), self.refilled, final, end or final,
                            self.io.retries)

    def _final(self) -> StreamItem:
        return StreamItem(None, self._report(final=True))

    def _collate(self, buf: list[_RawSample], pixels: np.ndarray, end: bool = False) -> StreamItem:
        spec = self.spec
        captions = [s.caption for s in buf]
        input_ids, attention_mask = tokenize_np(spec.tokenizer, captions, spec.max_length)
        image_ids = np.array([s.image_id for s in buf], dtype=np.int64)
        keys = [s.key for s in buf]
        if not self.pack:
            batch = {"pixels": torch.from_numpy(pixels), "input_ids": torch.from_numpy(input_ids),
                     "attention_mask": torch.from_numpy(attention_mask), "image_ids": torch.from_numpy(image_ids),
                     "keys": keys, "captions": captions}
        else:
            batch = pack_batch(pixels, input_ids, attention_mask, image_ids, keys, captions)
        return StreamItem(batch, self._report(end=end))


class EpochDataset(IterableDataset):
    """One rank's epoch for ``DataLoader(batch_size=None)`` (or iterated directly, without workers)."""

    def __init__(self, spec: EpochSpec):
        super().__init__()
        self.spec = spec

    def __iter__(self) -> Iterator[StreamItem]:
        info = get_worker_info()
        wid = info.id if info is not None else 0
        if info is not None and torch.get_num_threads() != 1:
            torch.set_num_threads(1)  # DataLoader does this already; workers never run torch ops in threads
        # worker i plays slot (i + rotate) % K: see EpochSpec.rotate
        return _Worker(self.spec, (wid + self.spec.rotate) % self.spec.num_workers, pack=info is not None).items()


# ----------------------------------------------------------------------------- transport

# Transport from DataLoader worker processes. Every tensor in a worker's result travels through
# its own shared-memory segment whose file descriptor the main process fetches over a socket
# (about 0.3-0.5 ms per tensor). So the int64 arrays travel as one ``bytes`` blob through the
# result pipe, and so do the pixels of batches up to ``PIPE_PIXELS_MAX`` bytes (cheaper than a
# segment below about 1 MiB); larger pixel batches travel as one shared-memory tensor. The main
# process (``unpack_batch``) rebuilds exactly the batch a worker-less loader yields.
PIPE_PIXELS_MAX = 1 << 20


def pack_batch(pixels: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray, image_ids: np.ndarray,
               keys: list[str], captions: list[str]) -> dict:
    ints = np.concatenate([image_ids, input_ids.ravel(), attention_mask.ravel()]).tobytes()
    px: Any = pixels.tobytes() if pixels.nbytes <= PIPE_PIXELS_MAX else torch.from_numpy(pixels)
    return {"_pixels": px, "_shape": (pixels.shape, input_ids.shape), "_ints": ints, "keys": keys,
            "captions": captions}


def unpack_batch(item: dict) -> dict:
    """A packed worker batch -> the batch dict (same keys, order, dtypes and values)."""
    px_shape, tok_shape = item.pop("_shape")
    px = item.pop("_pixels")
    if isinstance(px, bytes):
        px = torch.frombuffer(bytearray(px), dtype=torch.uint8).view(px_shape)
    ints = np.frombuffer(item.pop("_ints"), dtype=np.int64)
    n, t = px_shape[0], tok_shape[0] * tok_shape[1]
    batch = {"pixels": px,
             "input_ids": torch.from_numpy(ints[n:n + t].reshape(tok_shape).copy()),
             "attention_mask": torch.from_numpy(ints[n + t:n + 2 * t].reshape(tok_shape).copy()),
             "image_ids": torch.from_numpy(ints[:n].copy()),
             "keys": item.pop("keys"), "captions": item.pop("captions")}
    return batch

