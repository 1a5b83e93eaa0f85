"""HyperAdaLoRA (benchmarks/quality/hyperadalora.py) on a tiny random LLaMA: generated shapes, the update it
applies, where gradients go, and that pruning reaches AdaLoRA's target budget."""

import peft
import pytest
import torch
from torch.func import functional_call

from benchmarks.quality.hyperadalora import HyperAdaLoraModel, adapter_parameters, orthogonality_penalty
from tests.models import tiny_llama

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def hyper_model(steps=20, init_r=6, target_r=4, seed=0):
    torch.manual_seed(seed)
    config = peft.AdaLoraConfig(init_r=init_r, target_r=target_r, lora_alpha=8, target_modules=TARGETS,
                                task_type="CAUSAL_LM", total_step=steps, tinit=2, tfinal=5, deltaT=1)  # fmt: skip
    return HyperAdaLoraModel(peft.get_peft_model(tiny_llama(), config))


def batch(seed=0):
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def train_steps(model, steps, lr=1e-2):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        model(**batch(step)).loss.backward()
        optimizer.step()
        model.after_step(step)
        optimizer.zero_grad(set_to_none=True)


def test_generated_shapes_match_the_layers_and_start_at_adaloras_initialisation():
    model = hyper_model()
    generated = model.generate()
    layers = dict(model.inner.named_parameters())
    assert set(generated) == {n for n in layers if ".lora_" in n and n.endswith(".default")}
    for name, tensor in generated.items():
        assert tensor.shape == layers[name].shape and tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, layers[name], rtol=0, atol=0)  # zero-initialised output projection
    assert all(not layers[name].requires_grad for name in generated)


def test_the_update_is_p_diag_lambda_q():
    model = hyper_model()
    with torch.no_grad():  # move the generators off their identity start so P, Λ, Q are non-trivial
        for parameter in [*model.trunk.parameters(), *model.heads.parameters()]:
            parameter.add_(0.05 * torch.randn_like(parameter))
        generated = model.generate()
        ids = batch()["input_ids"]
        substituted = functional_call(model.inner, generated, args=(), kwargs={"input_ids": ids}, strict=False).logits
        for name, tensor in generated.items():  # the same adapter stored in peft's layers
            model.inner.get_parameter(name).copy_(tensor)
        torch.testing.assert_close(substituted, model.inner(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        name = next(n for n in generated if ".q_proj.lora_E." in n)
        P, E, Q = (generated[name.replace("lora_E", kind)] for kind in ("lora_B", "lora_E", "lora_A"))
        layer = model.inner.get_submodule(name.rsplit(".lora_E.", 1)[0])
        x = torch.randn(3, layer.in_features)
        update = P @ torch.diag(E.view(-1)) @ Q * layer.scaling["default"] / (layer.ranknum["default"] + 1e-5)
        torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ update.T, rtol=1e-5, atol=1e-6)


def test_gradients_reach_the_hypernetwork_not_the_generated_tensors():
    model = hyper_model()
    with torch.no_grad():  # zero heads (Λ = 0) would leave the trunk and P's, Q's heads without a gradient
        for parameter in model.heads.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    model.train()
    model(**batch()).loss.backward()
    for name, module in [("trunk", model.trunk), *model.heads.items()]:
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads) and all(g.abs().sum() > 0 for g in grads), name
    assert all(p.grad is None for n, p in model.inner.named_parameters() if ".lora_" in n)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("trunk.", "heads.")) for n in trainable)  # a causal LM: no head to train
    assert model.hypernetwork_parameters() == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert all(t.grad is not None for t in model._generated.values())  # kept for AdaLoRA's sensitivity


def test_after_step_writes_the_generated_adapter_into_the_layers():
    model = hyper_model()
    train_steps(model, 2)  # step 0 generates AdaLoRA's initialisation (Λ = 0), step 1 the first learned Θ
    model.eval()
    before = {n: p.clone() for n, p in model.inner.named_parameters() if ".lora_" in n}
    assert any(p.abs().sum() > 0 for n, p in before.items() if ".lora_E." in n)  # Λ moved off zero
    eval_loss = model(**batch()).loss  # plain peft forward on the stored adapter
    assert torch.isfinite(eval_loss)
    with pytest.raises(RuntimeError, match="after_step called without a training forward"):
        model.after_step(1)


def test_pruning_reaches_the_target_budget_and_masks_the_generated_singular_values():
    steps, init_r, target_r = 20, 6, 4
    model = hyper_model(steps, init_r, target_r)
    train_steps(model, steps)
    pattern = model.peft_model.peft_config["default"].rank_pattern
    layers = [n for n, _ in model.inner.named_parameters() if ".lora_E." in n]
    assert set(pattern) == set(layers)
    assert sum(sum(keep) for keep in pattern.values()) == target_r * len(layers)
    generated = model.generate()
    for name in layers:
        dropped = ~torch.tensor(pattern[name])
        assert (generated[name].view(-1)[dropped] == 0).all()
        assert (model.inner.get_parameter(name).view(-1)[dropped] == 0).all()
    shapes = {n: model.inner.get_submodule(n.rsplit(".lora_E.", 1)[0]) for n in layers}
    expected = sum(sum(pattern[n]) * (m.in_features + m.out_features + 1) for n, m in shapes.items())
    assert adapter_parameters(model.peft_model) == expected


def test_orthogonality_penalty_matches_peft_adalora():
    model = hyper_model()
    model.train()
    generated = model.generate()
    ours = orthogonality_penalty(generated)
    adalora = model.peft_model.base_model  # peft's AdaLoraModel adds orth_reg_weight x the same mean
    ids = batch()
    plain = model.inner(**ids).loss
    with_penalty = adalora(**ids).loss
    torch.testing.assert_close(with_penalty - plain, 0.5 * ours.detach(), rtol=1e-4, atol=1e-6)


def test_refuses_a_model_without_an_adalora_adapter():
    lora = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=TARGETS, task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="no AdaLoRA adapter"):
        HyperAdaLoraModel(lora)
