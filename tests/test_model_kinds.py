"""Encoder-only, decoder-only, encoder-decoder and mixture-of-experts models: the class chosen from the config,
decoder inputs fed as in training, ranks from a bare encoder applied to a task model (and back), MoE routers
left out of the default targets and fused expert weights reported."""

import warnings

import pytest
import torch
from sensilora import allocate, calibrate, get_peft_model
from sensilora.calibration.models import model_kind
from sensilora.calibration.targets import find_targets, is_router
from sensilora.integrations.lora import adapter_ranks

from tests.models import random_batches, tiny_bert, tiny_moe


@pytest.mark.parametrize(
    "config,kind",
    [
        ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "causal-lm"),
        ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "causal-lm"),
        ({"architectures": ["BertModel"], "model_type": "bert"}, "encoder"),
        ({"architectures": ["T5ForConditionalGeneration"], "is_encoder_decoder": True}, "seq2seq"),
        ({"model_type": "bart", "is_encoder_decoder": True}, "seq2seq"),
        ({"model_type": "llama"}, "causal-lm"),
    ],
)
def test_model_kind_from_config(config, kind):
    assert model_kind(config) == kind


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, decoder_start_token_id=0)
    return T5ForConditionalGeneration(config).eval()


def tiny_bart():
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    sizes = {"encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4, "decoder_attention_heads": 4}
    sizes.update(encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64)
    config = BartConfig(vocab_size=128, d_model=32, **sizes)
    return BartForConditionalGeneration(config).eval()


@pytest.mark.parametrize("builder", [tiny_t5, tiny_bart])
def test_encoder_decoder_models_calibrate_both_stacks(builder):
    model = builder()
    stats = calibrate(model, random_batches(), progress=False)
    names = stats.module_names
    assert any(".encoder." in f".{n}" for n in names) and any(".decoder." in f".{n}" for n in names)
    assert all(torch.isfinite(stats.hessian_diag(n)).all() for n in names)
    allocation = allocate(stats, avg_rank=2, budget="ranks")
    assert sum(allocation.ranks.values()) == 2 * len(names)


@pytest.mark.parametrize("builder", [tiny_t5, tiny_bart])
def test_fisher_reaches_both_stacks_of_an_encoder_decoder(builder):
    """Each stack embeds through its own module tied to the shared embeddings: the gradient must flow into both."""
    batches = [{**batch, "labels": batch["input_ids"]} for batch in random_batches()]
    stats = calibrate(builder(), batches, statistic="fisher", progress=False)
    names = stats.module_names
    assert any(".encoder." in f".{n}" for n in names) and any(".decoder." in f".{n}" for n in names)
    assert all(torch.isfinite(stats.hessian_diag(n)).all() and stats.hessian_diag(n).sum() > 0 for n in names)


def test_ranks_from_a_bare_encoder_fit_the_task_model_and_back():
    classifier = tiny_bert()
    bare = classifier.bert  # what AutoModel loads: names without the "bert." prefix
    allocation = allocate(calibrate(bare, random_batches(), progress=False), avg_rank=2)
    assert next(iter(allocation.ranks)).startswith("encoder.layer.0")
    peft_model = get_peft_model(tiny_bert(), allocation, task_type="SEQ_CLS")  # mapped onto bert.encoder...
    assert any(
        n.endswith("bert.encoder.layer.0.attention.self.query.lora_A.default") for n, _ in peft_model.named_modules()
    )
    task_allocation = allocate(calibrate(tiny_bert(), random_batches(), progress=False), avg_rank=2)
    assert task_allocation.for_model(tiny_bert().bert).ranks == allocation.ranks  # the reverse direction


@pytest.mark.parametrize("family, router", [("qwen2_moe", "mlp.shared_expert_gate"), ("phimoe", "mlp.router")])
def test_moe_routers_are_not_default_targets_and_fused_experts_are_reported(family, router):
    model = tiny_moe(family)
    targets = find_targets(model)
    assert not [name for name in targets if name.endswith(router)]
    assert "model.layers.0.self_attn.q_proj" in targets
    if family == "qwen2_moe":  # the shared expert's projections stay targets; `gate_proj` is no router
        assert "model.layers.1.mlp.shared_expert.gate_proj" in targets
    assert f"model.layers.0.{router}" in find_targets(model, [router])  # named explicitly, it is adapted
    with pytest.warns(UserWarning, match=r"4 expert weights .* fused 3-D parameters.*target_parameters"):
        stats = calibrate(model, random_batches(vocab=128), progress=False)
    assert set(stats.module_shapes) == set(targets)
    with warnings.catch_warnings():  # explicit targets: the user chose, nothing to report
        warnings.simplefilter("error")
        calibrate(model, random_batches(vocab=128), target_modules=["q_proj"], progress=False)


def test_router_test_is_by_name_and_width():
    wide, narrow = torch.nn.Linear(32, 32), torch.nn.Linear(32, 4)
    assert is_router("model.layers.0.mlp.gate", narrow) and is_router("layers.0.moe.token_router", narrow)
    assert not is_router("model.layers.0.mlp.gate", wide)  # a full-width gating projection is adapted
    assert not is_router("model.layers.0.mlp.gate_proj", narrow)


def test_fused_experts_take_uniform_lora_beside_the_allocation():
    model = tiny_moe("qwen2_moe")
    with pytest.warns(UserWarning, match="expert weights"):
        allocation = allocate(calibrate(model, random_batches(vocab=128), progress=False), avg_rank=2)
    experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    peft_model = get_peft_model(model, allocation, target_parameters=experts)  # every allocated rank verified
    assert adapter_ranks(peft_model) == allocation.ranks
    wrapped = [m for n, m in peft_model.named_modules() if n.endswith("layers.0.mlp.experts")]
    assert wrapped and wrapped[0].r["default"] == allocation.avg_rank
    peft_model(**random_batches(vocab=128)[0]).logits.sum().backward()
