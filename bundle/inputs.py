"""The files of each expert's routed inputs, kept by ``dymoe calibrate --collect-inputs`` for a
quantizer that needs data (GPTQ builds its Hessian from them): names, sizes and the reader.

One safetensors file per layer, ``calibration-inputs/layer_LLL.safetensors``, holding
``expert_EEE`` as F16 ``[kept, H]`` for every expert that kept at least one row; each file is
listed (bytes + sha256) in manifest.json and in ``calibration.json``'s ``expert_inputs``.
The recorder that fills them is ``dymoe.calibration.inputs``.

Dimensions: L layers, E experts per layer, H hidden size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .calibration import Calibration, ExpertInputs
from .errors import BundleError
from .manifest import Manifest, verify_file
from .naming import inputs_path as layer_file
from .safetensors_io import SafetensorsFile

DTYPE = "F16"  # half the bytes of fp32; 11 significant bits are plenty for a Hessian estimate

__all__ = ["DTYPE", "ExpertInputsReader", "layer_file", "load_expert_inputs", "memory_bound", "tensor_name"]


def tensor_name(expert: int) -> str:
    return f"expert_{expert:03d}"


def memory_bound(num_layers: int, num_experts: int, hidden: int, cap: int) -> int:
    """Bytes of at most ``cap`` rows per expert: the recorder's memory bound and the files' size."""
    return num_layers * num_experts * cap * hidden * 2


class ExpertInputsReader:
    """Reads the rows the recorder kept, checking each layer file against manifest.json the first
    time it is opened. ``expert_inputs``' per-layer lists follow ``model.moe_layers``."""

    def __init__(self, bundle: Path, manifest: Manifest, inputs: ExpertInputs) -> None:
        self.bundle = Path(bundle)
        self.manifest = manifest
        self.inputs = inputs
        self.hidden = manifest.model.hidden_size
        self._slot = {layer: i for i, layer in enumerate(manifest.model.moe_layers)}
        self._open: dict[int, SafetensorsFile] = {}

    def _index(self, layer: int) -> int:
        slot = self._slot.get(layer)
        if slot is None or slot >= len(self.inputs.files):
            raise IndexError(f"layer {layer} has no collected inputs (they cover MoE layers "
                             f"{list(self._slot)[:len(self.inputs.files)]})")
        return slot

    def seen(self, layer: int, expert: int) -> int:
        """Rows (routed tokens) the expert was offered during calibration; ``rows`` holds at most cap."""
        return self.inputs.seen[self._index(layer)][expert]

    def rows(self, layer: int, expert: int) -> np.ndarray:
        """The expert's kept routed inputs as float32 ``[n, H]``; n = min(seen, cap), maybe 0."""
        kept = self.inputs.kept[self._index(layer)][expert]
        f = self._file(layer)
        if kept == 0:
            return np.zeros((0, self.hidden), dtype=np.float32)
        return f.read(tensor_name(expert))

    def _file(self, layer: int) -> SafetensorsFile:
        f = self._open.get(layer)
        if f is None:
            slot = self._index(layer)
            rel = self.inputs.files[slot]
            f = SafetensorsFile(verify_file(self.bundle, self.manifest, rel))
            want = {tensor_name(e): (n, self.hidden) for e, n in enumerate(self.inputs.kept[slot]) if n}
            if {name: t.shape for name, t in f.tensors.items()} != want:
                raise BundleError(f"{self.bundle / rel} does not hold the rows calibration.json records",
                                  "rerun: dymoe calibrate BUNDLE --data TEXT --collect-inputs")
            self._open[layer] = f
        return f


def load_expert_inputs(bundle: Path, manifest: Manifest, calibration: Calibration) -> ExpertInputsReader:
    """The reader of ``calibration``'s collected expert inputs (BundleError when it has none)."""
    if calibration.expert_inputs is None:
        raise BundleError(f"bundle {bundle} has no collected expert inputs",
                          "run: dymoe calibrate BUNDLE --data TEXT --collect-inputs")
    return ExpertInputsReader(bundle, manifest, calibration.expert_inputs)
