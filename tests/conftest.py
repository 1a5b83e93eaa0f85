"""Shared fixtures: tiny random models of each architecture, the real SmolLM2, GPU gating."""

from __future__ import annotations

import os

import pytest
import torch

# Triton's interpreter must be chosen before any @triton.jit function is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def tiny_llama(layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def tiny_qwen2(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return Qwen2ForCausalLM(config).eval()


def tiny_mistral(seed: int = 0):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    config = MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return MistralForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=128, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(config).eval()


def random_batches(batches: int = 2, batch_size: int = 3, seq_len: int = 11, vocab: int = 128, pad_tail: bool = True, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    result = []
    for _ in range(batches):
        ids = torch.randint(0, vocab, (batch_size, seq_len), generator=generator)
        mask = torch.ones_like(ids)
        if pad_tail:
            mask[0, seq_len // 2 :] = 0
        result.append({"input_ids": ids, "attention_mask": mask})
    return result


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer, name) of the real SmolLM2-135M-Instruct (GGUF, dequantised to fp32)."""
    from sensilora.data import load_model

    return load_model()


@pytest.fixture
def cuda_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")
