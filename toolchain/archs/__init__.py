"""Supported architectures, one module each, named after the Hugging Face ``model_type``
(``base.py`` says what a module provides and holds what they share)."""

from __future__ import annotations

from types import ModuleType

from dymoe.bundle.errors import CheckpointError

from . import deepseek_v2, deepseek_v3, mixtral, olmoe, qwen2_moe, qwen3_moe

ARCHITECTURES: dict[str, ModuleType] = {
    m.MODEL_TYPE: m for m in (mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3)}


def get_architecture(model_type: str) -> ModuleType:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise CheckpointError(
            f"unknown architecture model_type={model_type!r}; dymoe supports: "
            f"{', '.join(sorted(ARCHITECTURES))}",
            "check config.json's model_type, or ask for this architecture to be added",
        ) from None
