"""What a run leaves when it is stopped or fails late: signals in real processes (SIGINT 130, SIGTERM 143,
one line, nothing written), the temporaries of a killed run removed by the next one (a moved-aside
original put back), the checkpoint kept until the outputs are written, export modes from the umask."""

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from sensilora import allocate, calibrate, io
from sensilora.calibration.stats import SensitivityStats
from sensilora.cli import main

from tests.models import random_batches, tiny_llama
from tests.test_cli_failures import allocate_args, listing


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped): no live process has it."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.parametrize("sig,code,word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_a_signal_during_calibration_in_a_real_process(tiny_model_dir, tmp_path, sig, code, word):
    """Ctrl-C (SIGINT) or what timeout, Slurm and Kubernetes send (SIGTERM) while the calibration passes
    run: one line, its exit code, nothing written and no temporary left."""
    text = tmp_path / "long.txt"
    text.write_text("And God said, Let there be light: and there was light. " * 20000)
    out = tmp_path / "out"
    args = allocate_args(tiny_model_dir, out, "--calibration", str(text), "--samples", "4000",
                         "--stats", str(out / "s.safetensors"))  # fmt: skip
    args.remove("--quiet")  # the progress bar on stderr says when calibration has started
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SENSILORA_BACKEND")}
    # a shell without job control starts background jobs with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: give the child the default disposition, as an interactive shell would
    process = subprocess.Popen([sys.executable, "-m", "sensilora", *args], stderr=subprocess.PIPE, text=True, env=env,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    seen, deadline = "", time.time() + 240
    while "calibrating" not in seen and time.time() < deadline:
        seen += process.stderr.read(1)
    process.send_signal(sig)
    rest = process.communicate(timeout=120)[1]
    assert process.returncode == code, seen + rest
    assert f"sensilora allocate: {word}; nothing was written" in rest and "Traceback" not in rest
    assert not out.exists()


def test_the_next_run_removes_what_a_killed_run_left(tiny_model_dir, tmp_path, capsys):
    """Temporaries named for a dead process are removed; a live process's are not; a ``.bak`` whose target
    is missing (killed between moving the original aside and putting the new one in place) is restored."""
    dead, out = dead_pid(), tmp_path / "out"
    out.mkdir()
    left = [out / f".r.json.sensilora-{dead}-x1.tmp", out / f".r.png.sensilora-{dead}-x2.tmp"]
    for path in left:
        path.write_bytes(b"0" * 1000)
    alive = out / f".r.json.sensilora-{os.getpid()}-x3.tmp"  # this test's own: a run in progress
    alive.write_text("in progress")
    other = out / f".notes.txt.sensilora-{dead}-x4.tmp"  # beside another file: not this run's business
    other.write_text("someone else's")
    assert main(allocate_args(tiny_model_dir, out)) == 0, capsys.readouterr().err
    assert not any(path.exists() for path in left) and alive.exists() and other.exists()
    assert json.loads((out / "r.json").read_text())["modules"]

    original = tmp_path / "ranks.json"
    backup = tmp_path / f".ranks.json.sensilora-{dead}-x5.bak"
    backup.write_text("the original")
    staging = tmp_path / f".ranks.json.sensilora-{dead}-x6.staging"
    staging.mkdir()
    (staging / "half-written").write_text("x")
    io.clean_stale_temporaries(original)
    assert original.read_text() == "the original" and not backup.exists() and not staging.exists()


def test_a_failed_write_keeps_the_checkpoint_and_the_rerun_resumes(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """The checkpoint goes only once every output is written: a write that fails (a full disk) leaves it,
    the rerun resumes from it, gives the same ranks as an uninterrupted run, and then removes it."""
    out, checkpoint = tmp_path / "out", tmp_path / "calibration.ckpt"
    args = allocate_args(tiny_model_dir, out, "--samples", "6", "--batch-size", "2", "--checkpoint",
                         str(checkpoint), "--checkpoint-every", "1", "--stats", str(out / "s.safetensors"))  # fmt: skip

    def full_disk(self, path: Path) -> None:
        raise RuntimeError("No space left on device (injected)")

    with monkeypatch.context() as patch:
        patch.setattr(SensitivityStats, "write_to", full_disk)
        assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device (injected)" in err and "nothing was written" in err
    assert checkpoint.is_file() and not out.exists()

    args.remove("--quiet")
    assert main(args) == 0
    assert "resuming from checkpoint" in capsys.readouterr().err and not checkpoint.exists()
    resumed = json.loads((out / "r.json").read_text())["modules"]
    fresh = [a for a in args if a not in ("--checkpoint", str(checkpoint))]
    fresh[fresh.index(str(out / "r.json"))] = str(tmp_path / "fresh.json")
    fresh[fresh.index(str(out / "r.png"))] = str(tmp_path / "fresh.png")
    fresh[fresh.index(str(out / "s.safetensors"))] = str(tmp_path / "fresh.safetensors")
    assert main(fresh) == 0
    assert {n: m["rank"] for n, m in json.loads((tmp_path / "fresh.json").read_text())["modules"].items()} == {
        n: m["rank"] for n, m in resumed.items()
    }


def test_an_exported_adapter_takes_the_umask(tiny_model_dir, tmp_path, capsys):
    assert main(allocate_args(tiny_model_dir, tmp_path)) == 0
    old_mask = os.umask(0o027)
    try:
        code = main(["export", str(tmp_path / "r.json"), str(tmp_path / "ad"), "--to", "peft",
                     "--model", str(tiny_model_dir)])  # fmt: skip
    finally:
        os.umask(old_mask)
    assert code == 0, capsys.readouterr().err
    assert stat.S_IMODE((tmp_path / "ad").stat().st_mode) == 0o750
    files = [p for p in (tmp_path / "ad").rglob("*") if p.is_file()]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o640 for p in files)
    assert not [name for name in listing(tmp_path) if ".sensilora-" in name]


def test_the_lm_head_as_a_target_sees_every_token():
    """With the head as a target the forward computes every position's logits (transformers' default of the
    last position alone would give the head one token a row): its diagonal is ``(2/N) sum x^2`` of the
    final norm's output over the real tokens."""
    model, batches = tiny_llama(), random_batches()
    stats = calibrate(model, batches, target_modules=["lm_head", "q_proj"], progress=False)
    assert stats.num_tokens("lm_head") == stats.num_tokens("model.layers.0.self_attn.q_proj")
    seen = []
    hook = model.model.norm.register_forward_hook(lambda module, args, output: seen.append(output.detach()))
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    hook.remove()
    squares = [(x.double() ** 2)[b["attention_mask"].bool()] for x, b in zip(seen, batches)]
    tokens = sum(len(s) for s in squares)
    expected = 2 * torch.cat(squares).sum(0) / tokens
    assert stats.num_tokens("lm_head") == tokens
    torch.testing.assert_close(stats.hessian_diag("lm_head").double(), expected, rtol=1e-5, atol=1e-8)
    assert allocate(stats, avg_rank=2).ranks["lm_head"] >= 1


FULL_DISK = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


@pytest.mark.parametrize("writer", ["allocate --stats", "checkpoint", "merge", "export"])
def test_a_full_disk_in_safetensors_is_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch, writer):
    """safetensors raises its own error type (not an OSError) on a full disk: every command that writes
    with it says so in one line, exit 2, and leaves nothing (a checkpoint that could not be saved included)."""
    import peft.peft_model
    from safetensors import SafetensorError
    from sensilora.calibration import checkpoint as checkpoint_module
    from sensilora.calibration import stats as stats_module

    stats = tmp_path / "stats.safetensors"
    assert main([*allocate_args(tiny_model_dir, tmp_path), "--stats", str(stats)]) == 0
    other = tmp_path / "other.safetensors"
    assert main([*allocate_args(tiny_model_dir, tmp_path, "--seed", "1"), "--stats", str(other)]) == 0
    capsys.readouterr()
    before, out = listing(tmp_path), tmp_path / "out"

    def full_disk(*args, **kwargs):
        raise SafetensorError(FULL_DISK)

    for module, name in ((stats_module, "save_file"), (checkpoint_module, "save_file"),
                         (peft.peft_model, "safe_save_file")):  # fmt: skip
        monkeypatch.setattr(module, name, full_disk)
    args = {
        "allocate --stats": [*allocate_args(tiny_model_dir, out), "--stats", str(out / "s.safetensors")],
        "checkpoint": [
            *allocate_args(tiny_model_dir, out),
            "--checkpoint",
            str(out / "c.ckpt"),
            "--checkpoint-every",
            "1",
        ],  # fmt: skip
        "merge": ["merge", str(stats), str(other), "-o", str(out / "m.safetensors")],
        "export": ["export", str(tmp_path / "r.json"), str(out / "ad"), "--to", "peft", "--model", str(tiny_model_dir)],
    }[writer]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err and "Traceback" not in err, err
    assert listing(tmp_path) == before and not out.exists()
