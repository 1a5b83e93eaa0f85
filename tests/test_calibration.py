"""Calibration hooks: padding, sharing, fp32 sums, model left untouched, clear errors."""

import copy

import pytest
import torch
from sensilora import SensiloraError, SensitivityStats, allocate, calibrate
from torch.utils.data import DataLoader, TensorDataset

from tests.models import random_batches, tiny_bert, tiny_gpt2, tiny_llama


def captured_inputs(model, batches, name):
    """The real-token rows that module ``name`` receives, collected by a plain hook."""
    rows = []
    module = dict(model.named_modules())[name]
    handle = module.register_forward_pre_hook(lambda m, args: rows.append(args[0].detach()))
    with torch.no_grad():
        for batch in batches:
            rows_before = len(rows)
            model(**batch)
            x = rows[rows_before]
            rows[rows_before] = x[batch["attention_mask"].bool()]
    handle.remove()
    return torch.cat(rows).float()


@pytest.mark.parametrize("mode", ["diag", "obs"])
def test_statistic_equals_hessian_diag_of_real_tokens(mode):
    model, batches = tiny_llama(), random_batches()
    stats = calibrate(model, batches, mode=mode, progress=False)
    x = captured_inputs(model, batches, "model.layers.1.mlp.down_proj")
    expected = 2.0 / x.shape[0] * (x**2).sum(0)
    torch.testing.assert_close(stats.hessian_diag("model.layers.1.mlp.down_proj"), expected, rtol=1e-5, atol=1e-6)
    assert stats.num_tokens("model.layers.1.mlp.down_proj") == sum(int(b["attention_mask"].sum()) for b in batches)
    if mode == "obs":
        hessian = 2.0 / x.shape[0] * x.T @ x
        damped = hessian + 0.01 * hessian.diagonal().mean() * torch.eye(hessian.shape[0])
        torch.testing.assert_close(
            stats.inverse_hessian_diag("model.layers.1.mlp.down_proj"),
            torch.linalg.inv(damped).diagonal(),
            rtol=1e-3,
            atol=1e-5,
        )


def test_padding_is_excluded():
    """Changing what sits under attention_mask == 0 changes nothing."""
    model = tiny_llama()
    batches = random_batches()
    other = copy.deepcopy(batches)
    other[0]["input_ids"][0, 6:] = (other[0]["input_ids"][0, 6:] + 1) % 128
    first, second = (calibrate(model, b, progress=False) for b in (batches, other))
    # causal attention: left-of-padding tokens never see the padded ones, so stats must be identical
    for name in first.module_names:
        torch.testing.assert_close(first.hessian_diag(name), second.hessian_diag(name))


def test_shared_inputs_share_one_accumulator():
    stats = calibrate(tiny_llama(), random_batches(), progress=False)
    layer = "model.layers.0."
    key = stats.module_inputs[layer + "self_attn.q_proj"]
    assert stats.module_inputs[layer + "self_attn.k_proj"] == key == stats.module_inputs[layer + "self_attn.v_proj"]
    assert stats.module_inputs[layer + "mlp.up_proj"] == stats.module_inputs[layer + "mlp.gate_proj"]
    assert stats.module_inputs[layer + "mlp.down_proj"] != stats.module_inputs[layer + "mlp.up_proj"]
    assert len(stats.inputs) == 4 * 2  # four distinct inputs per layer


def test_fp32_sums_from_bf16_model():
    model = tiny_llama().to(torch.bfloat16)
    stats = calibrate(model, random_batches(), progress=False)
    assert all(stats.hessian_diag(n).dtype == torch.float32 for n in stats.module_names)


HOOK_KINDS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


@pytest.mark.parametrize("mode, statistic", [("diag", "hessian"), ("obs", "hessian"), ("diag", "fisher")])
def test_model_left_as_it_was_even_on_error(mode, statistic):
    model = tiny_llama()
    model.train()
    model.model.layers[0].eval()
    model.model.layers[1].mlp.up_proj.weight.requires_grad_(False)
    flags = {n: m.training for n, m in model.named_modules()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calibrate(model, random_batches(), mode=mode, statistic=statistic, progress=False)
    bad = random_batches()
    bad[1]["input_ids"] = bad[1]["input_ids"][:, :5]  # mask no longer fits the tokens
    with pytest.raises(SensiloraError, match="attention_mask"):
        calibrate(model, bad, mode=mode, statistic=statistic, progress=False)
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert all(not getattr(m, kind) for m in model.modules() for kind in HOOK_KINDS)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())  # no weight gradient computed or kept


@pytest.mark.parametrize("kind", ["list", "tensor", "dataloader", "single"])
def test_batch_sources_agree(kind):
    model = tiny_llama()
    ids = torch.randint(0, 128, (4, 9), generator=torch.Generator().manual_seed(0))
    sources = {
        "list": [{"input_ids": ids[:2]}, {"input_ids": ids[2:]}],
        "tensor": [ids[:2], ids[2:]],
        "dataloader": DataLoader(TensorDataset(ids, torch.ones_like(ids)), batch_size=2),
        "single": ids,
    }
    reference = calibrate(model, ids, progress=False)
    stats = calibrate(model, sources[kind], progress=False)
    for name in reference.module_names:
        torch.testing.assert_close(stats.hessian_diag(name), reference.hessian_diag(name), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("builder,count", [(tiny_gpt2, 8), (tiny_bert, 12), (tiny_llama, 14)])
def test_default_targets_cover_blocks_only(builder, count):
    stats = calibrate(builder(), random_batches(), progress=False)
    assert len(stats.module_names) == count
    assert not any(
        word in n for n in stats.module_names for word in ("lm_head", "classifier", "pooler", "embed", "wte")
    )


def test_target_modules_as_suffixes_and_regex():
    model = tiny_llama()
    by_suffix = calibrate(model, random_batches(), target_modules=["q_proj", "v_proj"], progress=False)
    assert len(by_suffix.module_names) == 4
    by_regex = calibrate(model, random_batches(), target_modules=r".*layers\.1\..*proj", progress=False)
    assert len(by_regex.module_names) == 7


def test_cli_target_modules_takes_one_regex(tiny_model_dir, tmp_path, capsys):
    import json

    from sensilora.cli import main

    output = tmp_path / "ranks.json"
    argv = ["allocate", "--model", str(tiny_model_dir), "--samples", "4", "--seq-len", "32", "--min-tokens", "1",
            "--avg-rank", "2", "--quiet", "--output", str(output), "--plot", str(tmp_path / "p.png"),
            "--target-modules", r"model\.layers\.1\..*"]  # fmt: skip
    assert main(argv) == 0
    ranks = json.loads(output.read_text())["modules"]
    assert len(ranks) == 7 and all(name.startswith("model.layers.1.") for name in ranks)
    capsys.readouterr()


class IdleTower(torch.nn.Module):
    """A LLaMA beside a numbered block that its forward never calls (a vision tower under text batches)."""

    def __init__(self):
        super().__init__()
        self.language = tiny_llama()
        self.tower = torch.nn.ModuleDict({"layers": torch.nn.ModuleList([torch.nn.Linear(8, 8)])})

    def forward(self, **batch):
        return self.language(**batch)


def test_targets_that_never_run_are_named_with_the_regex_that_leaves_them_out():
    import re

    model = IdleTower()
    with pytest.raises(SensiloraError, match=r"1 target module\(s\) never ran .*\['tower\.layers'\]") as error:
        calibrate(model, random_batches(), progress=False)
    regex = re.search(r"target_modules=r'([^']+)'", str(error.value)).group(1)
    assert regex == r"language\.model\.layers\.\d+\..*"
    assert len(calibrate(model, random_batches(), target_modules=regex, progress=False).module_names) == 14
    with pytest.raises(SensiloraError, match="leave them out with target_modules"):  # explicit: no regex advice
        calibrate(model, random_batches(), target_modules=["q_proj", "tower.layers.0"], progress=False)


def test_errors_are_clear():
    model = tiny_llama()
    with pytest.raises(SensiloraError, match="no module"):
        calibrate(model, random_batches(), target_modules=["nonexistent"], progress=False)
    with pytest.raises(SensiloraError, match="empty"):
        calibrate(model, [], progress=False)
    padding_only = random_batches()
    for batch in padding_only:
        batch["attention_mask"].zero_()
    with pytest.raises(SensiloraError, match="all padding"):
        calibrate(model, padding_only, progress=False)
    with pytest.raises(SensiloraError, match="mode"):
        calibrate(model, random_batches(), mode="full", progress=False)


def test_non_finite_activations_name_module_and_batch():
    model = tiny_llama()
    with torch.no_grad():  # a norm weight is not a target: the activations after it are the first to show it
        model.model.layers[1].post_attention_layernorm.weight[0] = float("inf")
    with pytest.raises(SensiloraError, match=r"model\.layers\.1\.mlp\.gate_proj.*batch 0"):
        calibrate(model, random_batches(), progress=False)


def test_non_finite_target_weights_are_named_before_calibrating():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(SensiloraError, match=r"hold NaN/Inf, e\.g\. \['model\.layers\.1\.mlp\.up_proj'\]"):
        calibrate(model, random_batches(), progress=False)


@pytest.mark.parametrize("mode", ["diag", "obs"])
def test_stats_save_load_round_trip(tmp_path, mode):
    stats = calibrate(tiny_gpt2(), random_batches(), mode=mode, progress=False)
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    loaded = SensitivityStats.load(path)
    assert loaded.module_names == stats.module_names and loaded.mode == mode
    assert loaded.module_inputs == stats.module_inputs and loaded.module_shapes == stats.module_shapes
    for name in stats.module_names:
        assert torch.equal(loaded.hessian_diag(name), stats.hessian_diag(name))
        if mode == "obs":
            assert torch.equal(loaded.inverse_hessian_diag(name), stats.inverse_hessian_diag(name))
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(SensiloraError, match="cannot read"):
        SensitivityStats.load(tmp_path / "junk.safetensors")


class SequenceFirst(torch.nn.Module):
    """A block that runs its linear layer on (seq, batch, d) activations, as some older models do."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(128, 8)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(8, 8)])

    def forward(self, input_ids, attention_mask=None):
        return self.layers[0](self.embed(input_ids).transpose(0, 1))


def test_sequence_first_inputs_are_refused_not_mis_masked():
    batch = {"input_ids": torch.randint(0, 128, (3, 5)), "attention_mask": torch.ones(3, 5, dtype=torch.long)}
    with pytest.raises(SensiloraError, match=r"token axes \(5, 3\) but the batch's attention_mask has shape \(3, 5\)"):
        calibrate(SequenceFirst(), [batch], progress=False)


class PackedLinear(torch.nn.Linear):
    """Stands in for bitsandbytes' Linear4bit (not installable on this CPU machine): an nn.Linear subclass
    whose stored weight is packed into another shape; in_features/out_features give the real one."""

    def __init__(self, d_in, d_out):
        super().__init__(d_in, d_out)
        self.weight = torch.nn.Parameter(torch.zeros(d_in * d_out // 2, 1), requires_grad=False)

    def forward(self, x):
        return x @ torch.ones(self.in_features, self.out_features)


def test_shapes_come_from_in_and_out_features():
    model = torch.nn.Sequential()
    model.add_module("blocks", torch.nn.ModuleList([PackedLinear(6, 10)]))
    model.forward = lambda input_ids: model.blocks[0](input_ids.float()[..., None].expand(-1, -1, 6))
    stats = calibrate(model, [torch.randint(0, 9, (2, 4))], progress=False)
    assert stats.module_shapes == {"blocks.0": (10, 6)}
    assert allocate(stats, avg_rank=2).ranks == {"blocks.0": 2}  # diag mode needs only the activations
    obs = calibrate(model, [torch.randint(0, 9, (2, 4))], mode="obs", progress=False)
    with pytest.raises(SensiloraError, match="stores its weight quantised .* use mode='diag'"):
        allocate(obs, avg_rank=2, model=model)
