"""Encoder-only, decoder-only and encoder-decoder models: the class chosen from the config, decoder inputs
fed as in training, and ranks from a bare encoder applied to a task model (and back)."""

import pytest
import torch
from sensilora import allocate, calibrate, get_peft_model
from sensilora.calibration.models import model_kind

from tests.models import random_batches, tiny_bert


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
