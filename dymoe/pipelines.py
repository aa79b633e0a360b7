"""Work that spans the packages: ``dymoe export --quantizer gptq`` is an export (data-free),
a calibration pass that collects every expert's routed inputs, and a requantization with gptq.

It lives above toolchain, calibration and runtime so that none of them imports another's
command. Rerunning the same command after an interruption resumes at the stage it reached:
the data-free bundle's fingerprint records the gptq settings, so a finished first stage is
recognised, and requantize resumes from its own journal.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from dymoe.bundle.errors import BundleError, DymoeError, InputError
from dymoe.bundle.inputs import memory_bound
from dymoe.bundle.lock import bundle_lock
from dymoe.bundle.manifest import Manifest, ModelSpec, read_manifest
from dymoe.bundle.naming import MANIFEST_NAME, REQUANTIZE_JOURNAL
from dymoe.bundle.precisions import BITS, FLOAT
from dymoe.calibration.options import INPUTS_PER_EXPERT, SEQ_LEN, CalibrationOptions
from dymoe.toolchain.options import GPTQ_MIN_TOKENS, ExportOptions

GPTQ_FIRST_STAGE = "hqq"  # what the data-free stage quantizes with (and gptq falls back to)


@dataclass(frozen=True)
class GptqOptions:
    """What ``--quantizer gptq`` adds to an export."""

    calibration_data: tuple[str, ...]
    min_tokens: int = GPTQ_MIN_TOKENS
    inputs_per_expert: int = INPUTS_PER_EXPERT

    def validate(self, precisions: tuple[str, ...]) -> None:
        if not self.calibration_data:
            raise InputError(
                "--quantizer gptq needs calibration text: it quantizes each expert with its own routed inputs",
                "pass --calibration-data FILE (text or JSON Lines), or export with --quantizer hqq, then run "
                "dymoe calibrate BUNDLE --data FILE --collect-inputs and dymoe requantize BUNDLE --quantizer gptq")
        if self.min_tokens < 1:
            raise InputError(f"--gptq-min-tokens {self.min_tokens} must be at least 1",
                             f"for example --gptq-min-tokens {GPTQ_MIN_TOKENS}")
        if self.inputs_per_expert < 1:
            raise InputError(f"--inputs-per-expert {self.inputs_per_expert} must be at least 1",
                             f"for example --inputs-per-expert {INPUTS_PER_EXPERT}")
        if not set(FLOAT) & set(precisions):
            raise InputError("--quantizer gptq needs a float precision in --precisions: the calibration pass "
                             "runs it, and the integer variants are requantized from it",
                             "add fp16 (or fp32), e.g. --precisions fp16,int4,int2")
        if not set(BITS) & set(precisions):
            raise InputError("--quantizer gptq has nothing to quantize: no integer precision in --precisions",
                             "add int8, int4 or int2, e.g. --precisions fp16,int4,int2")


def export(model: str, out: Path, options: ExportOptions, gptq: GptqOptions | None = None) -> Manifest:
    """``dymoe export``: the toolchain's data-free export, or with ``gptq`` the three-stage pipeline."""
    from dymoe.toolchain.export import export as export_bundle
    from dymoe.toolchain.export import fingerprint_of, open_checkpoint, prepare_folder

    if gptq is None:
        return export_bundle(model, out, options)
    precisions = options.validate()
    gptq.validate(precisions)
    if options.target != "ort":
        raise InputError(f"--quantizer gptq writes the portable forms only, not --target {options.target}",
                         f"use --quantizer hqq (the default) or rtn with --target {options.target}")
    source = open_checkpoint(model)
    calibration = _calibration_options(gptq, source.spec.max_position_embeddings)
    _check_calibration_data(gptq, calibration, source.spec, source.folder)  # before stage 1, not after it
    stage1 = replace(options, quantizer=GPTQ_FIRST_STAGE,
                     fingerprint_extra=(("pipeline", "gptq"), ("min_tokens", str(gptq.min_tokens)),
                                        ("inputs_per_expert", str(gptq.inputs_per_expert)),
                                        ("calibration_data", "|".join(str(Path(p).resolve())
                                                                      for p in gptq.calibration_data))),
                     reserve_bytes=_stage_bytes(source.spec, precisions, options.block_size, gptq))
    out = prepare_folder(Path(out))
    with bundle_lock(out, "export"):  # one writer for all three stages
        if options.force or not _stage_pending(out, fingerprint_of(source, stage1)):
            export_bundle(model, out, stage1, source=source)
        # else resume: the data-free stage finished before the interruption
        return _gptq_stage(out, gptq, calibration, options)


def _stage_bytes(spec: ModelSpec, precisions: tuple[str, ...], block_size: int, gptq: GptqOptions) -> int:
    """Disk the later stages add to the bundle: the collected inputs and the new integer variants."""
    from dymoe.toolchain.export import estimated_expert_bytes

    return (memory_bound(len(spec.moe_layers), spec.num_experts, spec.hidden_size, gptq.inputs_per_expert)
            + estimated_expert_bytes(spec, tuple(p for p in precisions if p in BITS), block_size))


def _stage_pending(out: Path, fingerprint: str) -> bool:
    """True when ``out`` holds this very gptq export with its gptq stage unfinished: the data-free
    bundle done, or the requantization switched in but not yet cleaned up."""
    if not (out / MANIFEST_NAME).is_file():
        return False
    try:
        m = read_manifest(out)
    except BundleError:
        return False
    if m.source.fingerprint_sha256 != fingerprint:
        return False
    return m.quantization.method == GPTQ_FIRST_STAGE or (out / REQUANTIZE_JOURNAL).exists()


def _calibration_options(gptq: GptqOptions, context: int) -> CalibrationOptions:
    return CalibrationOptions(seq_len=min(SEQ_LEN, context), sensitivity=False, collect_inputs=True,
                              inputs_per_expert=gptq.inputs_per_expert)


def _check_calibration_data(gptq: GptqOptions, calibration: CalibrationOptions, spec: ModelSpec, folder: Path) -> None:
    """Everything the gptq stage will need from its data and memory, checked up front."""
    from dymoe.calibration import data as data_mod
    from dymoe.calibration.inputs import available_memory, require_memory
    from dymoe.runtime.tokenizer import TextTokenizer

    try:
        require_memory(len(spec.moe_layers), spec.num_experts, spec.hidden_size, calibration.inputs_per_expert,
                       available_memory())
    except DymoeError as e:
        raise InputError(e.message, "lower --inputs-per-expert") from None
    eos = spec.eos_token_ids[0] if spec.eos_token_ids else None
    try:  # exactly what the calibration pass will do with it
        data_mod.draw([Path(p) for p in gptq.calibration_data], TextTokenizer(folder / "tokenizer.json").encode,
                      eos, calibration.samples, calibration.seq_len, calibration.seed)
    except DymoeError as e:
        raise InputError(f"--calibration-data: {e.message}",
                         "give readable text (plain, JSON Lines with 'text', or folders of them) with at least "
                         f"{calibration.seq_len} tokens to --calibration-data") from None


def _gptq_stage(out: Path, gptq: GptqOptions, calibration: CalibrationOptions, options: ExportOptions) -> Manifest:
    """Collect every expert's routed inputs on the calibration text, then requantize with gptq."""
    from dymoe.calibration.run import calibrate
    from dymoe.toolchain.quantizers import QuantizerOptions
    from dymoe.toolchain.requantize import RequantizeOptions, requantize

    if not (out / REQUANTIZE_JOURNAL).exists():  # else the inputs were collected before the interruption
        calibrate(out, [Path(p) for p in gptq.calibration_data], calibration, progress=options.progress)
    return requantize(out, RequantizeOptions(quantizer=QuantizerOptions("gptq", min_tokens=gptq.min_tokens),
                                             progress=options.progress))
