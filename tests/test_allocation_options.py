"""The research options of METHOD.md: the loss-aware (Fisher) statistic, sink exclusion, rank aggregation,
temperature, rsLoRA. Each is checked against a direct computation; the default aggregation is "rank" (the
quality suite's choice), every other default leaves the paper's method; an extreme allocation is flagged."""

import math

import pytest
import torch
from sensilora import AllocationConfig, SensiloraError, allocate, calibrate, combine, lora_config
from sensilora.allocation.metrics import ModuleMetrics

from tests.models import random_batches, tiny_bert, tiny_llama

NAME = "model.layers.1.mlp.down_proj"


def captured(model, name, batches, backward=False):
    """(inputs x, output gradients or None) of module ``name`` for each batch, by plain autograd."""
    module = dict(model.named_modules())[name]
    seen = []

    def hook(_module, args, output):
        seen.append([args[0].detach(), None])
        if backward:
            output.register_hook(lambda g: seen[-1].__setitem__(1, g.detach()))

    handle = module.register_forward_hook(hook)
    try:
        for batch in batches:
            if backward:
                labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
                embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
                model(
                    inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=labels, use_cache=False
                ).loss.backward()
            else:
                with torch.no_grad():
                    model(**batch, use_cache=False)
    finally:
        handle.remove()
    return seen


def test_fisher_statistic_equals_autograd():
    model, batches = tiny_llama(), random_batches()
    stats = calibrate(model, batches, statistic="fisher", progress=False)
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    total, tokens = torch.zeros(stats.module_shapes[NAME][1], dtype=torch.float64), 0
    for (x, g), batch in zip(captured(model, NAME, batches, backward=True), batches):
        keep = batch["attention_mask"].bool()
        weights = g.double().square().sum(-1)
        total += (weights[..., None] * x.double().square())[keep].sum(0)
        tokens += int(keep.sum())
    torch.testing.assert_close(stats.hessian_diag(NAME).double(), 2 * total / tokens, rtol=1e-4, atol=1e-12)
    assert stats.info["statistic"] == "fisher"
    assert len(set(stats.module_inputs.values())) == len(stats.module_names)  # q/k/v no longer share: own gradients


def test_fisher_needs_labels_outside_causal_lms():
    with pytest.raises(SensiloraError, match="needs the loss: give BertForSequenceClassification calibration batches"):
        calibrate(tiny_bert(), random_batches(), statistic="fisher", progress=False)
    batches = [{**b, "labels": torch.tensor([0, 1, 2])} for b in random_batches()]
    stats = calibrate(tiny_bert(), batches, statistic="fisher", progress=False)
    assert all(torch.isfinite(stats.hessian_diag(n)).all() for n in stats.module_names)
    with pytest.raises(SensiloraError, match="use it with mode='diag'"):
        calibrate(tiny_llama(), random_batches(), mode="obs", statistic="fisher", progress=False)


def test_robust_statistic_drops_outlier_tokens_and_is_the_paper_without_them():
    """hessian-robust = (2/N) sum x^2 over each input's tokens with norm <= 10x the median's, by direct
    computation on activations with planted massive tokens; without outliers it equals the paper's exactly."""
    from sensilora.calibration.observers.robust import OUTLIER_RATIO

    model, batches = tiny_llama(), random_batches()
    plain = calibrate(model, batches, progress=False)
    robust = calibrate(model, batches, statistic="hessian-robust", progress=False)
    for name in plain.module_names:  # random weights: no token 10x the median norm anywhere
        torch.testing.assert_close(robust.hessian_diag(name), plain.hessian_diag(name), rtol=0, atol=0)
        assert robust.num_tokens(name) == plain.num_tokens(name)

    module = dict(model.named_modules())[NAME]  # plant massive activations in the down_proj input
    planted = {(0, 0), (1, 4), (2, 7)}  # (row, position): the sink and two tokens further on

    def massive(_module, args):
        x = args[0].clone()
        for row, position in planted:
            x[row, position] *= 500.0
        return (x,)

    handle = module.register_forward_pre_hook(massive)
    try:
        with_outliers = calibrate(model, batches, statistic="hessian-robust", progress=False)
        as_paper = calibrate(model, batches, progress=False)
        seen = captured(model, NAME, batches)  # the hook above runs first: these are the planted inputs
    finally:
        handle.remove()
    total, tokens = torch.zeros(with_outliers.module_shapes[NAME][1], dtype=torch.float64), 0
    for (x,), batch in zip(((x,) for x, _ in seen), batches):
        norms = x.double().norm(dim=-1)
        real = batch["attention_mask"].bool()
        keep = real & (norms <= OUTLIER_RATIO * norms[real].median())
        assert {(int(r), int(p)) for r, p in (real & ~keep).nonzero()} == {t for t in planted if real[t]}
        total += x.double().square()[keep].sum(0)
        tokens += int(keep.sum())
    torch.testing.assert_close(with_outliers.hessian_diag(NAME).double(), 2 * total / tokens, rtol=1e-5, atol=1e-12)
    assert with_outliers.num_tokens(NAME) == tokens < as_paper.num_tokens(NAME)
    assert as_paper.hessian_diag(NAME).sum() > 1000 * with_outliers.hessian_diag(NAME).sum()  # what the sink did
    assert with_outliers.info["statistic"] == "hessian-robust"
    with pytest.raises(SensiloraError, match="use it with mode='diag'"):
        calibrate(model, batches, mode="obs", statistic="hessian-robust", progress=False)


@pytest.mark.parametrize("k", [0, 1, 3])
def test_exclude_first_tokens(k):
    model, batches = tiny_llama(), random_batches(pad_tail=True)
    stats = calibrate(model, batches, exclude_first=k, progress=False)
    total, tokens = 0.0, 0
    for (x, _), batch in zip(captured(model, NAME, batches), batches):
        keep = batch["attention_mask"].bool().clone()
        keep[:, :k] = False  # right padding: the first k positions are the first k real tokens
        total = total + x.double().square()[keep].sum(0)
        tokens += int(keep.sum())
    torch.testing.assert_close(stats.hessian_diag(NAME).double(), 2 * total / tokens, rtol=1e-5, atol=1e-9)
    if k == 0:  # off means exactly the paper's statistic
        assert torch.equal(stats.hessian_diag(NAME), calibrate(model, batches, progress=False).hessian_diag(NAME))


def test_rank_aggregation_and_temperature():
    metrics = {
        "a": ModuleMetrics(1e6, 1e3, 10),  # an outlier in the trace
        "b": ModuleMetrics(2.0, 2.0, 20),
        "c": ModuleMetrics(1.0, 1.0, 30),
    }
    paper = combine(metrics)
    ranked = combine(metrics, aggregation="rank")
    assert paper["a"] / paper["c"] > 10 and ranked["a"] / ranked["c"] < 3  # the outlier no longer rules
    assert combine(metrics, temperature=0.0) == {"a": 1.0, "b": 1.0, "c": 1.0}
    tempered = combine(metrics, temperature=0.5)
    assert all(math.isclose(tempered[n], math.sqrt(paper[n])) for n in metrics)


def test_the_default_is_rank_aggregation_and_the_paper_is_one_option_away(tmp_path):
    stats = calibrate(tiny_llama(), random_batches(), progress=False)
    assert allocate(stats, avg_rank=4).ranks == allocate(stats, avg_rank=4, aggregation="rank", temperature=1.0).ranks
    paper = allocate(stats, AllocationConfig.paper(avg_rank=4))
    assert paper.config.aggregation == "paper" and paper.ranks == allocate(stats, avg_rank=4, aggregation="paper").ranks
    assert paper.ranks != allocate(stats, avg_rank=4).ranks
    old_file = paper.to_dict()
    del old_file["config"]["aggregation"]  # written before rank aggregation existed: the paper's
    assert AllocationConfig.from_dict(old_file["config"]).aggregation == "paper"
    tempered = allocate(stats, avg_rank=4, temperature=0.0)
    assert sum(tempered.ranks.values()) == 4 * len(tempered.ranks)
    assert max(tempered.ranks.values()) - min(tempered.ranks.values()) <= 1
    with pytest.raises(SensiloraError, match="temperature must be a number"):
        AllocationConfig(temperature=-1)


def test_rslora_scaling():
    stats = calibrate(tiny_llama(), random_batches(), progress=False)
    allocation = allocate(stats, avg_rank=4, use_rslora=True)
    config = lora_config(allocation, lora_alpha=8)
    assert config.use_rslora and not config.alpha_pattern and config.lora_alpha == pytest.approx(8 / 2)
    plain = lora_config(allocate(stats, avg_rank=4), lora_alpha=8)
    assert not plain.use_rslora and len(plain.alpha_pattern) == len(allocation.ranks)
    assert allocation.to_dict()["config"]["use_rslora"] is True


def massive_down_proj_stats(scale: float = 1e7):
    """The tiny model's statistics with one input channel of every ``down_proj`` scaled up, as the
    massive activations at attention-sink tokens do on LLaMA-family models."""
    stats = calibrate(tiny_llama(), random_batches(), progress=False)
    for name in stats.module_names:
        if name.endswith("down_proj"):
            stats.inputs[stats.module_inputs[name]].hessian_diag[0] *= scale
    return stats


def test_an_extreme_allocation_is_named_with_its_share(tmp_path, capsys):
    from sensilora.cli import main
    from sensilora.integrations.report import extreme_allocation

    stats = massive_down_proj_stats()
    paper = allocate(stats, AllocationConfig.paper(avg_rank=4))
    cost = {n: r * sum(paper.shapes[n]) for n, r in paper.ranks.items()}
    share = sum(c for n, c in cost.items() if n.endswith("down_proj")) / sum(cost.values())
    uniform = sum(sum(s) for n, s in paper.shapes.items() if n.endswith("down_proj")) / sum(
        sum(s) for s in paper.shapes.values()
    )
    assert share > 2 * uniform  # the premise: the outliers hand down_proj the budget
    line = extreme_allocation(paper)
    assert f"mlp.down_proj {share:.1%} (uniform LoRA {uniform:.1%})" in line and "self_attn" not in line
    assert "massive activations" in line and "--aggregation rank (the default)" in line
    assert extreme_allocation(allocate(stats, avg_rank=4, temperature=0.0)) is None  # uniform ranks
    assert extreme_allocation(allocate(calibrate(tiny_llama(), random_batches(), progress=False), avg_rank=4)) is None

    stats.save(tmp_path / "s.safetensors")
    args = ["allocate", "--from-stats", str(tmp_path / "s.safetensors"), "--avg-rank", "4", "--quiet",
            "--output", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")]  # fmt: skip
    assert main([*args, "--aggregation", "paper"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "extreme allocation" in line]
    assert len(warned) == 1 and warned[0].startswith(
        "sensilora allocate: warning: an extreme allocation: mlp.down_proj"
    )
    assert main(args) == 0  # rank aggregation: the outlier's scale no longer decides
    assert "extreme allocation" not in capsys.readouterr().err


def test_clipped_statistic_scales_outlier_tokens_to_the_bound():
    """hessian-clipped = (2/N) sum_n min(1, (10 m / ||x_n||)^2) x_n^2 over every real token, by direct
    computation on activations with planted massive tokens; without outliers it equals the paper's exactly."""
    from sensilora.calibration.observers.robust import OUTLIER_RATIO

    model, batches = tiny_llama(), random_batches()
    plain = calibrate(model, batches, progress=False)
    clipped = calibrate(model, batches, statistic="hessian-clipped", progress=False)
    for name in plain.module_names:
        torch.testing.assert_close(clipped.hessian_diag(name), plain.hessian_diag(name), rtol=1e-6, atol=0)
        assert clipped.num_tokens(name) == plain.num_tokens(name)

    module = dict(model.named_modules())[NAME]

    def massive(_module, args):
        x = args[0].clone()
        x[0, 0] *= 500.0
        x[2, 7] *= 300.0
        return (x,)

    handle = module.register_forward_pre_hook(massive)
    try:
        with_outliers = calibrate(model, batches, statistic="hessian-clipped", progress=False)
        seen = captured(model, NAME, batches)
    finally:
        handle.remove()
    total, tokens = torch.zeros(with_outliers.module_shapes[NAME][1], dtype=torch.float64), 0
    for (x, _), batch in zip(seen, batches):
        norms = x.double().norm(dim=-1)
        real = batch["attention_mask"].bool()
        weight = (OUTLIER_RATIO * norms[real].median() / norms).square().clamp(max=1.0)
        assert int((weight[real] < 1).sum()) >= 1
        total += (x.double().square() * weight[..., None])[real].sum(0)
        tokens += int(real.sum())
    torch.testing.assert_close(with_outliers.hessian_diag(NAME).double(), 2 * total / tokens, rtol=1e-5, atol=1e-12)
    assert with_outliers.num_tokens(NAME) == tokens and with_outliers.info["statistic"] == "hessian-clipped"
