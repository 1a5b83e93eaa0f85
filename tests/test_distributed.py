"""Data-parallel calibration with two gloo processes on the CPU, and merging statistics files: both equal one
process calibrating on all the batches, up to fp32 summation order."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import sensilora
import torch
from sensilora import SensiloraError, SensitivityStats, calibrate
from sensilora.calibration import merge_statistics
from sensilora.calibration.batches import combined_fingerprint
from sensilora.cli import main

from tests.models import random_batches, tiny_llama

ROOT = Path(__file__).resolve().parent.parent
WORKER = """
import os, sys, torch, torch.distributed as dist
import torch.distributed.nn.functional  # before the group exists: see torchrun_group
from sensilora import calibrate
from tests.models import random_batches, tiny_llama
rank, mode, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=2)
batches = random_batches(batches=4, seed=7)[rank::2]  # each rank its own shard
stats = calibrate(tiny_llama(), batches, mode=mode, progress=False)
stats.save(f"{out}/rank{rank}.safetensors")
dist.destroy_process_group()
# nothing keeps the group alive: its worker threads are joined, none is left to race interpreter shutdown
tasks = f"/proc/{os.getpid()}/task"
names = [open(f"{tasks}/{t}/comm").read().strip() for t in os.listdir(tasks)] if os.path.isdir(tasks) else []
assert not any(name.startswith("pt_gloo") for name in names), names
"""


def fp32_tolerance(stats: SensitivityStats) -> float:
    """Relative error of summing N fp32 terms in another order: about N * 2^-24 in the worst case."""
    return max(stats.inputs[k].num_tokens for k in stats.inputs) * 2.0**-24 * 4


@pytest.mark.parametrize("mode", ["diag", "obs"])
def test_two_gloo_processes_equal_one(tmp_path, mode):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SENSILORA_BACKEND")}
    env["OMP_NUM_THREADS"] = "1"
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(WORKER), str(r), mode, str(tmp_path)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for r in (0, 1)
    ]
    for worker in workers:
        _, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err[-3000:]
    single = calibrate(tiny_llama(), random_batches(batches=4, seed=7), mode=mode, progress=False)
    for rank in (0, 1):
        got = SensitivityStats.load(tmp_path / f"rank{rank}.safetensors")
        assert got.info["batches"] == 4 and got.info["tokens"] == single.info["tokens"]
        for name in single.module_names:
            torch.testing.assert_close(
                got.hessian_diag(name), single.hessian_diag(name), rtol=fp32_tolerance(single), atol=0
            )
            if mode == "obs":
                torch.testing.assert_close(got.inverse_hessian_diag(name), single.inverse_hessian_diag(name),
                                           rtol=1e-4, atol=1e-7)  # fmt: skip


def test_merge_equals_one_run_and_refuses_mismatches(tmp_path, capsys):
    model, batches = tiny_llama(), random_batches(batches=4, seed=3)
    first, second = calibrate(model, batches[:1], progress=False), calibrate(model, batches[1:], progress=False)
    single = calibrate(model, batches, progress=False)
    merged = merge_statistics(first, second)
    for name in single.module_names:
        torch.testing.assert_close(merged.hessian_diag(name), single.hessian_diag(name), rtol=1e-5, atol=0)
    first.save(tmp_path / "a.safetensors")
    second.save(tmp_path / "b.safetensors")
    assert (
        main(
            [
                "merge",
                str(tmp_path / "a.safetensors"),
                str(tmp_path / "b.safetensors"),
                "-o",
                str(tmp_path / "c.safetensors"),
            ]
        )
        == 0
    )
    assert SensitivityStats.load(tmp_path / "c.safetensors").info["tokens"] == single.info["tokens"]
    with pytest.raises(SensiloraError, match="different models or target modules"):
        merge_statistics(first, calibrate(tiny_llama(layers=3), batches[:1], progress=False))
    with pytest.raises(SensiloraError, match="merge only with their Hessians"):
        obs = calibrate(model, batches[:1], mode="obs", progress=False)
        merge_statistics(obs, obs)


def test_merge_names_what_differs_refuses_repeated_data_and_keeps_the_model_hash(tmp_path, capsys):
    """Merging a Hessian and a Fisher file names the statistic (not "different models" of one model); the
    same data in two files (a copy) is refused rather than counted twice; the merged file keeps the model's
    config hash, so comparing its ranks with a single run's warns of nothing."""
    import shutil

    from sensilora.integrations.compare import compare_allocations

    model, batches = tiny_llama(), random_batches(batches=4, seed=3)
    first, second = calibrate(model, batches[:2], progress=False), calibrate(model, batches[2:], progress=False)
    fisher = calibrate(model, batches[2:], statistic="fisher", progress=False)
    with pytest.raises(SensiloraError, match="different statistic \\('hessian' vs 'fisher'\\)"):
        merge_statistics(first, fisher)
    first.save(tmp_path / "a.safetensors")
    shutil.copy(tmp_path / "a.safetensors", tmp_path / "copy.safetensors")
    assert main(["merge", str(tmp_path / "a.safetensors"), str(tmp_path / "copy.safetensors"),
                 "-o", str(tmp_path / "m.safetensors")]) == 2  # fmt: skip
    assert "the same calibration data appears more than once" in capsys.readouterr().err
    assert not (tmp_path / "m.safetensors").exists()
    merged, single = merge_statistics(first, second), calibrate(model, batches, progress=False)
    assert merged.info["model_config_sha256"] == single.info["model_config_sha256"] is not None
    assert merged.info["tokens"] == single.info["tokens"]
    report = compare_allocations(sensilora.allocate(merged, avg_rank=4), sensilora.allocate(single, avg_rank=4))
    assert not [w for w in report["warnings"] if "model configurations" in w or "statistics differ" in w]


def test_obs_statistics_with_their_hessians_merge_like_one_run(tmp_path):
    model, batches = tiny_llama(), random_batches(batches=4, seed=3)
    parts = [calibrate(model, part, mode="obs", keep_grams=True, progress=False) for part in (batches[:1], batches[1:])]
    for index, part in enumerate(parts):  # the Hessians travel in the statistics file
        part.save(tmp_path / f"{index}.safetensors")
    loaded = [SensitivityStats.load(tmp_path / f"{index}.safetensors") for index in range(2)]
    assert all(
        s.hessian is not None and s.hessian.shape == (s.hessian_diag.numel(),) * 2 for s in loaded[0].inputs.values()
    )
    merged = merge_statistics(*loaded)
    single = calibrate(model, batches, mode="obs", progress=False)
    for name in single.module_names:
        torch.testing.assert_close(merged.hessian_diag(name), single.hessian_diag(name), rtol=1e-5, atol=0)
        torch.testing.assert_close(merged.inverse_hessian_diag(name), single.inverse_hessian_diag(name),
                                   rtol=1e-4, atol=1e-7)  # fmt: skip
    assert single.inputs[next(iter(single.inputs))].hessian is None  # kept only when asked
    assert (
        sensilora.allocate(merged, avg_rank=4, model=model).ranks
        == sensilora.allocate(single, avg_rank=4, model=model).ranks
    )
    with pytest.raises(SensiloraError, match="keep_grams keeps obs mode"):
        calibrate(model, batches, keep_grams=True, progress=False)


def test_cli_under_torchrun_equals_one_process(tiny_model_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("In the beginning God created the heaven and the earth. And the earth was without form. " * 60)
    common = ["allocate", "--model", str(tiny_model_dir), "--calibration", str(text), "--samples", "8",
              "--seq-len", "32", "--batch-size", "2", "--min-tokens", "1", "--quiet"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SENSILORA_BACKEND")}
    env["OMP_NUM_THREADS"] = "1"
    run = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        "29517",
        "-m",
        "sensilora",
    ]
    two = subprocess.run([*run, *common, "--output", str(tmp_path / "two.json"), "--plot", str(tmp_path / "two.png")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote ") == 1  # only rank 0 reports and writes
    assert main([*common, "--output", str(tmp_path / "one.json"), "--plot", str(tmp_path / "one.png")]) == 0
    import json

    one_data, two_data = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert {n: m["rank"] for n, m in two_data["modules"].items()} == {
        n: m["rank"] for n, m in one_data["modules"].items()
    }
    assert two_data["calibration"]["tokens"] == one_data["calibration"]["tokens"]
    per_rank = two_data["calibration"]["data_sha256_per_rank"]  # every rank's data, not rank 0's alone
    assert len(per_rank) == 2 and per_rank[0] != per_rank[1]
    assert two_data["calibration"]["data_sha256"] == combined_fingerprint(per_rank)
