"""peft integration: anchored patterns, verification, JSON round trip."""

import json

import pytest
import torch
from sensilora import (
    RankAllocation,
    SensiloraError,
    allocate,
    calibrate,
    get_peft_model,
    lora_config,
    verify_ranks,
)
from sensilora.integrations.lora import adapter_ranks

from tests.models import random_batches, tiny_bert, tiny_llama


def test_peft_round_trip_gives_every_module_its_rank(tmp_path):
    model = tiny_llama(layers=12)  # layers.1 must not catch layers.10/11
    allocation = allocate(calibrate(model, random_batches(), progress=False), avg_rank=4)
    allocation.ranks["model.layers.1.self_attn.q_proj"] = 2  # make near-identical names differ
    allocation.ranks["model.layers.11.self_attn.q_proj"] = 6
    path = tmp_path / "ranks.json"
    allocation.save(path)
    loaded = RankAllocation.load(path)
    assert loaded.ranks == allocation.ranks and loaded.theta == allocation.theta
    data = json.loads(path.read_text())
    assert data["trainable_parameters"]["uniform_lora"] == allocation.uniform_parameters
    assert set(data["modules"]["model.layers.0.mlp.up_proj"]) >= {
        "rank",
        "theta",
        "global_sensitivity",
        "topk",
        "effective_rank",
    }
    peft_model = get_peft_model(tiny_llama(layers=12), loaded, lora_alpha=8)
    assert adapter_ranks(peft_model) == loaded.ranks
    from peft.tuners.lora import LoraLayer

    scalings = [m.scaling["default"] for m in peft_model.modules() if isinstance(m, LoraLayer)]
    assert len(scalings) == len(loaded.ranks)
    assert all(s == pytest.approx(8 / 4) for s in scalings)  # lora_alpha / r kept constant
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == loaded.trainable_parameters


def test_verify_detects_a_missed_rank():
    model = tiny_llama()
    allocation = allocate(calibrate(model, random_batches(), progress=False), avg_rank=4)
    peft_model = get_peft_model(model, allocation)
    allocation.ranks["model.layers.0.self_attn.q_proj"] += 1
    with pytest.raises(SensiloraError, match="did not apply"):
        verify_ranks(peft_model, allocation)


def test_ranks_file_that_does_not_fit_the_model(tmp_path):
    allocation = allocate(calibrate(tiny_llama(), random_batches(), progress=False), avg_rank=4)
    with pytest.raises(SensiloraError, match="does not fit"):
        get_peft_model(tiny_bert(), allocation)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SensiloraError, match="not a sensilora ranks file"):
        RankAllocation.load(tmp_path / "bad.json")


def test_sequence_classification_with_lora_kwargs():
    model = tiny_bert()
    allocation = allocate(calibrate(model, random_batches(), progress=False), avg_rank=2)
    peft_model = get_peft_model(model, allocation, task_type="SEQ_CLS", lora_dropout=0.0)
    out = peft_model(input_ids=torch.randint(0, 128, (2, 7)))
    assert out.logits.shape == (2, 3)


def test_peft_older_than_0_15_is_refused(monkeypatch):
    """peft < 0.15 matches rank_pattern keys as ``.*\\.KEY$``: our anchored keys would match nothing and every
    module would silently get r (checked here against that matcher), so lora_config refuses those versions."""
    import re

    import peft
    from sensilora.integrations.lora import pattern_key

    name = "model.layers.1.self_attn.q_proj"
    assert re.match(rf".*\.{pattern_key(name)}$", name) is None  # the peft 0.14 matcher: no match
    assert re.match(rf"(.*\.)?({pattern_key(name)})$", name)  # peft >= 0.15: matches exactly this name
    assert not re.match(rf"(.*\.)?({pattern_key(name)})$", name.replace("layers.1.", "layers.11."))
    allocation = allocate(calibrate(tiny_llama(), random_batches(), progress=False), avg_rank=4)
    monkeypatch.setattr(peft, "__version__", "0.14.0")
    with pytest.raises(SensiloraError, match=r"peft 0.14.0 .* pip install 'peft>=0.15'"):
        lora_config(allocation)
