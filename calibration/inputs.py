"""Each expert's routed inputs, kept by ``dymoe calibrate --collect-inputs`` for a quantizer that
needs data (GPTQ builds its Hessian from them): the recorder, the file format and the reader.

An expert's input is the layer's post-attention normalised hidden state (``LayerStep.router_input``)
of each token routed to it. Per (layer l, expert e) at most ``cap`` rows are kept, a uniform sample
of every row offered (reservoir sampling, Algorithm R), so the sample does not depend on where in
the data a token stood and memory is bounded by :func:`memory_bound` whatever the data size.

On disk: one safetensors file per layer, ``calibration-inputs/layer_LLL.safetensors``, holding
``expert_EEE`` as F16 ``[kept, H]`` for every expert that kept at least one row (rows in slot order),
each file listed (bytes + sha256) in manifest.json and in ``calibration.json``'s ``expert_inputs``.

Dimensions: L layers, E experts per layer, H hidden size, T rows offered in one call.
"""

from __future__ import annotations

import numpy as np

from dymoe.bundle.calibration import ExpertInputs
from dymoe.bundle.errors import InputError
from dymoe.bundle.inputs import DTYPE, layer_file, memory_bound, tensor_name
from dymoe.bundle.safetensors_io import encode_safetensors

_FIRST_ROWS = 64  # first buffer size of an expert; grown by doubling up to the cap


def available_memory() -> int | None:
    """Bytes the OS can hand out now without swapping, or None where that cannot be told."""
    try:
        import psutil  # installed with the dev extras only, hence the fallback
    except ImportError:
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        return None
    return int(psutil.virtual_memory().available)


def require_memory(num_layers: int, num_experts: int, hidden: int, cap: int, available: int | None) -> None:
    """Refuse a collection whose bound exceeds half of the available memory: the recorder's
    buffers and then the encoded files are held at once, beside the model."""
    bound = memory_bound(num_layers, num_experts, hidden, cap)
    if available is None or bound <= available // 2:
        return
    fits = (available // 2) // memory_bound(num_layers, num_experts, hidden, 1)
    hint = (f"use --inputs-per-expert {fits} or less" if fits >= 1
            else "free memory, or calibrate without --collect-inputs")
    raise InputError(f"--collect-inputs may hold {bound / 2**30:.2f} GiB ({num_layers} layers x {num_experts} "
                     f"experts x {cap} rows x {hidden} x 2 bytes), more than half of the "
                     f"{available / 2**30:.2f} GiB of memory available", hint)


class InputRecorder:
    """Keeps at most ``cap`` rows per (layer, expert) out of all rows offered by :meth:`add`,
    each offered row equally likely to be kept; deterministic given ``seed`` and the calls."""

    def __init__(self, layers: list[int] | int, num_experts: int, hidden: int, cap: int, seed: int) -> None:
        """``layers``: the MoE layers whose experts are recorded (an int n: layers 0..n-1)."""
        if cap < 1:
            raise ValueError(f"cap {cap} must be at least 1")
        self.hidden = hidden
        self.cap = cap
        self.seed = seed
        self.layers = list(range(layers)) if isinstance(layers, int) else list(layers)
        self._slot = {layer: i for i, layer in enumerate(self.layers)}
        self.seen = [[0] * num_experts for _ in self.layers]  # per recorded layer, in ``layers`` order
        # grown on demand: most experts of a short run never reach the cap
        self._rows: list[list[np.ndarray | None]] = [[None] * num_experts for _ in self.layers]
        self._rngs: dict[tuple[int, int], np.random.Generator] = {}

    @property
    def kept(self) -> list[list[int]]:
        return [[min(n, self.cap) for n in layer] for layer in self.seen]

    def rows(self, layer: int, expert: int) -> np.ndarray:
        """The kept rows, float16 ``[kept, H]`` (a view; slot order, not arrival order, once full)."""
        slot = self._slot[layer]
        kept = min(self.seen[slot][expert], self.cap)
        buf = self._rows[slot][expert]
        return buf[:kept] if buf is not None else np.zeros((0, self.hidden), dtype=np.float16)

    def add(self, layer: int, expert: int, rows: np.ndarray) -> None:
        """Offer ``rows`` ``[T, H]`` (float32), in token order, as the next rows of (layer, expert)."""
        T = rows.shape[0]
        if T == 0:
            return
        if rows.shape[1:] != (self.hidden,):
            raise ValueError(f"rows of shape {rows.shape} offered to a recorder of hidden size {self.hidden}")
        slot = self._slot[layer]
        n = self.seen[slot][expert]
        self.seen[slot][expert] = n + T
        fill = max(0, min(T, self.cap - n))  # the first rows go to free slots, in order
        if fill:
            buf = self._reserve(layer, expert, n + fill)
            buf[n:n + fill] = rows[:fill]
        if fill == T:
            return
        # Algorithm R: the row of 0-based index i >= cap replaces slot j ~ U{0, ..., i} when j < cap
        index = np.arange(n + fill, n + T)
        j = self._rng(layer, expert).integers(0, index + 1)
        hit = np.nonzero(j < self.cap)[0]
        if hit.size:
            # a slot drawn twice in this call ends with the later row, as one row at a time would
            slots, first = np.unique(j[hit][::-1], return_index=True)
            self._rows[slot][expert][slots] = rows[fill + hit[::-1][first]]

    def _reserve(self, layer: int, expert: int, size: int) -> np.ndarray:
        slot = self._slot[layer]
        buf = self._rows[slot][expert]
        have = 0 if buf is None else buf.shape[0]
        if size > have:
            grown = np.empty((min(self.cap, max(size, 2 * have, _FIRST_ROWS)), self.hidden), dtype=np.float16)
            if buf is not None:
                grown[:have] = buf
            self._rows[slot][expert] = buf = grown
        return buf

    def _rng(self, layer: int, expert: int) -> np.random.Generator:
        # one stream per (layer, expert): its draws do not depend on how other experts were routed
        rng = self._rngs.get((layer, expert))
        if rng is None:
            rng = self._rngs[(layer, expert)] = np.random.default_rng([self.seed, layer, expert])
        return rng

    def encode(self) -> tuple[dict[str, bytes], ExpertInputs]:
        """The layer files (bundle-relative path -> bytes) and their record for calibration.json.
        Each layer's buffers are released once encoded, so the recorder is spent afterwards."""
        files: dict[str, bytes] = {}
        kept = self.kept
        for slot, layer in enumerate(self.layers):
            experts = self._rows[slot]
            tensors = {tensor_name(e): self.rows(layer, e) for e in range(len(experts)) if kept[slot][e]}
            files[layer_file(layer)] = encode_safetensors(tensors, DTYPE)
            self._rows[slot] = [None] * len(experts)
        record = ExpertInputs(cap=self.cap, seed=self.seed, dtype=DTYPE, files=list(files),
                              seen=[list(s) for s in self.seen], kept=kept)
        return files, record
