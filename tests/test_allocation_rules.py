"""The allocation rules beside the paper's theta (METHOD.md section 5): the structural prior, pooling by
module type x depth, GoRA's |W * G| and the whitened gradient spectrum, and the mean gradients they read;
each against a direct computation."""

import numpy as np
import pytest
import torch
from sensilora import AllocationConfig, SensiloraError, allocate, calibrate, mean_gradients
from sensilora.allocation.rules import greedy_ranks, pooled_theta, structural_theta

from tests.models import random_batches, tiny_gpt2, tiny_llama


@pytest.fixture(scope="module")
def calibrated():
    model = tiny_llama(layers=3)
    batches = random_batches(3)
    return model, batches, calibrate(model, batches, progress=False), mean_gradients(model, batches)


def budget(allocation):
    return allocation.avg_rank * sum(sum(shape) for shape in allocation.shapes.values())


def test_mean_gradients_are_the_average_autograd_gradient(calibrated):
    model, batches, _, gradients = calibrated
    name = "model.layers.1.mlp.down_proj"
    weight = dict(model.named_modules())[name].weight
    expected = torch.zeros_like(weight)
    for batch in batches:
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels, use_cache=False).loss
        expected += torch.autograd.grad(loss, weight)[0] / len(batches)
    assert torch.allclose(gradients[name], expected, rtol=1e-4, atol=1e-7)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())  # nothing left behind
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_structural_rule_ranks_by_depth_alone(calibrated):
    _, _, stats, _ = calibrated
    allocation = allocate(stats, AllocationConfig(avg_rank=4, rule="structural"))
    assert allocation.theta == structural_theta(allocation.shapes)
    assert allocation.theta["model.layers.2.self_attn.q_proj"] == 3.0
    by_layer = {}
    for name, rank in allocation.ranks.items():
        by_layer.setdefault(int(name.split(".")[2]), []).append(rank / 1.0)
    assert np.mean(by_layer[0]) < np.mean(by_layer[1]) < np.mean(by_layer[2])
    assert allocation.trainable_parameters <= budget(allocation)


def test_pooling_shares_theta_within_type_and_depth_third():
    theta = {f"model.layers.{i}.mlp.up_proj": float(i) for i in range(6)} | {"model.layers.0.mlp.down_proj": 7.0}
    pooled = pooled_theta(theta)
    assert pooled["model.layers.0.mlp.up_proj"] == pooled["model.layers.1.mlp.up_proj"] == 0.5
    assert pooled["model.layers.4.mlp.up_proj"] == pooled["model.layers.5.mlp.up_proj"] == 4.5
    assert pooled["model.layers.0.mlp.down_proj"] == 7.0


def test_pooled_allocation_gives_one_rank_per_group(calibrated):
    _, _, stats, _ = calibrated
    plain = allocate(stats, AllocationConfig(avg_rank=4))
    pooled = allocate(stats, AllocationConfig(avg_rank=4, pooling="type-depth"))
    assert pooled.theta == pooled_theta(plain.theta)
    assert pooled.trainable_parameters <= budget(pooled)


def test_gradient_rules_read_gpt2_conv1d_weights_as_d_out_by_d_in():
    model, batches = tiny_gpt2(), random_batches(2)
    gradients = mean_gradients(model, batches)
    name = "transformer.h.1.attn.c_attn"
    weight = dict(model.named_modules())[name].weight  # Conv1D: stored (d_in, d_out)
    expected = torch.zeros_like(weight)
    for batch in batches:
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        expected += torch.autograd.grad(model(**batch, labels=labels).loss, weight)[0] / len(batches)
    assert gradients[name].shape == (96, 32) and torch.allclose(gradients[name], expected.T, rtol=1e-4, atol=1e-7)
    stats = calibrate(model, batches, progress=False)
    for rule in ("gora", "gradient-spectrum"):
        allocation = allocate(stats, AllocationConfig(avg_rank=2, rule=rule), model=model, gradients=gradients)
        assert set(allocation.ranks) == set(stats.module_names)
    gora = allocate(stats, AllocationConfig(avg_rank=2, rule="gora"), model=model, gradients=gradients)
    assert gora.theta[name] == pytest.approx(float((weight.detach().T * gradients[name]).abs().mean()), rel=1e-6)


def test_gora_is_mean_abs_weight_times_gradient_clipped(calibrated):
    model, _, stats, gradients = calibrated
    allocation = allocate(stats, AllocationConfig(avg_rank=4, rule="gora"), model=model, gradients=gradients)
    modules = dict(model.named_modules())
    for name, value in allocation.theta.items():
        assert value == pytest.approx(float((modules[name].weight.detach() * gradients[name]).abs().mean()), rel=1e-6)
    assert all(2 <= r <= 16 for r in allocation.ranks.values())
    assert allocation.trainable_parameters <= budget(allocation)


def test_gradient_spectrum_values_and_greedy(calibrated):
    _, _, stats, gradients = calibrated
    allocation = allocate(stats, AllocationConfig(avg_rank=4, rule="gradient-spectrum"), gradients=gradients)
    name = "model.layers.0.self_attn.o_proj"
    h = stats.hessian_diag(name).double()
    whitened = gradients[name].double() / (h + 0.01 * h.mean()).sqrt()[None, :]
    assert allocation.theta[name] == pytest.approx(float(whitened.square().sum()), rel=1e-4)
    assert allocation.trainable_parameters <= budget(allocation)
    assert budget(allocation) - allocation.trainable_parameters < min(sum(s) for s in allocation.shapes.values())


def test_greedy_takes_units_by_worth_per_parameter():
    shapes = {"a": (4, 4), "b": (4, 12)}  # costs 8 and 16 per rank
    values = {"a": np.array([9.0, 8.0, 1.0, 0.5]), "b": np.array([9.0, 6.0, 5.0, 4.0])}
    # budget 2 * (8 + 16) = 48: rank 1 each (24), then a's 8/8 = 1.0 (8), then b's 6/16 = 0.375 (16)
    assert greedy_ranks(values, shapes, 48, {"a": 3, "b": 3}) == {"a": 2, "b": 2}
    # a's third unit (1/8) beats b's fourth (4/16) only when b is at its ceiling
    assert greedy_ranks(values, shapes, 64, {"a": 4, "b": 2}) == {"a": 4, "b": 2}


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"rule": "gora", "method": "pra"}, "method='sra'"),
        ({"rule": "gradient-spectrum", "pooling": "type-depth"}, "pooling='none'"),
        ({"rule": "gradient-spectrum", "min_rank": 2}, "min_rank=1"),
        ({"rule": "magic"}, "rule must be one of"),
        ({"pooling": "layer"}, "pooling must be one of"),
    ],
)
def test_bad_rule_options_are_one_line(changes, message):
    with pytest.raises(SensiloraError, match=message):
        AllocationConfig(avg_rank=4, **changes)


def test_gradient_rules_refuse_missing_inputs(calibrated):
    model, _, stats, gradients = calibrated
    with pytest.raises(SensiloraError, match="needs the mean loss gradients"):
        allocate(stats, AllocationConfig(avg_rank=4, rule="gora"), model=model)
    with pytest.raises(SensiloraError, match="needs the model's weights"):
        allocate(stats, AllocationConfig(avg_rank=4, rule="gora"), gradients=gradients)
    partial = dict(list(gradients.items())[1:])
    with pytest.raises(SensiloraError, match="gradients lack 1 calibrated module"):
        allocate(stats, AllocationConfig(avg_rank=4, rule="gradient-spectrum"), gradients=partial)


def test_rule_options_survive_the_ranks_file(calibrated, tmp_path):
    from sensilora import RankAllocation

    _, _, stats, _ = calibrated
    allocation = allocate(stats, AllocationConfig(avg_rank=4, rule="structural", pooling="type-depth"))
    allocation.save(tmp_path / "ranks.json")
    loaded = RankAllocation.load(tmp_path / "ranks.json")
    assert loaded.config == allocation.config and loaded.ranks == allocation.ranks


def test_cli_allocates_with_a_gradient_rule_and_pooling(tiny_model_dir, tmp_path, capsys):
    import json

    from sensilora.cli import main

    base = ["allocate", "--model", str(tiny_model_dir), "--samples", "8", "--seq-len", "64", "--avg-rank", "4",
            "--min-tokens", "512",
            "--quiet"]  # fmt: skip
    for extra in (["--rule", "gora"], ["--rule", "structural", "--pooling", "type-depth"]):
        output = tmp_path / f"{extra[1]}.json"
        assert main([*base, *extra, "--output", str(output), "--plot", str(tmp_path / "p.png")]) == 0
        config = json.loads(output.read_text())["config"]
        assert config["rule"] == extra[1] and config["pooling"] == (extra[3] if len(extra) > 2 else "none")
    capsys.readouterr()
