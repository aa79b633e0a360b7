"""Where each file of a bundle lives: the names export writes, and everything else reads through
manifest.json (the runtime never derives a path from these; only writers name files).

L layer, E expert, P precision; three digits each so that listings sort.
"""

from __future__ import annotations

MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".dymoe.lock"  # the writers' flock (lock.py)
EXPORT_JOURNAL = ".dymoe-export.jsonl"  # finished files of an unfinished export
REQUANTIZE_JOURNAL = ".dymoe-requantize.jsonl"  # new variants of an unfinished requantize
JOURNALS = (EXPORT_JOURNAL, REQUANTIZE_JOURNAL)

EMBED = "backbone/embed.onnx"
HEAD = "backbone/head.onnx"
TOKENIZER_DIR = "tokenizer"
CALIBRATION_NAME = "calibration.json"  # written by dymoe calibrate, listed in manifest.json
INPUTS_DIRNAME = "calibration-inputs"  # calibrate --collect-inputs: one safetensors file per layer
REPORT_DIRNAME = "calibration-report"  # the calibration report's default folder, inside the bundle


def layer_path(layer: int) -> str:
    return f"backbone/layer_{layer:03d}.onnx"


def router_path(layer: int) -> str:
    return f"backbone/router_{layer:03d}.onnx"


def expert_path(layer: int, expert: int, precision: str) -> str:
    return f"experts/layer_{layer:03d}/expert_{expert:03d}.{precision}.onnx"


def variant_path(layer: int, expert: int, precision: str, quantizer: str, tag: str) -> str:
    """A requantized variant: a new name per run, so the bundle stays valid until the switch."""
    return f"experts/layer_{layer:03d}/expert_{expert:03d}.{precision}.{quantizer}-{tag}.onnx"


def tokenizer_path(name: str) -> str:
    return f"{TOKENIZER_DIR}/{name}"


def inputs_path(layer: int) -> str:
    return f"{INPUTS_DIRNAME}/layer_{layer:03d}.safetensors"


def external_data_path(graph: str) -> str:
    """The ONNX external data file of ``graph`` (its largest tensors), beside it."""
    return f"{graph}.data"
