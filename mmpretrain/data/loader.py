"""WebDataset shards -> per-rank batches, balanced so every rank runs the same number of steps.

Pipeline (see docs/data.md for the design and the numbers)::

    sources --expand_sources--> shard URLs (+ per-shard sample counts: manifest or counted)
      --plan(seed, epoch)--> pieces of shards assigned to (rank, worker) slots, equal quotas
      --worker: tar -> samples (raw checks, header + pixel guard) -> shuffle buffer (seeded)
      --> decode + crop (uint8) -> tokenize -> batch (in the worker)
      --DataLoader(batch_size=None)--> batches, workers interleaved round-robin (deterministic)

Balance. A *piece* is ``(url, start, stop, stride)``: the samples of one shard whose index is in
``range(start, stop, stride)``. Each epoch the shard list is shuffled with ``(seed, epoch)``
(identical on every rank); with fewer pieces than ``world_size * workers`` slots each shard is
split into strided pieces. Pieces are assigned greedily (largest first, to the least loaded
slot), then equalised at sample level: every rank gets ``floor(N / global_batch)`` batches,
worker ``k`` of a rank ``nb // K + (k < nb % K)`` of them; over-full slots hand their tail to
under-full ones, what is left (< one global batch) is dropped and reported.

Bad samples (corrupt or oversized image, missing/empty caption, missing image, bad json,
duplicate key, truncated tar) are skipped, counted by reason and warned about at most once per
reason per 30 s per process. A worker whose pieces run short (skips) re-reads its own pieces
(a *refill* pass) until it has its planned number of batches, so batch counts stay exact.

Eval (``train=False``): no shuffle, center crop, last partial batch kept, each sample exactly
once over all ranks and workers (ranks may differ in batch count).

Resume: ``state_dict()`` holds ``(epoch, batches consumed)`` plus, per worker, how many
shuffle-buffer outputs it consumed, and the skip / refill counters up to the cursor; a resumed
worker replays tar reading and the shuffle buffer without decoding images (and without counting
the replayed skips again) and continues with exactly the next batch.
"""

from __future__ import annotations

import collections
import dataclasses
import glob as globmod
import hashlib
import heapq
import json
import logging
import os
import random
import signal
import tarfile
import time
import warnings
from typing import Any, Iterator
from urllib.parse import urlparse
from zlib import adler32

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmpretrain.data.config import DataConfig
from mmpretrain.data.tokenizer import tokenize_np
from mmpretrain.data.transforms import BadSample, decode_and_crop_hwc

log = logging.getLogger("mmpretrain.data")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
SHARD_EXTS = (".tar", ".tar.gz", ".tgz")
WARN_INTERVAL_S = 30.0
META_KEYS = ("_worker", "_raw", "_skipped", "_refilled", "_final")


# ----------------------------------------------------------------------------- sources

def _is_remote(url: str) -> bool:
    if url.startswith("pipe:"):
        return True
    scheme = urlparse(url).scheme
    return len(scheme) > 1 and scheme != "file"


def expand_sources(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """Shard URLs for brace patterns, globs, directories (their ``*.tar``), local paths,
    ``pipe:`` commands and fsspec URLs (``s3://...``; globbed through fsspec)."""
    import braceexpand

    if isinstance(spec, (list, tuple)):
        return [u for s in spec for u in expand_sources(s)]
    out: list[str] = []
    for item in braceexpand.braceexpand(str(spec)):
        item = item.strip()
        if not item:
            continue
        if item.startswith("pipe:"):
            out.append(item)
            continue
        if _is_remote(item):
            if globmod.has_magic(item):
                import fsspec

                fs, _, paths = fsspec.get_fs_token_paths(item)
                proto = fs.protocol[0] if isinstance(fs.protocol, (list, tuple)) else fs.protocol
                out += sorted(f"{proto}://{p}" for p in paths)
            else:
                out.append(item)
            continue
        path = item[len("file://"):] if item.startswith("file://") else item
        if os.path.isdir(path):
            out += sorted(p for p in globmod.glob(os.path.join(path, "*")) if p.endswith(SHARD_EXTS))
        elif globmod.has_magic(path):
            out += sorted(p for p in globmod.glob(path) if not p.endswith(".tmp"))
        else:
            out.append(path)
    return out


def open_url(url: str):
    """A readable binary stream: webdataset's opener (local, ``pipe:``, http) or fsspec."""
    scheme = urlparse(url).scheme
    if not url.startswith("pipe:") and (len(scheme) <= 1 or scheme == "file"):
        return open(url[len("file://"):] if url.startswith("file://") else url, "rb")
    if url.startswith("pipe:") or scheme in ("http", "https"):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    import fsspec

    return fsspec.open(url, "rb").open()


def _split_name(name: str) -> tuple[str | None, str | None]:
    """``dir/abc.seg.jpg`` -> (``dir/abc``, ``seg.jpg``), as webdataset groups files."""
    base = os.path.basename(name)
    if "." not in base:
        return None, None
    stem, ext = base.split(".", 1)
    d = os.path.dirname(name)
    return (f"{d}/{stem}" if d else stem), ext.lower()


class TruncatedTar(Exception):
    """The tar stream ended inside a header or a member, or without its end marker."""


_BLOCK = 512


def _pax_path(data: bytes) -> str | None:
    path, pos = None, 0
    while pos < len(data):
        sp = data.index(b" ", pos)
        length = int(data[pos:sp])
        rec = data[sp + 1:pos + length - 1]
        k, _, v = rec.partition(b"=")
        if k == b"path":
            path = v.decode("utf-8", "replace")
        pos += length
    return path


def _tar_checksum(header: bytes) -> int:
    """The ustar checksum of a header: the unsigned sum of its bytes with the checksum field
    counted as spaces. Summed in C: ``adler32`` of at most 256 bytes is ``1 + sum(bytes)``
    exactly (no modulo, 256 * 255 < 65521), so two halves give the sum ~5x faster than
    ``sum()`` over the header."""
    mv = memoryview(header)
    total = (adler32(mv[:256]) & 0xFFFF) + (adler32(mv[256:]) & 0xFFFF) - 2
    return total - sum(header[148:156]) + 256


_ZERO_BLOCK = bytes(_BLOCK)


def iter_tar_members(f) -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular files of an uncompressed tar stream (ustar, GNU long names,
    pax headers). A lean replacement for ``tarfile``'s stream mode, about 5x faster per member
    and strict about truncation: raises ``TruncatedTar`` when the stream ends before the
    end-of-archive marker."""
    long_name: str | None = None
    read = f.read
    while True:
        header = read(_BLOCK)
        if len(header) < _BLOCK:
            raise TruncatedTar("end of stream inside a header / no end-of-archive marker")
        if header == _ZERO_BLOCK:
            return  # end-of-archive marker
        try:
            if header[124] & 0x80:  # GNU base-256
                size = int.from_bytes(header[125:136], "big")
            else:
                size = int(header[124:136].rstrip(b"\0 ").strip() or b"0", 8)
        except ValueError:
            raise TruncatedTar("corrupt header") from None
        chk = header[148:156].rstrip(b"\0 ").strip()
        if chk and int(chk, 8) != _tar_checksum(header):
            raise TruncatedTar("header checksum mismatch")
        kind = header[156:157]
        if size:
            padded = -(-size // _BLOCK) * _BLOCK
            data = read(padded)
            if len(data) != padded:
                raise TruncatedTar(f"wanted {padded} bytes, got {len(data)}")
            if padded != size:
                data = data[:size]
        else:
            data = b""
        if kind == b"L":
            long_name = data.rstrip(b"\0").decode("utf-8", "replace")
            continue
        if kind == b"x":
            long_name = _pax_path(data) or long_name
            continue
        if kind not in (b"0", b"\0", b"7"):
            long_name = None
            continue  # directories, links, global pax headers
        if long_name is not None:
            name, long_name = long_name, None
        else:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            if header[257:262] == b"ustar":
                prefix = header[345:500].split(b"\0", 1)[0]
                if prefix:
                    name = prefix.decode("utf-8", "replace") + "/" + name
        yield name, data


_READ_BUFFER = 1 << 20  # local shards: 1 MiB reads instead of Python's default 8 KiB


def _open_tar_stream(url: str):
    if url.endswith((".gz", ".tgz")):
        import gzip

        stream = open_url(url)
        return gzip.GzipFile(fileobj=stream, mode="rb"), stream
    scheme = urlparse(url).scheme
    if not url.startswith("pipe:") and (len(scheme) <= 1 or scheme == "file"):
        stream = open(url[len("file://"):] if url.startswith("file://") else url, "rb", buffering=_READ_BUFFER)
        return stream, stream
    stream = open_url(url)
    return stream, stream


def _member_key(name: str) -> tuple[str | None, str | None]:
    """``_split_name`` without the ``os.path`` calls for plain names (no ``//``, not absolute),
    where ``dirname`` is the text before the last ``/``; ``(None, None)`` also for ``__*``
    files (tar metadata the loader ignores)."""
    if "//" in name or name.startswith("/"):
        key, ext = _split_name(name)
        return (None, None) if key is None or os.path.basename(name).startswith("__") else (key, ext)
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0 or name.startswith("__", slash):
        return None, None
    return name[:dot], name[dot + 1:].lower()


def iter_shard_samples(url: str, stop: int | None = None) -> Iterator[tuple[int, dict]]:
    """(index, sample) for the samples of one tar, index = position of the key group.

    A sample is a dict ``{"__key__": key, ext: bytes, ...}``. Problems are reported in-band:
    a sample with ``"__bad__": reason`` (``duplicate_key``) and, when the tar ends early,
    a final ``(-1, {"__bad__": "truncated_tar"})``; the sample cut by the truncation is dropped.
    Reading stops after index ``stop - 1`` when ``stop`` is given.
    """
    f, raw = _open_tar_stream(url)
    seen: set[str] = set()
    cur: dict | None = None
    cur_key = None
    idx = -1
    truncated = False
    try:
        try:
            for name, data in iter_tar_members(f):
                key, ext = _member_key(name)
                if key is None:
                    continue
                if key != cur_key:
                    if cur is not None:
                        yield idx, cur
                        if stop is not None and idx + 1 >= stop:
                            return
                    idx += 1
                    cur = {"__key__": key, "__url__": url}
                    cur_key = key
                    if key in seen:
                        cur["__bad__"] = "duplicate_key"
                    seen.add(key)
                if ext in cur:
                    cur["__bad__"] = "duplicate_key"
                cur[ext] = data
        except (TruncatedTar, EOFError, OSError, ValueError) as e:
            truncated = True
            log.debug("truncated tar %s: %s", url, e)
            # the members read so far are whole (a cut member is never yielded): the last sample
            # is kept when it has its image and caption (the cut fell after it), else it is the
            # one sample the cut took, counted once as truncated_tar
            if cur is not None and not ("txt" in cur and any(x in cur for x in IMAGE_EXTS)):
                cur["__bad__"] = "truncated_tar"
                truncated = False
        if cur is not None:
            yield idx, cur
        if truncated:
            yield -1, {"__bad__": "truncated_tar", "__key__": "", "__url__": url}
    finally:
        for obj in (f, raw) if f is not raw else (raw,):
            try:
                obj.close()
            except Exception:  # noqa: BLE001 - pipe exit status after an early stop
                pass


UNREADABLE: dict[str, str] = {}
"""Local shards ``count_samples`` could not read as a tar, with the reason (the loader warns
about them and reports them as ``ShardLoader.unreadable_shards``)."""


def count_samples(url: str) -> int:
    """Number of samples (key groups) in one shard, read from its headers. A local file that is
    not a readable tar counts 0 and is recorded in ``UNREADABLE``."""
    n = 0
    if not _is_remote(url):
        last = None
        path = url[len("file://"):] if url.startswith("file://") else url
        UNREADABLE.pop(url, None)  # as of this count
        try:
            if os.path.getsize(path) == 0:
                UNREADABLE[url] = "empty file (0 bytes)"
                return 0
            with tarfile.open(path, "r:*") as tf:
                for info in tf:
                    key, _ = _split_name(info.name)
                    if info.isreg() and key is not None and key != last and \
                            not os.path.basename(info.name).startswith("__"):
                        n += 1
                        last = key
        except (tarfile.TarError, EOFError, OSError) as e:
            if n == 0:
                UNREADABLE[url] = f"not a readable tar archive ({type(e).__name__}: {e})"
        return n
    for idx, _ in iter_shard_samples(url):
        n = max(n, idx + 1)
    return n


def shards_with_key(urls: list[str], key: str, limit: int = 2) -> list[str]:
    """The first ``limit`` distinct local shards among ``urls`` holding a sample with this
    ``__key__`` (tar headers only; remote shards are not searched). For error messages."""
    found: list[str] = []
    for url in dict.fromkeys(urls):
        if len(found) >= limit:
            break
        if _is_remote(url):
            continue
        try:
            with tarfile.open(url[len("file://"):] if url.startswith("file://") else url, "r:*") as tf:
                if any(info.isreg() and _split_name(info.name)[0] == key for info in tf):
                    found.append(url)
        except (tarfile.TarError, EOFError, OSError):
            continue
    return found


_MANIFEST_CACHE: dict[str, dict[str, int] | None] = {}


def _manifest_counts(dir_url: str) -> dict[str, int] | None:
    if dir_url not in _MANIFEST_CACHE:
        counts = None
        try:
            path = os.path.join(dir_url, "manifest.json") if not _is_remote(dir_url) else dir_url + "/manifest.json"
            if _is_remote(path) or os.path.exists(path):
                with open_url(path) as f:
                    manifest = json.loads(f.read().decode("utf-8"))
                counts = {}
                for split in manifest.get("splits", {}).values():
                    for shard in split.get("shards", []):
                        counts[os.path.basename(shard["file"])] = int(shard["num_samples"])
        except Exception:  # noqa: BLE001 - no manifest: count the shards instead
            counts = None
        _MANIFEST_CACHE[dir_url] = counts
    return _MANIFEST_CACHE[dir_url]


def shard_counts(urls: list[str]) -> list[int]:
    """Samples per shard: ``manifest.json`` beside the shard when it lists it, else counted."""
    out = []
    for url in urls:
        n = None
        if not url.startswith("pipe:"):
            d, base = url.rsplit("/", 1) if "/" in url else (".", url)
            counts = _manifest_counts(d)
            if counts is not None:
                n = counts.get(base)
        out.append(count_samples(url) if n is None else n)
    return out


def stable_hash(value: Any) -> int:
    """Stable 63-bit hash (same in every process and run) of ``str(value)``."""
    return _hash_text(str(value))


def _hash_text(text: str) -> int:
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


# ----------------------------------------------------------------------------- plan

@dataclasses.dataclass(frozen=True)
class Piece:
    """Samples ``range(start, stop, stride)`` (indices inside the shard) of one shard."""

    url: str
    start: int
    stop: int
    stride: int = 1

    @property
    def count(self) -> int:
        return len(range(self.start, self.stop, self.stride))

    def split(self, n: int) -> tuple["Piece", "Piece"]:
        cut = self.start + n * self.stride
        return Piece(self.url, self.start, cut, self.stride), Piece(self.url, cut, self.stop, self.stride)

    def __contains__(self, idx: int) -> bool:
        return self.start <= idx < self.stop and (idx - self.start) % self.stride == 0


@dataclasses.dataclass
class Plan:
    slots: list[list[Piece]]
    """Pieces per slot; slot index = rank * num_workers + worker."""
    batches: list[int]
    """Batches per slot (train: exact; eval: upper bound from the counts)."""
    dropped: int
    """Samples left out of this epoch (train: < one global batch)."""
    num_samples: int


def _epoch_pieces(sources: list[list[str]], counts: list[list[int]], weights: list[float],
                  seed: int, epoch: int, resample: bool, train: bool) -> list[Piece]:
    """The epoch's shard pieces (mixing weights applied), in a (seed, epoch)-shuffled order."""
    total = sum(sum(c) for c in counts)
    pieces: list[Piece] = []
    if not train:
        return [Piece(u, 0, n) for urls, cs in zip(sources, counts) for u, n in zip(urls, cs) if n > 0]
    if not weights and not resample:
        pieces = [Piece(u, 0, n) for urls, cs in zip(sources, counts) for u, n in zip(urls, cs) if n > 0]
        random.Random(f"shards:{seed}:{epoch}").shuffle(pieces)
        return pieces
    ws = list(weights) if weights else [float(sum(c)) for c in counts]
    wsum = sum(ws)
    for s, (urls, cs) in enumerate(zip(sources, counts)):
        target = int(round(total * ws[s] / wsum)) if wsum > 0 else 0
        avail = [(u, n) for u, n in zip(urls, cs) if n > 0]
        if target <= 0 or not avail:
            continue
        rng = random.Random(f"mix:{seed}:{epoch}:{s}")
        order: list[tuple[str, int]] = []
        while target > 0:
            if resample:
                u, n = rng.choices(avail, weights=[n for _, n in avail])[0]
            else:
                if not order:
                    order = list(avail)
                    rng.shuffle(order)
                u, n = order.pop()
            take = min(n, target)
            pieces.append(Piece(u, 0, take))
            target -= take
    random.Random(f"shards:{seed}:{epoch}").shuffle(pieces)
    return pieces


def make_plan(pieces: list[Piece], *, world_size: int, num_workers: int, batch_per_rank: int,
              train: bool, seed: int, epoch: int) -> Plan:
    """Assign pieces to ``world_size * num_workers`` slots (see module docstring)."""
    S = world_size * num_workers
    b = batch_per_rank
    total = sum(p.count for p in pieces)
    # too few pieces for the slots: strided sub-pieces, so every slot reads something
    if 0 < len(pieces) < S:
        m = -(-S // len(pieces))
        pieces = [Piece(p.url, p.start + j * p.stride, p.stop, p.stride * m)
                  for p in pieces for j in range(m)]
        pieces = [p for p in pieces if p.count > 0]
    order = sorted(range(len(pieces)), key=lambda i: -pieces[i].count)
    slots: list[list[tuple[int, Piece]]] = [[] for _ in range(S)]
    loads = [0] * S
    heap = [(0, j) for j in range(S)]
    for i in order:
        load, j = heapq.heappop(heap)
        slots[j].append((i, pieces[i]))
        loads[j] = load + pieces[i].count
        heapq.heappush(heap, (loads[j], j))

    if not train:
        out = [[p for _, p in sorted(s)] for s in slots]
        return Plan(out, [-(-load // b) for load in loads], 0, total)

    nb = total // (b * world_size)  # batches per rank
    per_worker = [nb // num_workers + (1 if k < nb % num_workers else 0) for k in range(num_workers)]
    quota = [per_worker[j % num_workers] * b for j in range(S)]
    pool: collections.deque[tuple[int, Piece]] = collections.deque()
    for j in range(S):
        while loads[j] > quota[j]:
            i, last = slots[j].pop()
            excess = loads[j] - quota[j]
            if last.count <= excess:
                pool.append((i, last))
                loads[j] -= last.count
            else:
                keep, rest = last.split(last.count - excess)
                slots[j].append((i, keep))
                pool.append((i, rest))
                loads[j] = quota[j]
    for j in range(S):
        while loads[j] < quota[j]:
            i, p = pool.popleft()
            need = quota[j] - loads[j]
            if p.count > need:
                p, rest = p.split(need)
                pool.appendleft((i, rest))
            slots[j].append((i, p))
            loads[j] += p.count
    dropped = sum(p.count for _, p in pool)
    out = []
    for j, s in enumerate(slots):
        ps = [p for _, p in s]
        random.Random(f"slot:{seed}:{epoch}:{j}").shuffle(ps)
        out.append(ps)
    return Plan(out, [per_worker[j % num_workers] for j in range(S)], dropped, total)


# ----------------------------------------------------------------------------- worker side

_last_warning: dict[str, float] = {}


def _warn_skip(reason: str, detail: str) -> None:
    now = time.monotonic()
    if now - _last_warning.get(reason, -1e9) >= WARN_INTERVAL_S:
        _last_warning[reason] = now
        log.warning("skipping bad sample (%s): %s [at most one warning per reason per %.0f s; "
                    "counts in loader.skipped]", reason, detail, WARN_INTERVAL_S)


def _ignore_stop_signals(_worker_id: int) -> None:
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


class _Worker:
    """One (rank, worker) slot's stream of batches for one epoch."""

    def __init__(self, ds: "_EpochDataset", wid: int):
        self.ds = ds
        self.wid = wid
        self.skipped: collections.Counter = collections.Counter()
        self.good = 0
        self.refilled = 0
        # True while a resumed worker replays what was consumed before the checkpoint: those
        # skips and refills are already in the loader's restored counters (state_dict)
        self.replaying = False

    def _count(self, reason: str, detail: str, pass_no: int) -> None:
        if pass_no == 0 and not self.replaying:
            self.skipped[reason] += 1
            _warn_skip(reason, detail)

    def _raw_pass(self, pieces: list[Piece], pass_no: int) -> Iterator[_RawSample]:
        ds = self.ds
        for piece in pieces:
            for idx, sample in iter_shard_samples(piece.url, stop=piece.stop):
                if idx >= 0 and idx not in piece:
                    continue
                try:
                    key, image, caption, iid = check_sample(sample, ds.max_pixels)
                except BadSample as e:  # the warning names the shard and the key
                    self._count(e.reason, f"{piece.url} {sample.get('__key__', '?')}: {e}", pass_no)
                    continue
                yield _RawSample(key, image, caption, iid, pass_no, piece.url)

    def _shuffled(self, it: Iterator[_RawSample], rng: random.Random) -> Iterator[_RawSample]:
        size = self.ds.shuffle_buffer if self.ds.train else 0
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

    def _stream(self, pieces: list[Piece]) -> Iterator[_RawSample]:
        """Pass 0 over the pieces, then (train) refill passes, each through its own buffer."""
        ds = self.ds
        pass_no = 0
        while True:
            good_before = self.good
            rng = random.Random(f"buffer:{ds.seed}:{ds.epoch}:{ds.rank}:{self.wid}:{pass_no}")
            yield from self._shuffled(self._raw_pass(pieces, pass_no), rng)
            if not ds.train:
                return
            if pass_no > 0 and self.good == good_before:
                raise RuntimeError(
                    f"loader worker {self.wid} of rank {ds.rank}: its shards {sorted({p.url for p in pieces})} "
                    f"yield no usable sample (skipped: {dict(self.skipped)}); cannot fill its "
                    "planned batches")
            pass_no += 1

    def batches(self) -> Iterator[dict]:
        ds = self.ds
        slot = ds.rank * ds.num_workers + self.wid
        pieces = ds.plan.slots[slot]
        planned = ds.plan.batches[slot] if ds.train else None
        done = ds.skip_batches[self.wid] if ds.skip_batches else 0
        skip_raw = ds.skip_raw[self.wid] if ds.skip_raw is not None else None
        skip_good = 0 if skip_raw is not None else done * ds.batch
        b = ds.batch
        if planned is not None and done >= planned:
            yield self._final(0)
            return
        raw_pos = 0
        size, max_pixels, train, crop = ds.image_size, ds.max_pixels, ds.train, ds.train_crop
        crop_scale = tuple(ds.train_crop_scale)
        # crop seed = stable_hash((seed, epoch, key, pass_no)): the tuple's text, built from a prefix
        seed_prefix = str((ds.seed, ds.epoch))[:-1] + ", "
        pixels = np.empty((b, 3, size, size), dtype=np.uint8)  # the batch, filled in place
        buf: list[_RawSample] = []
        self.replaying = bool(skip_raw) or skip_good > 0
        if planned is None or planned > 0:
            for s in self._stream(pieces):
                raw_pos += 1
                if skip_raw is not None and raw_pos <= skip_raw:
                    self.good += 1  # consumed before the checkpoint (decoded fine then)
                    if raw_pos == skip_raw:
                        self.replaying = False  # the next raw sample is new: count from here
                    continue
                crop_seed = _hash_text(f"{seed_prefix}{s.key!r}, {s.pass_no!r})")
                try:
                    hwc = decode_and_crop_hwc(s.image, size, max_pixels=max_pixels, train=train, crop=crop,
                                              seed=crop_seed, scale=crop_scale)
                except BadSample as e:
                    self._count(e.reason, f"{s.url} {s.key}: {e}", s.pass_no)
                    continue
                self.good += 1
                if skip_good > 0:  # no raw cursor: decode and drop what was consumed (counted then)
                    skip_good -= 1
                    if skip_good == 0:
                        self.replaying = False
                    continue
                if s.pass_no > 0:
                    self.refilled += 1
                pixels[len(buf)] = hwc.transpose(2, 0, 1)
                buf.append(s)
                if len(buf) == b:
                    done += 1
                    yield self._collate(buf, pixels, raw_pos)
                    buf = []
                    pixels = np.empty((b, 3, size, size), dtype=np.uint8)
                    if planned is not None and done >= planned:
                        break
        if buf and not ds.train:
            yield self._collate(buf, pixels[:len(buf)].copy(), raw_pos)
        yield self._final(raw_pos)

    def _meta(self, raw_pos: int) -> dict:
        return {"_worker": self.wid, "_raw": raw_pos, "_skipped": dict(self.skipped),
                "_refilled": self.refilled}

    def _final(self, raw_pos: int) -> dict:
        return {**self._meta(raw_pos), "_final": True}

    def _collate(self, buf: list[_RawSample], pixels: np.ndarray, raw_pos: int) -> dict:
        ds = self.ds
        captions = [s.caption for s in buf]
        input_ids, attention_mask = tokenize_np(ds.tokenizer, captions, ds.max_length)
        image_ids = np.array([s.image_id for s in buf], dtype=np.int64)
        keys = [s.key for s in buf]
        if not ds.pack:
            batch = {"pixels": torch.from_numpy(pixels), "input_ids": torch.from_numpy(input_ids),
                     "attention_mask": torch.from_numpy(attention_mask), "image_ids": torch.from_numpy(image_ids),
                     "keys": keys, "captions": captions}
        else:
            batch = _pack(pixels, input_ids, attention_mask, image_ids, keys, captions)
        batch.update(self._meta(raw_pos))
        return batch


# Transport from DataLoader worker processes. Every tensor in a worker's result travels through
# its own shared-memory segment whose file descriptor the main process fetches over a socket
# (about 0.3-0.5 ms per tensor). So the int64 arrays travel as one ``bytes`` blob through the
# result pipe, and so do the pixels of batches up to ``PIPE_PIXELS_MAX`` bytes (cheaper than a
# segment below about 1 MiB); larger pixel batches travel as one shared-memory tensor. The main
# process (``_unpack``) rebuilds exactly the batch a worker-less loader yields.
PIPE_PIXELS_MAX = 1 << 20


def _pack(pixels: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray, image_ids: np.ndarray,
          keys: list[str], captions: list[str]) -> dict:
    ints = np.concatenate([image_ids, input_ids.ravel(), attention_mask.ravel()]).tobytes()
    px: Any = pixels.tobytes() if pixels.nbytes <= PIPE_PIXELS_MAX else torch.from_numpy(pixels)
    return {"_pixels": px, "_shape": (pixels.shape, input_ids.shape), "_ints": ints, "keys": keys,
            "captions": captions}


def _unpack(item: dict) -> dict:
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
    batch.update(item)
    return batch


class _EpochDataset(IterableDataset):
    """What every DataLoader worker of one rank needs for one epoch."""

    def __init__(self, **kw):
        super().__init__()
        self.__dict__.update(kw)

    def __iter__(self):
        info = get_worker_info()
        wid = info.id if info is not None else 0
        if info is not None and torch.get_num_threads() != 1:
            torch.set_num_threads(1)  # DataLoader does this already; workers never run torch ops in threads
        self.pack = info is not None  # results cross a process boundary: see _pack
        # DataLoader polls its workers round-robin from worker 0; a resumed epoch continues
        # with slot (batches done % K), so worker i plays slot (i + rotate) % K
        return _Worker(self, (wid + self.rotate) % self.num_workers).batches()


# ----------------------------------------------------------------------------- public API

class ShardLoader:
    """Per-rank batches from WebDataset shards; see the module docstring.

    ``sources``: overrides the config's shard list: a pattern, a list of patterns, or a list of
    ``(pattern, weight)`` pairs. Defaults: ``cfg.train_shards``/``cfg.train_weights`` when
    ``train`` else ``cfg.val_shards``.
    """

    def __init__(self, cfg: DataConfig, tokenizer, *, rank: int, world_size: int, seed: int,
                 train: bool = True, sources=None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if cfg.batch_size % world_size != 0:
            raise ValueError(f"data.batch_size={cfg.batch_size} is not divisible by the world size "
                             f"{world_size}; the per-rank batch is data.batch_size // world_size")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.rank, self.world_size, self.seed, self.train = rank, world_size, int(seed), bool(train)
        self.batch = cfg.batch_size // world_size
        if self.batch < 1:
            raise ValueError(f"data.batch_size={cfg.batch_size} gives an empty per-rank batch")
        self.num_workers = max(0, int(cfg.num_workers))
        self.slots_per_rank = max(1, self.num_workers)
        weights: list[float] = []
        if sources is None:
            specs = list(cfg.train_shards) if train else [cfg.val_shards]
            weights = list(cfg.train_weights) if train else []
            name = "data.train_shards" if train else "data.val_shards"
        else:
            name = "sources"
            if isinstance(sources, str):
                specs = [sources]
            else:
                specs = []
                for s in sources:
                    if isinstance(s, (tuple, list)) and len(s) == 2 and not isinstance(s[1], str):
                        specs.append(s[0])
                        weights.append(float(s[1]))
                    else:
                        specs.append(s)
        if weights and len(weights) != len(specs):
            raise ValueError(f"data.train_weights has {len(weights)} entries for {len(specs)} shard sources")
        if any(w < 0 for w in weights):
            raise ValueError("data.train_weights must be >= 0")
        self.source_urls = [expand_sources(s) for s in specs]
        for spec, urls in zip(specs, self.source_urls):
            if not urls:
                raise ValueError(f"{name}: no shards match {spec!r}")
        self.weights = weights
        self.source_counts = [shard_counts(urls) for urls in self.source_urls]
        self.unreadable_shards = {u: UNREADABLE[u] for urls in self.source_urls for u in urls if u in UNREADABLE}
        """Shards that are not readable tars (0 bytes, not a tar): no sample is read from them."""
        for url, why in self.unreadable_shards.items():
            if rank == 0:
                log.warning("unreadable shard %s: %s; no sample is read from it", url, why)
        self.epoch = 0
        self.batches_done = 0
        self._worker_raw: list[int] | None = None
        self._resume_raw: list[int] | None = None
        self._skipped_past: collections.Counter = collections.Counter()
        self._skipped_epoch: dict[int, dict] = {}
        self._refilled_past = 0
        self._refilled_epoch: dict[int, int] = {}
        self._plans: dict[int, Plan] = {}
        if self.train and self.batches_per_epoch == 0:
            raise ValueError(f"data.batch_size={cfg.batch_size} is larger than the {self.num_samples} samples "
                             f"of {name}; no full batch per epoch")

    # -- plan
    @property
    def num_samples(self) -> int:
        return sum(sum(c) for c in self.source_counts)

    def plan(self, epoch: int | None = None) -> Plan:
        epoch = self.epoch if epoch is None else epoch
        if epoch not in self._plans:
            pieces = _epoch_pieces(self.source_urls, self.source_counts, self.weights, self.seed, epoch,
                                   bool(self.cfg.resample), self.train)
            self._plans = {epoch: make_plan(pieces, world_size=self.world_size, num_workers=self.slots_per_rank,
                                            batch_per_rank=self.batch, train=self.train, seed=self.seed,
                                            epoch=epoch)}
        return self._plans[epoch]

    @property
    def batches_per_epoch(self) -> int:
        """Batches this rank yields per epoch (train: exact and equal on every rank; eval: an
        upper bound from the shard counts, lower when samples are skipped)."""
        p = self.plan()
        k = self.slots_per_rank
        return sum(p.batches[self.rank * k:(self.rank + 1) * k])

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def dropped_per_epoch(self) -> int:
        """Samples of the current epoch's plan left out (train: < one global batch)."""
        return self.plan().dropped

    # -- cursor
    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch or self.batches_done:
            self._fold_skipped()
        self.epoch = int(epoch)
        self.batches_done = 0
        self._worker_raw = None
        self._resume_raw = None

    def state_dict(self) -> dict:
        """The cursor, plus this rank's skip / refill counters up to it (all epochs so far)."""
        return {"epoch": self.epoch, "batches": self.batches_done, "seed": self.seed,
                "world_size": self.world_size, "num_workers": self.slots_per_rank, "rank": self.rank,
                "worker_raw": list(self._worker_raw) if self._worker_raw is not None else None,
                "skipped": self.skipped, "refilled": self.refilled}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.batches_done = int(state["batches"])
        same = (state.get("seed", self.seed) == self.seed and state.get("world_size") == self.world_size
                and state.get("num_workers") == self.slots_per_rank)
        if not same:
            warnings.warn("data state was saved with a different seed/world size/worker count; resuming "
                          "at the same batch index of a different sample order", stacklevel=2)
        raw = state.get("worker_raw")
        self._resume_raw = list(raw) if same and raw is not None and state.get("rank", self.rank) == self.rank \
            else None
        self._worker_raw = list(self._resume_raw) if self._resume_raw is not None else None
        # This rank's counters up to the cursor. The resumed workers replay the consumed part of
        # the epoch without counting it again, so what they report adds to these. (Another
        # rank's counts are not taken over: summed over ranks they would be counted twice.)
        if ("skipped" in state or "refilled" in state) and state.get("rank", self.rank) == self.rank:
            self._skipped_past = collections.Counter({str(k): int(v) for k, v in
                                                      (state.get("skipped") or {}).items()})
            self._skipped_epoch = {}
            self._refilled_past = int(state.get("refilled") or 0)
            self._refilled_epoch = {}

    # -- counters
    def _fold_skipped(self) -> None:
        for c in self._skipped_epoch.values():
            self._skipped_past.update(c)
        self._skipped_epoch = {}
        self._refilled_past += sum(self._refilled_epoch.values())
        self._refilled_epoch = {}

    @property
    def refilled(self) -> int:
        """Samples re-read (refill passes) to make up for skipped ones, all epochs so far."""
        return self._refilled_past + sum(self._refilled_epoch.values())

    @property
    def skipped(self) -> dict[str, int]:
        """Skipped samples by reason on this rank (all workers, all epochs so far)."""
        total = collections.Counter(self._skipped_past)
        for c in self._skipped_epoch.values():
            total.update(c)
        return dict(total)

    # -- iteration
    def _dataset(self) -> _EpochDataset:
        k = self.slots_per_rank
        done = self.batches_done
        skip_batches = [done // k + (1 if w < done % k else 0) for w in range(k)] if done else None
        skip_raw = None
        if done and self._resume_raw is not None and len(self._resume_raw) == k:
            skip_raw = self._resume_raw
        elif done and self._worker_raw is not None and len(self._worker_raw) == k:
            skip_raw = self._worker_raw
        cfg = self.cfg
        return _EpochDataset(plan=self.plan(), rank=self.rank, num_workers=k, epoch=self.epoch, seed=self.seed,
                             train=self.train, batch=self.batch, tokenizer=self.tokenizer,
                             max_length=cfg.max_length, image_size=cfg.image_size,
                             max_pixels=cfg.max_image_pixels, train_crop=cfg.train_crop,
                             train_crop_scale=tuple(cfg.train_crop_scale),
                             shuffle_buffer=cfg.shuffle_buffer, skip_batches=skip_batches, skip_raw=skip_raw,
                             rotate=done % k)

    def __iter__(self) -> Iterator[dict]:
        """The rest of the current epoch (from the cursor); then the cursor moves to the next."""
        ds = self._dataset()
        k = self.slots_per_rank
        if self.num_workers == 0:
            source: Any = iter(ds)
        else:
            source = DataLoader(ds, batch_size=None, num_workers=self.num_workers, shuffle=False,
                                prefetch_factor=2, persistent_workers=False,
                                worker_init_fn=_ignore_stop_signals)
        if self._worker_raw is None or len(self._worker_raw) != k:
            self._worker_raw = [0] * k
        epoch_skipped = self._skipped_epoch
        for item in source:
            if "_ints" in item:
                item = _unpack(item)
            w = item.pop("_worker")
            self._worker_raw[w] = max(self._worker_raw[w], item.pop("_raw"))
            epoch_skipped[w] = item.pop("_skipped")
            self._refilled_epoch[w] = item.pop("_refilled")
            if item.pop("_final", False):
                continue
            self.batches_done += 1
            yield item
        self._resume_raw = None
        if self.train:
            self.set_epoch(self.epoch + 1)

    def infinite(self) -> Iterator[dict]:
        """Batches forever, advancing epochs (for the trainer's step loop)."""
        while True:
            n = 0
            for batch in self:
                n += 1
                yield batch
            if n == 0 and self.batches_per_epoch == 0:
                raise RuntimeError("the loader yields no batch per epoch")
