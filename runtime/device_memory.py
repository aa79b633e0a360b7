"""Memory on a GPU target: what one resident expert engine costs there, and whether a run fits the
device's usable memory.

On the CPU the budget counts the RSS an engine really adds (measured, ``costs.py``). On a GPU an
engine's weights live in device memory in the form its graph stores them: fp16 stays fp16, INT4
and MatMulNBits codes stay packed (TensorRT's INT4 GEMM and ORT's MatMulNBits read them packed),
except that a ``float`` fp16 graph's Cast is folded into an fp32 copy (twice the bytes). Each
engine also holds its activations for the largest token chunk. These are estimates from the
bundle's own file sizes, not measurements: no GPU was at hand when they were written (README).

On unified memory (every Jetson) device memory *is* the DRAM: experts, backbone, KV cache and
runtime buffers share the profile's usable memory, and the run is refused up front when its
budget cannot fit beside the rest.
"""

from __future__ import annotations

from dymoe.bundle.errors import InputError
from dymoe.bundle.manifest import Manifest
from dymoe.bundle.precisions import BITS
from dymoe.targets.devices import DeviceProfile
from dymoe.targets.providers import ExecutionTarget

RUNTIME_RESERVE = 256 * 2**20  # ONNX Runtime, CUDA context and arena slack beside the counted tensors (estimate)


def activation_bytes(manifest: Manifest, precision: str, fmt: str, max_tokens: int) -> int:
    """One expert's intermediate tensors for ``max_tokens`` rows: gate, up, h [T, I] and y [T, H]."""
    s = manifest.model
    width = 2 if fmt in ("float16", "qdq_sym_int4_fp16") else 4
    return max_tokens * (3 * s.expert_intermediate_size + 2 * s.hidden_size) * width


def device_costs(manifest: Manifest, target: ExecutionTarget) -> dict[str, int]:
    """Per precision, the device bytes of one resident expert engine (the largest over experts)."""
    out = {}
    q = manifest.quantization
    for p in q.precisions:
        fmt = q.formats[p]
        weights = max(manifest.files[e.variants[p].path].bytes for e in manifest.experts)
        if p == "fp16" and fmt == "float":
            weights *= 2  # the fp16 -> fp32 Cast is folded into an fp32 copy
        out[p] = weights + activation_bytes(manifest, p, fmt, target.shapes.max_tokens)
    return out


# ONNX Runtime's CPU MatMulNBits keeps its weights prepacked for its int8-activation kernel, larger than
# the file (measured on the Qwen3-30B-A3B shape, resident after the heap is trimmed: x1.24 for int8
# codes in blocks of 32, x1.41 for int4); its CUDA kernel reads the codes as stored.
PREPACKED = {"int8": 1.24, "int4": 1.41}


def backbone_bytes(manifest: Manifest, prepacked: bool = True) -> int:
    """The backbone resident: its graphs and their external data as stored, except that ONNX Runtime
    folds the Cast of an fp16 linear weight into a float32 copy (twice the bytes; an fp16 embedding
    table is read by a Gather and stays fp16) and, with ``prepacked`` (the CPU), packs quantized linear
    weights for its kernel (:data:`PREPACKED`). An estimate from the files, within a few percent of the
    RSS measured by ``benchmarks/backbone_size.py``."""
    bb, files = manifest.backbone, manifest.files

    def size(rel: str) -> int:
        return files[rel].bytes + sum(files[d].bytes for d in bb.external_data.get(rel, ()))

    def factor(precision: str) -> float:
        return 2.0 if precision == "fp16" else PREPACKED.get(precision, 1.0) if prepacked else 1.0

    vocab = size(bb.embed) + factor(bb.lm_head) * size(bb.head)
    return round(vocab + factor(bb.precision) * sum(size(r) for r in bb.layers) + sum(size(r) for r in bb.routers))


def kv_bytes(manifest: Manifest) -> int:
    """The float32 KV cache at the model's full context (the most a run can hold)."""
    return manifest.model.kv_bytes_per_token() * manifest.model.max_position_embeddings


def fit_problem(profile: DeviceProfile, experts: int, backbone: int, kv: int) -> str | None:
    """Pure: why ``experts`` + ``backbone`` + ``kv`` bytes (+ the runtime reserve) cannot fit the
    profile's usable memory, or None when they do."""
    total = experts + backbone + kv + RUNTIME_RESERVE
    if total <= profile.usable_bytes:
        return None
    mib = lambda n: f"{n / 2**20:,.0f} MiB"  # noqa: E731
    shared = "unified memory: experts, backbone, KV cache and runtime share one DRAM" if profile.unified_memory \
        else "device memory"
    return (f"experts {mib(experts)} + backbone {mib(backbone)} + KV cache {mib(kv)} + runtime {mib(RUNTIME_RESERVE)} "
            f"= {mib(total)}, more than the {profile.usable_memory_gib:g} GiB usable on {profile.name} ({shared})")


def check_fits(manifest: Manifest, profile: DeviceProfile | None, expert_bytes: int, what: str) -> None:
    """Refuse a run whose resident experts (``expert_bytes``: the budget, or every expert at one
    precision) cannot fit beside the rest on the target device."""
    if profile is None:
        return
    problem = fit_problem(profile, expert_bytes, backbone_bytes(manifest), kv_bytes(manifest))
    if problem:
        low = [p for p in manifest.quantization.precisions if p in BITS]
        raise InputError(f"{what} does not fit {profile.name}: {problem}",
                         "lower --budget, or use a lower precision" + (f" ({', '.join(low)})" if low else ""))
