"""WebDataset shards -> per-rank batches, balanced so every rank runs the same number of steps.

Pipeline (see docs/data.md for the design and the numbers)::

    sources --expand_sources--> shard URLs (+ per-shard sample counts: manifest, the
      data.num_samples hint (remote shards), or counted)                                    [shardio]
      --plan(seed, epoch)--> pieces of shards assigned to (rank, worker) slots, equal quotas  [plan]
      --worker: tar -> samples (raw checks, header + pixel guard) -> shuffle buffer (seeded)  [stream]
      --> decode + crop (uint8) -> tokenize -> batch (in the worker)
      --DataLoader(batch_size=None)--> batches, workers interleaved round-robin (deterministic)

This module holds ``ShardLoader``: the sources, the cursor (epoch, batches consumed, each
worker's raw position) and the skip / refill counters, gathered from the ``WorkerReport`` that
travels beside each batch. The plan is in ``mmpretrain.data.plan``, the worker stream and its
transport in ``mmpretrain.data.stream``, shard reading in ``mmpretrain.data.shardio``.

Balance: every rank gets ``floor(N / global_batch)`` batches per epoch, split over its workers;
what is left (< one global batch) is dropped and reported (``dropped_per_epoch``).

Bad samples (corrupt or oversized image, missing/empty caption, missing image, bad json,
duplicate key, truncated tar, a remote read that failed for good) are skipped, counted by
reason and warned about at most once per reason per 30 s per process. A worker whose pieces run
short (skips) re-reads its own pieces (a *refill* pass) until it has its planned number of
batches, so batch counts stay exact.

Eval (``train=False``): no shuffle, center crop, last partial batch kept, each sample exactly
once over all ranks and workers (ranks may differ in batch count).

Remote shards (http(s), ``s3://`` and other fsspec URLs) are read by ``remote.RemoteFile``:
a transient failure is retried with backoff and resumed at the byte offset reached, so the
stream is exactly that of an uninterrupted read; retries are counted (``remote_retries``). A
read whose retries are exhausted ends its piece like a truncated tar (``remote_read_failed``).

Resume: ``state_dict()`` holds ``(epoch, batches consumed)`` plus, per worker, how many
shuffle-buffer outputs it consumed, and the skip / refill counters up to the cursor; a resumed
worker replays tar reading and the shuffle buffer without decoding images (and without counting
the replayed skips again) and continues with exactly the next batch.
"""

from __future__ import annotations

import collections
import logging
import warnings
from typing import Any, Iterator

from torch.utils.data import DataLoader

from mmpretrain.data.config import DataConfig
from mmpretrain.data.plan import Plan, epoch_pieces, make_plan
from mmpretrain.data.remote import IOStats, RemoteOptions
from mmpretrain.data.shardio import UNREADABLE, expand_sources, shard_counts
from mmpretrain.data.stream import EpochDataset, EpochSpec, ignore_stop_signals, unpack_batch

log = logging.getLogger("mmpretrain.data")


def stop_workers(it, timeout_s: float = 5.0) -> None:
    """Shut a DataLoader iterator's workers down, and SIGKILL any still alive after that.

    The workers ignore SIGTERM (``ignore_stop_signals``), so for a worker slow to quit
    DataLoader's own fallback (``terminate()``, a SIGTERM) does nothing, and at interpreter exit
    multiprocessing terminates and then joins its daemonic children without a timeout: the rank
    hung after its final checkpoint until the launcher killed it. ``_shutdown_workers`` and
    ``_workers`` are DataLoader internals (``_MultiProcessingDataLoaderIter``)."""
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for w in getattr(it, "_workers", ()):
        if w.is_alive():
            w.kill()
            w.join(timeout=timeout_s)


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
        if cfg.global_batch_size % world_size != 0:
            raise ValueError(f"data.global_batch_size={cfg.global_batch_size} is not divisible by the world size "
                             f"{world_size}; the per-rank batch is data.global_batch_size // world_size")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.rank, self.world_size, self.seed, self.train = rank, world_size, int(seed), bool(train)
        self.batch = cfg.global_batch_size // world_size
        if self.batch < 1:
            raise ValueError(f"data.global_batch_size={cfg.global_batch_size} gives an empty per-rank batch")
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
        self.remote = RemoteOptions.from_config(cfg)
        self._io = IOStats()  # retries of the start-up reads (manifests, counting) in this process
        flat = [u for urls in self.source_urls for u in urls]
        counts = shard_counts(flat, remote=self.remote, stats=self._io, name=name, warn=rank == 0,
                              num_samples=int(cfg.num_samples) if train else 0)
        self.source_counts = []
        for urls in self.source_urls:
            self.source_counts.append(counts[:len(urls)])
            counts = counts[len(urls):]
        self.unreadable_shards = {u: UNREADABLE[u] for urls in self.source_urls for u in urls if u in UNREADABLE}
        """Shards that are not readable tars (0 bytes, not a tar): no sample is read from them."""
        for url, why in self.unreadable_shards.items():
            if rank == 0:
                log.warning("unreadable shard %s: %s; no sample is read from it", url, why)
        self.epoch = 0
        self.batches_done = 0
        self._worker_raw: list[int] | None = None
        """Per worker slot, the raw-stream position of its last batch consumed (the resume cursor)."""
        self._finished: set[int] = set()
        """Worker slots whose stream end (a report with ``end``) was consumed this epoch."""
        self._skipped_past: collections.Counter = collections.Counter()
        self._skipped_epoch: dict[int, dict] = {}
        self._refilled_past = 0
        self._refilled_epoch: dict[int, int] = {}
        self._retries_past = 0
        self._retries_epoch: dict[int, int] = {}
        self._plans: dict[int, Plan] = {}
        if self.train and self.batches_per_epoch == 0:
            raise ValueError(f"data.global_batch_size={cfg.global_batch_size} is larger than the "
                             f"{self.num_samples} samples of {name}; no full batch per epoch")

    # -- plan
    @property
    def num_samples(self) -> int:
        return sum(sum(c) for c in self.source_counts)

    def plan(self, epoch: int | None = None) -> Plan:
        epoch = self.epoch if epoch is None else epoch
        if epoch not in self._plans:
            pieces = epoch_pieces(self.source_urls, self.source_counts, self.weights, self.seed, epoch,
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
        self._finished = set()

    def state_dict(self) -> dict:
        """The cursor, plus this rank's skip / refill counters up to it (all epochs so far)."""
        return {"epoch": self.epoch, "batches": self.batches_done, "seed": self.seed,
                "world_size": self.world_size, "num_workers": self.slots_per_rank, "rank": self.rank,
                "worker_raw": list(self._worker_raw) if self._worker_raw is not None else None,
                "skipped": self.skipped, "refilled": self.refilled, "remote_retries": self.remote_retries}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.batches_done = int(state["batches"])
        same = (state.get("seed", self.seed) == self.seed and state.get("world_size") == self.world_size
                and state.get("num_workers") == self.slots_per_rank)
        if not same:
            warnings.warn("data state was saved with a different seed/world size/worker count; resuming "
                          "at the same batch index of a different sample order", stacklevel=2)
        raw = state.get("worker_raw")
        self._finished = set()
        self._worker_raw = list(raw) if same and raw is not None and state.get("rank", self.rank) == self.rank \
            else None
        # This rank's counters up to the cursor. The resumed workers replay the consumed part of
        # the epoch without counting it again, so what they report adds to these. (Another
        # rank's counts are not taken over: summed over ranks they would be counted twice.)
        if ("skipped" in state or "refilled" in state) and state.get("rank", self.rank) == self.rank:
            self._skipped_past = collections.Counter({str(k): int(v) for k, v in
                                                      (state.get("skipped") or {}).items()})
            self._skipped_epoch = {}
            self._refilled_past = int(state.get("refilled") or 0)
            self._refilled_epoch = {}
            self._retries_past = int(state.get("remote_retries") or 0)
            self._retries_epoch = {}

    # -- counters
    def _fold_skipped(self) -> None:
        for c in self._skipped_epoch.values():
            self._skipped_past.update(c)
        self._skipped_epoch = {}
        self._refilled_past += sum(self._refilled_epoch.values())
        self._refilled_epoch = {}
        self._retries_past += sum(self._retries_epoch.values())
        self._retries_epoch = {}

    @property
    def refilled(self) -> int:
        """Samples re-read (refill passes) to make up for skipped ones, all epochs so far."""
        return self._refilled_past + sum(self._refilled_epoch.values())

    @property
    def remote_retries(self) -> int:
        """Remote reads retried on this rank (start-up reads and every worker, all epochs so far;
        each one a network event: a replayed part of a resumed epoch counts its own)."""
        return self._io.retries + self._retries_past + sum(self._retries_epoch.values())

    @property
    def skipped(self) -> dict[str, int]:
        """Skipped samples by reason on this rank (all workers, all epochs so far)."""
        total = collections.Counter(self._skipped_past)
        for c in self._skipped_epoch.values():
            total.update(c)
        return dict(total)

    # -- iteration
    def _dataset(self) -> EpochDataset:
        k = self.slots_per_rank
        done = self.batches_done
        skip_batches = [done // k + (1 if w < done % k else 0) for w in range(k)] if done else None
        skip_raw = None
        if done and self._worker_raw is not None and len(self._worker_raw) == k:
            skip_raw = list(self._worker_raw)
        cfg = self.cfg
        return EpochDataset(EpochSpec(
            plan=self.plan(), rank=self.rank, num_workers=k, epoch=self.epoch, seed=self.seed, train=self.train,
            batch=self.batch, tokenizer=self.tokenizer, max_length=cfg.max_length, image_size=cfg.image_size,
            max_pixels=cfg.max_image_pixels, train_crop=cfg.train_crop,
            train_crop_scale=tuple(cfg.train_crop_scale), shuffle_buffer=cfg.shuffle_buffer,
            skip_batches=skip_batches, skip_raw=skip_raw, rotate=done % k,
            finished=frozenset(self._finished), remote=self.remote))

    def __iter__(self) -> Iterator[dict]:
        """The rest of the current epoch (from the cursor); then (train) the cursor moves to the next."""
        if self.batches_done:
            # continuing mid-epoch: the workers replay the consumed part without counting it, so
            # what they report adds to the counts so far
            self._fold_skipped()
        else:
            self._finished = set()  # the epoch starts over: every worker reads (and counts) anew
        ds = self._dataset()
        if self.num_workers == 0:
            source: Any = iter(ds)
        else:
            source = iter(DataLoader(ds, batch_size=None, num_workers=self.num_workers, shuffle=False,
                                     prefetch_factor=2, persistent_workers=False,
                                     worker_init_fn=ignore_stop_signals))
        try:
            yield from self._consume(source)
        finally:
            if self.num_workers:
                stop_workers(source)

    def _consume(self, source) -> Iterator[dict]:
        k = self.slots_per_rank
        if self._worker_raw is None or len(self._worker_raw) != k:
            self._worker_raw = [0] * k
        epoch_skipped = self._skipped_epoch
        for batch, report in source:  # StreamItem: the batch (None on a worker's final item) and its report
            w = report.worker
            self._worker_raw[w] = max(self._worker_raw[w], report.raw)
            epoch_skipped[w] = report.skipped
            self._refilled_epoch[w] = report.refilled
            self._retries_epoch[w] = report.retries
            if report.end:
                self._finished.add(w)
            if report.final:
                continue
            if "_ints" in batch:
                batch = unpack_batch(batch)
            self.batches_done += 1
            yield batch
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
