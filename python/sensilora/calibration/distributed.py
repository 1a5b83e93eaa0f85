"""Data-parallel calibration on torch.distributed (NCCL on GPUs, gloo on CPUs).

Inside an initialised process group, ``calibrate`` on each rank's own shard of the batches sums its fp32
accumulators and token counts as usual, then ``reduce_statistics`` all-reduces them once (SUM), so every
rank finishes (scaling, and in obs mode the damped inverse of the reduced ``X^T X``) from the same sums as
one process calibrating on every shard: equal up to fp32 summation order. Each rank computes the obs
inverse itself: the reduced grams are identical everywhere, and a broadcast of the result would add a
second collective to save seconds of Cholesky.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from contextlib import contextmanager

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


@contextmanager
def torchrun_group(device: str) -> Iterator[tuple[int, int, str]]:
    """Under torchrun (``WORLD_SIZE`` > 1 in the environment) initialise the default process group (NCCL for
    CUDA devices, gloo otherwise) unless one exists; yields (rank, world size, this rank's device) and on exit
    destroys the group if it created it, so its worker threads are joined before the interpreter shuts down."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        yield 0, 1, device
        return
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(torch.device(device))
    created = not dist.is_initialized()
    if created:
        # torch.distributed.nn.functional binds group.WORLD as a default argument when it is imported. Imported
        # after the group exists (transformers does, building a model), it keeps the group alive past
        # destroy_process_group, and a gloo worker thread still releasing a finished collective's tensors then
        # races interpreter shutdown: SIGABRT, "terminate called without an active exception".
        importlib.import_module("torch.distributed.nn.functional")
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        yield dist.get_rank(), dist.get_world_size(), device
    finally:
        if created:
            dist.destroy_process_group()


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
