"""torchrun support: the one training loop runs unchanged on 1..N processes.

Every helper here is a no-op in a single process, so the loop has no second code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


SINGLE = Context()  # one process: the default context of every function that takes one


def environment_rank() -> int:
    """This process's rank as torchrun sets it (0 without torchrun), before joining the group."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return 0
    return int(os.environ.get("RANK", "0") or 0)


def init_from_environment(device: str) -> Context:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK); else one process.

    nccl for CUDA, gloo for the CPU. Each process takes the GPU of its LOCAL_RANK.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Context()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return Context(rank=rank, world_size=world_size, local_rank=local_rank)


def all_gather(context: Context, tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from every rank, in rank order."""
    if not context.enabled:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(context.world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def all_gather_uneven(context: Context, tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate tensors whose first dimension differs between ranks, in rank order."""
    if not context.enabled:
        return tensor
    sizes = all_gather(context, torch.tensor([tensor.shape[0]], device=tensor.device))
    largest = int(sizes.max())
    padded = torch.zeros((largest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    gathered = all_gather(context, padded).view(context.world_size, largest, *tensor.shape[1:])
    return torch.cat([gathered[r, : int(sizes[r])] for r in range(context.world_size)])


def average(context: Context, tensors: List[torch.Tensor]) -> None:
    """In place: the mean of each tensor over ranks."""
    if not context.enabled:
        return
    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(context.world_size)


def broadcast_float(context: Context, value: float, device: torch.device) -> float:
    if not context.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return float(tensor.item())


def broadcast_module(context: Context, module: torch.nn.Module) -> None:
    """In place: every parameter and buffer of `module` set to rank 0's."""
    if not context.enabled:
        return
    with torch.no_grad():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def barrier(context: Context) -> None:
    if context.enabled:
        dist.barrier()


def broadcast_tensor(context: Context, tensor: torch.Tensor) -> torch.Tensor:
    """In place: `tensor` set to rank 0's (every rank passes one of the same shape and dtype)."""
    if context.enabled:
        dist.broadcast(tensor, src=0)
    return tensor
