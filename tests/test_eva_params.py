"""EVA's rank rule at a parameter budget (benchmarks/quality/eva_params.py) against direct computations."""

import numpy as np
import pytest
import torch

from benchmarks.quality.eva_params import explained_variance_ratios, ranks_within


class TwoLinear(torch.nn.Module):
    """Embedding -> first (5 -> 7) -> second (7 -> 3); the inputs of ``first`` and ``second`` are known."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(11, 5)
        self.first, self.second = torch.nn.Linear(5, 7), torch.nn.Linear(7, 3)

    def forward(self, input_ids, attention_mask):
        return self.second(self.first(self.embed(input_ids)))


def direct_ratios(tokens: np.ndarray, components: int) -> np.ndarray:
    eigenvalues = np.sort(np.linalg.eigvalsh(np.cov(tokens.T, bias=True)))[::-1].clip(min=0)
    return eigenvalues[:components] / eigenvalues.sum()


def test_explained_variance_ratios_are_the_pca_of_the_unmasked_tokens():
    model = TwoLinear()
    generator = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 11, (3, 6), generator=generator),
                "attention_mask": torch.randint(0, 2, (3, 6), generator=generator)} for _ in range(2)]  # fmt: skip
    ratios = explained_variance_ratios(model, ["first", "second"], batches, components=4)
    with torch.no_grad():
        embedded = torch.cat([model.embed(b["input_ids"])[b["attention_mask"].bool()] for b in batches]).double()
        hidden = model.first(embedded.float()).double()
    for name, tokens in (("first", embedded), ("second", hidden)):
        assert ratios[name].dtype == torch.float64 and ratios[name].shape == (4,)
        np.testing.assert_allclose(ratios[name].numpy(), direct_ratios(tokens.numpy(), 4), rtol=1e-6, atol=1e-9)
    assert not model.first._forward_hooks and not model.second._forward_hooks  # the hooks are gone


@pytest.mark.parametrize(
    ("costs", "budget", "expected"),
    [
        ({"a": 1, "b": 1}, 2, {"a": 1, "b": 1}),  # EVA's count rule: the two largest ratios, 0.5 and 0.4
        ({"a": 1, "b": 1}, 3, {"a": 2, "b": 1}),
        ({"a": 3, "b": 1}, 4, {"a": 1, "b": 1}),  # a's second unit (0.3) no longer fits
        ({"a": 3, "b": 1}, 5, {"a": 1, "b": 2}),  # ... but b's cheaper second unit (0.1) does
        ({"a": 3, "b": 1}, 0, {"a": 0, "b": 0}),
    ],
)
def test_ranks_within_takes_units_by_ratio_while_they_fit(costs, budget, expected):
    ratios = {"a": torch.tensor([0.5, 0.3]), "b": torch.tensor([0.4, 0.1])}
    ranks = ranks_within(ratios, costs, budget)
    assert ranks == expected and sum(costs[n] * r for n, r in ranks.items()) <= budget
