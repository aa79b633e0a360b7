"""Export settings and their defaults, declared once (the CLI shows them in --help; this module
imports nothing heavy)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dymoe.bundle.errors import InputError
from dymoe.bundle.precisions import BACKBONE_PRECISIONS, EXPORT_TARGETS, highest_first
from dymoe.bundle.precisions import PRECISIONS as ALL_PRECISIONS
from dymoe.bundle.progress import ProgressFn

PRECISIONS = ("fp16", "int8", "int4", "int2")  # the export ladder; tests add fp32
BLOCK_SIZE = 32  # chosen by measurement, see README "Quantization"
# Data-free, and closer to fp32 than round-to-nearest on the demo model (README "Quantizers");
# gptq needs calibration inputs (dymoe.pipelines runs it).
QUANTIZER = "hqq"
QUANTIZERS = ("rtn", "hqq", "gptq")
DATA_FREE = ("rtn", "hqq")  # quantizers the export itself runs
GPTQ_MIN_TOKENS = 64  # experts with fewer routed calibration tokens fall back to hqq
WORKERS = 1
# the ONNX forms written: "ort" (portable: asymmetric QDQ, --block-size) or "tensorrt" (symmetric
# fp16-scaled INT4 and fp16 arithmetic for TensorRT, MatMulNBits int8/int2 for ORT's CUDA provider)
TARGET = "ort"
TARGETS = tuple(EXPORT_TARGETS)
# The backbone's linear weights (attention, shared experts, dense MLPs; embedding table and LM head at
# most int8). int8 by measurement (README "Backbone precision"): 2.8x less resident than float32 (a
# Qwen3-30B-A3B backbone 2.1 GiB instead of 5.8), perplexity within 0.01 % and 99.2 % top-1
# agreement on the demo model; int4 saves another 0.5 GiB for 5x that error, and fp16 linears are
# upcast by ONNX Runtime (resident as float32).
BACKBONE_PRECISION = "int8"
# A graph whose tensors pass this many bytes keeps its largest ones in ONNX external data beside it
# (a protobuf cannot exceed 2 GiB; 1 GiB leaves room for the graph itself). Tests make it tiny.
EXTERNAL_DATA_BYTES = 1 << 30


@dataclass(frozen=True)
class ExportOptions:
    precisions: tuple[str, ...] = PRECISIONS
    block_size: int = BLOCK_SIZE
    workers: int = WORKERS
    force: bool = False
    quantizer: str = QUANTIZER  # rtn or hqq; gptq is a pipeline over export, calibrate and requantize
    progress: ProgressFn | None = field(default=None, compare=False)
    # what else the bundle depends on (a pipeline's later stages): part of the export's fingerprint
    fingerprint_extra: tuple[tuple[str, str], ...] = ()
    reserve_bytes: int = 0  # disk space a pipeline's later stages will need in the bundle (checked up front)
    target: str = TARGET  # which ONNX forms (bundle.precisions.EXPORT_TARGETS)
    backbone_precision: str = BACKBONE_PRECISION  # bundle.precisions.BACKBONE_PRECISIONS
    external_data_bytes: int = EXTERNAL_DATA_BYTES

    @property
    def formats(self) -> dict[str, str]:
        """precision -> ONNX form written (manifest ``quantization.formats``)."""
        return EXPORT_TARGETS[self.target]

    def validate(self) -> tuple[str, ...]:
        """The precisions to write, highest first; a clear error for any impossible setting."""
        unknown = [p for p in self.precisions if p not in ALL_PRECISIONS]
        if unknown or not self.precisions:
            raise InputError(
                f"unknown precision(s) {', '.join(unknown) or '(none given)'}",
                f"choose from {', '.join(ALL_PRECISIONS)}",
            )
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise InputError(f"--block-size {self.block_size} must be a power of two >= 16",
                             "for example --block-size 32")
        if self.workers < 1:
            raise InputError(f"--workers {self.workers} must be at least 1", "for example --workers 2")
        if self.quantizer not in DATA_FREE:
            raise InputError(f"the export quantizes with {' or '.join(DATA_FREE)}, not {self.quantizer!r}",
                             "gptq runs as dymoe export --quantizer gptq --calibration-data FILE")
        if self.target not in TARGETS:
            raise InputError(f"unknown export --target {self.target!r}",
                             f"choose {' or '.join(TARGETS)} (device profiles such as orin-nano-8gb are for check, "
                             "run and build-engines; a Jetson's bundle is exported with --target tensorrt)")
        if self.backbone_precision not in BACKBONE_PRECISIONS:
            raise InputError(f"unknown --backbone-precision {self.backbone_precision!r}",
                             f"choose from {', '.join(BACKBONE_PRECISIONS)}")
        if self.external_data_bytes < 0:
            raise InputError(f"external data threshold {self.external_data_bytes} must not be negative",
                             "give the bytes of tensors a graph file may hold itself (default 1 GiB)")
        return highest_first(self.precisions)
