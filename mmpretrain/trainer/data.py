"""The trainer's data source: this rank's ``ShardLoader``, or — with ``train.emulate_world_size``
= N in a single process — the N loaders of an N-process run read side by side, their batches
concatenated rank-major. That one process then trains on exactly the global batches (same
samples, same order) the N-process run sees, which is how the tests compare one process with
DDP / ZeRO runs loss for loss.
"""

from __future__ import annotations

import collections
from typing import Iterator

import torch


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


def build_train_loader(cfg, tokenizer, rank: int, world_size: int):
    """This process's training batches: ``ShardLoader`` for this rank, or the emulation above."""
    from mmpretrain.data.loader import ShardLoader

    emulate = cfg.train.emulate_world_size
    if emulate > 1:
        if world_size != 1:
            raise ValueError(f"train.emulate_world_size={emulate} is for a single process; this run has "
                             f"{world_size} processes")
        return RankConcatLoader([ShardLoader(cfg.data, tokenizer, rank=r, world_size=emulate, seed=cfg.seed,
                                             train=True) for r in range(emulate)])
    return ShardLoader(cfg.data, tokenizer, rank=rank, world_size=world_size, seed=cfg.seed, train=True)
