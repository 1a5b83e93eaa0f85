"""Checkpoint and resume (sensilora.checkpoint): an interrupted calibration resumed from its checkpoint gives
the uninterrupted result bit for bit, counts no batch twice, and refuses other data or settings."""

import pytest
import sensilora
import torch
from sensilora.errors import SensiloraError

from tests.models import random_batches, tiny_llama


def interrupted(batches, after: int):
    """The batches, then an interruption (as a Ctrl-C or a lost node would) after ``after`` of them."""
    for index, batch in enumerate(batches):
        if index == after:
            raise KeyboardInterrupt
        yield batch


def assert_same_stats(a, b):
    assert a.module_inputs == b.module_inputs and a.info["batches"] == b.info["batches"]
    assert a.info["data_sha256"] == b.info["data_sha256"]
    for key in a.inputs:
        assert a.inputs[key].num_tokens == b.inputs[key].num_tokens
        assert torch.equal(a.inputs[key].hessian_diag, b.inputs[key].hessian_diag)
        if a.inputs[key].inverse_hessian_diag is not None:
            assert torch.equal(a.inputs[key].inverse_hessian_diag, b.inputs[key].inverse_hessian_diag)


@pytest.mark.parametrize("mode", ["diag", "obs"])
def test_resume_after_an_interruption_equals_one_uninterrupted_run(tmp_path, mode):
    model, batches, path = tiny_llama(), random_batches(7), tmp_path / "calibration.ckpt"
    whole = sensilora.calibrate(model, batches, mode=mode, progress=False)
    with pytest.raises(KeyboardInterrupt):
        sensilora.calibrate(model, interrupted(batches, 5), mode=mode, progress=False, checkpoint=path,
                            checkpoint_every=2)  # fmt: skip
    assert path.exists()  # batches 1-4 saved; batch 5 ran but is not in the checkpoint and will run again
    resumed = sensilora.calibrate(model, batches, mode=mode, progress=False, checkpoint=path, checkpoint_every=2)
    assert_same_stats(resumed, whole)
    assert not path.exists()  # removed once the calibration finished


def test_resume_refuses_other_data_other_settings_and_too_few_batches(tmp_path):
    model, path = tiny_llama(), tmp_path / "calibration.ckpt"
    with pytest.raises(KeyboardInterrupt):
        sensilora.calibrate(model, interrupted(random_batches(6), 4), progress=False, checkpoint=path,
                            checkpoint_every=2)  # fmt: skip
    with pytest.raises(SensiloraError, match="differ from those summed in checkpoint"):
        sensilora.calibrate(model, random_batches(6, seed=1), progress=False, checkpoint=path, checkpoint_every=2)
    with pytest.raises(SensiloraError, match="written with other settings"):
        sensilora.calibrate(model, random_batches(6), progress=False, checkpoint=path, exclude_first=1)
    with pytest.raises(SensiloraError, match="already summed 4"):
        sensilora.calibrate(model, random_batches(3), progress=False, checkpoint=path)
    assert path.exists()  # a refused resume leaves the checkpoint as it was


def test_checkpoint_options_are_checked_before_any_pass(tmp_path):
    model = tiny_llama()
    with pytest.raises(SensiloraError, match="sequential mode runs layer by layer"):
        sensilora.calibrate(model, random_batches(2), progress=False, checkpoint=tmp_path / "c", sequential=True)
    with pytest.raises(SensiloraError, match="checkpoint_every must be a positive number"):
        sensilora.calibrate(model, random_batches(2), progress=False, checkpoint=tmp_path / "c", checkpoint_every=0)
    (tmp_path / "junk").write_bytes(b"not a checkpoint")
    with pytest.raises(SensiloraError, match="cannot read calibration checkpoint"):
        sensilora.calibrate(model, random_batches(2), progress=False, checkpoint=tmp_path / "junk")


def test_cli_checkpoint_is_used_and_removed(tiny_model_dir, tmp_path, capsys):
    from sensilora.cli import main

    out, checkpoint = tmp_path / "out", tmp_path / "calibration.ckpt"
    outputs = ["--output", str(out / "r.json"), "--plot", str(out / "r.png")]
    common = ["allocate", "--model", str(tiny_model_dir), "--samples", "4", "--batch-size", "1", "--seq-len", "16",
              "--quiet", "--min-tokens", "1", *outputs]  # fmt: skip
    assert main([*common, "--checkpoint", str(checkpoint), "--checkpoint-every", "1"]) == 0
    assert (out / "r.json").exists() and not checkpoint.exists()
    assert main([*common, "--checkpoint", str(checkpoint), "--checkpoint-every", "0"]) == 2
    assert "checkpoint_every must be a positive number" in capsys.readouterr().err
