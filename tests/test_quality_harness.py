"""The quality harness runs end to end (its --smoke configuration: seconds of training, no claims), and its
paired statistics are right."""

import json

import numpy as np
import pytest

from benchmarks.quality.paired import holm, paired_difference


def test_paired_difference_and_holm():
    method, baseline = np.array([0.70, 0.72, 0.71, 0.73, 0.74]), np.array([0.69, 0.70, 0.70, 0.71, 0.71])
    result = paired_difference(method, baseline, higher_is_better=True)
    assert result["improvement"] == pytest.approx(0.018)
    assert result["ci_low"] > 0 and result["p"] < 0.01
    flipped = paired_difference(baseline, method, higher_is_better=False)  # perplexity: lower is better
    assert flipped["improvement"] == pytest.approx(0.018) and flipped["p"] == pytest.approx(result["p"])
    assert holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})


def test_run_log_resumes_a_run_only_at_its_learning_rate(tmp_path):
    from benchmarks.quality.run_quality import RunLog
    from benchmarks.quality.train import RunResult

    path = tmp_path / "runs.jsonl"
    result = RunResult("lora", 0, {"accuracy": 0.5}, 10, 0.1, None, {4: {"accuracy": 0.5, "seconds": 1.0}})
    RunLog(path).add("NLU runs", 1e-3, result)
    reloaded = RunLog(path)
    assert reloaded.get("NLU runs", "lora", 0, 1e-3) == result
    assert reloaded.get("NLU runs", "lora", 0, 2e-3) is None  # a changed rate is a new run, never a stale one


@pytest.mark.slow
def test_quality_smoke(tmp_path):
    from benchmarks.quality import methods, run_quality

    assert run_quality.main(["--smoke", "--results", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "quality_smoke.json").read_text())
    nlu = [row for row in data["rows"] if row["task"] == "NLU"]
    assert [row["method"] for row in nlu] == list(methods.ALL_METHODS)
    lora = next(r for r in nlu if r["method"] == "lora")
    for row in nlu:
        if row["method"] in methods.SENSILORA_VARIANTS or row["method"] == "shuffled":
            assert row["trainable_params"] <= lora["trainable_params"]  # same parameter budget (or just under)
    assert all(0.0 <= row["mean"] <= 1.0 for row in nlu)
    assert data["environment"]["decision"]["default"] in run_quality.PRIMARY
    assert (tmp_path / "quality_smoke.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_gpu_run_script_end_to_end_at_tiny_sizes(tmp_path):
    """The one-command GPU script, on this machine at toy sizes: every step runs and the results land."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SENSILORA_BACKEND", "PYTHON")}
    shadow = tmp_path / "bin"  # a `python` on PATH without torch, as on the GPU machine: the script must not use it
    shadow.mkdir()
    (shadow / "python").write_text("#!/bin/sh\necho 'this python has no torch' >&2\nexit 1\n")
    (shadow / "python").chmod(0o755)
    interpreter = Path(sys.executable)
    env["PATH"] = f"{shadow}:{interpreter.parent}:{env.get('PATH', '')}"  # python3 (the default) has torch
    bad = subprocess.run(["bash", "benchmarks/gpu_run.sh", "--tiny"], cwd=root, capture_output=True, text=True,
                         env={**env, "PYTHON": str(shadow / "python")}, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "cannot import torch" in bad.stderr, bad.stderr
    result = subprocess.run(["bash", "benchmarks/gpu_run.sh", "--tiny", f"--results={tmp_path}"], cwd=root, env=env,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "[end-to-end] done in" in result.stdout
    rows = json.loads((tmp_path / "cpu_tiny.json").read_text())["rows"]
    assert {row["case"] for row in rows} >= {"naive_hessian", "column_sumsq", "end_to_end"}
    log = (tmp_path / "gpu_run_tiny.log").read_text()
    assert log.count("== exit 0 after") == 3 and "CUDA_HOME=" in log and "part 1 done in" in log


@pytest.mark.slow
def test_hyperadalora_comparison_smoke(tmp_path):
    from benchmarks.quality import hyper_compare, run_quality

    assert run_quality.main(["--smoke", "--compare", "hyperadalora", "--tasks", "nlu", "--results", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "quality_smoke_hyperadalora.json").read_text())
    assert [row["method"] for row in data["rows"]] == list(hyper_compare.NLU_METHODS)
    hyper = next(row for row in data["rows"] if row["method"] == "hyperadalora")
    assert hyper["hypernetwork_params"] > 0 and hyper["adapter_params"] > 0
    assert {c["contrast"] for c in data["environment"]["contrasts"]} == {c[0] for c in hyper_compare.CONTRASTS}
    timing = data["environment"]["notes"]["NLU"]["step_seconds_side_by_side"]
    assert set(timing) == set(hyper_compare.METHODS) and all(seconds > 0 for seconds in timing.values())
    assert (tmp_path / "quality_smoke_hyperadalora.png").read_bytes()[:4] == b"\x89PNG"
