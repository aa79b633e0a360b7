"""Rotary position embeddings with the scaling kinds of transformers 5.24, as ONNX graph pieces.

``rope_spec`` turns a config.json dict into the inverse frequencies (numpy, float32) exactly as
``transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS`` computes them; ``rope_cos_sin`` builds
cos/sin from ``position_ids`` inside a graph (for "dynamic" the frequencies are recomputed in the
graph from the run-time sequence length, as ``dynamic_rope_update`` does); ``apply_rope`` rotates
a tensor in one of three layouts.

Dimension letters: T new tokens, n heads (any leading count), d = dim the rotary dimension,
d/2 frequencies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from ..onnx_build import FLOAT, GraphBuilder

DOUBLE = TensorProto.DOUBLE

SUPPORTED = ("default", "linear", "dynamic", "yarn", "llama3")
# transformers only reads the model-level ``original_max_position_embeddings`` for configs that
# declare it as a field (Phi-3 family); for every other class it lands after rope standardisation
# and is ignored
_TOP_LEVEL_ORIGINAL_MAX = ("phi3", "phi4_multimodal")


@dataclass(frozen=True)
class RopeSpec:
    rope_type: str
    dim: int  # rotary dimension d (head_dim * partial_rotary_factor, decided by the caller)
    inv_freq: np.ndarray  # float32 [d/2]; for "dynamic" the value used while seq_len <= max_position_embeddings
    attention_factor: float  # multiplies cos and sin
    # "dynamic" only: the run-time recomputation needs these
    base: float = 10000.0
    factor: float = 1.0
    max_position_embeddings: int = 0


def rope_parameters(config: dict, default_theta: float = 10000.0) -> dict:
    """The standardised ``config.rope_parameters`` transformers builds from a config.json dict.

    Mirrors ``RotaryEmbeddingConfigMixin.convert_rope_params_to_dict`` + ``standardize_rope_params``:
    legacy ``rope_scaling`` wins over ``rope_parameters`` when both are set, a model-level
    ``rope_theta`` / ``partial_rotary_factor`` only fills what the dict lacks, and the legacy key
    ``type`` becomes ``rope_type``. ``default_theta`` is the config class's default (10000; 1e6 for Mixtral).
    """
    params = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError("per-layer-type (nested) rope_parameters are not supported")
    params.setdefault("rope_theta", config.get("rope_theta", default_theta))
    if config.get("partial_rotary_factor") is not None:
        params.setdefault("partial_rotary_factor", config["partial_rotary_factor"])
    params.setdefault("rope_type", params.get("type", "default"))
    if params["rope_type"] in ("llama3", "yarn", "longrope"):
        if config.get("model_type") in _TOP_LEVEL_ORIGINAL_MAX and "original_max_position_embeddings" in config:
            params["original_max_position_embeddings"] = config["original_max_position_embeddings"]
        else:
            params.setdefault("original_max_position_embeddings", config.get("max_position_embeddings"))
    return params


def rotary_dim(config: dict, head_dim: int) -> int:
    """int(head_dim * partial_rotary_factor), the ``dim`` transformers' scaled-rope functions use.
    (Some models' own default-rope functions ignore the factor; the caller decides.)"""
    return int(head_dim * rope_parameters(config).get("partial_rotary_factor", 1.0))


def _exponents(dim: int) -> np.ndarray:
    # torch.arange(0, dim, 2).float() / dim, in float32 as transformers computes it
    return (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)).astype(np.float32)


def _pow32(base, exponents: np.ndarray) -> np.ndarray:
    # float32 base ** float32 exponents, evaluated in float64 and rounded once: numpy's float32 pow
    # is off by an ulp more often than torch's; this agrees with torch almost everywhere
    return (np.float64(np.float32(base)) ** exponents.astype(np.float64)).astype(np.float32)


def _default_inv_freq(base: float, dim: int) -> np.ndarray:
    return (np.float32(1.0) / _pow32(base, _exponents(dim))).astype(np.float32)


def _dynamic_init_inv_freq(base: float, factor: float, max_pos: int, dim: int) -> np.ndarray:
    # _compute_dynamic_ntk_parameters with seq_len=None: the base adjustment runs in python float64
    # with seq_len = max_position_embeddings (a factor of ~1, but not always exactly 1.0)
    seq_len = max_pos
    base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return _default_inv_freq(base, dim)


def dynamic_inv_freq(spec: RopeSpec, seq_len: int) -> np.ndarray:
    """Numpy twin of the in-graph "dynamic" frequencies for a run-time ``seq_len`` (float32 math,
    as transformers does once seq_len is a tensor)."""
    if seq_len <= spec.max_position_embeddings:
        return spec.inv_freq
    f32 = np.float32
    s = f32(max(seq_len, spec.max_position_embeddings))
    scaled = f32(spec.factor) * s / f32(spec.max_position_embeddings) - f32(spec.factor - 1)
    # torch's ``tensor ** python_float`` keeps the exponent in double
    base = f32(spec.base) * f32(np.float64(scaled) ** (spec.dim / (spec.dim - 2)))
    return (f32(1.0) / _pow32(base, _exponents(spec.dim))).astype(np.float32)


def _yarn(params: dict, config: dict, dim: int) -> tuple[np.ndarray, float]:
    base = params["rope_theta"]
    factor = params.get("factor")
    attention_factor = params.get("attention_factor")
    mscale = params.get("mscale")
    mscale_all_dim = params.get("mscale_all_dim")
    original_max = params["original_max_position_embeddings"]
    if factor is None:
        factor = config["max_position_embeddings"] / original_max

    def get_mscale(scale, m=1):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(original_max / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp

    pos_freqs = _pow32(base, _exponents(dim))
    extrapolation = np.float32(1.0) / pos_freqs
    interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation_factor = np.float32(1) - ramp.astype(np.float32)
    inv_freq = interpolation * (np.float32(1) - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq.astype(np.float32), float(attention_factor)


def _llama3(params: dict, dim: int) -> np.ndarray:
    inv_freq = _default_inv_freq(params["rope_theta"], dim)
    factor = np.float32(params["factor"])
    low_ff, high_ff = params["low_freq_factor"], params["high_freq_factor"]
    old_context = params["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_context / low_ff, old_context / high_ff
    # torch evaluates ``scalar / tensor`` as ``tensor.reciprocal() * scalar`` (two roundings)
    wavelen = ((np.float32(1) / inv_freq) * np.float32(2 * math.pi)).astype(np.float32)
    # long wavelengths: divided by factor; short: kept; medium: smoothly interpolated
    inv_llama = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = ((np.float32(1) / wavelen) * np.float32(old_context) - np.float32(low_ff)) / np.float32(high_ff - low_ff)
    smoothed = (np.float32(1) - smooth) * inv_llama / factor + smooth * inv_llama
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, inv_llama).astype(np.float32)


def rope_spec(config: dict, dim: int, default_theta: float = 10000.0) -> RopeSpec:
    """RoPE frequencies for a config.json dict; ``dim`` is the rotary dimension (even).

    Raises ValueError for rope types other than default / linear / dynamic / yarn / llama3.
    """
    params = rope_parameters(config, default_theta)
    kind = params["rope_type"]
    if kind not in SUPPORTED:
        raise ValueError(f"unsupported rope_type {kind!r} (supported: {', '.join(SUPPORTED)})")
    base = float(params["rope_theta"])
    if kind == "default":
        return RopeSpec(kind, dim, _default_inv_freq(base, dim), 1.0)
    if kind == "linear":
        return RopeSpec(
            kind, dim, (_default_inv_freq(base, dim) / np.float32(params["factor"])).astype(np.float32), 1.0
        )
    if kind == "dynamic":
        factor = float(params["factor"])
        max_pos = int(config["max_position_embeddings"])
        inv = _dynamic_init_inv_freq(base, factor, max_pos, dim)
        return RopeSpec(kind, dim, inv, 1.0, base=base, factor=factor, max_position_embeddings=max_pos)
    if kind == "yarn":
        inv, attention_factor = _yarn(params, config, dim)
        return RopeSpec(kind, dim, inv, attention_factor)
    return RopeSpec(kind, dim, _llama3(params, dim), 1.0)


# --- graph pieces ------------------------------------------------------------------------------


def _dynamic_inv_freq_graph(g: GraphBuilder, position_ids: str, spec: RopeSpec) -> str:
    """[d/2] frequencies for seq_len = max(position_ids) + 1, recomputed in float32 like
    ``_compute_dynamic_ntk_parameters(seq_len=tensor)``; the init frequencies while
    seq_len <= max_position_embeddings, as ``dynamic_rope_update`` keeps them there."""
    f32, f64 = np.float32, np.float64
    seq_len = g.op("Add", [g.op("ReduceMax", [position_ids], keepdims=0), g.const(1)])  # int64 scalar
    s = g.op("Cast", [g.op("Max", [seq_len, g.const(spec.max_position_embeddings)])], to=FLOAT)
    scaled = g.op("Div", [g.op("Mul", [s, g.const(spec.factor, f32)]), g.const(spec.max_position_embeddings, f32)])
    scaled = g.op("Sub", [scaled, g.const(spec.factor - 1, f32)])
    # both powers in double, rounded once to float32: torch keeps the python exponent dim/(dim-2)
    # in double, and a once-rounded pow agrees with torch's float pow more often than ORT's powf
    power = g.op("Pow", [g.op("Cast", [scaled], to=DOUBLE), g.const(spec.dim / (spec.dim - 2), f64)])
    base = g.op("Mul", [g.const(spec.base, f32), g.op("Cast", [power], to=FLOAT)])
    pos_freqs = g.op("Pow", [g.op("Cast", [base], to=DOUBLE), g.const(_exponents(spec.dim), f64)])
    scaled_inv = g.op("Div", [g.const(1.0, f32), g.op("Cast", [pos_freqs], to=FLOAT)])
    longer = g.op("Greater", [seq_len, g.const(spec.max_position_embeddings)])
    return g.op("Where", [longer, scaled_inv, g.const(spec.inv_freq, f32)])


def rope_cos_sin(g: GraphBuilder, position_ids: str, spec: RopeSpec) -> tuple[str, str]:
    """cos, sin [T, d] in transformers' cat(freqs, freqs) layout, times attention_factor."""
    if spec.rope_type == "dynamic":
        inv_freq = _dynamic_inv_freq_graph(g, position_ids, spec)
    else:
        inv_freq = g.const(spec.inv_freq, np.float32)
    pos = g.op("Unsqueeze", [g.op("Cast", [position_ids], to=FLOAT), g.const([1])])  # [T, 1]
    freqs = g.op("Mul", [pos, inv_freq])  # [T, d/2]
    emb = g.op("Concat", [freqs, freqs], axis=-1)
    cos, sin = g.op("Cos", [emb]), g.op("Sin", [emb])
    if spec.attention_factor != 1.0:
        af = g.const(spec.attention_factor, np.float32)
        cos, sin = g.op("Mul", [cos, af]), g.op("Mul", [sin, af])
    return cos, sin


def _rotate_half(g: GraphBuilder, x: str, cos: str, sin: str) -> str:
    first, second = g.ops("Split", [x], 2, axis=-1, num_outputs=2)
    rotated = g.op("Concat", [g.op("Neg", [second]), first], axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rotated, sin])])


def _swap_last_two(g: GraphBuilder, x: str, split: list[int]) -> str:
    # [n, T, d] -> [n, T, a, b] -> [n, T, b, a] -> [n, T, d]: a de-/re-interleave of d without knowing d
    y = g.op("Reshape", [x, g.const([0, 0] + split)])
    return g.op("Reshape", [g.op("Transpose", [y], perm=[0, 1, 3, 2]), g.const([0, 0, -1])])


def deinterleave_perm(d: int) -> np.ndarray:
    """[0, 2, 4, ..., 1, 3, 5, ...]: the pair layout (x0, x1), (x2, x3) -> (evens, odds)."""
    return np.concatenate([np.arange(0, d, 2), np.arange(1, d, 2)]).astype(np.int64)


def apply_rope(g: GraphBuilder, x: str, cos: str, sin: str, style: str) -> str:
    """Rotate x [n, T, d] (cos/sin [T, d] broadcast over n).

    style:
      "half"        rotate_half on the two halves of d (Llama / Qwen / Mixtral, DeepSeek-V3 with
                    rope_interleave=False);
      "interleaved" DeepSeek-V3 ``apply_rotary_pos_emb_interleave``: pairs (x0,x1),(x2,x3)... are
                    rotated, the OUTPUT is de-interleaved [rotated evens, rotated odds];
      "complex"     DeepSeek-V2 ``apply_rotary_emb`` (view_as_complex): the same rotation, the output
                    stays in pair layout (x0',x1',x2',x3',...).
    "interleaved" and "complex" differ only by the fixed permutation ``deinterleave_perm`` of d,
    applied alike to q and k, so attention scores agree; the layout of a cached rotated key differs.
    """
    if style == "half":
        return _rotate_half(g, x, cos, sin)
    if style not in ("interleaved", "complex"):
        raise ValueError(f"unknown rope style {style!r}")
    # de-interleaving turns the pair rotation into rotate_half with the same cat(freqs, freqs) cos/sin
    y = _rotate_half(g, _swap_last_two(g, x, [-1, 2]), cos, sin)
    if style == "complex":  # back to the pair layout
        y = _swap_last_two(g, y, [2, -1])
    return y
