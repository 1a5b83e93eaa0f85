"""AllocationConfig: validated once, saved verbatim in the ranks JSON and read back; the budget and
bound contracts of SRA and PRA."""

import json

import pytest
from sensilora import AllocationConfig, RankAllocation, SensiloraError, allocate, calibrate, pra_ranks, sra_ranks

from tests.models import random_batches, tiny_llama


@pytest.fixture(scope="module")
def stats():
    return calibrate(tiny_llama(), random_batches(), progress=False)


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"avg_rank": 0}, "avg_rank must be a positive integer"),
        ({"avg_rank": 2.5}, "avg_rank must be a positive integer"),
        ({"method": "adalora"}, "method must be one of sra, pra"),
        ({"k_frac": 0.0}, r"k_frac must be in \(0, 1\]"),
        ({"alpha": 1.5}, r"alpha must be in \(0, 1\]"),
        ({"min_rank": 0}, "min_rank must be an integer >= 1"),
        ({"min_rank": 9, "avg_rank": 8}, "min_rank=9 exceeds avg_rank=8"),
        ({"max_rank": 4, "avg_rank": 8}, "max_rank=4 is below avg_rank=8"),
        ({"method": "pra", "budget": "params"}, "use budget='ranks' with method='pra'"),
    ],
)
def test_invalid_configs_are_refused_at_construction(changes, message):
    with pytest.raises(SensiloraError, match=message):
        AllocationConfig(**changes)


def test_unknown_override_is_refused(stats):
    with pytest.raises(SensiloraError, match="unknown allocation option"):
        allocate(stats, avg_rank=4, avg_rnak=5)
    with pytest.raises(SensiloraError, match="AllocationConfig"):
        allocate(stats, 4)


def test_config_is_saved_verbatim_and_read_back(stats, tmp_path):
    config = AllocationConfig(avg_rank=4, weighting="equal", max_rank=6, budget="params", k_frac=1 / 3)
    allocation = allocate(stats, config)
    path = tmp_path / "ranks.json"
    allocation.save(path)
    assert json.loads(path.read_text())["config"] == config.to_dict()
    loaded = RankAllocation.load(path)
    assert loaded.config == config and loaded.ranks == allocation.ranks and loaded.mode == "diag"
    assert allocate(stats, config, avg_rank=4).ranks == allocation.ranks  # overrides equal to the config change nothing


def test_version_1_ranks_files_still_load(stats, tmp_path):
    allocation = allocate(stats, avg_rank=4, max_rank=6)
    data = allocation.to_dict()
    config = data.pop("config")
    data.update(format="sensilora.allocation/1", avg_rank=4, settings={**config, "mode": "diag"})
    data.pop("mode")
    loaded = RankAllocation.from_dict(data)
    assert loaded.config == allocation.config and loaded.ranks == allocation.ranks


def test_damaged_ranks_file_gives_a_message(stats):
    data = allocate(stats, avg_rank=4).to_dict()
    for key in ("modules", "config"):
        broken = {k: v for k, v in data.items() if k != key}
        with pytest.raises(SensiloraError, match="damaged"):
            RankAllocation.from_dict(broken, source="r.json")


def _first_module_set(data, **fields):
    name = next(iter(data["modules"]))
    data["modules"][name].update(fields)
    return data


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda text, data: text.replace('"rank": ', '"rank": NaN, "x": ', 1), "NaN is not a number JSON allows"),
        (lambda text, data: "[" * 100_000 + "]" * 100_000, "is not a sensilora ranks file|nested too deeply"),
        (lambda text, data: json.dumps({**data, "modules": {}}), "lists no modules"),
        (lambda text, data: json.dumps(_first_module_set(data, rank=0)), r"a rank is an integer in \[1, "),
        (lambda text, data: json.dumps(_first_module_set(data, rank=10**6)), r"a rank is an integer in \[1, "),
        (lambda text, data: json.dumps(_first_module_set(data, rank=2.5)), r"a rank is an integer in \[1, "),
        (lambda text, data: json.dumps(_first_module_set(data, shape=[0, 8])), "not \\[d_out, d_in\\]"),
        (lambda text, data: json.dumps(_first_module_set(data, shape="8x8")), "not \\[d_out, d_in\\]"),
        (lambda text, data: json.dumps(_first_module_set(data, theta=None)), "no finite theta"),
        (lambda text, data: json.dumps(_first_module_set(data, topk=True)), "no finite topk"),
    ],
)
def test_ranks_file_fields_are_validated_on_load(stats, tmp_path, damage, message):
    allocation = allocate(stats, avg_rank=4)
    path = tmp_path / "ranks.json"
    path.write_text(damage(allocation.to_json(), allocation.to_dict()), encoding="utf-8")
    with pytest.raises(SensiloraError, match=message) as error:
        RankAllocation.load(path)
    assert "\n" not in str(error.value)


def test_ranks_file_with_a_byte_order_mark_loads(stats, tmp_path):
    allocation = allocate(stats, avg_rank=4)
    path = tmp_path / "ranks.json"
    path.write_text(allocation.to_json(), encoding="utf-8-sig")  # what some Windows editors save
    assert RankAllocation.load(path).ranks == allocation.ranks


def test_pra_respects_max_rank():
    theta = {f"m{i}": float(i) for i in range(6)}
    shapes = {name: (64, 64) for name in theta}
    assert max(pra_ranks(theta, shapes, 5, 3, max_rank=6).values()) == 6
    with pytest.raises(SensiloraError, match="exceeds max_rank=5"):
        pra_ranks(theta, shapes, 5, 3, max_rank=5)
    with pytest.raises(SensiloraError, match="exceeds max_rank"):
        allocate(calibrate(tiny_llama(), random_batches(), progress=False), method="pra", avg_rank=4, max_rank=4)


@pytest.mark.parametrize("budget", ["ranks", "params"])
@pytest.mark.parametrize(
    "theta",
    [
        {"a": 1e308, "b": 1e308, "c": 1.0, "d": 0.0},  # c * theta overflowed before theta was rescaled
        {"a": 1e-300, "b": 3e-300, "c": 2e-300, "d": 5e-324},
        {f"m{i}": 1.0 - 1e-12 * i for i in range(7)},  # near-integer real ranks (rounding to 9 digits)
    ],
)
def test_sra_never_exceeds_its_budget(theta, budget):
    shapes = {name: (24 + 8 * i, 16) for i, name in enumerate(theta)}
    ranks = sra_ranks(theta, shapes, 3, 1, budget)
    cost = {name: sum(shapes[name]) if budget == "params" else 1 for name in theta}
    spent, total = sum(ranks[n] * cost[n] for n in theta), 3 * sum(cost.values())
    assert spent <= total and (budget == "params" or spent == total)
    assert all(1 <= ranks[n] <= min(shapes[n]) for n in theta)


def test_non_finite_theta_is_refused():
    with pytest.raises(SensiloraError, match="theta is not finite"):
        sra_ranks({"a": float("nan"), "b": 1.0}, {"a": (8, 8), "b": (8, 8)}, 2)
