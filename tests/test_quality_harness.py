"""The quality harness runs end to end (its --smoke configuration: seconds of training, no claims)."""

import json

import pytest


@pytest.mark.slow
def test_quality_smoke_nlu(tmp_path):
    from benchmarks.quality import run_quality

    assert run_quality.main(["--smoke", "--tasks", "nlu", "--results", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "quality_smoke.json").read_text())
    methods = [row["method"] for row in data["rows"]]
    assert methods == list(run_quality.METHODS)
    lora = next(r for r in data["rows"] if r["method"] == "lora")
    sra = next(r for r in data["rows"] if r["method"] == "sensilora-diag")
    assert sra["trainable_params"] <= lora["trainable_params"]  # same parameter budget (or just under)
    assert all(0.0 <= row["accuracy_mean"] <= 1.0 for row in data["rows"])
    assert (tmp_path / "quality_smoke.png").read_bytes()[:4] == b"\x89PNG"
