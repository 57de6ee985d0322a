"""The balance plan: each epoch's shard pieces assigned to (rank, worker) slots with equal quotas.

A *piece* is ``(url, start, stop, stride)``: the samples of one shard whose index is in
``range(start, stop, stride)``. Each epoch the shard list is shuffled with ``(seed, epoch)``
(identical on every rank; ``epoch_pieces``, which also applies mixing weights and resampling);
with fewer pieces than ``world_size * workers`` slots each shard is split into strided pieces.
``make_plan`` assigns pieces greedily (largest first, to the least loaded slot), then equalises
at sample level: every rank gets ``floor(N / global_batch)`` batches, worker ``k`` of a rank
``nb // K + (k < nb % K)`` of them; over-full slots hand their tail to under-full ones, what is
left (< one global batch) is dropped and reported. Eval plans keep every sample (no quotas).

Pure functions of the shard counts, the seed and the epoch: no I/O.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import random


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


def epoch_pieces(sources: list[list[str]], counts: list[list[int]], weights: list[float],
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
