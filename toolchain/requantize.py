"""``dymoe requantize``: rewrite the integer variants of an existing bundle with another quantizer.

The weights come from the bundle's own float variant (fp32, else fp16), the routed inputs for
gptq from ``dymoe calibrate --collect-inputs``. The bundle stays usable at every moment: new
variants are written under new names (tagged with this run's fingerprint), each recorded in a
journal (``.dymoe-requantize.jsonl``) so an interrupted run resumes; ``manifest.json`` is swapped
in one atomic write once all of them exist, and only then are the old files deleted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from dymoe.bundle.errors import BundleError, InputError
from dymoe.bundle.folder import remove_listed, remove_temp_files
from dymoe.bundle.fsutil import fsync_dir, require_free_space, sha256_file
from dymoe.bundle.journal import Journal, read_journal, read_retired
from dymoe.bundle.lock import bundle_lock
from dymoe.bundle.manifest import FileEntry, Manifest, check_confined, read_manifest, read_verified
from dymoe.bundle.naming import REQUANTIZE_JOURNAL, variant_path
from dymoe.bundle.paths import resolve
from dymoe.bundle.precisions import BITS, FLOAT, FORMATS, PRECISIONS
from dymoe.bundle.progress import Counter, ProgressFn
from dymoe.bundle.version import __version__

from .expert_graph import expected_bytes
from .expert_weights import expert_weights
from .quantizers import QuantizerOptions, RoutedInputs
from .variants import entry_of, variant_of, write_expert

JOURNAL = REQUANTIZE_JOURNAL


@dataclass(frozen=True)
class RequantizeOptions:
    quantizer: QuantizerOptions = QuantizerOptions()
    precisions: tuple[str, ...] = ()  # integer precisions to (re)write; () = every one in the bundle
    progress: ProgressFn | None = field(default=None, compare=False)


def _targets(manifest: Manifest, options: RequantizeOptions) -> tuple[str, ...]:
    have = manifest.quantization.precisions
    wanted = options.precisions or tuple(p for p in have if p in BITS)
    bad = [p for p in wanted if p not in BITS]
    if bad:
        raise InputError(f"cannot requantize to {', '.join(bad)}: only integer precisions are quantized",
                         f"choose from {', '.join(BITS)}")
    if not wanted:
        raise InputError("the bundle has no integer precision to requantize",
                         "name the ones to add with --precisions int4,int2")
    other = [p for p in wanted if manifest.quantization.formats.get(p, FORMATS[p]) != FORMATS[p]]
    if other:  # requantize writes the portable forms only; rewriting these would change their format
        raise InputError(f"{', '.join(other)} of this bundle {'is' if len(other) == 1 else 'are'} in the "
                         f"{manifest.quantization.formats[other[0]]} form (dymoe export --target tensorrt), "
                         "which requantize does not write",
                         "re-export with dymoe export --target tensorrt --quantizer rtn|hqq, or requantize other "
                         "precisions (--precisions)")
    return tuple(p for p in PRECISIONS if p in wanted)


def _intact(bundle: Path, rel: str, entry: dict) -> bool:
    try:
        path = resolve(bundle, rel, "journal entry")
    except BundleError:
        return False
    return path.is_file() and path.stat().st_size == entry.get("bytes") and sha256_file(path) == entry.get("sha256")


def _source_precision(manifest: Manifest, bundle: Path) -> str:
    for p in FLOAT:  # where the weights are read from, best first
        if p in manifest.quantization.precisions:
            return p
    raise BundleError(f"{bundle} has no fp32 or fp16 experts to requantize from",
                      "re-export it with a float precision in --precisions (e.g. fp16,int4,int2), "
                      "or export directly with the quantizer you want (dymoe export --quantizer ...)")


def _inputs(bundle: Path, manifest: Manifest, needed: bool):
    """The calibration's expert-input reader, or None when there is none and it is not needed."""
    from dymoe.bundle.calibration import read_calibration
    from dymoe.bundle.inputs import load_expert_inputs

    if not manifest.calibration or manifest.calibration not in manifest.files:
        if needed:
            raise BundleError(f"bundle {bundle} has no calibration with expert inputs (gptq needs them)",
                              "run: dymoe calibrate BUNDLE --data TEXT --collect-inputs")
        return None, None
    calibration = read_calibration(bundle, manifest)
    if calibration.expert_inputs is None:
        if needed:
            raise BundleError(f"the calibration of {bundle} did not collect expert inputs (gptq needs them)",
                              "run: dymoe calibrate BUNDLE --data TEXT --collect-inputs")
        return None, None
    return load_expert_inputs(bundle, manifest, calibration), calibration.expert_inputs


def _fingerprint(manifest: Manifest, source: str, targets: tuple[str, ...], options: RequantizeOptions,
                 input_files: list[str]) -> str:
    """What the new variants depend on: the source weights, the inputs, the quantizer and its settings."""
    sources = [manifest.files[e.variants[source].path].sha256 for e in manifest.experts]
    blob = json.dumps({
        "sources": hashlib.sha256("".join(sources).encode()).hexdigest(),
        "inputs": [manifest.files[f].sha256 for f in input_files],
        "quantizer": dataclasses.asdict(options.quantizer), "precisions": targets,
        "block_size": manifest.quantization.block_size, "dymoe": __version__,
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _clean_up(bundle: Path, manifest: Manifest) -> None:
    """Delete the files the journal retired that ``manifest`` no longer lists (the replaced
    variants, also after a run stopped right after its manifest swap), then the journal."""
    journal = bundle / JOURNAL
    remove_listed(bundle, [rel for rel in read_retired(journal) if rel not in manifest.files])
    journal.unlink(missing_ok=True)


def _needed_bytes(manifest: Manifest, targets: tuple[str, ...], done: dict[str, dict]) -> int:
    """New variants still to write (the old ones are deleted only after the switch)."""
    q, s = manifest.quantization, manifest.model
    per = sum(expected_bytes(s.hidden_size, s.expert_intermediate_size, p, q.block_size) for p in targets)
    return max(0, len(s.moe_layers) * s.num_experts * per - sum(int(e.get("bytes", 0)) for e in done.values()))


def requantize(bundle: Path, options: RequantizeOptions = RequantizeOptions()) -> Manifest:
    """Rewrite (or add) the integer variants of ``bundle`` with ``options.quantizer``."""
    bundle = Path(bundle)
    read_manifest(bundle)  # a clean error for a missing or foreign folder before the lock file is made
    with bundle_lock(bundle, "requantize"):
        return _requantize_locked(bundle, options)


def _requantize_locked(bundle: Path, options: RequantizeOptions) -> Manifest:
    manifest = read_manifest(bundle)  # fresh, under the lock
    check_confined(bundle, manifest)
    targets = _targets(manifest, options)
    source = _source_precision(manifest, bundle)
    qopts = options.quantizer
    reader, inputs_meta = _inputs(bundle, manifest, needed=qopts.needs_inputs)
    fingerprint = _fingerprint(manifest, source, targets, options, inputs_meta.files if inputs_meta else [])
    tag = fingerprint[:12]
    if manifest.quantization.revision == tag:  # already requantized with exactly these settings and inputs
        _clean_up(bundle, manifest)  # finishes a run stopped after its manifest swap
        return manifest

    previous, done = read_journal(bundle / JOURNAL)
    if previous != fingerprint:
        # files an earlier run with other settings wrote and never switched in: ours to delete
        remove_listed(bundle, [rel for rel in done if rel not in manifest.files])
        _clean_up(bundle, manifest)
        done = {}
    done = {rel: e for rel, e in done.items() if _intact(bundle, rel, e)}
    # A variant the manifest already lists under this run's name (these settings were applied
    # before, then partly replaced) is kept as it is: rewriting a listed file before the swap
    # would break the bundle's promise, and the same fingerprint makes the same bytes.
    for entry in manifest.experts:
        for p in targets:
            v = entry.variants.get(p)
            if v is not None and v.path == variant_path(entry.layer, entry.expert, p, qopts.name, tag):
                done[v.path] = entry_of(v, manifest.files[v.path])
    remove_temp_files(bundle)
    require_free_space(bundle, _needed_bytes(manifest, targets, done), f"requantizing {', '.join(targets)}",
                       "free some space on that disk, or requantize fewer precisions (--precisions)")
    journal = Journal(bundle / JOURNAL, fingerprint, done)
    counter = Counter(options.progress, f"requantize {qopts.name} {','.join(targets)}", len(manifest.experts))
    for entry in manifest.experts:
        rels = {p: variant_path(entry.layer, entry.expert, p, qopts.name, tag) for p in targets}
        if all(r in done for r in rels.values()):
            counter.tick()
            continue
        data = read_verified(bundle, manifest, entry.variants[source].path)
        gate, up, down = expert_weights(onnx.load_model_from_string(data))
        del data
        x = reader.rows(entry.layer, entry.expert) if reader else None
        if x is not None and x.shape[0] == 0:
            x = None
        if x is not None:
            x = RoutedInputs(x)  # shared by the expert's precisions
        memo: dict = {}  # and what they derive from the same weights, as export shares it
        for p, rel in rels.items():
            if rel in done:
                continue
            finished = {rel: write_expert(bundle, rel, gate, up, down, p, manifest.quantization.block_size,
                                          qopts, name=f"l{entry.layer}_e{entry.expert}_{p}", inputs=x, memo=memo)}
            if x is None and qopts.needs_inputs:  # the expert got no routed token at all
                finished[rel]["calibration_tokens"] = 0
            done.update(finished)
            journal.record(finished)
        counter.tick()

    old = set()
    for entry in manifest.experts:
        for p, rel in ((p, variant_path(entry.layer, entry.expert, p, qopts.name, tag)) for p in targets):
            if p in entry.variants:
                old.add(entry.variants[p].path)
            entry.variants[p] = variant_of(rel, p, done[rel])
        entry.variants = {p: entry.variants[p] for p in PRECISIONS if p in entry.variants}
    retired = old - set(done)  # a name both old and new is the same file: keep it
    for rel in retired:
        manifest.files.pop(rel, None)
    for rel in done:
        manifest.files[rel] = FileEntry(bytes=done[rel]["bytes"], sha256=done[rel]["sha256"])
    manifest.files = dict(sorted(manifest.files.items()))
    q = manifest.quantization
    q.precisions = [p for p in PRECISIONS if p in q.precisions or p in targets]
    q.formats = {p: q.formats.get(p) or FORMATS[p] for p in q.precisions}
    q.method, q.revision = qopts.name, tag
    journal.retire(sorted(retired))
    manifest.write(bundle)  # the one atomic switch from the old variants to the new
    fsync_dir(bundle)  # the switch is on disk before any file it replaced is deleted
    journal.close()
    _clean_up(bundle, manifest)
    return manifest
