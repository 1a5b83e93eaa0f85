"""Integrations: allocations into the tools people train and inspect with: peft (``lora``: a LoraConfig and
a verified wrap), adapter directories and configs (``export``), plots (``plots``), the report and the
summary table (``report``), and comparisons of two allocations (``compare``)."""

from .lora import get_peft_model, lora_config, verify_ranks

__all__ = ["get_peft_model", "lora_config", "verify_ranks"]
