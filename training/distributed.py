"""Process-group set-up for ``torchrun`` (DistributedDataParallel); a no-op for one process.

Every rank draws the same global batch (same seed) and takes its rows ``rank::world_size``, so
with gradient averaging a run on N processes follows the single-process run step for step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` = the rank's CUDA device when present, else CPU."""
    if name == "auto":
        return (
            torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        )
    return torch.device(name)


def init_distributed(device_name: str) -> tuple[DistributedContext, torch.device]:
    """Join the process group that ``torchrun`` describes in the environment, if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext(), resolve_device(device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistributedContext(rank, world_size, local_rank), device


def shard(indices: torch.Tensor, ctx: DistributedContext) -> torch.Tensor:
    """This rank's rows of a global batch."""
    return indices[ctx.rank :: ctx.world_size]


def agree(flag: bool, ctx: DistributedContext) -> bool:
    """Rank 0's ``flag`` on every rank (for decisions only rank 0 can make)."""
    if not ctx.enabled:
        return flag
    device = torch.device("cuda", ctx.local_rank) if dist.get_backend() == "nccl" else None
    value = torch.tensor([int(flag)], device=device)
    dist.broadcast(value, src=0)
    return bool(value.item())


def barrier(ctx: DistributedContext) -> None:
    if ctx.enabled:
        dist.barrier()


def shutdown(ctx: DistributedContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
