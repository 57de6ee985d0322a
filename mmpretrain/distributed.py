"""Rank, world size and every collective: with ``mmpretrain.runtime`` the only modules that touch
``torch.distributed``.

``mmpretrain.runtime`` (app side) creates and destroys the process group (through Accelerate or
``init_process_group``); this module (the library: models and losses call it, it imports no
Accelerate) answers the questions and runs the collectives. No other module calls
``torch.distributed`` (tests/unit/test_runtime.py checks it).

Every helper works without a process group: then the world is one rank and every gather,
exchange or reduction is the identity (no process-group call is made).

- ``get_rank() / get_world_size() / is_main() / is_distributed() / barrier()``
- ``all_gather_with_grad(x)``: concatenation of every rank's ``x`` along dim 0 *with autograd*.
  Backward sums the incoming gradient over ranks (all-reduce) and returns this rank's slice, so
  the gradient reaching the local tensor is the sum over all ranks' losses. With per-rank losses
  that are means over local rows, DDP's 1/world averaging then gives exactly the gradient of one
  process holding the global batch (see ``mmpretrain.losses``).
- ``all_gather_no_grad(x)``: the same concatenation, detached.
- ``global_mean(x)``: the mean over ranks of a (detached) tensor, for reported values.
- ``all_gather_objects(obj)`` / ``sum_counters(counts)``: picklable objects from every rank, in
  rank order / counter dicts summed over ranks.
- ``fetch_rows(local, indices, method)``: rows of the *global* batch (index ``rank * B + i``)
  fetched without gradient by the rank that asked for them. ``method="all_to_all"`` (default)
  sends the requested indices first (an all-gather of ``len(indices)`` integers per rank), then
  only the chosen rows travel in one ``all_to_all_single``: O(B) rows per rank whatever the
  world size. ``method="all_gather"`` gathers every rank's rows (O(W * B), fine for small
  worlds) and indexes them.

All ranks must call every collective with the same shapes (equal per-rank batch).
"""

from __future__ import annotations

import torch

try:  # torch.distributed may be built without support
    import torch.distributed as dist
except ImportError:  # pragma: no cover
    dist = None


def is_distributed() -> bool:
    return dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _gather_list(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.n = get_rank(), x.shape[0]
        return _gather_list(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``cat([x_rank0, x_rank1, ...], 0)`` with gradient flowing back to every rank's ``x``."""
    if not is_distributed():
        return x
    return _AllGatherWithGrad.apply(x)


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """``cat([x_rank0, x_rank1, ...], 0)``, detached."""
    if not is_distributed():
        return x.detach()
    return _gather_list(x.detach())


@torch.no_grad()
def global_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a detached tensor (the identity in one process)."""
    x = x.detach()
    if not is_distributed():
        return x
    y = x.clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / get_world_size()


def all_gather_objects(obj) -> list:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` in one process). A collective."""
    if not is_distributed():
        return [obj]
    gathered: list = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


@torch.no_grad()
def sum_counters(counts: dict[str, int]) -> dict[str, int]:
    """Counter dicts (e.g. skipped samples by reason) summed over ranks; every rank gets the
    total (the identity in one process). A collective: call on every rank at the same point."""
    if not is_distributed():
        return dict(counts)
    total: dict[str, int] = {}
    for c in all_gather_objects(dict(counts)):
        for k, v in (c or {}).items():
            total[k] = total.get(k, 0) + int(v)
    return dict(sorted(total.items()))


def fetch_rows(local: torch.Tensor, indices: torch.Tensor, method: str = "all_to_all") -> torch.Tensor:
    """Rows ``indices`` (global positions ``owner_rank * B + i``) of the global batch whose
    local part on this rank is ``local`` ([B, ...], same B on every rank). No gradient.

    Every rank must call it with the same ``local`` shape and the same ``len(indices)``.
    """
    indices = indices.to(device=local.device, dtype=torch.long)
    if not is_distributed():
        return local.detach()[indices]
    if method == "all_gather":
        return _gather_list(local.detach())[indices]
    if method != "all_to_all":
        raise ValueError(f"fetch_rows: unknown method {method!r} (all_to_all | all_gather)")
    world, rank, b = get_world_size(), get_rank(), local.shape[0]
    # 1) indices first: every rank learns what every other rank asks for (len(indices) ints each)
    requests = _gather_list(indices).view(world, -1)  # [W, K]
    # 2) what this rank sends: for each requester r (in rank order), the rows it owns, in the
    #    requester's order
    send_idx, send_counts = [], []
    for r in range(world):
        req = requests[r]
        mine = req[(req // b) == rank] - rank * b
        send_idx.append(mine)
        send_counts.append(int(mine.numel()))
    send = local.detach()[torch.cat(send_idx)].contiguous()
    owners = indices // b
    recv_counts = [int((owners == s).sum()) for s in range(world)]
    recv = local.new_empty((int(indices.numel()),) + tuple(local.shape[1:]))
    dist.all_to_all_single(recv, send, output_split_sizes=recv_counts, input_split_sizes=send_counts)
    # 3) received rows arrive grouped by owner (stable order within an owner): put them back in
    #    request order
    order = torch.sort(owners, stable=True).indices
    out = torch.empty_like(recv)
    out[order] = recv
    return out
