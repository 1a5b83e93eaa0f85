"""Ranks into the training stacks people use: a peft adapter directory, a LoraConfig dict, an axolotl fragment.

The adapter directory is what every tool that resumes from an adapter understands
(``PeftModel.from_pretrained(base, DIR, is_trainable=True)``: TRL, the HF Trainer, LLaMA-Factory, unsloth,
axolotl's ``lora_model_dir``). Its ``adapter_config.json`` keeps only keys that peft 0.15 (the oldest peft
whose pattern matching sensilora supports) accepts, where a newer key holds its default; the weights carry
LoRA's usual initialisation (B = 0: the adapted model starts equal to the base).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from safetensors import SafetensorError
from torch import nn

from ..allocation.result import RankAllocation
from ..errors import SensiloraError
from ..io import clean_stale_temporaries, create_parents, remove_created, temporary_path
from .lora import get_peft_model, lora_config

FORMATS = ("peft", "json", "axolotl")
# LoraConfig and PeftConfig fields of peft 0.15 (older loaders reject keys they do not know).
PEFT_0_15_KEYS = frozenset(
    [
        "r",
        "target_modules",
        "exclude_modules",
        "lora_alpha",
        "lora_dropout",
        "fan_in_fan_out",
        "bias",
        "use_rslora",
        "modules_to_save",
        "init_lora_weights",
        "layers_to_transform",
        "layers_pattern",
        "rank_pattern",
        "alpha_pattern",
        "megatron_config",
        "megatron_core",
        "trainable_token_indices",
        "loftq_config",
        "eva_config",
        "corda_config",
        "use_dora",
        "layer_replication",
        "runtime_config",
        "lora_bias",
        "task_type",
        "peft_type",
        "auto_mapping",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
    ]
)


def portable_adapter_config(config: dict) -> dict:
    """``config`` without the keys peft 0.15 would reject, where they hold the current peft's defaults."""
    import peft

    defaults = {f.name: f.default for f in dataclasses.fields(peft.LoraConfig) if f.default is not dataclasses.MISSING}
    defaults.update(
        {
            f.name: f.default_factory()
            for f in dataclasses.fields(peft.LoraConfig)
            if f.default_factory is not dataclasses.MISSING
        }
    )
    defaults["peft_version"] = config.get("peft_version")  # metadata only: always dropped
    return {key: value for key, value in config.items() if key in PEFT_0_15_KEYS or value != defaults.get(key, value)}


def ranks_from_adapter_config(config: dict, module_names: list[str]) -> dict[str, int]:
    """The rank peft will give each of ``module_names`` under ``config`` (its own pattern matching)."""
    from peft.utils.other import get_pattern_key

    pattern = config.get("rank_pattern") or {}
    return {name: int(pattern.get(get_pattern_key(pattern.keys(), name), config["r"])) for name in module_names}


def check_adapter_dir(out_dir: str | os.PathLike) -> Path:
    """Refuse an adapter directory that exists (other than empty), is a symlink, or cannot be created."""
    out_dir = Path(out_dir)
    if out_dir.is_symlink():
        raise SensiloraError(f"{out_dir} is a symlink; give the path of a new directory for the adapter")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise SensiloraError(f"{out_dir} exists and is not an empty directory; give a new directory for the adapter")
    ancestor = out_dir.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise SensiloraError(f"cannot create the adapter directory {out_dir}: {ancestor} is not a writable directory")
    return out_dir


def _apply_umask(directory: Path) -> None:
    """Give a staged directory and its files the modes a plain mkdir/open would have (mkdtemp makes 0700)."""
    mask = os.umask(0)
    os.umask(mask)
    directory.chmod(0o777 & ~mask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def export_peft(allocation: RankAllocation, model: nn.Module, out_dir: str | os.PathLike, **lora_kwargs) -> Path:
    """Write a peft adapter directory for ``allocation`` on ``model`` (atomically: a temporary directory
    renamed into place), check every rank as peft will read it back, and return the directory."""
    out_dir = check_adapter_dir(out_dir)
    allocation = allocation.for_model(model)  # the names the adapter will carry
    peft_model = get_peft_model(model, allocation, **lora_kwargs)
    created: list[Path] = []  # the directories above out_dir made here: removed again if the export fails
    try:
        create_parents(out_dir, created)
        clean_stale_temporaries(out_dir)
        staging = temporary_path(out_dir, "staging", directory=True)
    except OSError as error:
        remove_created(created)
        raise SensiloraError(f"cannot create the adapter directory {out_dir}: {error.strerror or error}") from None
    try:
        peft_model.save_pretrained(staging)
        config_path = staging / "adapter_config.json"
        config = portable_adapter_config(json.loads(config_path.read_text(encoding="utf-8")))
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        wanted = allocation.ranks
        got = ranks_from_adapter_config(config, list(wanted))
        if got != wanted:
            wrong = {n: (got[n], r) for n, r in wanted.items() if got[n] != r}
            raise SensiloraError(
                f"the exported adapter config would give wrong ranks (got, wanted): {dict(list(wrong.items())[:3])}"
            )
        _apply_umask(staging)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(staging, out_dir)
    except (OSError, SafetensorError) as error:  # a full disk: safetensors raises its own type
        raise SensiloraError(f"writing the adapter {out_dir} failed ({error}); nothing was written") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging)
            remove_created(created)
    return out_dir


def lora_config_dict(allocation: RankAllocation, **lora_kwargs) -> dict:
    """The plain ``LoraConfig`` (as a JSON-ready dict) carrying the ranks, for ``LoraConfig(**d)``."""
    config = lora_config(allocation, **lora_kwargs).to_dict()
    return portable_adapter_config({k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()})


def axolotl_fragment(allocation: RankAllocation, adapter_dir: str) -> str:
    """A YAML fragment for axolotl. axolotl's config reference has no per-module rank option that we found,
    so the ranks travel in the adapter directory, which axolotl resumes from with ``lora_model_dir``."""
    names = sorted({name.rsplit(".", 1)[-1] for name in allocation.ranks})
    return "\n".join(
        [
            "# Sensitivity-LoRA ranks for axolotl: axolotl takes one lora_r, so the per-module ranks come from the",
            f"# adapter directory written by `sensilora export ... --to peft {adapter_dir}` (lora_model_dir).",
            "adapter: lora",
            f"lora_model_dir: {adapter_dir}",
            f"lora_r: {allocation.avg_rank}  # the average; every module's own rank is in the adapter",
            f"lora_alpha: {2 * allocation.avg_rank}",
            "lora_target_modules:",
            *[f"  - {name}" for name in names],
            "",
        ]
    )


def export_text(allocation: RankAllocation, to: str, adapter_dir: str = "sensilora-adapter", **lora_kwargs) -> str:
    """The text of a ``json`` or ``axolotl`` export."""
    if to == "json":
        return json.dumps(lora_config_dict(allocation, **lora_kwargs), indent=2, sort_keys=True) + "\n"
    if to == "axolotl":
        return axolotl_fragment(allocation, adapter_dir)
    raise SensiloraError(f"export format must be one of {', '.join(FORMATS)}; got {to!r}")
