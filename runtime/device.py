"""Can this machine run ``--device cuda`` or ``--device tensorrt``? Asked once per process, before
any bundle graph is loaded, so a missing package or GPU is one clear error, not a traceback or a
silent fall back to the CPU (ONNX Runtime quietly runs on the CPU when a GPU provider fails).

Two questions, each with its own hint:
1. does the installed onnxruntime have the provider at all (the ``onnxruntime`` package has only
   the CPU one; ``onnxruntime-gpu`` has CUDA and TensorRT)?
2. does a one-node session actually start on it (a GPU, its driver, and the CUDA / cuDNN /
   TensorRT libraries the provider was built against)? The provider library is also opened
   directly, because the dynamic loader's message ("libcublasLt.so.13: cannot open shared object
   file") says exactly what is missing, and ONNX Runtime only logs it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
from pathlib import Path

from dymoe.bundle.errors import DymoeError
from dymoe.targets.providers import PROVIDER, ExecutionTarget, providers_for

# the shared library of each provider inside the onnxruntime package (Linux names; Jetson is Linux)
_LIBRARY = {"cuda": "libonnxruntime_providers_cuda.so", "tensorrt": "libonnxruntime_providers_tensorrt.so"}
INSTALL_HINT = ("pip uninstall -y onnxruntime && pip install onnxruntime-gpu (on a Jetson: the onnxruntime-gpu "
                "wheel built for its JetPack, from the Jetson Zoo); TensorRT also needs the tensorrt libraries")


class DeviceError(DymoeError):
    """The asked-for device cannot run here."""


def missing_provider(device: str, available: list[str]) -> DeviceError | None:
    """Question 1, pure: the error for a provider this onnxruntime does not have."""
    if device == "cpu" or PROVIDER[device] in available:
        return None
    gpu_build = PROVIDER["cuda"] in available
    what = ("this onnxruntime has the CUDA provider but not TensorRT's" if gpu_build
            else "the installed onnxruntime runs on the CPU only (it is the onnxruntime package, not onnxruntime-gpu)")
    return DeviceError(f"--device {device}: {what}",
                       "use --device cuda, or an onnxruntime-gpu build with TensorRT" if gpu_build else INSTALL_HINT)


def failed_start(device: str, started: list[str], loader_error: str | None) -> DeviceError | None:
    """Question 2, pure: the error when a session asked for ``device`` started on ``started``."""
    if device == "cpu" or PROVIDER[device] in started:
        return None
    cause = f" ({loader_error})" if loader_error else ""
    what = "TensorRT" if device == "tensorrt" else "CUDA"
    libraries = "CUDA, cuDNN and TensorRT" if device == "tensorrt" else "CUDA and cuDNN"
    return DeviceError(f"--device {device}: ONNX Runtime could not start its {what} provider{cause}",
                       "check that this machine has an NVIDIA GPU and driver (nvidia-smi; on a Jetson, tegrastats) "
                       f"and the {libraries} libraries this onnxruntime-gpu was built for, on the library path; "
                       "or run with --device cpu")


def _loader_error(device: str) -> str | None:
    import onnxruntime as ort

    lib = Path(ort.__file__).parent / "capi" / _LIBRARY[device]
    if not lib.is_file():
        return None
    try:
        ctypes.CDLL(str(lib))
    except OSError as e:
        return str(e)  # "libcublasLt.so.13: cannot open shared object file: ...": what is missing
    return None


def _probe_model() -> bytes:
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


@contextlib.contextmanager
def _quiet_ort():
    """ONNX Runtime logs a failed provider at error level and its Python layer prints its fall
    back: neither belongs on a user's terminal when dymoe says it in two lines."""
    import onnxruntime as ort

    ort.set_default_logger_severity(4)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        ort.set_default_logger_severity(2)


@functools.cache
def _started(device: str, device_id: int) -> tuple[str, ...]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4
    providers = providers_for(ExecutionTarget("cuda", device_id=device_id))
    if device == "tensorrt":
        providers = [(PROVIDER["tensorrt"], {"device_id": device_id}), *providers]
    with _quiet_ort():
        try:
            s = ort.InferenceSession(_probe_model(), so, providers=[n for n, _ in providers],
                                     provider_options=[o for _, o in providers])
        except Exception:  # ORT raises its own types when a provider fails outright
            return ()
    return tuple(s.get_providers())


def check_device(target: ExecutionTarget) -> None:
    """Raise a :class:`DeviceError` unless ``target.device`` can run on this machine."""
    if target.is_cpu:
        return
    import onnxruntime as ort

    problem = missing_provider(target.device, ort.get_available_providers())
    if problem is None:
        started = list(_started(target.device, target.device_id))
        problem = failed_start(target.device, started,
                               None if PROVIDER[target.device] in started else _loader_error(target.device))
    if problem is not None:
        raise problem
