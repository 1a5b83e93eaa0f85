"""Layer-by-layer calibration equals the ordinary mode for LLaMA, Qwen2, Mistral, GPT-2 and BERT, and says
clearly what it cannot do."""

import pytest
import torch
from sensilora import SensiloraError, calibrate

from tests.models import random_batches, tiny_bert, tiny_gpt2, tiny_llama, tiny_mistral, tiny_qwen2


@pytest.mark.parametrize("builder", [tiny_llama, tiny_qwen2, tiny_mistral, tiny_gpt2, tiny_bert])
@pytest.mark.parametrize("mode", ["diag", "obs"])
def test_sequential_equals_ordinary(builder, mode):
    model = builder()
    ordinary = calibrate(model, random_batches(), mode=mode, progress=False)
    layered = calibrate(model, random_batches(), mode=mode, sequential=True, device="cpu", progress=False)
    assert layered.module_inputs == ordinary.module_inputs and layered.info["tokens"] == ordinary.info["tokens"]
    for name in ordinary.module_names:
        torch.testing.assert_close(layered.hessian_diag(name), ordinary.hessian_diag(name), rtol=1e-5, atol=1e-7)
        if mode == "obs":
            torch.testing.assert_close(layered.inverse_hessian_diag(name), ordinary.inverse_hessian_diag(name),
                                       rtol=1e-4, atol=1e-7)  # fmt: skip
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_sequential_refuses_what_it_cannot_do():
    with pytest.raises(SensiloraError, match="every target inside one list of numbered layers"):
        calibrate(tiny_llama(), random_batches(), target_modules=["lm_head", "q_proj"], sequential=True, progress=False)
    with pytest.raises(SensiloraError, match="use sequential=False"):
        calibrate(tiny_llama(), random_batches(), statistic="fisher", sequential=True, progress=False)


def test_sequential_with_targets_in_later_layers_only():
    """A first layer without targets runs like the others (it once failed checking sums that did not exist)."""
    model, batches = tiny_llama(), random_batches()
    pattern = r".*layers\.1\..*proj"
    ordinary = calibrate(model, batches, target_modules=pattern, progress=False)
    layered = calibrate(model, batches, target_modules=pattern, sequential=True, device="cpu", progress=False)
    assert layered.module_names == ordinary.module_names and all(".1." in n for n in layered.module_names)
    for name in ordinary.module_names:
        torch.testing.assert_close(layered.hessian_diag(name), ordinary.hessian_diag(name), rtol=1e-5, atol=0)
