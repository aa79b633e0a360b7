"""Device profiles (``device_profiles/*.toml``): what dymoe needs to know of a board to run on its GPU.

Memory (all of it, and what is left for dymoe), whether CPU and GPU share it (Jetson: one DRAM,
so "device memory" and "host memory" are the same budget), storage read speed, the GPU's compute
capability (TensorRT engines are built for it), the JetPack / CUDA / TensorRT / Python versions
the profile was written for, what its ONNX Runtime can run, the TensorRT optimisation profile of
an expert graph, and provider options. Read strictly: an unknown key is an error naming it.

    dymoe check BUNDLE --target orin-nano-8gb
    dymoe run BUNDLE -p "..." --device tensorrt --target orin-nano-8gb
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from dymoe.bundle.compat import tomllib
from dymoe.bundle.errors import BundleError, InputError
from dymoe.bundle.strict import from_dict


@dataclass(frozen=True)
class Software:
    jetpack: str
    cuda: str
    tensorrt: str
    python: str
    onnxruntime: str  # the oldest onnxruntime-gpu the capabilities below hold for


@dataclass(frozen=True)
class StorageFacts:
    read_mb_per_s: float
    latency_ms: float


@dataclass(frozen=True)
class Capabilities:
    cuda_matmulnbits_bits: list[int] = field(default_factory=lambda: [4, 8])  # what its CUDA provider runs


@dataclass(frozen=True)
class EngineShapes:
    """TensorRT optimisation profile of an expert graph's input ``x [T, H]``: T from min to max."""

    min_tokens: int = 1
    opt_tokens: int = 1
    max_tokens: int = 256


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    unified_memory: bool  # CPU and GPU share one DRAM (every Jetson)
    memory_gib: float
    usable_memory_gib: float  # left for dymoe: resident experts, backbone, KV cache, runtime
    memory_bandwidth_gb_s: float
    compute_capability: str  # "8.7" for Orin
    software: Software
    storage: StorageFacts
    capabilities: Capabilities = field(default_factory=Capabilities)
    engines: EngineShapes = field(default_factory=EngineShapes)
    tensorrt: dict[str, Any] = field(default_factory=dict)  # ONNX Runtime TensorRT provider options
    cuda: dict[str, Any] = field(default_factory=dict)  # ONNX Runtime CUDA provider options

    @property
    def usable_bytes(self) -> int:
        return int(self.usable_memory_gib * 2**30)

    @property
    def sm(self) -> str:
        """The compute capability as ONNX Runtime's TensorRT provider writes it ("87")."""
        return self.compute_capability.replace(".", "")

    def describe(self) -> str:
        s = self.software
        return (f"{self.description} ({self.memory_gib:g} GB {'unified ' if self.unified_memory else ''}memory, "
                f"{self.usable_memory_gib:g} GB usable; JetPack {s.jetpack}, CUDA {s.cuda}, TensorRT {s.tensorrt}, "
                f"Python {s.python})")


def _folder():
    return resources.files("dymoe.targets") / "device_profiles"


def available_devices() -> list[str]:
    return sorted(p.name[:-5] for p in _folder().iterdir() if p.name.endswith(".toml"))


def load_device(name_or_path: str) -> DeviceProfile:
    """A shipped profile by name (``orin-nano-8gb``) or a ``.toml`` file of the same shape."""
    path = Path(name_or_path)
    source = path if path.suffix == ".toml" and path.is_file() else _folder() / f"{name_or_path}.toml"
    try:
        data = tomllib.loads(source.read_text(encoding="utf-8"))
    except (FileNotFoundError, IsADirectoryError):
        raise InputError(f"unknown device profile {name_or_path!r}",
                         f"choose one of {', '.join(available_devices())}, or pass a .toml file") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise InputError(f"device profile {name_or_path} is not valid TOML ({e})", "fix the file") from None
    try:
        profile = from_dict(DeviceProfile, data, label=f"device profile {name_or_path}")
    except BundleError as e:
        raise InputError(e.message, "compare it with a shipped profile, e.g. "
                                    "dymoe/targets/device_profiles/orin-nano-8gb.toml") from None
    problems = profile_problems(profile)
    if problems:
        raise InputError(f"device profile {name_or_path}: {problems[0]}", "fix the file")
    return profile


def profile_problems(p: DeviceProfile) -> list[str]:
    """Every impossible value of a profile, in words (empty: fine)."""
    out = []
    if not 0 < p.usable_memory_gib <= p.memory_gib:
        out.append(f"usable_memory_gib {p.usable_memory_gib:g} must be above 0 and at most memory_gib {p.memory_gib:g}")
    if p.memory_bandwidth_gb_s <= 0 or p.storage.read_mb_per_s <= 0 or p.storage.latency_ms < 0:
        out.append("memory_bandwidth_gb_s and storage.read_mb_per_s must be positive, storage.latency_ms not negative")
    e = p.engines
    if not 1 <= e.min_tokens <= e.opt_tokens <= e.max_tokens:
        out.append(f"engines: need 1 <= min_tokens <= opt_tokens <= max_tokens, got {e.min_tokens}, "
                   f"{e.opt_tokens}, {e.max_tokens}")
    if any(b not in (2, 4, 8) for b in p.capabilities.cuda_matmulnbits_bits):
        out.append("capabilities.cuda_matmulnbits_bits may list 2, 4 and 8 only")
    parts = p.compute_capability.split(".")
    if len(parts) != 2 or not all(x.isdigit() for x in parts):
        out.append(f"compute_capability {p.compute_capability!r} must look like 8.7")
    return out
