"""``dymoe calibrate``: measure, then commit.

:func:`measure` runs everything with ONNX Runtime (no torch) and writes nothing: the data are
loaded and checked first, then one reference pass over the sampled windows at the bundle's highest
precision records importance and predictability, then one pass per (layer, lower precision or
skip, retention) measures sensitivity against the reference; with ``collect_inputs`` the reference
pass also keeps a sample of each expert's routed inputs (``inputs``), encoded in memory. :func:`commit`
then writes those files and ``calibration.json`` atomically and rewrites ``manifest.json``
(atomically) to list them with their sha256, so an interrupted or failed measurement leaves the
bundle as it was.
"""

from __future__ import annotations

import contextlib
import math
import re
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dymoe.bundle.calibration import (
    SCHEMA_VERSION,
    BundleRef,
    Calibration,
    DataSource,
    ExpertImportance,
    LayerImportance,
    Prediction,
    Schedule,
    Sensitivity,
    SensitivityEntry,
    Settings,
    Skew,
)
from dymoe.bundle.errors import BundleError, InputError
from dymoe.bundle.folder import remove_listed
from dymoe.bundle.fsutil import atomic_write_bytes, atomic_write_text, require_free_space
from dymoe.bundle.inputs import memory_bound
from dymoe.bundle.lock import bundle_lock
from dymoe.bundle.manifest import FileEntry, Manifest, check_confined, read_manifest
from dymoe.bundle.naming import CALIBRATION_NAME, INPUTS_DIRNAME
from dymoe.bundle.paths import real_subdir, resolve
from dymoe.bundle.precisions import SKIP
from dymoe.bundle.progress import Counter, ProgressFn
from dymoe.bundle.version import __version__
from dymoe.runtime.bundle import Bundle
from dymoe.runtime.maths import log_softmax
from dymoe.runtime.model import MoEModel
from dymoe.runtime.predictor import Predictor
from dymoe.runtime.tokenizer import TextTokenizer

from . import data as data_mod
from . import schedule as sched
from .bank import ExpertBank
from .collect import CollectingExperts, ReferenceCache
from .inputs import InputRecorder, available_memory, require_memory
from .options import CalibrationOptions
from .predict import PredictionTally
from .sensitivity import PerturbedExperts, perturbations
from .stats import coverage_count, gini, nll_of, normalized_entropy, top_share


@dataclass
class Measured:
    calibration: Calibration
    seconds: dict[str, float]  # wall time per phase (never written into calibration.json)
    notes: list[str] = field(default_factory=list)  # warnings worth showing the user
    # collect_inputs: bundle-relative path -> bytes of each layer's input file (calibration.expert_inputs)
    inputs: dict[str, bytes] = field(default_factory=dict)

    @property
    def total_s(self) -> float:
        return sum(self.seconds.values())


@dataclass
class Reference:
    """What a perturbed pass over one window is compared with: the reference next-token
    distribution P (float64) and its negative entropy sum_v P log P per position."""

    p: np.ndarray  # [T, V]
    neg_entropy: np.ndarray  # [T]
    nll: float  # summed over the window's scored tokens

    @classmethod
    def of(cls, logits: np.ndarray, ids: np.ndarray) -> Reference:
        logp = log_softmax(logits)
        p = np.exp(logp)
        return cls(p, (p * logp).sum(axis=-1), float(nll_of(logp, ids).sum()))

    def compare(self, logits: np.ndarray, ids: np.ndarray) -> tuple[float, float]:
        """Summed KL(P || Q) over positions and summed NLL of Q over scored tokens."""
        logq = log_softmax(logits)
        kl = np.maximum(0.0, self.neg_entropy - (self.p * logq).sum(axis=-1))
        return float(kl.sum()), float(nll_of(logq, ids).sum())


class _Switch:
    """One executor for the model whose delegate changes between passes (the backbone sessions
    are built once)."""

    def __init__(self) -> None:
        self.current = None

    def run(self, step):
        return self.current.run(step)

    def close(self) -> None:
        pass


def recall_ks(top_k: int, num_experts: int) -> list[int]:
    """Prefetch sizes whose recall is measured: k and 2k experts (capped at E)."""
    return sorted({top_k, min(num_experts, 2 * top_k)})


def measure(bundle_path: Path, data_paths: Sequence[Path], options: CalibrationOptions = CalibrationOptions(),
            progress: ProgressFn | None = None) -> Measured:
    options.validate()
    clock = {"load": time.perf_counter()}
    data_mod.discover(data_paths)  # missing paths first: cheaper than opening the bundle
    bundle = Bundle(bundle_path)
    spec = bundle.spec
    if options.seq_len > spec.max_position_embeddings:
        raise InputError(f"--seq-len {options.seq_len} exceeds the model's context of {spec.max_position_embeddings}",
                         f"use --seq-len {spec.max_position_embeddings} or less")
    moe = spec.moe_layers
    if options.collect_inputs:  # before anything slow: the bound is known from the options alone
        require_memory(len(moe), spec.num_experts, spec.hidden_size, options.inputs_per_expert,
                       available_memory())
    eos = spec.eos_token_ids[0] if spec.eos_token_ids else None
    files, sampled = data_mod.draw(data_paths, TextTokenizer(bundle.tokenizer_path()).encode, eos, options.samples,
                                   options.seq_len, options.seed)
    notes = []
    if len(sampled.windows) < options.samples:
        notes.append(f"the data hold {sampled.available} windows of {options.seq_len} tokens, fewer than "
                     f"--samples {options.samples}; all of them were used")

    k = spec.top_k
    modes = list(bundle.precisions[1:]) + [SKIP] if options.sensitivity else []
    grid = sched.retention_grid([*options.retentions, options.critical_fraction], k)
    todo = perturbations(moe, modes, grid)
    windows = sampled.windows
    rerun = sampled.subset(options.sensitivity_samples) if todo else []
    seconds: dict[str, float] = {}

    bank = ExpertBank(bundle, progress)
    predictor = Predictor(bundle)
    switch = _Switch()
    model = MoEModel(bundle, switch)
    seconds["load"] = time.perf_counter() - clock["load"]

    t0 = time.perf_counter()
    counter = Counter(progress, "calibrate: reference pass", len(windows) + len(rerun) * len(todo))
    tally = PredictionTally(predictor, recall_ks(k, spec.num_experts))
    cache = ReferenceCache(set(rerun))
    recorder = InputRecorder(moe, spec.num_experts, spec.hidden_size, options.inputs_per_expert,
                             options.seed) if options.collect_inputs else None
    collector = CollectingExperts(bank, options.heavy_hitter_fraction, tally, cache, recorder)
    switch.current = collector
    reference: dict[int, Reference] = {}
    for i, w in enumerate(windows):
        collector.window = i
        logits = model.forward(w, model.new_cache(), all_logits=True)
        if i in cache.windows:
            reference[i] = Reference.of(logits, w)
        counter.tick()
    inputs, expert_inputs = recorder.encode() if recorder is not None else ({}, None)
    seconds["reference"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    results: dict[tuple[int, str, float], tuple[float, float]] = {}
    for n, p in enumerate(todo):
        what = "all" if p.retention == 0 else f"r={p.retention:g}"
        counter.relabel(f"calibrate: layer {p.layer} {p.mode} ({what})")
        switch.current = executor = PerturbedExperts(bank, p, cache)
        kl, nll = 0.0, 0.0
        for i in rerun:
            executor.window = i
            logits = model.forward(windows[i], model.new_cache(), all_logits=True)
            dkl, dnll = reference[i].compare(logits, windows[i])
            kl, nll = kl + dkl, nll + dnll
            counter.tick()
        results[(p.layer, p.mode, p.retention)] = (kl, nll)
        if n + 1 == len(todo) or todo[n + 1].layer != p.layer:
            for m in bundle.precisions[1:]:
                bank.drop(p.layer, m)
    if todo:
        seconds["sensitivity"] = time.perf_counter() - t0
    bank.close()

    settings = Settings(
        samples=len(windows), sensitivity_samples=len(rerun), seq_len=options.seq_len, seed=options.seed,
        data=[DataSource(f.name, f.bytes, f.sha256, len(f.documents)) for f in files],
        data_tokens=sampled.tokens, windows_available=sampled.available, reference_precision=bank.reference,
        modes=modes, heavy_hitter_fraction=options.heavy_hitter_fraction,
        critical_fraction=sched.effective_retention(options.critical_fraction, k), retentions=grid,
        top_share_fraction=options.top_share_fraction, coverage_mass=options.coverage_mass,
        percentiles=list(options.percentiles), recall_ks=recall_ks(k, spec.num_experts), target_kl=options.target_kl,
        cosine_r_max=options.cosine_r_max, cosine_r_min=options.cosine_r_min)
    sensitivity = schedule = None
    if options.sensitivity:
        positions = sum(len(windows[i]) for i in rerun)
        scored = sum(len(windows[i]) - 1 for i in rerun)
        ref_nll = sum(reference[i].nll for i in rerun) / scored
        sensitivity = _sensitivity(results, ref_nll, positions, scored)
        schedule = _schedule(sensitivity, modes, grid, spec.num_layers, moe, k, options)
    calibration = Calibration(
        schema_version=SCHEMA_VERSION, dymoe_version=__version__,
        bundle=BundleRef(bundle.manifest.source.fingerprint_sha256, spec.model_type, spec.num_layers,
                         spec.num_experts, k),
        settings=settings, importance=_importance(collector, k, options), sensitivity=sensitivity,
        prediction=[Prediction(key.layer, key.distance, key.source, key.k, r) for key, r in tally.recalls().items()],
        schedule=schedule, expert_inputs=expert_inputs)
    return Measured(calibration, seconds, notes, inputs)


def _importance(collector: CollectingExperts, k: int, options: CalibrationOptions) -> list[LayerImportance]:
    layers = []
    for layer, t in collector.layers.items():
        mass = float(t.gate_mass.sum())
        experts = []
        for e in range(t.tokens.size):
            w = t.weights_of(e)
            n = int(t.tokens[e])
            experts.append(ExpertImportance(
                expert=e, tokens=n, share=n / (t.tokens_seen * k) if t.tokens_seen else 0.0,
                gate_mass=float(t.gate_mass[e]), gate_share=float(t.gate_mass[e]) / mass if mass else 0.0,
                weight_mean=float(w.mean()) if n else 0.0,
                weight_percentiles=[float(v) for v in np.percentile(w, options.percentiles)] if n
                else [0.0] * len(options.percentiles),
                heavy_hitters=int(t.heavy[e]), output_contribution=float(t.contribution[e]) / n if n else 0.0))
        skew = Skew(gini=gini(t.gate_mass), entropy=normalized_entropy(t.gate_mass),
                    top_share=top_share(t.gate_mass, options.top_share_fraction),
                    coverage_count=coverage_count(t.gate_mass, options.coverage_mass))
        layers.append(LayerImportance(layer, t.tokens_seen, t.heavy_seen, skew, experts))
    return layers


def _sensitivity(results, ref_nll: float, positions: int, scored: int) -> Sensitivity:
    ref_ppl = math.exp(ref_nll)
    entries = []
    for (layer, mode, r), (kl, nll) in results.items():
        nll /= scored
        entries.append(SensitivityEntry(layer, mode, r, kl / positions, nll, math.exp(nll), math.exp(nll) - ref_ppl))
    return Sensitivity(ref_nll, ref_ppl, positions, scored, entries)


def layer_losses(sensitivity: Sensitivity, mode: str, num_layers: int) -> list[dict[float, float]]:
    """Per layer, effective retention -> measured mean KL for ``mode`` (1.0 -> 0 implied; a dense
    layer, never measured, loses nothing)."""
    losses: list[dict[float, float]] = [{0.0: 0.0} for _ in range(num_layers)]
    for e in sensitivity.entries:
        if e.mode == mode:
            losses[e.layer][e.retention] = e.kl
    return losses


def _schedule(sensitivity: Sensitivity, modes: list[str], grid: list[float], num_layers: int, moe: list[int],
              k: int, options: CalibrationOptions) -> Schedule:
    """Per layer (dense layers: 1.0, nothing to lower), the recommended and the cosine retention; the
    loss budget is shared equally by the MoE layers."""
    cosine = sched.cosine_schedule(num_layers, options.cosine_r_max, options.cosine_r_min)
    recommended, recommended_kl, cosine_kl = {}, {}, {}
    for mode in modes:
        losses = layer_losses(sensitivity, mode, num_layers)
        r_moe = sched.recommend([losses[layer] for layer in moe], options.target_kl)
        recommended[mode] = [r_moe[moe.index(layer)] if layer in moe else 1.0 for layer in range(num_layers)]
        recommended_kl[mode] = sched.predicted_loss(losses, recommended[mode], k)
        cosine_kl[mode] = sched.predicted_loss(losses, cosine, k)
    return Schedule(options.target_kl, options.target_kl / len(moe), recommended, recommended_kl, cosine, cosine_kl)


@contextlib.contextmanager
def _deferred_interrupt():
    """Hold Ctrl-C while the files are swapped in, so they are not left out of step."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def commit(bundle_path: Path, measured: Measured | Calibration) -> Path:
    """Write ``calibration.json`` (and the collected input files, first) into the bundle and list
    them (bytes + sha256) in manifest.json. Input files of an earlier calibration that this one does
    not list are dropped from the manifest, then deleted, so the manifest never names a missing file."""
    bundle_path = Path(bundle_path)
    calibration, inputs = (measured.calibration, measured.inputs) if isinstance(measured, Measured) else (measured, {})
    if sorted(calibration.expert_inputs.files if calibration.expert_inputs else []) != sorted(inputs):
        raise ValueError("calibration.expert_inputs and the input files to write disagree (commit the Measured)")
    text = calibration.to_json()
    with bundle_lock(bundle_path, "calibrate"), _deferred_interrupt():
        manifest = read_manifest(bundle_path)  # fresh: another tool may have rewritten it meanwhile
        if manifest.source.fingerprint_sha256 != calibration.bundle.source_fingerprint_sha256:
            raise BundleError(f"{bundle_path} was re-exported from other weights while calibration ran",
                              "rerun dymoe calibrate")
        check_confined(bundle_path, manifest)
        stale = _stale_inputs(bundle_path, manifest, set(inputs))
        targets = {rel: resolve(bundle_path, rel) for rel in [*inputs, CALIBRATION_NAME]}  # all checked first
        for rel, data in inputs.items():
            manifest.files[rel] = FileEntry(bytes=len(data), sha256=atomic_write_bytes(targets[rel], data))
        for rel in stale:
            manifest.files.pop(rel, None)
        sha = atomic_write_text(targets[CALIBRATION_NAME], text)
        manifest.files[CALIBRATION_NAME] = FileEntry(bytes=len(text.encode("utf-8")), sha256=sha)
        manifest.files = dict(sorted(manifest.files.items()))
        manifest.calibration = CALIBRATION_NAME
        manifest.write(bundle_path)
        remove_listed(bundle_path, stale)
    return bundle_path / CALIBRATION_NAME


_INPUT_FILE = re.compile(r"^layer_\d{3,}\.safetensors$")  # inputs.layer_file's names


def _stale_inputs(bundle_path: Path, manifest: Manifest, keep: set[str]) -> list[str]:
    """Input files listed in the manifest, or left in the bundle's own inputs folder under the
    names dymoe gives them (by a crash between the manifest write and the deletion), that ``keep``
    does not hold. A linked folder's contents are never considered."""
    listed = {rel for rel in manifest.files if rel.startswith(f"{INPUTS_DIRNAME}/")}
    folder = real_subdir(bundle_path, INPUTS_DIRNAME)
    on_disk = set()
    if folder is not None and not (bundle_path / INPUTS_DIRNAME).is_symlink():
        on_disk = {f"{INPUTS_DIRNAME}/{p.name}" for p in folder.iterdir()
                   if _INPUT_FILE.match(p.name) and p.is_file() and not p.is_symlink()}
    return sorted((listed | on_disk) - keep)


def calibrate(bundle_path: Path, data_paths: Sequence[Path], options: CalibrationOptions = CalibrationOptions(),
              progress: ProgressFn | None = None) -> tuple[Measured, Path]:
    """Measure and commit, holding the bundle's writer lock throughout: a second writer is told
    at once, and a bundle that cannot be written fails before the measurement, not after."""
    bundle_path = Path(bundle_path)
    manifest = read_manifest(bundle_path)
    with bundle_lock(bundle_path, "calibrate"):
        if options.collect_inputs:
            s = manifest.model
            require_free_space(bundle_path, memory_bound(len(s.moe_layers), s.num_experts, s.hidden_size,
                                                         options.inputs_per_expert),
                               "--collect-inputs", "free some space, or lower --inputs-per-expert")
        measured = measure(bundle_path, data_paths, options, progress)
        return measured, commit(bundle_path, measured)
