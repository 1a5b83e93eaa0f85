"""Which modules are adapted, and their weights in the ``y = x W^T`` convention."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable

import torch
from torch import nn

from ..errors import SensiloraError

try:  # transformers' GPT-2 style layer stores W transposed: (d_in, d_out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = ()

TargetSpec = str | Iterable[str] | None
_BLOCK_INDEX = re.compile(r"(^|\.)\d+(\.|$)")
# a mixture-of-experts router or gate by its last name part: Mixtral's `gate`, PhiMoE's `router`, Qwen2-MoE's
# `shared_expert_gate`; `gate_proj` (a gated MLP's input projection) is not one
_ROUTER_NAME = re.compile(r"(.*_)?(gate|router)")
ROUTER_WIDTH_RATIO = 8  # a router maps d_in features to one score per expert: at most d_in / 8 outputs


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or stores_weight_transposed(module)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of an ``nn.Linear`` (from ``out_features``/``in_features``, so that quantised
    subclasses such as bitsandbytes' ``Linear4bit``, whose packed weight has another shape, work) or a
    ``Conv1D`` (weight stored as (d_in, d_out))."""
    if stores_weight_transposed(module):
        return int(module.weight.shape[1]), int(module.weight.shape[0])
    return int(module.out_features), int(module.in_features)


def stores_weight_transposed(module: nn.Module) -> bool:
    """True for ``Conv1D`` (W stored as (d_in, d_out)): peft needs ``fan_in_fan_out=True`` for it."""
    return bool(Conv1D) and isinstance(module, Conv1D)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (d_out, d_in) (a transposed view for ``Conv1D``), without copying."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.T


REGEX_CHARACTERS = set("\\*+?()[]{}|^$")  # never in a module name: a value holding one is a regex


def target_spec(values: list[str] | None) -> TargetSpec:
    """Target names as a command line gives them (``--target-modules``), as ``find_targets`` takes them: None,
    one regex over full module names (a single value with a regex character: peft's meaning of a string), or
    a list of names / suffixes."""
    if not values or len(values) > 1 or not REGEX_CHARACTERS & set(values[0]):
        return values
    try:
        re.compile(values[0])
    except re.error as error:
        raise SensiloraError(f"target modules {values[0]!r} is not a valid regex ({error}); fix it or give names")
    return values[0]


def is_router(name: str, module: nn.Module) -> bool:
    """A mixture-of-experts router (or shared-expert gate): a layer named ``gate``, ``router``, ``*_gate`` or
    ``*_router`` whose output is at most ``d_in / ROUTER_WIDTH_RATIO`` wide (one score per expert). Left out
    of the default targets: an adapter there shifts which experts every token reaches, and common MoE
    fine-tuning recipes leave routers frozen; name one in ``target_modules`` to adapt it anyway."""
    d_out, d_in = linear_shape(module)
    return _ROUTER_NAME.fullmatch(name.rsplit(".", 1)[-1]) is not None and d_out * ROUTER_WIDTH_RATIO <= d_in


def _matches(name: str, module: nn.Module, spec: TargetSpec) -> bool:
    if spec is None:  # default: linear layers inside numbered transformer blocks, MoE routers excepted
        return bool(_BLOCK_INDEX.search(name)) and not is_router(name, module)
    if isinstance(spec, str):  # peft semantics: a string is a regex matched against the full name
        return re.fullmatch(spec, name) is not None
    return any(name == key or name.endswith("." + key) for key in spec)


def find_targets(model: nn.Module, target_modules: TargetSpec = None) -> dict[str, nn.Module]:
    """Adapted modules by their ``named_modules()`` name, in model order.

    ``target_modules``: None (every Linear/Conv1D inside a numbered block: not embeddings, lm_head,
    poolers, classifier heads or mixture-of-experts routers, ``is_router``), a regex matched against full
    names, or a list of names / name suffixes as peft's ``target_modules``.
    """
    if isinstance(target_modules, (list, tuple, set)) and not target_modules:
        raise SensiloraError("target_modules is empty: give module names, suffixes (e.g. 'q_proj') or a regex")
    found = {
        name: module
        for name, module in model.named_modules()
        if name and is_adaptable(module) and _matches(name, module, target_modules)
    }
    if not found:
        kinds = sorted({type(m).__name__ for _, m in model.named_modules() if is_adaptable(m)})
        raise SensiloraError(
            f"no module of {type(model).__name__} matches target_modules={target_modules!r} "
            f"(adaptable layer types present: {kinds or 'none'}); pass names or suffixes such as "
            "['q_proj', 'v_proj'] or a regex over full module names"
        )
    return found


def fused_expert_weights(model: nn.Module) -> list[str]:
    """Names of the 3-D expert weights of a mixture-of-experts model (transformers >= 5 keeps each MoE
    layer's experts as one ``(experts, d_out, d_in)`` parameter, not as ``nn.Linear`` layers): no target
    covers them, so Sensitivity-LoRA allocates no rank to them and they stay frozen."""
    return [name for name, parameter in model.named_parameters() if parameter.dim() == 3 and "expert" in name]


def unadapted_experts_note(model: nn.Module) -> str | None:
    """One line for the user where ``fused_expert_weights`` finds any (None otherwise): which, and what to do."""
    fused = fused_expert_weights(model)
    if not fused:
        return None
    return (
        f"{len(fused)} expert weights of this mixture-of-experts model (e.g. {fused[0]}) are fused 3-D "
        "parameters, not linear layers: no rank is allocated to them and they stay frozen; to adapt them, pass "
        "target_parameters=[...] to sensilora.get_peft_model or lora_config (peft >= 0.17; uniform rank avg_rank, "
        "outside the allocation's budget)"
    )


def block_prefix(name: str) -> str:
    """The part of a module name before its block index (``model.vision_tower.encoder.layers`` for
    ``model.vision_tower.encoder.layers.0.mlp.fc1``); the whole name outside numbered blocks."""
    match = _BLOCK_INDEX.search(name)
    return name[: match.start()] if match else name


def never_ran_message(missing: list[str], ran: list[str], default_targets: bool) -> str:
    """One line for targets that saw no calibration token: where they are and what to do. ``default_targets``:
    whether the targets were the default (then a regex selecting only the blocks that ran is the remedy)."""
    where, ran_in = {block_prefix(name) for name in missing}, {block_prefix(name) for name in ran}
    head = f"{len(missing)} target module(s) never ran during calibration, under {sorted(where)[:3]}"
    head += f" (e.g. {missing[0]})"
    kept = sorted(ran_in - where)
    if not default_targets or not kept or ran_in & where:  # blocks that partly ran: no regex leaves them out
        return f"{head}: the calibration batches never reach them; leave them out with target_modules"
    regex = f"({'|'.join(re.escape(prefix) for prefix in kept)})" if len(kept) > 1 else re.escape(kept[0])
    regex += r"\.\d+\..*"
    return (
        f"{head}: the calibration batches never reach them (a vision tower fed text only?); adapt only the "
        f"blocks that ran: target_modules=r'{regex}' (command line: --target-modules '{regex}')"
    )


def layer_and_kind(name: str) -> tuple[int | None, str]:
    """Split ``model.layers.3.self_attn.q_proj`` into (3, 'self_attn.q_proj') for tables and plots."""
    parts = name.split(".")
    for index, part in enumerate(parts):
        if part.isdigit():
            return int(part), ".".join(parts[index + 1 :]) or name
    return None, name


def check_weights_finite(targets: dict[str, nn.Module]) -> None:
    """Refuse target modules whose (floating point) weights hold NaN/Inf, by name, before any forward pass:
    they would poison the statistics silently in diag mode and break the inverse in obs mode. Weights
    offloaded by accelerate (``meta`` until their forward) are left to the per-batch activation check."""
    bad = [
        name
        for name, module in targets.items()
        if torch.is_floating_point(module.weight)
        and module.weight.device.type != "meta"
        and not bool(torch.isfinite(module.weight).all())
    ]
    if bad:
        raise SensiloraError(
            f"the weights of {len(bad)} target module(s) hold NaN/Inf, e.g. {bad[:3]}: the checkpoint is damaged; "
            "reload or re-download the model"
        )


def weights_loaded(module: nn.Module):
    """A context in which ``module``'s own weights are real tensors: for a module whose weights accelerate
    offloaded (``device_map`` with CPU/disk offload: ``meta`` outside its forward), accelerate's
    ``align_module_device`` loads them for the duration; any other module as it is."""
    if getattr(module, "_hf_hook", None) is None:
        return contextlib.nullcontext()
    from accelerate.utils import align_module_device

    return align_module_device(module)
