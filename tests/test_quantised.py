"""bitsandbytes 4-bit and 8-bit layers (QLoRA's base): calibrated from their activations, shapes from in/out features,
wrapped by get_peft_model with every rank; obs mode, which needs dense weights, refuses them by name."""

import pytest
import torch
from sensilora import SensiloraError, allocate, calibrate, get_peft_model

from tests.models import random_batches, tiny_llama

bnb = pytest.importorskip("bitsandbytes")


def quantised_llama(bits: int):
    """tiny_llama with every MLP up_proj replaced by a 4-bit (NF4) or 8-bit layer holding the same weights."""
    model = tiny_llama()
    for layer in model.model.layers:
        dense = layer.mlp.up_proj
        if bits == 4:
            packed = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=False, compute_dtype=torch.float32)
            packed.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
            # bitsandbytes' AVX512-BF16 CPU repacking (taken only on CPUs that have it) needs out_features
            # divisible by 32 and fails on this tiny 48-wide layer: keep the portable 4-bit path
            packed.support_avx512bf16_for_cpu = False
        else:
            packed = bnb.nn.Linear8bitLt(dense.in_features, dense.out_features, bias=False, has_fp16_weights=False)
            packed.weight = bnb.nn.Int8Params(dense.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
        layer.mlp.up_proj = packed.to("cpu")  # quantises here
    return model


@pytest.mark.parametrize("bits", [4, 8])
def test_quantised_layers_calibrate_allocate_and_wrap(bits):
    model = quantised_llama(bits)
    packed = model.model.layers[0].mlp.up_proj
    assert packed.weight.dtype == (torch.uint8 if bits == 4 else torch.int8)  # really quantised
    stats = calibrate(model, random_batches(), progress=False)
    assert stats.module_shapes["model.layers.0.mlp.up_proj"] == (48, 32)
    allocation = allocate(stats, avg_rank=4)
    peft_model = get_peft_model(model, allocation)  # verify_ranks inside: every rank applied
    out = peft_model(**random_batches(batches=1)[0])
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_obs_mode_refuses_quantised_weights_by_name(bits):
    model = quantised_llama(bits)
    stats = calibrate(model, random_batches(), mode="obs", progress=False)
    with pytest.raises(SensiloraError, match=r"'model\.layers\.0\.mlp\.up_proj' stores its weight quantised"):
        allocate(stats, avg_rank=4, model=model)
