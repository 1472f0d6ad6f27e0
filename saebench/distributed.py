"""Data-parallel training on ``torch.distributed``, written so that one process is the trivial case.

Two things live here:

- **Process setup** (``init_from_env``, ``rank``, ``world_size``): ``torchrun`` sets ``RANK``/``WORLD_SIZE``;
  the training loop calls ``init_from_env`` once and gets ``(rank, world)``; without those variables it is
  ``(0, 1)`` and nothing else in this module ever communicates.
- **Batch-statistic reductions used by the loss code** (``all_reduce_sum``, ``all_reduce_min``, ...). They
  reduce over the *active data-parallel group*, which the loop switches on only for the span of one
  training step (``with data_parallel():``). Outside that span, and in a single process, they return their
  input unchanged, so the single-process numbers are bit-identical and an evaluation that happens to run
  inside a distributed job never enters a collective by accident.

Convention (the usual DDP one): every rank holds an equal slice of the global batch, loss terms on a rank
are that rank's *estimate of the global value*, and gradients are averaged over ranks. Per-token means
therefore need nothing; a ratio of batch sums (the FVU) divides by the globally reduced denominator
(``trainers.base.total_variance``); a global selection (BatchTopK) reduces its threshold
(``sparse.batch_topk_mask``); dead-latent counters add the ranks' counts.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor

_ACTIVE = False  # a data-parallel step is running: reductions communicate


# ----- process setup -------------------------------------------------------------------------------
def init_from_env(device: str = "cpu") -> tuple[int, int]:
    """Join the process group ``torchrun`` describes (env ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...).

    Returns ``(rank, world_size)``; ``(0, 1)`` when not launched by a distributed launcher. The backend
    is NCCL for CUDA devices and gloo otherwise. An already initialised group is reused.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return 0, 1
    backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def rank_device(device: str) -> str:
    """``cuda`` → ``cuda:LOCAL_RANK`` under a launcher (one GPU per process); other devices unchanged."""
    return f"cuda:{local_rank()}" if device == "cuda" and is_distributed() else device


def comm_device() -> torch.device:
    """Where tensors must live for this process group's collectives: the rank's GPU for NCCL, else CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# ----- the data-parallel step span -----------------------------------------------------------------
@contextmanager
def data_parallel(enabled: bool = True) -> Iterator[None]:
    """Within this block (and a process group of > 1 ranks), batch statistics reduce across ranks."""
    global _ACTIVE
    prev = _ACTIVE
    _ACTIVE = enabled and is_distributed()
    try:
        yield
    finally:
        _ACTIVE = prev


def active() -> bool:
    """Whether loss code should reduce batch statistics across ranks right now."""
    return _ACTIVE


def dp_world_size() -> int:
    """Ranks sharing the batch in the current step (1 outside a data-parallel step)."""
    return dist.get_world_size() if _ACTIVE else 1


def _reduce(t: Tensor, op) -> Tensor:
    if not _ACTIVE:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=op)
    return out


def all_reduce_sum(t: Tensor) -> Tensor:
    """Σ over data-parallel ranks (a new tensor, no gradient); ``t`` itself outside a data-parallel step."""
    return _reduce(t, dist.ReduceOp.SUM)


def all_reduce_mean(t: Tensor) -> Tensor:
    """Mean over data-parallel ranks; ``t`` itself outside a data-parallel step."""
    return _reduce(t, dist.ReduceOp.SUM) / dp_world_size() if _ACTIVE else t


def all_reduce_min(t: Tensor) -> Tensor:
    return _reduce(t, dist.ReduceOp.MIN)


def all_reduce_max(t: Tensor) -> Tensor:
    return _reduce(t, dist.ReduceOp.MAX)


def all_gather_cat(t: Tensor) -> Tensor:
    """Concatenate ``t`` [n, ...] from every data-parallel rank along dim 0 (equal n on every rank)."""
    if not _ACTIVE:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.detach().contiguous())
    return torch.cat(parts)


# ----- whole-model synchronisation (used by the training loop) ------------------------------------
@torch.no_grad()
def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """DDP's gradient all-reduce: every rank ends with the mean of the ranks' gradients.

    One flat bucket, one collective (plus a tiny one agreeing which parameters have a gradient, so that a
    parameter no rank touched keeps ``grad=None`` exactly as in a single process).
    """
    if not is_distributed():
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    live = [p for p, h in zip(params, has.tolist()) if h]
    if not live:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in live])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in live:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
        offset += n


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy every parameter and buffer of ``module`` from rank ``src`` (identical replicas)."""
    if not is_distributed():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src)


@torch.no_grad()
def broadcast_tensor(t: Tensor, src: int = 0) -> None:
    """Overwrite ``t`` in place with rank ``src``'s copy."""
    if is_distributed():
        dist.broadcast(t.data, src)


def broadcast_float(value: float, src: int = 0) -> float:
    """Rank ``src``'s ``value`` on every rank (e.g. the activation scale)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=comm_device())
    dist.broadcast(t, src)
    return float(t.item())


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is True on any rank (used for skip/stop decisions)."""
    if not is_distributed():
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def min_over_ranks(value: int) -> int:
    """The smallest ``value`` over all ranks (e.g. how many batches every rank's chunk can give)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def gather_objects(obj) -> list:
    """``[obj from rank 0, obj from rank 1, ...]`` on every rank (small picklable objects only)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather_rows(t: Tensor) -> Tensor:
    """Concatenate ``t`` [n, ...] from every rank along dim 0 (equal n), outside any step span.

    The result is on the collective's device (the rank's GPU under NCCL)."""
    if not is_distributed():
        return t
    t = t.to(comm_device()).contiguous()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts)
