"""Shared fixtures: the real SmolLM2, GPU gating; the interpreter switch for Triton on the CPU."""

from __future__ import annotations

import os

import pytest
import torch

# Triton's interpreter must be chosen before any @triton.jit function is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer, name) of the real SmolLM2-135M-Instruct (GGUF, dequantised to fp32)."""
    from sensilora.models import load_model

    return load_model()


@pytest.fixture
def cuda_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")
