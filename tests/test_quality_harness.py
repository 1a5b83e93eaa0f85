"""The quality harness runs end to end (its --smoke configuration: seconds of training, no claims), and its
paired statistics are right."""

import json

import numpy as np
import pytest
from sensilora import AllocationConfig

from benchmarks.quality.paired import holm, paired_difference


def test_paired_difference_and_holm():
    method, baseline = np.array([0.70, 0.72, 0.71, 0.73, 0.74]), np.array([0.69, 0.70, 0.70, 0.71, 0.71])
    result = paired_difference(method, baseline, higher_is_better=True)
    assert result["improvement"] == pytest.approx(0.018)
    assert result["ci_low"] > 0 and result["p"] < 0.01
    flipped = paired_difference(baseline, method, higher_is_better=False)  # perplexity: lower is better
    assert flipped["improvement"] == pytest.approx(0.018) and flipped["p"] == pytest.approx(result["p"])
    assert holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})


def test_run_log_resumes_a_run_only_at_its_learning_rate_and_length(tmp_path):
    from benchmarks.quality.run_quality import RunLog
    from benchmarks.quality.train import RunResult

    path = tmp_path / "runs.jsonl"
    result = RunResult("lora", 0, {"accuracy": 0.5}, 10, 0.1, None, {4: {"accuracy": 0.5, "seconds": 1.0}})
    RunLog(path).add("NLU runs", 1e-3, result)
    reloaded = RunLog(path)
    assert reloaded.get("NLU runs", "lora", 0, 1e-3, 4) == result
    assert reloaded.get("NLU runs", "lora", 0, 2e-3, 4) is None  # a changed rate is a new run, never a stale one
    assert reloaded.get("NLU runs", "lora", 0, 1e-3, 8) is None  # so is a longer run


def test_run_log_reuses_a_run_only_with_its_allocation(tmp_path):
    import dataclasses

    from benchmarks.quality.run_quality import RunLog
    from benchmarks.quality.train import RunResult

    path = tmp_path / "runs.jsonl"
    result = RunResult("paper", 0, {"nll": 2.0}, 10, 0.1, None, {4: {"nll": 2.0, "seconds": 1.0}})
    RunLog(path).add("NLG runs", 1e-3, result, "ranks-a")
    legacy = {"label": "NLG runs", "lr": 1e-3, **dataclasses.asdict(dataclasses.replace(result, method="rank"))}
    with path.open("a") as handle:  # a record from before fingerprints were kept
        handle.write(json.dumps(legacy) + "\n")
    log = RunLog(path)
    assert log.get("NLG runs", "paper", 0, 1e-3, 4, "ranks-a") == result
    assert log.get("NLG runs", "paper", 0, 1e-3, 4, "ranks-b") is None  # other ranks: trained again
    assert log.get("NLG runs", "rank", 0, 1e-3, 4, "ranks-c", legacy_ok=False) is None
    assert log.get("NLG runs", "rank", 0, 1e-3, 4, "ranks-c", legacy_ok=True).method == "rank"


def test_legacy_runs_are_reused_only_where_the_rank_bound_never_bound():
    from sensilora.allocation.result import RankAllocation

    from benchmarks.quality import methods

    def context_with(ranks):
        shapes = {name: (64, 64) for name in ranks}  # the bound: 64 * 64 / 128 = 32
        allocation = RankAllocation(ranks, {n: 1.0 for n in ranks}, {}, shapes, AllocationConfig(), "diag", {})
        return methods.TaskContext(None, list(ranks), 8, "CAUSAL_LM", 1, allocations={"paper": allocation})

    assert methods.unchanged_by_the_rank_bound(context_with({"a": 31, "b": 1}), "paper")
    assert not methods.unchanged_by_the_rank_bound(context_with({"a": 32, "b": 1}), "shuffled")  # at the cap
    assert methods.unchanged_by_the_rank_bound(context_with({"a": 32}), "lora")  # no allocation behind it
    fingerprints = {methods.allocation_fingerprint(context_with(r), "paper") for r in ({"a": 3}, {"a": 4})}
    assert len(fingerprints) == 2 and methods.allocation_fingerprint(context_with({"a": 3}), "eva") is None


def test_the_default_rule_ships_the_best_safe_candidate_when_none_wins():
    from benchmarks.quality.run_quality import PRIMARY, decide

    def row(task, method, improvement, low, high, p):
        return {"task": task, "method": method, "std": 1.0, "vs_lora_improvement": improvement,
                "vs_lora_ci_low": low, "vs_lora_ci_high": high, "vs_lora_p": p}  # fmt: skip

    lora = [row("A", "lora", 0, 0, 0, 1.0), row("B", "lora", 0, 0, 0, 1.0)]
    a, b, c = PRIMARY[:3]
    rows = lora + [row("A", a, 0.5, -0.1, 1.1, 0.1), row("B", a, -3.0, -4.0, -2.0, 1e-4),  # worse on B: unsafe
                   row("A", b, 0.4, -0.2, 1.0, 0.2), row("B", b, 0.1, -0.3, 0.5, 0.6),  # safe, best of the safe
                   row("A", c, -0.2, -0.9, 0.5, 0.5), row("B", c, 0.0, -0.4, 0.4, 0.9)]  # fmt: skip
    decision = decide(rows)
    assert not decision["beats_lora"] and decision["default"] == b and set(decision["safe"]) == {b, c}
    rows.append(row("B", c, 5.0, 4.0, 6.0, 1e-6))  # c now wins with Holm p < 0.05 and is safe: it qualifies
    rows = [r for r in rows if not (r["method"] == c and r["vs_lora_improvement"] == 0.0)]
    assert decide(rows)["default"] == c and decide(rows)["beats_lora"]
    unsafe = lora + [row("A", a, -1.0, -2.0, -0.5, 1e-3), row("B", a, 0.0, -0.1, 0.1, 1.0)]
    assert decide(unsafe)["default"] == "uniform ranks"


def test_regime_verdict_is_the_named_contrast():
    from benchmarks.quality import regime
    from benchmarks.quality.train import RunResult

    generator = np.random.default_rng(0)
    results = []
    for seed in range(5):
        noise = generator.normal(0, 0.01)
        for rank in regime.RANKS:
            nll = 2.0 - 0.1 * np.log2(rank) + noise + generator.normal(0, 0.002)
            results.append(RunResult(f"lora-rs r={rank}", seed, {"nll": nll}, rank * 100, 0.1, None, {}))
    rows, verdict = regime.summarise("T", results)
    low = np.array([r.metrics["nll"] for r in results if r.method == "lora-rs r=1"])
    high = np.array([r.metrics["nll"] for r in results if r.method == "lora-rs r=8"])
    assert verdict["gain"] == pytest.approx(float((low - high).mean()))
    assert verdict["ratio"] == pytest.approx(float((low - high).mean() / (low - high).std(ddof=1)))
    assert verdict["passes"] and [r["rank"] for r in rows] == list(regime.RANKS)
    flat = [RunResult(r.method, r.seed, {"nll": 2.0 + generator.normal(0, 0.01)}, 1, 0.1, None, {}) for r in results]
    assert not regime.summarise("T", flat)[1]["passes"]
    one_seed = [r for r in results if r.seed == 0]
    assert not regime.summarise("T", one_seed)[1]["passes"]  # no spread, no verdict


def test_update_norms_are_the_scaled_lora_products():
    import peft
    import torch

    from benchmarks.quality.train import update_norms
    from tests.models import tiny_llama

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_rslora=True)
    model = peft.get_peft_model(tiny_llama(), config)
    for module in model.modules():
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight)
    norms = update_norms(model)
    assert len(norms) == 4 and all(value > 0 for value in norms.values())
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    product = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * (8 / 4**0.5)
    assert norms["model.layers.1.mlp.down_proj"] == pytest.approx(float(product.detach().norm()), rel=1e-5)


def test_uniform_rslora_takes_per_module_ranks_and_drops_rank_zero():
    """EVA's ranks in the regime's uniform arm: a module of rank 0 has no adapter, the others their own rank,
    every scale alpha / sqrt(r) with alpha = 2 sqrt(avg_rank); the comparison's eva-ranks arm the same modules."""
    from types import SimpleNamespace

    from sensilora.calibration.targets import find_targets

    from benchmarks.quality import methods as M
    from benchmarks.quality import regime
    from tests.models import tiny_llama

    base = tiny_llama()
    targets = sorted(find_targets(base))
    dropped, raised = "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"
    ranks = {**dict.fromkeys(targets, 2), dropped: 0, raised: 5}
    setup = SimpleNamespace(base=base, targets=targets, task_type="CAUSAL_LM")
    model = regime.uniform_rslora(setup, 2, 4, ranks)
    adapted = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert set(adapted) == set(targets) - {dropped}
    assert adapted[raised].r["default"] == 5 and adapted[raised].scaling["default"] == pytest.approx(4 / 5**0.5)
    context = M.TaskContext(base, targets, 2, "CAUSAL_LM", steps=1)
    context.eva_state = {f"base_model.model.{n}": np.zeros((r, 1)) for n, r in ranks.items()}
    eva = M.build("eva-ranks", context, 0)[0]
    assert {n.removeprefix("base_model.model.") for n, m in eva.named_modules() if hasattr(m, "lora_A")} == set(adapted)


def test_confirmation_contrasts_are_paired_and_holm_corrected():
    from benchmarks.quality import confirm
    from benchmarks.quality.train import RunResult

    generator = np.random.default_rng(1)
    uniform = confirm.baseline(2)
    results = []
    for seed in range(4):
        base = 3.9 + generator.normal(0, 0.01)
        shifts = (0.0, 0.01, -0.02, 0.0, 0.03, 0.0, 0.0, 0.0)
        for shift, method in zip(shifts, (uniform, *confirm.CANDIDATES), strict=True):
            kl = base + shift + generator.normal(0, 0.001)
            results.append(RunResult(method, seed, {"kl": kl, "nll": 0.0}, 10, 0.1, None, {},
                                     update_norms={"model.layers.0.mlp.down_proj": 1.0 + shift}))  # fmt: skip
    rows, contrasts = confirm.summarise(results, uniform, "kl")
    by_name = {c["contrast"]: c for c in contrasts}
    paper = by_name[f"paper-rs vs {uniform}"]
    kl = {m: np.array([r.metrics["kl"] for r in results if r.method == m]) for m in (uniform, "paper-rs")}
    assert paper["improvement"] == pytest.approx(float((kl[uniform] - kl["paper-rs"]).mean()))
    assert paper["improvement"] < 0 and by_name[f"shuffled-rs vs {uniform}"]["improvement"] > 0
    assert all(c["p_holm"] >= c["p"] for c in contrasts) and len(contrasts) == len(confirm.CONTRASTS)
    assert {r["method"] for r in rows} == {uniform, *confirm.CANDIDATES}
    assert rows[0]["update_norm_by_type"] == {"mlp.down_proj": pytest.approx(1.0)}
    assert rows[0]["kl_mean"] == pytest.approx(float(kl[uniform].mean()))


def test_default_decision_combines_tasks_and_refuses_a_loss():
    from benchmarks.quality import confirm

    def contrast(task, candidate, improvement, p, p_holm):
        return {"task": task, "contrast": f"{candidate} vs lora-rs r=8", "method": candidate,
                "baseline": confirm.UNIFORM, "improvement": improvement, "p": p, "p_holm": p_holm}  # fmt: skip

    contrasts = []
    for task in ("A", "B", "C"):
        contrasts += [contrast(task, "rank", +0.01, 0.001, 0.005), contrast(task, "paper", +0.05, 0.0001, 0.001),
                      contrast(task, "rank-rs", -0.001, 0.8, 1.0)]  # fmt: skip
    contrasts[-2] = contrast("C", "paper", -0.02, 0.001, 0.004)  # the paper loses on C: never the default
    decision = confirm.decide(contrasts)
    assert decision["candidates"]["paper"]["worse_on"] == ["C"] and not decision["candidates"]["paper"]["qualifies"]
    assert decision["default"] == "rank" and decision["why"] == "qualifies"
    assert decision["candidates"]["rank"]["p_holm"] >= decision["candidates"]["rank"]["p"]
    only_losses = [c for c in contrasts if c["method"] != "rank"]
    assert confirm.decide(only_losses)["default"] == "rank-rs"  # safe, not qualifying
    assert "none qualifies" in confirm.decide(only_losses)["why"]


def test_tasks_where_not_every_candidate_ran_stay_outside_the_default_rule():
    from benchmarks.quality import confirm

    def contrast(task, candidate, improvement):
        return {"task": task, "contrast": f"{candidate} vs lora-rs r=2", "method": candidate,
                "baseline": confirm.UNIFORM, "improvement": improvement, "p": 0.5, "p_holm": 1.0}  # fmt: skip

    contrasts = [contrast(t, c, 0.0) for t in ("A", "B") for c in confirm.DEFAULTS]
    contrasts += [contrast("plateau", "rank", -1.0) | {"p_holm": 0.001}]  # a loss on a task outside the rule
    decision = confirm.decide(contrasts)
    assert decision["tasks"] == ["A", "B"] and decision["outside"] == ["plateau"]
    assert decision["candidates"]["rank"]["worse_on"] == []


def test_the_oracle_allocation_is_the_greedy_on_the_teachers_whitened_spectra():
    """Against a direct computation: the SVD of each Delta W scaled by diag(h)^1/2, units greedy by worth per
    parameter from rank 1 at uniform LoRA's parameters; a matrix with a large update takes the spare rank."""
    import torch
    from sensilora.allocation.budgets import largest_rank
    from sensilora.calibration.targets import find_targets

    from benchmarks.quality import confirm
    from benchmarks.quality import methods as M
    from tests.models import random_batches, tiny_llama

    model = tiny_llama()
    targets = sorted(find_targets(model))
    context = M.TaskContext(model, targets, 2, "CAUSAL_LM", steps=1)
    M.prepare(context, ["paper"], random_batches(), random_batches())
    shapes = context.allocations["paper"].shapes
    generator = torch.Generator().manual_seed(0)
    update = {n: 1e-3 * torch.randn(*shapes[n], generator=generator) for n in shapes}
    big = "model.layers.1.mlp.down_proj"
    update[big] = 10.0 * torch.randn(shapes[big][0], 6, generator=generator) @ torch.randn(6, shapes[big][1])
    oracle = confirm.oracle_allocation(context, update, 0.5)
    stats = context.stats[()]
    cost = {n: sum(shapes[n]) for n in shapes}
    worth = []  # every unit above rank 1, by worth per parameter
    for name in shapes:
        scale = stats.hessian_diag(name).double().sqrt()
        values = torch.linalg.svdvals(update[name].double() * scale[None, :]).square()
        worth += [(-float(v) / cost[name], name) for v in values[1 : largest_rank(*shapes[name])]]
    ranks, left = dict.fromkeys(shapes, 1), 2 * sum(cost.values()) - sum(cost.values())
    for _, name in sorted(worth):
        if cost[name] <= left:
            ranks[name], left = ranks[name] + 1, left - cost[name]
    assert oracle.ranks == ranks and oracle.ranks[big] >= 6
    assert oracle.config.use_rslora and sum(r * cost[n] for n, r in oracle.ranks.items()) <= 2 * sum(cost.values())


def test_token_kl_is_the_direct_sum():
    import torch

    from benchmarks.quality.setups import token_kl

    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 7, generator=generator)
    teacher = torch.log_softmax(torch.randn(2, 5, 7, generator=generator), -1)
    mask = torch.tensor([[True, True, False, True, True], [True, False, True, True, True]])
    q = torch.log_softmax(student, -1)
    expected = [sum(teacher[b, t, v].exp() * (teacher[b, t, v] - q[b, t, v]) for v in range(7))
                for b in range(2) for t in range(5) if mask[b, t]]  # fmt: skip
    assert float(token_kl(student, teacher.half(), mask)) == pytest.approx(float(sum(expected) / 8), rel=2e-3)
    assert float(token_kl(teacher, teacher, mask)) == pytest.approx(0.0, abs=1e-6)


def test_hidden_distance_is_the_direct_sum():
    import torch

    from benchmarks.quality.setups import hidden_distance

    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 4, 3, generator=generator), torch.randn(2, 4, 3, generator=generator)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    expected = [sum((student[b, t, h] - teacher[b, t, h]) ** 2 for h in range(3))
                for b in range(2) for t in range(4) if mask[b, t]]  # fmt: skip
    assert float(hidden_distance(student.half(), teacher, mask)) == pytest.approx(float(sum(expected) / 5), rel=2e-3)
    assert float(hidden_distance(teacher, teacher, mask)) == 0.0


def test_kjv_chapters_split_every_fifth_chapter():
    from benchmarks.quality.tasks import kjv_chapters

    split = kjv_chapters()
    assert len(split["train"]) + len(split["test"]) == 1189 and len(split["test"]) == 238
    assert split["test"][0].startswith("In the beginning God created the heaven and the earth.")
    assert not set(split["train"]) & set(split["test"])


@pytest.mark.slow
def test_regime_smoke(tmp_path):
    from benchmarks.quality import regime

    assert regime.main(["--smoke", "--results", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "regime_smoke.json").read_text())
    assert {(r["task"], r["rank"]) for r in data["rows"]} == {
        (regime.TASKS[k][0], rank) for k in regime.TASKS for rank in regime.RANKS
    }
    verdicts = data["environment"]["verdicts"]
    assert [v["task"] for v in verdicts] == [regime.TASKS[k][0] for k in regime.TASKS]
    metric = {"distill": "kl", "bbc_distill": "kl", "enc_distill": "distance", "enc_distill_long": "distance"}
    assert [v["metric"] for v in verdicts] == [metric.get(k, "nll") for k in regime.TASKS]
    assert verdicts[-1]["contrast"] == "squared distance(r=1) - squared distance(r=8)"
    assert all(r["trainable_params"] > 0 for r in data["rows"])
    encoder_tasks = {regime.TASKS[k][0] for k in ("enc_distill", "enc_distill_long")}
    assert all("nll_mean" in r for r in data["rows"] if r["task"] not in encoder_tasks)
    distilled = [r for r in data["rows"] if r["task"] in {regime.TASKS[k][0] for k in ("distill", "bbc_distill")}]
    assert len(distilled) == 2 * len(regime.RANKS) and all(r["kl_mean"] >= 0 for r in distilled)
    encoded = [r for r in data["rows"] if r["task"] == regime.TASKS["enc_distill"][0]]
    setup = data["environment"]["cost"][regime.TASKS["enc_distill"][0]]["setup"]
    assert all(0 <= r["distance_mean"] for r in encoded) and setup["base_model"]["distance"] > 0
    assert "teacher" in data["environment"]["cost"][regime.TASKS["distill"][0]]["setup"] and "teacher" in setup
    assert (tmp_path / "regime_smoke.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_screen_smoke(tmp_path):
    """The teacher screen end to end on the encoder task (the decoder's path is the same code, minutes longer)."""
    from benchmarks.quality import screen

    assert screen.main(["--smoke", "--tasks", "nlu", "--results", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "screen_smoke.json").read_text())
    rows = {r["rule"]: r for r in data["rows"]}
    assert {"uniform", "oracle", "oracle (other teacher)", "shuffled", "eva-ranks", "gora", "structural"} <= set(rows)
    assert set(screen.VARIANTS) <= set(rows)
    assert rows["uniform"]["gap_closed"] == 0.0 and rows["oracle"]["gap_closed"] == pytest.approx(1.0)
    assert all(r["spend"] <= 1.0 + 1e-9 for r in data["rows"])
    assert all(-1.0 <= r["halves_spearman"] <= 1.0 for r in data["rows"] if "halves_spearman" in r)
    assert (tmp_path / "screen_smoke.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_confirmation_smoke(tmp_path):
    from benchmarks.quality import confirm

    assert confirm.main(["--smoke", "--tasks", "distill", "--results", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "confirm_smoke.json").read_text())
    uniform = confirm.baseline(confirm.CONFIGS["smoke"]["distill_avg_rank"])
    assert {r["method"] for r in data["rows"]} == {uniform, *confirm.CANDIDATES, *confirm.ORACLES}
    assert all(r["metric"] == "kl" for r in data["rows"])
    assert data["environment"]["decision"]["default"] in (*confirm.DEFAULTS, "uniform ranks")
    assert (tmp_path / "confirm_smoke.png").read_bytes()[:4] == b"\x89PNG"
    assert len(data["environment"]["contrasts"]) == len(confirm.CONTRASTS) + len(confirm.DIAGNOSTICS)
    assert all(r["update_norm_by_type"] for r in data["rows"])
    diagnostics = [c for c in data["environment"]["contrasts"] if c["diagnostic"]]
    assert {c["method"] for c in diagnostics} == set(confirm.ORACLES) and all(
        c["p_holm"] == c["p"] for c in diagnostics
    )


def test_holdout_smoke(tmp_path):
    from benchmarks.quality import confirm, holdout, tuned_lr

    assert holdout.main(["--smoke", "--results", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "holdout_smoke.json").read_text())
    uniform = confirm.baseline(holdout.CONFIGS["smoke"]["topic_distill_avg_rank"])
    assert {r["method"] for r in data["rows"]} == {uniform, *holdout.CANDIDATES}
    assert all(r["seeds"] == holdout.CONFIGS["smoke"]["seeds"] and r["metric"] == "distance" for r in data["rows"])
    env = data["environment"]
    assert {c["method"] for c in env["contrasts"]} == set(holdout.CANDIDATES)
    assert env["regime"]["seeds"] == holdout.CONFIGS["smoke"]["regime_seeds"]
    searched = env["searched"]
    assert env["decision"]["holds_at_the_shared_rate"] == holdout.holds(env["contrasts"])
    assert env["decision"]["holds_at_rates_searched_on_dev"] == holdout.holds(searched["contrasts"])
    assert env["decision"]["shipped_default_holds"] == (
        env["decision"]["holds_at_the_shared_rate"] and env["decision"]["holds_at_rates_searched_on_dev"]
    )
    for arm, scores in searched["dev_scores"].items():  # the search's rule: the chosen rate scored lowest
        assert set(map(float, scores)) >= set(holdout.SEARCH_RATES)
        assert searched["rates"][arm] == tuned_lr.chosen_rate({float(r): v for r, v in scores.items()})
    assert {row["method"]: row["lr"] for row in searched["rows"]} == searched["rates"]
    assert searched["regime"]["lr"] == searched["rates"][uniform]
    same = [c for c in searched["contrasts"] if c["baseline"] == tuned_lr.SAME_RATE]  # each at the other's rate
    differ = searched["rates"]["rank"] != searched["rates"][uniform]
    assert sorted(c["lr"] for c in same) == (sorted({searched["rates"]["rank"], searched["rates"][uniform]}) if differ
                                             else [])  # fmt: skip
    assert (tmp_path / "holdout_smoke_rates.png").stat().st_size > 0
    standing = env["standing"]  # the arms every table keeps, at uniform LoRA's searched rate
    assert standing["lr"] == searched["rates"][uniform]
    assert {r["method"] for r in standing["rows"]} == {uniform, "paper-rs", *holdout.STANDING}
    assert {(c["method"], c["baseline"]) for c in standing["contrasts"]} == {
        *((arm, confirm.UNIFORM) for arm in holdout.STANDING),
        ("paper-rs", "shuffled-rs"),
    }
    equal = env["equal_params"]  # EVA's rule at uniform LoRA's parameters and the structural prior, same rate
    assert equal["lr"] == searched["rates"][uniform]
    assert {r["method"] for r in equal["rows"]} == {uniform, *holdout.EQUAL_PARAMS, confirm.EVA, tuned_lr.SHIPPED}
    assert {(c["method"], c["baseline"]) for c in equal["contrasts"]} == set(holdout.EQUAL_PARAMS_CONTRASTS)
    params = {r["method"]: r["trainable_params"] for r in equal["rows"]}
    assert params[confirm.EVA_PARAMS] <= params[uniform] and params["structural-rs"] <= params[uniform]
    assert set(equal["ranks"]) == set(holdout.EQUAL_PARAMS)
    long = env["long"]  # the diagnostic trained longer: uniform LoRA and the default, a curve each
    assert {r["method"] for r in long["rows"]} == {uniform, "rank"}
    assert all(r["seeds"] == holdout.CONFIGS["smoke"]["long_seeds"] and len(r["curve"]) == 2 for r in long["rows"])
    assert [c["contrast"] for c in long["contrasts"]] == [f"rank vs {uniform}"] and long["contrasts"][0]["diagnostic"]
    assert (tmp_path / "holdout_smoke.png").read_bytes()[:4] == b"\x89PNG"


def test_holdout_rule_fails_the_default_only_on_a_significant_loss():
    from benchmarks.quality import confirm, holdout, tuned_lr

    def contrasts(improvement, p_holm):
        return [{"method": tuned_lr.SHIPPED, "baseline": confirm.UNIFORM, "improvement": improvement, "p_holm": p_holm}]

    assert holdout.holds(contrasts(-0.5, 0.2)) and holdout.holds(contrasts(+0.5, 0.001))
    assert not holdout.holds(contrasts(-0.5, 0.01))


def test_topic_splits_are_disjoint_stratified_and_round_robin():
    from benchmarks.quality.setups import topic_splits
    from benchmarks.quality.tasks import TOPICS

    splits = topic_splits({"topic_train": 6, "topic_dev": 2, "topic_test": 3, "nlu_len": 16})
    assert [len(splits[name]["labels"]) for name in ("train", "dev", "test")] == [30, 10, 15]
    assert splits["train"]["labels"][: len(TOPICS)].tolist() == list(range(len(TOPICS)))  # every topic first
    rows = {name: {tuple(ids.tolist()) for ids in split["input_ids"]} for name, split in splits.items()}
    assert not rows["train"] & rows["test"] and not rows["dev"] & rows["test"] and not rows["train"] & rows["dev"]


@pytest.mark.slow
def test_quality_smoke(tmp_path):
    from benchmarks.quality import methods, run_quality

    assert run_quality.main(["--smoke", "--results", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "quality_smoke.json").read_text())
    nlu = [row for row in data["rows"] if row["task"] == "NLU"]
    assert [row["method"] for row in nlu] == list(methods.ALL_METHODS)
    lora = next(r for r in nlu if r["method"] == "lora")
    for row in nlu:
        if row["method"] in methods.SENSILORA_VARIANTS or row["method"] == "shuffled":
            assert row["trainable_params"] <= lora["trainable_params"]  # same parameter budget (or just under)
    assert all(0.0 <= row["mean"] <= 1.0 for row in nlu)
    assert data["environment"]["decision"]["default"] in (*run_quality.PRIMARY, "uniform ranks")
    assert (tmp_path / "quality_smoke.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_gpu_run_script_end_to_end_at_tiny_sizes(tmp_path):
    """The one-command GPU script, on this machine at toy sizes: every step runs and the results land."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SENSILORA_BACKEND", "PYTHON")}
    shadow = tmp_path / "bin"  # a `python` on PATH without torch, as on the GPU machine: the script must not use it
    shadow.mkdir()
    (shadow / "python").write_text("#!/bin/sh\necho 'this python has no torch' >&2\nexit 1\n")
    (shadow / "python").chmod(0o755)
    interpreter = Path(sys.executable)
    env["PATH"] = f"{shadow}:{interpreter.parent}:{env.get('PATH', '')}"  # python3 (the default) has torch
    bad = subprocess.run(["bash", "benchmarks/gpu_run.sh", "--tiny"], cwd=root, capture_output=True, text=True,
                         env={**env, "PYTHON": str(shadow / "python")}, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "cannot import torch" in bad.stderr, bad.stderr
    result = subprocess.run(["bash", "benchmarks/gpu_run.sh", "--tiny", f"--results={tmp_path}"], cwd=root, env=env,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "[end-to-end] done in" in result.stdout
    rows = json.loads((tmp_path / "cpu_tiny.json").read_text())["rows"]
    assert {row["case"] for row in rows} >= {"naive_hessian", "column_sumsq", "end_to_end"}
    log = (tmp_path / "gpu_run_tiny.log").read_text()
    assert log.count("== exit 0 after") == 3 and "CUDA_HOME=" in log and "part 1 done in" in log


@pytest.mark.slow
def test_hyperadalora_comparison_smoke(tmp_path):
    from benchmarks.quality import hyper_compare, run_quality

    assert run_quality.main(["--smoke", "--compare", "hyperadalora", "--tasks", "nlu", "--results", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "quality_smoke_hyperadalora.json").read_text())
    assert [row["method"] for row in data["rows"]] == list(hyper_compare.NLU_METHODS)
    hyper = next(row for row in data["rows"] if row["method"] == "hyperadalora")
    assert hyper["hypernetwork_params"] > 0 and hyper["adapter_params"] > 0
    assert {c["contrast"] for c in data["environment"]["contrasts"]} == {c[0] for c in hyper_compare.CONTRASTS}
    timing = data["environment"]["notes"]["NLU"]["step_seconds_side_by_side"]
    assert set(timing) == set(hyper_compare.METHODS) and all(seconds > 0 for seconds in timing.values())
    assert (tmp_path / "quality_smoke_hyperadalora.png").read_bytes()[:4] == b"\x89PNG"


def test_tuned_rate_is_the_dev_best_inside_the_rates_tried():
    from benchmarks.quality import tuned_lr

    assert tuned_lr.chosen_rate({1e-3: 0.5, 2e-3: 0.4, 4e-3: 0.4}) == 2e-3  # a tie: the smaller
    assert tuned_lr.chosen_rate({1e-3: 0.5, 2e-3: float("nan")}) == 1e-3  # divergence loses
    assert tuned_lr.next_rate({5e-4: 0.5, 1e-3: 0.4, 2e-3: 0.45}) is None  # inside: done
    assert tuned_lr.next_rate({5e-4: 0.5, 1e-3: 0.4, 2e-3: 0.3}) == 4e-3  # best at the top: one step up
    assert tuned_lr.next_rate({5e-4: 0.3, 1e-3: 0.4}) == 2.5e-4  # best at the bottom: one step down
    tried = []

    def dev(rate):  # a valley at 8e-3: the search walks up to it, then MAX_RATES stops it
        tried.append(rate)
        return abs(np.log2(rate / 8e-3))

    scores = tuned_lr.search(dev)
    assert tuned_lr.chosen_rate(scores) == 8e-3 and tried == [5e-4, 1e-3, 2e-3, 4e-3, 8e-3]
    assert len(scores) == tuned_lr.MAX_RATES  # and no further, though 8e-3 is at the edge


def test_shared_rate_is_the_one_most_arms_chose():
    from benchmarks.quality import tuned_lr

    assert tuned_lr.shared_rate({"u": 1e-3, "a": 4e-3, "b": 4e-3, "c": 2e-3}, "u") == 4e-3  # the most chosen
    assert tuned_lr.shared_rate({"u": 1e-3, "a": 4e-3, "b": 1e-3, "c": 4e-3}, "u") == 1e-3  # tied: uniform's
    assert tuned_lr.shared_rate({"u": 1e-3, "a": 4e-3, "b": 2e-3, "c": 2e-3, "d": 4e-3}, "u") == 4e-3  # larger


def test_shipped_default_changes_only_on_a_win_or_a_loss():
    from benchmarks.quality import tuned_lr

    def decided(default, why, worse_on=()):
        return {"default": default, "why": why, "candidates": {tuned_lr.SHIPPED: {"worse_on": list(worse_on)}}}

    tie = decided("paper-rs", "best-ranked safe candidate; none qualifies")  # another candidate ranks first
    assert tuned_lr.shipped_default(tie)[0] == tuned_lr.SHIPPED  # a tie keeps the shipped default
    assert tuned_lr.shipped_default(decided("paper-rs", "qualifies"))[0] == "paper-rs"  # a win ships
    loss = decided("paper-rs", "best-ranked safe candidate; none qualifies", ["KJV"])  # the default loses on a task
    assert tuned_lr.shipped_default(loss) == ("paper-rs", f"{tuned_lr.SHIPPED} is significantly worse on KJV; "
                                              "best-ranked safe candidate; none qualifies")  # fmt: skip


def test_shipped_is_the_librarys_default_allocation():
    import sensilora

    from benchmarks.quality import methods, tuned_lr

    calibrate, overrides = methods.SENSILORA_VARIANTS[tuned_lr.SHIPPED]  # the arm the shipped-default rule keeps
    assert calibrate == {} and sensilora.AllocationConfig(**overrides) == sensilora.AllocationConfig()


def test_same_rate_contrast_pairs_by_seed():
    from benchmarks.quality import tuned_lr
    from benchmarks.quality.train import RunResult

    def runs(method, values):
        return [RunResult(method, seed, {"kl": v}, 1, 0.0, None, {}) for seed, v in values.items()]

    contrast = tuned_lr.same_rate_contrast("paper-rs", runs("paper-rs", {0: 0.30, 1: 0.31, 2: 0.29}),
                                           runs("lora-rs r=2", {0: 0.33, 1: 0.35, 3: 0.9}), "kl")  # fmt: skip
    assert contrast["n"] == 2 and contrast["improvement"] == pytest.approx(0.035)  # seeds 0 and 1 only
    assert contrast["uniform_mean"] == pytest.approx(0.34) and contrast["diagnostic"]
    assert contrast["baseline"] == tuned_lr.SAME_RATE and contrast["p_holm"] == contrast["p"]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["bbc_distill", "enc_distill"])  # a decoder's dev windows, the encoder's verses
def test_tuned_lr_smoke(tmp_path, task):
    from benchmarks.quality import confirm, tuned_lr

    more = ["--seeds", str(tuned_lr.CONFIGS["smoke"][f"{task}_seeds"] + 1)] if task == "enc_distill" else []
    assert tuned_lr.main(["--smoke", "--tasks", task, "--results", str(tmp_path), *more]) == 0
    data = json.loads((tmp_path / "tuned_lr_smoke.json").read_text())
    record = data["environment"]["tasks"][tuned_lr.TASKS[task][0]]
    assert set(record["rates"]) == {"lora-rs r=2", *tuned_lr.ARMS, *tuned_lr.CONTROLS, confirm.STRUCTURAL}
    assert all(len(scores) >= len(tuned_lr.GRID) for scores in record["dev_scores"].values())
    searched = {r["method"]: r["lr"] for r in data["rows"] if r["rate_from"] == "dev search"}
    assert searched == {arm: rate for arm, rate in record["rates"].items() if arm != confirm.STRUCTURAL}
    shared = record["shared_rate"]
    assert shared == tuned_lr.shared_rate(searched, "lora-rs r=2")  # the structural prior stays out of it
    seeds = int(more[1]) if more else tuned_lr.CONFIGS["smoke"][f"{task}_seeds"]  # every arm's at the shared rate
    shared_rows = {r["method"]: r["seeds"] for r in data["rows"] if r["rate_from"] == "shared"}
    assert shared_rows == {arm: seeds for arm in (*record["rates"], confirm.STRUCTURAL)}
    contrasts = data["environment"]["contrasts"]
    family = {c["method"] for c in contrasts if not c["diagnostic"]}
    assert family == set(tuned_lr.ARMS) and all(c["baseline"] == "uniform" for c in contrasts if not c["diagnostic"])
    at_shared = [c for c in contrasts if c["contrast"].endswith(f"at the shared rate {shared:g}")]
    against_uniform = {c["method"] for c in at_shared if c["baseline"] == tuned_lr.SHARED}
    assert against_uniform == {*tuned_lr.ARMS, "shuffled-rs", confirm.STRUCTURAL}
    against_default = {(c["method"], c["baseline"]) for c in at_shared if c["baseline"] == tuned_lr.SHIPPED}
    assert against_default == {(confirm.STRUCTURAL, tuned_lr.SHIPPED)}  # the structural prior against the default
    assert all(c["diagnostic"] and c["n"] == seeds for c in at_shared)
    assert len(at_shared) == len(tuned_lr.ARMS) + 2 + len(tuned_lr.PRIOR_CONTRASTS)
    prior = data["environment"]["structural_prior"]
    assert prior["tasks"] == [tuned_lr.TASKS[task][0]] and set(prior) >= {"z", "p", "worse_on", "joins_the_candidates"}
    decided = data["environment"]["decision_at_shared_rate"]
    assert decided["tasks"] == [tuned_lr.TASKS[task][0]]
    default, why = tuned_lr.shipped_default(decided)
    assert data["environment"]["shipped_default"] == {"default": default, "why": why}
    parts = (tuned_lr.SAME_RATE, tuned_lr.OWN_RATES)  # diagnostics of their own, checked below
    controls = {c["contrast"] for c in contrasts if c["diagnostic"] and c["baseline"] not in parts}
    assert controls - {c["contrast"] for c in at_shared} == {"shuffled-rs vs lora-rs r=2", "paper-rs vs shuffled-rs"}
    moved = {m for m in tuned_lr.ARMS if record["rates"][m] != record["rates"]["lora-rs r=2"]}
    own = record["rates"][confirm.STRUCTURAL]  # the structural prior at its own rate, uniform LoRA at its own
    moved |= {confirm.STRUCTURAL} if own not in (record["rates"]["lora-rs r=2"], shared) else set()
    assert {c["method"] for c in contrasts if c["baseline"] == tuned_lr.SAME_RATE} == moved
    own_rows = {r["method"]: (r["lr"], r["seeds"]) for r in data["rows"] if r["rate_from"].startswith("own rate")}
    assert own_rows == {arm: (record["rates"][arm], seeds) for arm in ("lora-rs r=2", confirm.STRUCTURAL)}
    (at_own,) = [c for c in contrasts if c["baseline"] == tuned_lr.OWN_RATES]
    assert at_own["method"] == confirm.STRUCTURAL and at_own["diagnostic"] and at_own["n"] == seeds
    prior = data["environment"]["structural_prior_at_own_rate"]
    assert prior["tasks"] == [tuned_lr.TASKS[task][0]] and prior["alpha"] == confirm.ALPHA / 2
    assert (tmp_path / "tuned_lr_smoke.png").read_bytes()[:4] == b"\x89PNG"


def test_cost_sums_each_logs_runs_per_task_and_rate(tmp_path):
    from benchmarks.quality import cost

    def log(name, runs):  # runs: (label, lr, seconds)
        lines = [json.dumps({"label": label, "lr": lr, "method": "m", "seed": 0, "metrics": {"seconds": seconds}})
                 for label, lr, seconds in runs]  # fmt: skip
        (tmp_path / f"{name}.runs.jsonl").write_text("\n".join(lines) + "\n")

    log("regime_cpu", [("A", 1e-3, 60.0), ("A", 1e-3, 120.0), ("A", 4e-3, 30.0), ("B", 1e-3, 600.0)])
    log("tuned_lr_cpu", [("A dev", 2e-3, 90.0)])
    log("regime_smoke", [("A", 1e-3, 1e6)])  # another configuration's log: not counted
    assert cost.main(["--results", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "quality_cost_cpu.json").read_text())
    rows = {(r["log"], r["task"], r["lr"]): (r["runs"], r["seconds"], r["minutes_per_run"]) for r in data["rows"]}
    assert rows == {
        ("regime_cpu", "A", 1e-3): (2, 180, 1.5),
        ("regime_cpu", "A", 4e-3): (1, 30, 0.5),
        ("regime_cpu", "B", 1e-3): (1, 600, 10.0),
        ("tuned_lr_cpu", "A dev", 2e-3): (1, 90, 1.5),
    }
    assert data["environment"]["minutes_by_log"] == {"regime_cpu": 13.5, "tuned_lr_cpu": 1.5}
    assert data["environment"]["minutes"] == 15.0
