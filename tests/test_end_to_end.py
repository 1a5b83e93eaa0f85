"""From model and text to a peft model: tiny LLaMA/GPT-2/BERT, the real SmolLM2, the command line."""

import json

import pytest
import torch
from sensilora import allocate, calibrate, get_peft_model
from sensilora.calibration.text import calibration_batches, default_calibration_file, read_texts
from sensilora.cli import main
from sensilora.integrations.lora import adapter_ranks

from tests.models import (
    random_batches,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_mistral,
    tiny_qwen2,
)


@pytest.mark.parametrize("builder", [tiny_llama, tiny_qwen2, tiny_mistral, tiny_gpt2, tiny_bert])
@pytest.mark.parametrize("mode", ["diag", "obs"])
def test_tiny_models_end_to_end(builder, mode):
    model = builder()
    stats = calibrate(model, random_batches(), mode=mode, progress=False)
    allocation = allocate(stats, avg_rank=4, model=model)
    assert 0.9 * allocation.uniform_parameters <= allocation.trainable_parameters <= allocation.uniform_parameters
    peft_model = get_peft_model(model, allocation)
    assert adapter_ranks(peft_model) == allocation.ranks
    out = peft_model(**random_batches(batches=1)[0])
    assert torch.isfinite(out.logits).all()


@pytest.mark.slow
def test_smollm2_real_model_end_to_end(smollm2):
    model, tokenizer, name = smollm2
    texts = read_texts(default_calibration_file())
    batches = calibration_batches(tokenizer, texts, num_samples=4, seq_len=64, batch_size=2)
    stats = calibrate(model, batches, progress=False, model_name=name)
    assert len(stats.module_names) == 30 * 7 and len(stats.inputs) == 30 * 4
    allocation = allocate(stats, avg_rank=8, budget="ranks")
    assert sum(allocation.ranks.values()) == 8 * 210
    by_params = allocate(stats, avg_rank=8)  # the default budget: uniform LoRA's parameters
    assert 0.99 * by_params.uniform_parameters <= by_params.trainable_parameters <= by_params.uniform_parameters
    assert len(set(allocation.ranks.values())) > 5  # genuinely non-uniform
    stats_obs = calibrate(model, batches[:1], mode="obs", target_modules=r"model\.layers\.(0|29)\..*", progress=False)
    allocation_obs = allocate(stats_obs, avg_rank=8, model=model, budget="ranks")
    assert sum(allocation_obs.ranks.values()) == 8 * 14


@pytest.mark.slow
def test_cli_main_job_and_compare(tmp_path, capsys):
    first, plot = tmp_path / "kjv.json", tmp_path / "kjv.png"
    args = ["allocate", "--samples", "8", "--seq-len", "256", "--budget", "ranks", "--full-table"]
    args += ["--output", str(first)]
    assert main([*args, "--plot", str(plot)]) == 0
    printed = capsys.readouterr().out
    assert "rank sum: 1680" in printed and "uniform LoRA" in printed and "model.layers.29.mlp.down_proj" in printed
    data = json.loads(first.read_text())
    assert sum(m["rank"] for m in data["modules"].values()) == 8 * 210
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    second = tmp_path / "other.json"
    text = tmp_path / "other.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 400)
    other = ["allocate", "--quiet", "--samples", "8", "--seq-len", "256", "--calibration", str(text)]
    assert main([*other, "--budget", "ranks", "--output", str(second), "--plot", str(tmp_path / "other.png")]) == 0
    capsys.readouterr()
    assert main(["compare", str(first), str(second), "--json"]) == 0
    comparison = json.loads(capsys.readouterr().out)
    assert comparison["modules"] == 210 and -1 <= comparison["spearman_theta"] <= 1


def test_cli_bad_input_writes_nothing(tmp_path, capsys):
    output = tmp_path / "ranks.json"
    code = main(
        ["allocate", "--model", str(tmp_path / "missing"), "--output", str(output), "--plot", str(tmp_path / "p.png")]
    )
    assert code == 2 and "not a directory" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 2
    assert "cannot read ranks file" in capsys.readouterr().err


@pytest.mark.slow
def test_the_default_model_trains_with_the_hf_trainer_and_saves(tmp_path):
    """The built-in default (a GGUF, dequantised) is an ordinary model: the README's HF Trainer recipe runs
    a few steps on it and both the adapter and the base model save."""
    from sensilora.calibration.models import load_model
    from transformers import Trainer, TrainingArguments

    model, tokenizer, _ = load_model(progress=False)
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")
    texts = read_texts(default_calibration_file())[:64]
    batches = calibration_batches(tokenizer, texts, 4, 32, batch_size=4, minimum=1)
    allocation = allocate(calibrate(model, batches, progress=False), avg_rank=2)
    model.save_pretrained(tmp_path / "base")  # refused while a GGUF quantizer was attached
    peft_model = get_peft_model(model, allocation)
    rows = [{"input_ids": ids, "attention_mask": mask, "labels": ids}
            for b in batches for ids, mask in zip(b["input_ids"], b["attention_mask"])]  # fmt: skip
    arguments = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2,
                                  report_to=[], save_strategy="no", use_cpu=True, learning_rate=1e-3)  # fmt: skip
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    Trainer(model=peft_model, args=arguments, train_dataset=rows).train()
    assert any(not torch.equal(before[n], p) for n, p in peft_model.named_parameters() if p.requires_grad)
    peft_model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
