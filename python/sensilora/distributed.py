"""Data-parallel calibration on torch.distributed (NCCL on GPUs, gloo on CPUs), and merging saved statistics.

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

from .errors import SensiloraError
from .inverse import inverse_diagonals
from .stats import InputStats, SensitivityStats


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


def reduce_statistics(collector, seen_batches: int) -> int:
    """All-reduce every accumulator of ``collector`` (a collector.Collector) and the batch count across
    the process group; returns the total number of batches. A no-op outside a process group."""
    if process_group_size() == 1:
        return seen_batches
    accumulators = collector.accumulators
    device = next(iter(accumulators.values())).column_sums().device if accumulators else torch.device("cpu")
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
    for key in keys:
        accumulator = accumulators[key]
        dist.all_reduce(accumulator.sums, op=dist.ReduceOp.SUM)
        tokens = torch.tensor([accumulator.num_tokens], device=device, dtype=torch.int64)
        dist.all_reduce(tokens, op=dist.ReduceOp.SUM)
        accumulator.num_tokens = int(tokens)
    return int(totals[0])


def merge_statistics(first: SensitivityStats, *others: SensitivityStats) -> SensitivityStats:
    """Statistics of separate calibration runs combined as if one run had seen all their tokens: each input's
    ``(2/N) sum x^2`` re-weighted by its token count. obs mode: the runs must have kept their Hessians
    (``calibrate(..., keep_grams=True)``), which merge the same way before the damped inverse is taken anew
    (damp: the first run's); obs files without them hold only the inverse diagonal and are refused."""
    runs = (first, *others)
    for other in others:
        if other.mode != first.mode:
            raise SensiloraError(f"cannot merge {first.mode}-mode and {other.mode}-mode statistics; calibrate alike")
        if other.module_shapes != first.module_shapes or other.module_inputs != first.module_inputs:
            raise SensiloraError(
                f"cannot merge statistics of different models or target modules ({first.model_name!r} vs "
                f"{other.model_name!r}); merge files calibrated on the same model and targets"
            )
        for setting in ("statistic", "exclude_first"):
            if other.info.get(setting) != first.info.get(setting):
                raise SensiloraError(
                    f"cannot merge statistics calibrated with different {setting} "
                    f"({first.info.get(setting)!r} vs {other.info.get(setting)!r})"
                )
    if first.mode == "obs" and any(s.hessian is None for run in runs for s in run.inputs.values()):
        raise SensiloraError(
            "obs-mode statistics merge only with their Hessians: calibrate each part with keep_grams=True "
            "(--keep-grams), or calibrate once on all the text"
        )
    inputs = {}
    for key in first.inputs:
        tokens = sum(run.inputs[key].num_tokens for run in runs)
        total = sum(run.inputs[key].hessian_diag.double() * run.inputs[key].num_tokens for run in runs)
        inputs[key] = InputStats(hessian_diag=(total / tokens).float(), num_tokens=tokens)
        if first.mode == "obs":
            weighted = sum(run.inputs[key].hessian.double() * run.inputs[key].num_tokens for run in runs)
            inputs[key].hessian = (weighted / tokens).float()
    if first.mode == "obs":
        damp = first.info.get("damp", 0.01)
        inverted = inverse_diagonals({key: stats.hessian for key, stats in inputs.items()}, damp)
        for key, (diagonal, used) in inverted.items():
            inputs[key].inverse_hessian_diag, inputs[key].damp = diagonal, used
    info = {
        "merged_from": [run.info for run in runs],
        "tokens": sum(run.info.get("tokens", 0) for run in runs),
        "batches": sum(run.info.get("batches", 0) for run in runs),
        "statistic": first.info.get("statistic"),
        "exclude_first": first.info.get("exclude_first"),
    }
    if first.mode == "obs":
        info["damp"] = first.info.get("damp", 0.01)
    return SensitivityStats(
        first.mode, dict(first.module_shapes), dict(first.module_inputs), inputs, first.model_name, info
    )
