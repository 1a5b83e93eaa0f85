"""Inputs shared by the kernel tests (Triton under the interpreter, csrc under host emulation)."""

import torch

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = list(TOLERANCE)
# (segment lengths, with per-value multiplicities, with ties and zeros) and (k_frac, alpha) for selection
SELECTION_CASES = [([1], False, False), ([5000], False, True), ([3, 1, 250, 1100], True, True), ([64] * 5, True, False)]
SELECTION_TARGETS = [(0.5, 0.85), (1 / 3, 0.8), (1.0, 1.0)]


def make_input(shape, dtype, layout, seed=0):
    """A (B, T, d) activation tensor, contiguous or with a non-contiguous token or column axis."""
    generator = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        return torch.randn(shape, generator=generator).to(dtype)
    if layout == "transposed":  # (B, T, d) whose token axis is not contiguous
        return torch.randn(shape[0], shape[2], shape[1], generator=generator).to(dtype).transpose(1, 2)
    return torch.randn(shape[0], shape[1], 2 * shape[2], generator=generator).to(dtype)[..., ::2]  # strided columns


def make_mask(shape, seed=1):
    """A (B, T) bool padding mask with about a third of the tokens masked out."""
    return torch.rand(shape[:2], generator=torch.Generator().manual_seed(seed)) > 0.35


ROWS = ["all", "masked", "masked and weighted"]  # the column sums' token options (weighted: the Fisher case)


def make_rows(shape, rows: str, seed=2):
    """(mask or None, row_weight or None) for ``rows`` in ROWS; the weights fp32 in [0, 3), a (B, T) view
    that is not contiguous (transposed storage), as strides may come."""
    if rows == "all":
        return None, None
    weight = None
    if rows == "masked and weighted":
        weight = 3 * torch.rand(shape[1], shape[0], generator=torch.Generator().manual_seed(seed)).T
    return make_mask(shape), weight


def selection_case(lengths, seed, with_counts=True, ties=True):
    """(values fp32, offsets int64, counts int64 or None) for segments of the given lengths."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.rand(sum(lengths), generator=generator) ** 3
    if ties:
        values[: len(values) // 3] = values[0]
        values[len(values) // 2 : len(values) // 2 + 7] = 0.0
    counts = torch.randint(1, 9, values.shape, generator=generator) if with_counts else None
    return values, torch.cumsum(torch.tensor([0] + lengths), 0), counts


def wide_range_case(seed=5):
    """(values, offsets, counts) spanning every binade of fp32 (zeros, subnormals, up to 1e38), with one
    segment of 600 equal large values (a bucket's exact sum passes 2^32 units: the carry) and clusters."""
    generator = torch.Generator().manual_seed(seed)
    exponents = torch.randint(-149, 127, (3000,), generator=generator).double()
    spread = (torch.rand(3000, generator=generator, dtype=torch.float64) + 1) * torch.exp2(exponents)
    spread = spread.clamp(max=3e38).float()
    spread[:50] = 0.0
    spread[50:60] = torch.tensor(1e-45)  # the smallest subnormal
    clustered = 1 + torch.rand(900, generator=generator) * 1e-3  # one binade, a few buckets
    equal = torch.full((600,), 1.9999999)  # 24-bit mantissa all ones: the largest fixed-point units
    values = torch.cat([spread, clustered, equal])
    counts = torch.randint(1, 5, values.shape, generator=generator)
    return values, torch.tensor([0, 3000, 3900, 4500]), counts


def assert_selects_every_binade(select, with_counts: bool) -> None:
    """``select(values, offsets, counts, k_frac, alpha)`` on ``wide_range_case`` equals the sorted reference.
    alpha < 1 only: at alpha = 1 the effective rank over 1e-45..1e38 is wherever fp64 rounding lets the
    prefix reach the total, which depends on summation order (every order is as right as the reference's)."""
    from sensilora.ops import reference

    values, offsets, counts = wide_range_case()
    counts = counts if with_counts else None
    for k_frac, alpha in SELECTION_TARGETS[:2]:
        expected = reference.topk_mean_and_effective_rank(values, offsets, counts, k_frac, alpha)
        assert_same_selection(select(values, offsets, counts, k_frac, alpha), expected)


def saliency_case(d_out, d_in, transposed, dtype=torch.float32, ties=False):
    """(weight (d_out, d_in), inverse diagonal (d_in,) fp32 > 0) for the fused obs selection; ``transposed``
    gives the non-contiguous view a Conv1D-stored weight arrives as; ``ties`` repeats a row and zeroes a column."""
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(d_out, d_in, generator=generator).to(dtype)
    if ties:
        weight[3, :] = weight[0, :]
        weight[:, 5] = 0.0
    if transposed:
        weight = weight.T.contiguous().T
    return weight, torch.rand(d_in, generator=generator) + 0.05


def assert_same_selection(got, expected):
    """(total, top-k mean, effective rank) of a selection kernel against the sorted reference: the fp64
    sums to 1e-12, the ranks exactly."""
    torch.testing.assert_close(got[0], expected[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-12, atol=0)
    assert torch.equal(got[2], expected[2])
