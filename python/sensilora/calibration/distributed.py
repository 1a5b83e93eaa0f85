"""Data-parallel calibration on torch.distributed (NCCL on GPUs, gloo on CPUs).

Inside an initialised process group, ``calibrate`` on each rank's own shard of the batches sums its fp32
accumulators and token counts as usual, then ``reduce_statistics`` all-reduces them once (SUM), so every
rank finishes (scaling, and in obs mode the damped inverse of the reduced ``X^T X``) from the same sums as
one process calibrating on every shard: equal up to fp32 summation order. Each rank computes the obs
inverse itself: the reduced grams are identical everywhere, and a broadcast of the result would add a
second collective to save seconds of Cholesky.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import SensiloraError
from .observers import Observer


def process_group_size() -> int:
    """The world size of the initialised default process group, 1 without one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def distributed_rank() -> int:
    """This process's rank in the initialised default process group, 0 without one."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def join_torchrun(device: str) -> tuple[int, int, str]:
    """Under torchrun (``WORLD_SIZE`` > 1 in the environment) initialise the default process group (NCCL for
    CUDA devices, gloo otherwise) once; returns (rank, world size, this rank's device)."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def reduce_statistics(observer: Observer, seen_batches: int) -> int:
    """All-reduce every accumulator of ``observer`` (its own ``reduce``) and the batch count across the
    process group; returns the total number of batches. A no-op outside a process group."""
    if process_group_size() == 1:
        return seen_batches
    accumulators = observer.accumulators
    device = next(iter(accumulators.values())).sums.device if accumulators else torch.device("cpu")
    if dist.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    status = torch.tensor([float(seen_batches), float(bool(accumulators))], device=device, dtype=torch.float64)
    totals = status.clone()
    dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    fewest = status[1:].clone()
    dist.all_reduce(fewest, op=dist.ReduceOp.MIN)
    if float(fewest) == 0.0:
        raise SensiloraError(
            f"a rank of the process group saw no real tokens (this is rank {dist.get_rank()}, with {seen_batches} "
            "batches): give every rank at least one batch of text"
        )
    keys = sorted(accumulators)
    everyone: list = [None] * process_group_size()
    dist.all_gather_object(everyone, keys)
    if any(other != keys for other in everyone):
        raise SensiloraError("the ranks calibrated different modules (target_modules or models differ between ranks)")
    observer.reduce(lambda tensor: dist.all_reduce(tensor, op=dist.ReduceOp.SUM))
    return int(totals[0])


def gather_fingerprints(fingerprint: str) -> list[str]:
    """Every rank's data fingerprint, in rank order (``[fingerprint]`` outside a process group)."""
    if process_group_size() == 1:
        return [fingerprint]
    everyone: list = [None] * process_group_size()
    dist.all_gather_object(everyone, fingerprint)
    return everyone
