"""Shared fixtures: the real SmolLM2, GPU gating; the interpreter switch for Triton on the CPU."""

from __future__ import annotations

import os

import pytest
import torch

# Triton's interpreter must be chosen before any @triton.jit function is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def interpreter_broken() -> str | None:
    """Why Triton's interpreter cannot run here, or None: Triton 3.6 (the GPU machine's) and older fail under
    numpy >= 2.4 ("only 0-dimensional arrays can be converted to Python scalars"); 3.9 works."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        import numpy
        import triton
    except ImportError:
        return None
    version = lambda text: tuple(int(part) for part in text.split(".")[:2])  # noqa: E731
    if version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4):
        return (
            f"Triton {triton.__version__}'s interpreter breaks under numpy {numpy.__version__} (>= 2.4): "
            "install numpy<2.4 or Triton >= 3.7 to run the kernels on the CPU"
        )
    return None


def pytest_collection_modifyitems(config, items):
    """Skip, with the reason, tests marked ``interpreter`` where the interpreter cannot run."""
    reason = interpreter_broken()
    if reason is None:
        return
    for item in items:
        marker = item.get_closest_marker("interpreter")
        if marker is not None and marker.kwargs.get("needed", True):
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer, name) of the real SmolLM2-135M-Instruct (GGUF, dequantised to fp32)."""
    from sensilora.calibration.models import load_model

    return load_model()


@pytest.fixture
def cuda_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer LLaMA with SmolLM2's tokenizer, saved as a Hugging Face directory (loads in a second)."""
    from sensilora.calibration.models import DEFAULT_GGUF, default_model_dir
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir(), gguf_file=DEFAULT_GGUF)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    directory = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
