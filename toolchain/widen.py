"""A function-preserving widening of a MoE checkpoint: realistic expert sizes with trained routing.

The shipped demo model's experts are a few KB, so offloading them measures engine creation and
Python, not storage; random-weight synthetic models have realistic sizes but no trained routing
and no accuracy. Widening gives both: every routed expert's intermediate neuron i is copied
``factor`` times. SwiGLU works per neuron, ``y = sum_i down[:, i] * silu(gate_i . x) * (up_i . x)``,
so repeating gate and up rows i makes every copy compute the same h_i, and splitting down's
column i over the copies with positive shares that sum to one (drawn per neuron, seeded) gives
back ``down[:, i] * h_i``. The widened model computes the same function (up to float rounding)
with experts ``factor`` times larger, and its routing is the trained one.

Dimensions: H hidden, I intermediate, k = factor, so the widened intermediate is I * k.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from dymoe.bundle.errors import CheckpointError
from dymoe.bundle.safetensors_io import write_safetensors

from .archs import get_architecture
from .checkpoint import TOKENIZER_FILES, Checkpoint

# config.json key of the routed experts' intermediate size, per architecture
INTERMEDIATE_KEY = {"mixtral": "intermediate_size", "olmoe": "intermediate_size",
                    "qwen2_moe": "moe_intermediate_size", "qwen3_moe": "moe_intermediate_size",
                    "deepseek_v2": "moe_intermediate_size", "deepseek_v3": "moe_intermediate_size"}


def widen_expert(gate: np.ndarray, up: np.ndarray, down: np.ndarray, factor: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``gate, up [I, H]``, ``down [H, I]`` -> ``[I*k, H]``, ``[I*k, H]``, ``[H, I*k]`` (float32):
    neuron i becomes rows i*k .. i*k+k-1, down's column i is split by positive shares summing to 1."""
    I = gate.shape[0]
    shares = rng.dirichlet(np.ones(factor), size=I).astype(np.float64)  # [I, k], rows sum to 1
    wide_down = (down.astype(np.float64)[:, :, None] * shares[None, :, :]).reshape(down.shape[0], I * factor)
    return (np.repeat(gate.astype(np.float32), factor, axis=0), np.repeat(up.astype(np.float32), factor, axis=0),
            wide_down.astype(np.float32))


def _layer_of(canon: str) -> int:
    """The layer of a canonical tensor name; -1 for embeddings, final norm and head."""
    return int(canon.split(".")[1]) if canon.startswith("layers.") else -1


def widen_checkpoint(src: Path, out: Path, factor: int, seed: int = 0) -> Path:
    """Write the widened checkpoint of ``src`` (float32 safetensors, one shard per layer, with
    config and tokenizer) to ``out``; deterministic for a given seed."""
    if factor < 1:
        raise CheckpointError(f"widening factor {factor} must be at least 1", "use 1 (a copy) or more")
    src, out = Path(src), Path(out)
    ckpt = Checkpoint(src)
    arch = get_architecture(ckpt.model_type)
    if ckpt.model_type not in INTERMEDIATE_KEY:
        raise CheckpointError(f"widening does not know {ckpt.model_type}", "widen a model of a known architecture")
    settings = arch.read_config(ckpt.config)
    mapping = arch.tensor_map(settings, set(ckpt.names()))
    if any(r.index is not None for r in mapping.values()):
        raise CheckpointError("widening reads one tensor per expert matrix (not the fused in-memory form)",
                              "save the checkpoint with transformers' save_pretrained")
    by_source = {ref.source: canon for canon, ref in mapping.items()}
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    weight_map: dict[str, str] = {}
    d = settings.decoder
    for layer in range(-1, d.num_layers):  # -1: the tensors outside every layer
        shard = "model-other.safetensors" if layer < 0 else f"model-layer{layer:03d}.safetensors"
        tensors: dict[str, np.ndarray] = {}
        prefix = f"layers.{layer}."
        for name in sorted(ckpt.names()):
            canon = by_source[name]
            if _layer_of(canon) == layer and ".experts." not in canon:  # experts: below, one by one
                tensors[name] = ckpt.read(name)
        if layer >= 0 and layer in d.moe_layers:
            for e in range(d.num_experts):
                names = {k: mapping[f"{prefix}experts.{e}.{k}"].source for k in ("gate", "up", "down")}
                wide = widen_expert(*(ckpt.read(names[k]) for k in ("gate", "up", "down")), factor, rng)
                tensors.update(zip((names["gate"], names["up"], names["down"]), wide, strict=True))
        write_safetensors(out / shard, tensors, "F32")
        weight_map.update({name: shard for name in tensors})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = dict(ckpt.config)
    key = INTERMEDIATE_KEY[ckpt.model_type]
    config[key] = int(config[key]) * factor
    config["dtype"] = "float32"
    config["dymoe_widened"] = {"factor": factor, "seed": seed, "source_intermediate": int(ckpt.config[key])}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    return out
