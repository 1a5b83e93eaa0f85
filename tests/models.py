"""Tiny random-weight models of each architecture and random calibration batches (shapes and timing
only, never quality claims)."""

from __future__ import annotations

import torch


def tiny_decoder(family: str = "llama", layers: int = 2, seed: int = 0):
    """A 2-layer LLaMA-style causal LM (family "llama", "qwen2" or "mistral": same shapes, GQA 4/2 heads)."""
    import transformers

    prefix = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}[family]
    torch.manual_seed(seed)
    config = getattr(transformers, f"{prefix}Config")(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return getattr(transformers, f"{prefix}ForCausalLM")(config).eval()


def tiny_llama(layers: int = 2, seed: int = 0):
    return tiny_decoder("llama", layers, seed)


def tiny_qwen2(seed: int = 0):
    return tiny_decoder("qwen2", seed=seed)


def tiny_mistral(seed: int = 0):
    return tiny_decoder("mistral", seed=seed)


def tiny_moe(family: str = "qwen2_moe", seed: int = 0):
    """A 2-layer mixture-of-experts causal LM with 4 experts whose weights are fused 3-D parameters (as every
    MoE in transformers >= 5): "qwen2_moe" (a shared expert and its 1-wide ``shared_expert_gate``) or
    "phimoe" (a ``router`` linear layer)."""
    import transformers

    torch.manual_seed(seed)
    shapes = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=2)  # fmt: skip
    if family == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(**shapes, num_experts=4, moe_intermediate_size=16,
                                             shared_expert_intermediate_size=32)  # fmt: skip
    else:
        config = transformers.PhimoeConfig(**shapes, num_local_experts=4)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        num_labels=3,
    )
    return BertForSequenceClassification(config).eval()


def random_batches(
    batches: int = 2, batch_size: int = 3, seq_len: int = 11, vocab: int = 128, pad_tail: bool = True, seed: int = 0
):
    generator = torch.Generator().manual_seed(seed)
    result = []
    for _ in range(batches):
        ids = torch.randint(0, vocab, (batch_size, seq_len), generator=generator)
        mask = torch.ones_like(ids)
        if pad_tail:
            mask[0, seq_len // 2 :] = 0
        result.append({"input_ids": ids, "attention_mask": mask})
    return result
