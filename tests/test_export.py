"""Export into the tools people train with, serving-friendly ranks, and the provenance a ranks file keeps."""

import json

import pytest
import torch
from sensilora import AllocationConfig, SensiloraError, allocate, calibrate, sra_ranks
from sensilora.cli import main
from sensilora.integrations.compare import compare_allocations
from sensilora.integrations.export import PEFT_0_15_KEYS, export_peft, export_text

from tests.models import random_batches, tiny_llama


@pytest.mark.slow
def test_peft_adapter_round_trips_through_from_pretrained(smollm2, tmp_path):
    import peft
    from transformers import AutoModelForCausalLM

    model, tokenizer, _ = smollm2
    texts = ["In the beginning God created the heaven and the earth. " * 20]
    batch = tokenizer(texts, return_tensors="pt")
    allocation = allocate(calibrate(model, [batch], progress=False), avg_rank=8, budget="params", max_rank=32)
    base = AutoModelForCausalLM.from_config(model.config)  # a fresh copy of the same architecture
    export_peft(allocation, base, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert set(config) <= PEFT_0_15_KEYS  # loadable by peft 0.15
    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_config(model.config), tmp_path / "adapter",
                                            is_trainable=True)  # fmt: skip
    from sensilora import verify_ranks

    verify_ranks(loaded, allocation)
    assert any(p.requires_grad for p in loaded.parameters())
    b_weights = [p for n, p in loaded.named_parameters() if "lora_B" in n]
    assert b_weights and all(torch.count_nonzero(p) == 0 for p in b_weights)  # LoRA's usual initialisation
    with pytest.raises(SensiloraError, match="not an empty directory"):
        export_peft(allocation, base, tmp_path / "adapter")


def test_json_and_axolotl_exports(tmp_path, capsys):
    allocation = allocate(calibrate(tiny_llama(), random_batches(), progress=False), avg_rank=4)
    allocation.save(tmp_path / "r.json")
    assert main(["export", str(tmp_path / "r.json"), str(tmp_path / "lora.json"), "--to", "json"]) == 0
    config = json.loads((tmp_path / "lora.json").read_text())
    assert config["r"] == 4 and len(config["rank_pattern"]) == len(allocation.ranks) and set(config) <= PEFT_0_15_KEYS
    import peft

    assert peft.LoraConfig(**config).rank_pattern == config["rank_pattern"]
    text = export_text(allocation, "axolotl", "out/adapter")
    assert "lora_model_dir: out/adapter" in text and "adapter: lora" in text


@pytest.mark.parametrize("budget", ["ranks", "params"])
def test_rank_multiple(budget):
    theta = {f"m{i}": float(i + 1) ** 2 for i in range(10)}
    shapes = {name: (64, 48) for name in theta}
    ranks = sra_ranks(theta, shapes, 8, 1, budget, None, rank_multiple=8)
    assert all(r % 8 == 0 and 8 <= r <= 48 for r in ranks.values())
    assert 8 * 10 - 8 < sum(ranks.values()) <= 8 * 10  # within one multiple of the budget
    with pytest.raises(SensiloraError, match="use method='sra' with rank_multiple"):
        AllocationConfig(method="pra", rank_multiple=8)
    with pytest.raises(SensiloraError, match="cannot hold a rank that is a multiple of 64"):
        sra_ranks(theta, shapes, 8, 1, budget, None, rank_multiple=64)


def test_ranks_files_record_provenance_and_compare_warns():
    model = tiny_llama()
    first = allocate(calibrate(model, random_batches(seed=0), progress=False), avg_rank=4)
    second = allocate(calibrate(model, random_batches(seed=1), progress=False), avg_rank=4, max_rank=6)
    data = first.to_dict()
    assert data["sensilora_version"] and len(data["calibration"]["data_sha256"]) == 64
    assert data["calibration"]["model_config_sha256"]
    same = allocate(calibrate(model, random_batches(seed=0), progress=False), avg_rank=4)
    assert compare_allocations(first, same)["warnings"] == []
    notes = compare_allocations(first, second)["warnings"]
    assert any("calibration tokens differ" in n for n in notes) and any("max_rank" in n for n in notes)


def test_report_page_and_compact_summary(tmp_path, capsys):
    allocation = allocate(calibrate(tiny_llama(layers=3), random_batches(), progress=False), avg_rank=4)
    allocation.save(tmp_path / "r.json")
    assert main(["report", str(tmp_path / "r.json"), "-o", str(tmp_path / "report.png")]) == 0
    printed = capsys.readouterr().out
    assert "module type" in printed and "mlp.down_proj" in printed and "mean rank per layer: 0:" in printed
    from matplotlib.image import imread

    image = imread(tmp_path / "report.png")
    assert image.shape[0] >= 1000 and image.shape[1] >= 1300 and image[..., :3].std() > 0.05  # a drawn page


def test_encoder_ranks_reach_the_task_model_through_export_and_lora_config(tmp_path, capsys):
    """Ranks computed on a bare encoder (``AutoModel``: ``encoder.layer.0...``) reach a task model
    (``bert.encoder.layer.0...``) by every path: the exported adapter, and peft.get_peft_model with
    lora_config (the TRL path). The model directory has no tokenizer files (a training checkpoint)."""
    import warnings

    import peft
    from sensilora import lora_config
    from sensilora.calibration.models import load_model
    from sensilora.integrations.lora import adapter_ranks
    from transformers import AutoModelForSequenceClassification

    from tests.models import tiny_bert

    directory = tmp_path / "bert"
    tiny_bert().save_pretrained(directory)  # weights and config only
    bare, tokenizer, _ = load_model(directory, progress=False, tokenizer=False)
    assert tokenizer is None and not any(name.startswith("bert.") for name, _ in bare.named_modules())
    allocation = allocate(calibrate(bare, random_batches(), progress=False), avg_rank=4)
    assert len(set(allocation.ranks.values())) > 1  # not uniform: a fallback to r would show
    allocation.save(tmp_path / "ranks.json")
    assert main(["export", str(tmp_path / "ranks.json"), str(tmp_path / "ad"), "--to", "peft",
                 "--model", str(directory)]) == 0, capsys.readouterr().err  # fmt: skip
    wanted = {f"bert.{name}": rank for name, rank in allocation.ranks.items()}
    task = AutoModelForSequenceClassification.from_pretrained(directory)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # peft warns of adapter weights it could not place
        assert adapter_ranks(peft.PeftModel.from_pretrained(task, tmp_path / "ad")) == wanted
    task = AutoModelForSequenceClassification.from_pretrained(directory)
    wrapped = peft.get_peft_model(task, lora_config(allocation, task_type="SEQ_CLS"))
    assert adapter_ranks(wrapped) == wanted


def test_pattern_keys_prefer_the_longer_name():
    """Two allocated modules whose names end alike: each gets its own rank (the longer key is matched first)."""
    from peft.utils.other import get_pattern_key
    from sensilora.integrations.lora import rank_patterns

    pattern = rank_patterns(
        {"model.layers.1.q_proj": 3, "vision.model.layers.1.q_proj": 7, "model.layers.11.q_proj": 5}
    )
    for name, rank in (("model.layers.1.q_proj", 3), ("vision.model.layers.1.q_proj", 7),
                       ("model.layers.11.q_proj", 5), ("base.model.layers.1.q_proj", 3)):  # fmt: skip
        assert pattern[get_pattern_key(pattern.keys(), name)] == rank, name
