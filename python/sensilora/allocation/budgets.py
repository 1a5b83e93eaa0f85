"""From theta to integer ranks (METHOD.md section 4): SRA (eq. 15) and PRA under exact budgets and bounds."""

from __future__ import annotations

import math

import numpy as np

from ..errors import SensiloraError
from .config import BUDGETS, AllocationConfig, check_choice


def _water_fill(theta, cost, budget, low, high) -> np.ndarray:
    """Real ranks ``clip(c*theta, low, high)`` with ``sum(cost*r) == budget`` (bisection on c)."""
    if theta.max(initial=0.0) <= 0:
        theta = np.ones_like(theta)  # no sensitivity information: share evenly
    theta = theta / theta.max()  # scale-free: huge theta (1e300) would overflow c * theta
    spent = lambda c: float((cost * np.clip(c * theta, low, high)).sum())  # noqa: E731
    lo, hi = 0.0, 1.0
    while spent(hi) < budget and hi < 1e300:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if spent(mid) < budget else (lo, mid)
    return np.clip(hi * theta, low, high)


def _largest_remainder(real, cost, budget, low, high, names) -> np.ndarray:
    """Integer ranks: floors, then +1 by largest remainder (ties by name) while the budget allows."""
    real = np.round(real, 9)
    ranks = np.clip(np.floor(real), low, high).astype(np.int64)
    left = int(round(budget - float((cost * ranks).sum())))
    order = sorted(range(len(names)), key=lambda i: (-(real[i] - math.floor(real[i])), names[i]))
    for i in reversed(order):  # rounding can overshoot: take back from the smallest remainders first
        while left < 0 and ranks[i] > low[i]:
            ranks[i] -= 1
            left += int(cost[i])
    changed = True
    while left > 0 and changed:
        changed = False
        for i in order:
            if ranks[i] < high[i] and cost[i] <= left:
                ranks[i] += 1
                left -= int(cost[i])
                changed = True
    return ranks


def largest_rank(d_out: int, d_in: int) -> int:
    """The largest rank an adapter of a d_out x d_in weight may have: its ``r (d_out + d_in)`` parameters
    never exceed the weight's ``d_out d_in`` (a larger adapter is never right, and it also stays below
    min(d_out, d_in), the weight's own rank): ``floor(d_out d_in / (d_out + d_in))``, at least 1."""
    return max(1, (d_out * d_in) // (d_out + d_in))


def sra_ranks(
    theta: dict[str, float],
    shapes: dict[str, tuple[int, int]],
    avg_rank: int,
    min_rank: int = 1,
    budget: str = "ranks",
    max_rank: int | None = None,
    rank_multiple: int = 1,
) -> dict[str, int]:
    """eq. 15: ranks proportional to theta within ``[min_rank, min(largest_rank(d_out, d_in), max_rank)]``.

    budget="ranks": ``sum r == avg_rank * #matrices`` exactly. budget="params": the trainable
    parameters ``sum r*(d_out+d_in)`` do not exceed uniform LoRA's at avg_rank (and come as close as
    integer ranks allow). rank_multiple m: every rank a multiple of m (serving kernels often want 8 or 16);
    the bounds round inwards to multiples of m, and the budget is then met to within less than m ranks
    (exactly when it is itself a multiple of m).
    """
    check_choice("budget", budget, BUDGETS)
    names = list(theta)
    dims = np.array([shapes[n] for n in names], dtype=np.int64)
    largest = np.array([largest_rank(int(d_out), int(d_in)) for d_out, d_in in dims], dtype=np.int64)
    high = largest if max_rank is None else np.minimum(largest, max_rank)
    high = high // rank_multiple  # bounds and costs in units of rank_multiple from here on
    low = np.full(len(names), -(-min_rank // rank_multiple), dtype=np.int64)
    if (high < low).any():
        small = [n for n, h, lo in zip(names, high, low) if h < lo]
        raise SensiloraError(
            f"{small[:3]} cannot hold a rank that is a multiple of {rank_multiple} within their bounds; "
            "lower --rank-multiple or exclude them"
        )
    cost = dims.sum(axis=1) if budget == "params" else np.ones(len(names), dtype=np.int64)
    total = int(avg_rank * cost.sum())
    cost = cost * rank_multiple
    if total < int((cost * low).sum()):
        raise SensiloraError(
            f"budget too small: avg_rank={avg_rank} over {len(names)} matrices is below min_rank={min_rank} each; "
            "raise avg_rank or lower min_rank"
        )
    if total > int((cost * high).sum()):
        raise SensiloraError(
            f"avg_rank={avg_rank} exceeds what the matrices can hold (an adapter at most its weight's size, "
            f"rank <= d_out d_in / (d_out + d_in), and max_rank={max_rank}); lower it"
        )
    values = np.array([theta[n] for n in names], dtype=np.float64)
    if not np.isfinite(values).all():
        bad = [n for n, v in zip(names, values) if not math.isfinite(v)]
        raise SensiloraError(f"theta is not finite for {bad[:3]}; the statistics hold NaN/Inf: recalibrate in float32")
    real = _water_fill(
        np.maximum(values, 0.0), cost.astype(np.float64), float(total), low.astype(np.float64), high.astype(np.float64)
    )
    units = _largest_remainder(real, cost, total, low, high, names)
    spent = int((cost * units).sum())
    if spent > total or (budget == "ranks" and total - spent >= rank_multiple):  # eq. 15's integer contract
        raise SensiloraError(
            f"internal error: SRA spent {spent} of a budget of {total}; please report it with the theta values"
        )
    return dict(zip(names, (units * rank_multiple).tolist()))


def pra_offsets(groups: int) -> list[int]:
    """Symmetric integer offsets, largest first: 3 -> [1, 0, -1]; 4 -> [2, 1, -1, -2]."""
    if groups % 2:
        return [groups // 2 - c for c in range(groups)]
    half = groups // 2
    return [half - c for c in range(half)] + [-(c + 1) for c in range(half)]


def pra_ranks(
    theta: dict[str, float], shapes, avg_rank: int, groups: int = 3, min_rank: int = 1, max_rank: int | None = None
) -> dict[str, int]:
    """Sort by theta, split into equal groups, give group c ``avg_rank + offset_c`` (METHOD.md section 4, PRA).
    Every rank stays within ``[min_rank, min(largest_rank(d_out, d_in), max_rank)]`` or the call fails."""
    names = sorted(theta, key=lambda n: (-theta[n], n))
    if groups < 1 or groups > len(names):
        raise SensiloraError(f"pra groups must be in [1, {len(names)}], got {groups}")
    base, extra = divmod(len(names), groups)
    if extra and groups % 2 == 0:
        raise SensiloraError(
            f"PRA with an even number of groups ({groups}) needs #matrices ({len(names)}) divisible by it"
        )
    sizes = [base + (extra if (groups % 2 and c == groups // 2) else 0) for c in range(groups)]
    offsets = pra_offsets(groups)
    if avg_rank + min(offsets) < min_rank:
        raise SensiloraError(
            f"PRA: avg_rank {avg_rank} + offset {min(offsets)} falls below min_rank={min_rank}; use fewer groups"
        )
    if max_rank is not None and avg_rank + max(offsets) > max_rank:
        raise SensiloraError(
            f"PRA: avg_rank {avg_rank} + offset {max(offsets)} exceeds max_rank={max_rank}; "
            "use fewer groups or raise max_rank"
        )
    ranks, start = {}, 0
    for size, offset in zip(sizes, offsets):
        for name in names[start : start + size]:
            if avg_rank + offset > largest_rank(*shapes[name]):
                raise SensiloraError(
                    f"PRA: rank {avg_rank + offset} would make the adapter of {name} larger than its weight; "
                    "lower avg_rank"
                )
            ranks[name] = avg_rank + offset
        start += size
    return {name: ranks[name] for name in theta}


def assign_ranks(
    theta: dict[str, float], shapes: dict[str, tuple[int, int]], config: AllocationConfig
) -> dict[str, int]:
    """Integer ranks from theta under ``config`` (SRA or PRA, its budget and bounds)."""
    if config.method == "sra":
        return sra_ranks(
            theta, shapes, config.avg_rank, config.min_rank, config.budget, config.max_rank, config.rank_multiple
        )
    return pra_ranks(theta, shapes, config.avg_rank, config.pra_groups, config.min_rank, config.max_rank)


def check_budget_fits(shapes: dict[str, tuple[int, int]], config: AllocationConfig) -> None:
    """Raise now, before any statistics exist, if ``config`` cannot be met on matrices of these shapes
    (a dry run of the allocation on uniform theta: the bounds and the budget depend only on the shapes)."""
    assign_ranks(dict.fromkeys(shapes, 1.0), shapes, config)
