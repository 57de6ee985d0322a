"""The trainer's data source: this rank's ``ShardLoader``, or — with ``train.emulate_world_size``
= N in a single process — the N loaders of an N-process run read side by side, their batches
concatenated rank-major. That one process then trains on exactly the global batches (same
samples, same order) the N-process run sees, which is how the tests compare one process with
DDP / ZeRO runs loss for loss.

What it reads of the config is a ``LoaderSpec``: the ``data`` section, the seed and
``train.emulate_world_size`` (``LoaderSpec.from_config``), not the whole tree.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Iterator

import torch

from mmpretrain.data.config import DataConfig


@dataclass(frozen=True)
class LoaderSpec:
    """What the training loader takes from the config tree."""

    data: DataConfig
    seed: int
    """``seed``: the data order (the same on every rank)."""
    emulate_world_size: int = 0
    """``train.emulate_world_size``: one process reads as this many ranks would (0, 1: off)."""

    @classmethod
    def from_config(cls, cfg) -> "LoaderSpec":
        return cls(data=cfg.data, seed=int(cfg.seed), emulate_world_size=int(cfg.train.emulate_world_size))


def concat_batches(parts: list[dict]) -> dict:
    """Rank-major concatenation of per-rank batches (tensors along dim 0, lists joined)."""
    out = {}
    for key, value in parts[0].items():
        if torch.is_tensor(value):
            out[key] = torch.cat([p[key] for p in parts], dim=0)
        elif isinstance(value, list):
            out[key] = [x for p in parts for x in p[key]]
        else:
            out[key] = value
    return out


class RankConcatLoader:
    """Quacks like ``ShardLoader`` for the trainer (``infinite``, cursor, counters)."""

    def __init__(self, loaders: list):
        self.loaders = loaders

    @property
    def batches_per_epoch(self) -> int:
        return self.loaders[0].batches_per_epoch

    @property
    def epoch(self) -> int:
        return self.loaders[0].epoch

    @property
    def skipped(self) -> dict[str, int]:
        total: collections.Counter = collections.Counter()
        for loader in self.loaders:
            total.update(loader.skipped)
        return dict(total)

    @property
    def remote_retries(self) -> int:
        return sum(loader.remote_retries for loader in self.loaders)

    def state_dict(self) -> dict:
        return {"emulated_ranks": [loader.state_dict() for loader in self.loaders]}

    def load_state_dict(self, state: dict) -> None:
        states = state.get("emulated_ranks")
        if states is None or len(states) != len(self.loaders):
            raise ValueError("train.emulate_world_size: the checkpoint's data cursor was written by a run "
                             "with a different (emulated) world size")
        for loader, s in zip(self.loaders, states):
            loader.load_state_dict(s)

    def infinite(self) -> Iterator[dict]:
        for parts in zip(*(loader.infinite() for loader in self.loaders)):
            yield concat_batches(list(parts))


def slice_batch(batch: dict, lo: int, hi: int) -> dict:
    """Samples ``lo:hi`` of a batch (tensors along dim 0, lists sliced; other values kept)."""
    n = len(batch["keys"])
    out = {}
    for key, value in batch.items():
        if (torch.is_tensor(value) and value.dim() and value.shape[0] == n) or (isinstance(value, list)
                                                                                 and len(value) == n):
            out[key] = value[lo:hi]
        else:
            out[key] = value
    return out


def stream_states(state: dict) -> dict[int, dict]:
    """The per-rank loader cursors a saved data state holds, by the rank of the run that wrote
    them: one (a ``ShardLoader``), N (``emulated_ranks``), those of a remap in progress
    (``remap``), or every saved rank's (``checkpoint_ranks``, from a checkpoint of another world
    size)."""
    if "checkpoint_ranks" in state:
        out: dict[int, dict] = {}
        for part in state["checkpoint_ranks"]:
            out.update(stream_states(part))
        return out
    if "emulated_ranks" in state:
        return {int(s["rank"]): s for s in state["emulated_ranks"]}
    if "remap" in state:
        return {int(s["rank"]): s for s in state["remap"]["streams"]}
    return {int(state.get("rank", 0)): state}


class TrainData:
    """The trainer's loader (``ShardLoader`` or ``RankConcatLoader``, built for this launch),
    which also resumes a data cursor written at another world size.

    The sample stream of an epoch depends on the world size (the plan deals shard pieces to
    (rank, worker) slots), so a cursor cannot be moved to another world size within its epoch.
    Instead, the rest of the interrupted epoch is read as the saved run would have read it: each
    process reads the saved ranks' streams that overlap its share of the global batch (all of
    them at world size 1; one saved stream read by 2 processes at twice the world size), with
    the saved worker count, concatenates them rank-major and keeps its share. The global batches
    are then exactly those of the uninterrupted run (same samples, same order: no sample lost or
    seen twice). At the next epoch the loader plans for the new world size. A cursor saved at
    an epoch boundary needs no remap.

    Same world size: the cursor goes to the loader unchanged (``ShardLoader.load_state_dict``).

    ``spec``: a ``LoaderSpec``; a whole config tree is read through ``LoaderSpec.from_config``."""

    def __init__(self, spec, tokenizer, rank: int, world_size: int):
        self.spec = spec if isinstance(spec, LoaderSpec) else LoaderSpec.from_config(spec)
        self.tokenizer, self.rank, self.world_size = tokenizer, rank, world_size
        self.native = _native_loader(self.spec, tokenizer, rank, world_size)
        self.remap: list | None = None  # the saved ranks' loaders read for the rest of their epoch
        self._remap_info: dict = {}

    # -- what the trainer reads
    @property
    def _active(self):
        return self.remap[0] if self.remap else self.native

    @property
    def batches_per_epoch(self) -> int:
        return self._active.batches_per_epoch

    @property
    def epoch(self) -> int:
        return self._active.epoch

    @property
    def skipped(self) -> dict[str, int]:
        if not self.remap:
            return self.native.skipped
        total: collections.Counter = collections.Counter()
        for loader in self._owned():
            total.update(loader.skipped)
        return dict(total)

    @property
    def remote_retries(self) -> int:
        if not self.remap:
            return self.native.remote_retries
        return sum(loader.remote_retries for loader in self._owned())

    def __getattr__(self, name):  # anything else of the loader (dropped_per_epoch, num_samples, ...)
        if name in ("native", "remap", "spec"):
            raise AttributeError(name)
        return getattr(self.native, name)

    # -- the cursor
    def state_dict(self) -> dict:
        if self.remap:
            return {"remap": {"streams": [loader.state_dict() for loader in self.remap]}}
        return self.native.state_dict()

    def _same_layout(self, state: dict) -> bool:
        """Whether ``state`` is a cursor of this loader's own streams (no remap)."""
        if "checkpoint_ranks" in state or "remap" in state:
            return False
        if isinstance(self.native, RankConcatLoader):
            return "emulated_ranks" not in state or len(state["emulated_ranks"]) == len(self.native.loaders)
        return "emulated_ranks" not in state

    def _span(self, world: int) -> tuple[int, int]:
        """This process's samples ``[lo, hi)`` of a global batch."""
        total = self.spec.data.global_batch_size
        if self.spec.emulate_world_size > 1:
            return 0, total
        share = total // self.world_size
        return self.rank * share, (self.rank + 1) * share

    def load_state_dict(self, state: dict) -> None:
        if self._same_layout(state):
            self.native.load_state_dict(state)  # the same world size: unchanged
            return
        streams = stream_states(state)
        first = next(iter(streams.values()))
        world, slots = int(first["world_size"]), int(first["num_workers"])
        where = (int(first["epoch"]), int(first["batches"]))
        for r, s in streams.items():
            if (int(s["world_size"]), int(s["num_workers"])) != (world, slots) or \
                    (int(s["epoch"]), int(s["batches"])) != where or s.get("seed") != first.get("seed"):
                raise ValueError(f"train.resume: the saved data cursors disagree (rank {r}: epoch {s['epoch']} "
                                 f"batch {s['batches']} of world size {s['world_size']}); cannot remap them")
        if first.get("seed") != self.spec.seed:
            raise ValueError(f"train.resume: the data cursor was saved with seed {first.get('seed')}, this run has "
                             f"seed {self.spec.seed}; another world size can only be resumed with the same seed")
        total = self.spec.data.global_batch_size
        if total % world:
            raise ValueError(f"train.resume: data.global_batch_size={total} is not the one the checkpoint's {world} "
                             "ranks shared (not divisible); keep data.global_batch_size when resuming")
        per = total // world
        lo, hi = self._span(world)
        ranks = list(range(lo // per, (hi - 1) // per + 1))
        missing = [r for r in ranks if r not in streams]
        if missing:
            raise ValueError(f"train.resume: the checkpoint lacks the data cursor of rank(s) {missing} of its "
                             f"{world}; cannot remap it")
        epoch, batches = where
        counters = self._counters(streams, world, per)
        if batches == 0:  # an epoch boundary: nothing to remap
            self._start_native(epoch, counters)
            return
        from dataclasses import replace

        from mmpretrain.data.loader import ShardLoader

        workers = slots if slots > 1 else min(1, int(self.spec.data.num_workers))
        dcfg = replace(self.spec.data, num_workers=workers)
        self.remap = []
        for r in ranks:
            loader = ShardLoader(dcfg, self.tokenizer, rank=r, world_size=world, seed=self.spec.seed, train=True)
            loader.load_state_dict(streams[r])
            self.remap.append(loader)
        self._remap_info = {"offset": ranks[0] * per, "lo": lo, "hi": hi, "world": world, "per": per,
                            "counters": counters}

    def _owner(self, saved_rank: int, per: int) -> bool:
        """Whether this process reports the counters of a saved rank's stream (the first process
        that reads it: a stream read by two processes is counted once)."""
        if self.spec.emulate_world_size > 1:
            return True
        share = self.spec.data.global_batch_size // self.world_size
        return (saved_rank * per) // share == self.rank

    def _owned(self) -> list:
        info = self._remap_info
        first = info["offset"] // info["per"]
        return [loader for i, loader in enumerate(self.remap) if self._owner(first + i, info["per"])]

    def _counters(self, streams: dict[int, dict], world: int, per: int) -> dict:
        """The skip / refill / retry counts of the saved ranks this process takes over."""
        skipped: collections.Counter = collections.Counter()
        refilled = retries = 0
        for r, s in streams.items():
            if r < world and self._owner(r, per):
                skipped.update({str(k): int(v) for k, v in (s.get("skipped") or {}).items()})
                refilled += int(s.get("refilled") or 0)
                retries += int(s.get("remote_retries") or 0)
        return {"skipped": dict(skipped), "refilled": refilled, "remote_retries": retries}

    def _start_native(self, epoch: int, counters: dict) -> None:
        """The native loader at the start of ``epoch``, carrying ``counters``."""
        loaders = getattr(self.native, "loaders", [self.native])
        states = []
        for i, loader in enumerate(loaders):
            mine = counters if i == 0 else {"skipped": {}, "refilled": 0, "remote_retries": 0}
            states.append({"epoch": epoch, "batches": 0, "seed": loader.seed, "world_size": loader.world_size,
                           "num_workers": loader.slots_per_rank, "rank": loader.rank, "worker_raw": None, **mine})
        for loader, s in zip(loaders, states):
            loader.load_state_dict(s)

    def infinite(self) -> Iterator[dict]:
        if self.remap:
            info = self._remap_info
            lo, hi = info["lo"] - info["offset"], info["hi"] - info["offset"]
            epoch = self.remap[0].epoch
            for parts in zip(*(iter(loader) for loader in self.remap)):
                yield slice_batch(concat_batches(list(parts)), lo, hi)
            owned = self._owned()
            skipped: collections.Counter = collections.Counter()
            for loader in owned:
                skipped.update(loader.skipped)
            counters = {"skipped": dict(skipped), "refilled": sum(loader.refilled for loader in owned),
                        "remote_retries": sum(loader.remote_retries for loader in owned)}
            self.remap = None
            self._start_native(epoch + 1, counters)
        yield from self.native.infinite()


def _native_loader(spec: LoaderSpec, tokenizer, rank: int, world_size: int):
    from mmpretrain.data.loader import ShardLoader

    emulate = spec.emulate_world_size
    if emulate > 1:
        if world_size != 1:
            raise ValueError(f"train.emulate_world_size={emulate} is for a single process; this run has "
                             f"{world_size} processes")
        return RankConcatLoader([ShardLoader(spec.data, tokenizer, rank=r, world_size=emulate, seed=spec.seed,
                                             train=True) for r in range(emulate)])
    return ShardLoader(spec.data, tokenizer, rank=rank, world_size=world_size, seed=spec.seed, train=True)


def build_train_loader(spec: LoaderSpec, tokenizer, rank: int, world_size: int) -> TrainData:
    """This process's training batches: ``ShardLoader`` for this rank, or the emulation above,
    inside ``TrainData`` (which resumes a cursor of another world size)."""
    return TrainData(spec, tokenizer, rank, world_size)
