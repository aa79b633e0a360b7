"""From ``--device``, ``--target`` and ``--engines`` to an :class:`ExecutionTarget`, checked before
any bundle is opened (the library entry point for the CLI and for ``serve``)."""

from __future__ import annotations

import os
from pathlib import Path

from dymoe.bundle.errors import InputError
from dymoe.targets.devices import load_device
from dymoe.targets.providers import DEVICES, ExecutionTarget


def ort_cache_dir(profile_name: str | None) -> Path:
    """Where ONNX Runtime's TensorRT provider keeps the engines and timing cache it builds itself."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "dymoe" / "ort-tensorrt" / (profile_name or "default")


def execution_target(device: str = "cpu", profile: str | None = None, engines: str | Path | None = None,
                     check: bool = True) -> ExecutionTarget:
    """``device`` cpu | cuda | tensorrt; ``profile`` a device profile name or .toml (its memory, versions
    and provider options); ``engines`` a ``dymoe build-engines`` folder, or "auto" for the profile's
    default one. ``check`` asks the machine whether the device can run (``runtime/device.py``)."""
    if device not in DEVICES:
        raise InputError(f"unknown --device {device!r}", f"choose {', '.join(DEVICES)}")
    prof = load_device(profile) if profile else None
    folder = None
    if engines is not None:
        if device != "tensorrt":
            raise InputError("--engines holds TensorRT engines: it needs --device tensorrt",
                             "add --device tensorrt, or drop --engines")
        if engines == "auto":
            if prof is None:
                raise InputError("--engines auto needs --target PROFILE (engines are built per device)",
                                 "add --target orin-nano-8gb (or your profile), or give the engine folder")
            from .trt_engines import default_dir

            folder = default_dir(prof.name)
        else:
            folder = Path(engines)
    target = ExecutionTarget(device, prof, cache_dir=None if device == "cpu" else ort_cache_dir(prof and prof.name),
                             engines=folder)
    if check:
        from .device import check_device

        check_device(target)
    return target
