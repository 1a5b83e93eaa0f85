"""Shared benchmark helpers: timing with device sync, environment stamp, results files."""

from __future__ import annotations

import csv
import datetime
import io
import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch
from sensilora.io import write_text_atomic

RESULTS = Path(__file__).parent / "results"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 2) -> dict[str, float]:
    """p20 / p50 / p80 seconds of ``fn`` over ``repeats`` calls after ``warmup`` (JIT compiles and caches
    land there). On CUDA each call is timed by CUDA events (no Python launch gaps counted between them,
    one synchronisation at the end); on the CPU by ``perf_counter``."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) / 1e3 for start, end in events]
    else:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    p20, p50, p80 = (
        float(q)
        for q in torch.tensor(times, dtype=torch.float64).quantile(torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64))
    )
    return {"p20": p20, "p50": p50, "p80": p80}


def time_it(fn: Callable[[], object], device: torch.device, repeats: int = 3, warmup: int = 1) -> float:
    """Median seconds of ``fn`` (see ``measure``)."""
    return measure(fn, device, repeats, warmup)["p50"]


def environment(device: torch.device) -> dict:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": commit,
    }


def write_results(stem: str, env: dict, rows: list[dict], directory: Path = RESULTS) -> tuple[Path, Path]:
    """<directory>/<stem>.json (environment + rows) and .csv (rows), atomically."""
    json_path, csv_path = Path(directory) / f"{stem}.json", Path(directory) / f"{stem}.csv"
    write_text_atomic(json_path, json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(csv_path, buffer.getvalue())
    return json_path, csv_path


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(value):
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
