"""What the architecture files share: reading config.json with clean errors, the settings every
decoder-only MoE model has, tensor names that are the same everywhere, and the pieces of a layer
graph around an architecture's own maths (inputs, outputs, routing, embeddings, the head).

An architecture file (one per Hugging Face ``model_type``) provides:

* ``read_config(cfg) -> Settings``: its settings, refusing anything it cannot export;
* ``model_spec(s) -> ModelSpec``: what the runtime needs to know;
* ``tensor_map(s, names) -> {canonical: Ref}`` and ``shapes(s) -> {canonical: shape}``: where each
  canonical tensor comes from and what it must look like (every source tensor used once);
* ``layer_graph(s, tensors, layer) -> onnx.ModelProto``: the layer's maths, from shared blocks.

Canonical names (torch ``Linear`` layout ``[out, in]``): ``embed``, ``final_norm``, ``lm_head``;
per layer ``layers.{l}.`` + ``attn_norm``, ``ffn_norm``, the attention's own names (``q``, ``k``,
``v``, ``o``, ... see ``blocks/``), ``router`` [E, H], ``router_bias`` [E],
``experts.{e}.gate|up|down``, ``shared.gate|up|down`` (+ ``shared_gate`` [1, H]) and, in dense
layers, ``mlp.gate|up|down``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from dymoe.bundle import graph_io as io
from dymoe.bundle.errors import CheckpointError
from dymoe.bundle.manifest import CacheTensor, ModelSpec, spec_problems

from ..backbone_forms import BackboneForm, gather_rows, head_logits
from ..blocks.attention import GqaConfig
from ..blocks.rope import SUPPORTED as ROPE_TYPES
from ..blocks.rope import rope_parameters
from ..blocks.routing import RouterConfig, route
from ..expert_graph import MS_DOMAIN
from ..layout import Ref
from ..onnx_build import FLOAT, INT64, GraphBuilder
from ..streamed import StreamedModel

Tensors = dict[str, np.ndarray]  # canonical name without "layers.{l}." -> float32 array

# --- reading config.json -----------------------------------------------------------------


def _bad_value(key: str, value: Any, what: str) -> CheckpointError:
    return CheckpointError(f"config.json: {key} is {value!r}, which is not {what}",
                           "fix config.json; compare it with the model's original config.json")


def need(cfg: dict, *keys: str) -> Any:
    """The first of ``keys`` present in config.json, or a clear error naming them."""
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    raise CheckpointError(
        f"config.json lacks '{keys[0]}' (model_type {cfg.get('model_type')!r})",
        "the config is incomplete; compare it with the model's original config.json",
    )


def as_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise _bad_value(key, value, "an integer")
    return int(value)


def as_float(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad_value(key, value, "a number")
    return float(value)


def need_int(cfg: dict, *keys: str) -> int:
    """As :func:`need`, checked to be an integer (the error names the key that held it)."""
    key = next((k for k in keys if cfg.get(k) is not None), keys[0])
    return as_int(key, need(cfg, *keys))


def opt_int(cfg: dict, key: str, default: int | None = None) -> int | None:
    return default if cfg.get(key) is None else as_int(key, cfg[key])


def opt_float(cfg: dict, key: str, default: float | None = None) -> float | None:
    return default if cfg.get(key) is None else as_float(key, cfg[key])


def positive(key: str, value: int | float | None) -> None:
    if value is not None and not value > 0:
        raise _bad_value(key, value, "a positive number")


def eos_ids(cfg: dict, vocab: int) -> list[int]:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return []
    ids = [as_int("eos_token_id", i) for i in (eos if isinstance(eos, list) else [eos])]
    return [i for i in ids if 0 <= i < vocab]


def rope_config(cfg: dict, default_theta: float = 10000.0) -> dict:
    """The rotary embedding's settings as transformers standardises them, checked: what the
    blocks' ``rope_spec`` turns into frequencies (kept in the manifest's ``architecture``)."""
    raw = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(raw, dict):
        raise _bad_value("rope_parameters", raw, "an object")
    try:
        params = rope_parameters(cfg, default_theta)
    except ValueError as e:
        raise CheckpointError(f"config.json: {e}", "export a model with one rope setting for every layer") from None
    kind = params.get("rope_type")
    if kind not in ROPE_TYPES:
        raise CheckpointError(f"config.json: rope type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})",
                              "export a model with one of those, or report this model to the dymoe developers")
    positive("rope_theta", as_float("rope_theta", params["rope_theta"]))
    if kind in ("linear", "dynamic", "yarn", "llama3") and params.get("factor") is not None:
        positive("rope factor", as_float("rope factor", params["factor"]))
    return {"rope_parameters": params, "max_position_embeddings": opt_int(cfg, "max_position_embeddings", 4096)}


def dense_layers(cfg: dict, num_layers: int) -> tuple[int, ...]:
    """Layers with a dense MLP instead of experts: Qwen's ``mlp_only_layers`` and
    ``decoder_sparse_step`` (a layer is MoE when (l + 1) % step == 0), DeepSeek's
    ``first_k_dense_replace``."""
    step = opt_int(cfg, "decoder_sparse_step", 1) or 1
    only = cfg.get("mlp_only_layers") or []
    if not isinstance(only, list):
        raise _bad_value("mlp_only_layers", only, "a list of layer numbers")
    first = opt_int(cfg, "first_k_dense_replace", 0) or 0
    dense = {as_int("mlp_only_layers", x) for x in only} | set(range(min(first, num_layers)))
    dense |= {layer for layer in range(num_layers) if (layer + 1) % step}
    return tuple(sorted(layer for layer in dense if 0 <= layer < num_layers))


@dataclass(frozen=True)
class Decoder:
    """What every decoder-only MoE model here has, whatever its attention and routing."""

    model_type: str
    hidden_size: int
    vocab_size: int
    num_layers: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    dense_layers: tuple[int, ...] = ()  # layers with a dense MLP instead of experts
    dense_intermediate_size: int = 0

    @property
    def moe_layers(self) -> list[int]:
        return [layer for layer in range(self.num_layers) if layer not in self.dense_layers]


def read_decoder(cfg: dict, num_experts_key: str | tuple[str, ...], expert_intermediate_key: str,
                 dense_intermediate_key: str = "intermediate_size") -> Decoder:
    """``num_experts_key``: the config key(s) of the routed expert count, first present wins."""
    experts_keys = (num_experts_key,) if isinstance(num_experts_key, str) else num_experts_key
    hidden = need_int(cfg, "hidden_size")
    for key in ("hidden_size", "vocab_size", "num_hidden_layers"):
        positive(key, need_int(cfg, key))
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(
            f"config.json: hidden_act {act!r} is not supported (dymoe's experts are SwiGLU with silu)",
            "export a model whose experts use silu",
        )
    vocab = need_int(cfg, "vocab_size")
    layers = need_int(cfg, "num_hidden_layers")
    dense = dense_layers(cfg, max(layers, 0))
    bos = cfg.get("bos_token_id")
    eps = as_float("rms_norm_eps", cfg.get("rms_norm_eps", 1e-6))
    positive("rms_norm_eps", eps)
    context = opt_int(cfg, "max_position_embeddings", 4096)
    rope = rope_config(cfg)["rope_parameters"]
    if rope["rope_type"] == "dynamic":  # dynamic NTK scaling extends the trained context by its factor
        context = int(context * float(rope.get("factor", 1.0)))
    d = Decoder(
        model_type=str(cfg["model_type"]), hidden_size=hidden, vocab_size=vocab, num_layers=layers,
        rms_norm_eps=eps, max_position_embeddings=context,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=None if bos is None else as_int("bos_token_id", bos), eos_token_ids=tuple(eos_ids(cfg, vocab)),
        num_experts=need_int(cfg, *experts_keys), top_k=need_int(cfg, "num_experts_per_tok"),
        expert_intermediate_size=need_int(cfg, expert_intermediate_key), dense_layers=dense,
        dense_intermediate_size=need_int(cfg, dense_intermediate_key) if dense else 0)
    if dense and len(dense) == layers:
        raise CheckpointError("config.json makes every layer dense (mlp_only_layers / decoder_sparse_step / "
                              "first_k_dense_replace): there are no experts to offload",
                              "dymoe runs Mixture-of-Experts models; check the config")
    return d


# ModelSpec field -> the config.json key it is read from (an architecture names its own differences)
CONFIG_KEYS = {
    "hidden_size": "hidden_size", "vocab_size": "vocab_size", "num_layers": "num_hidden_layers",
    "top_k": "num_experts_per_tok", "max_position_embeddings": "max_position_embeddings",
    "eos_token_ids": "eos_token_id", "bos_token_id": "bos_token_id", "num_experts": "num_experts",
    "expert_intermediate_size": "intermediate_size", "moe_layers": "mlp_only_layers",
}


def model_spec(d: Decoder, cache: dict[str, tuple[int, int]], keys: dict[str, str] | None = None) -> ModelSpec:
    """The runtime's view of the model; an impossible one is refused naming its config.json key."""
    spec = ModelSpec(model_type=d.model_type, hidden_size=d.hidden_size, vocab_size=d.vocab_size,
                     num_layers=d.num_layers, num_experts=d.num_experts, top_k=d.top_k,
                     expert_intermediate_size=d.expert_intermediate_size, moe_layers=d.moe_layers,
                     kv_cache=[CacheTensor(name, heads, dim) for name, (heads, dim) in cache.items()],
                     max_position_embeddings=d.max_position_embeddings, bos_token_id=d.bos_token_id,
                     eos_token_ids=list(d.eos_token_ids))
    problems = spec_problems(spec)
    if problems:
        names = {**CONFIG_KEYS, **(keys or {})}
        name, what = problems[0]
        base, _, index = name.partition("[")
        raise CheckpointError(f"config.json: {names.get(base, base)}{'[' + index if index else ''} {what}",
                              "fix config.json: it does not describe a model dymoe can run "
                              "(compare it with the model's original config.json)")
    return spec


def settings_json(settings: Any) -> dict[str, Any]:
    """An architecture's settings as the manifest's ``architecture`` object (plain JSON)."""
    return json_ready(dataclasses.asdict(settings))


def json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


# --- canonical tensors --------------------------------------------------------------------


def top_refs(d: Decoder) -> dict[str, Ref]:
    refs = {"embed": Ref("model.embed_tokens.weight"), "final_norm": Ref("model.norm.weight")}
    if not d.tie_word_embeddings:
        refs["lm_head"] = Ref("lm_head.weight")
    return refs


def norm_refs(layer: int, prefix: str) -> dict[str, Ref]:
    c = f"layers.{layer}."
    return {c + "attn_norm": Ref(f"{prefix}input_layernorm.weight"),
            c + "ffn_norm": Ref(f"{prefix}post_attention_layernorm.weight")}


def named_refs(layer: int, group: str, names: dict[str, str], prefix: str) -> dict[str, Ref]:
    """``layers.{l}.{group}{canonical}`` -> ``{prefix}{source}`` for each pair of ``names``."""
    return {f"layers.{layer}.{group}{canon}": Ref(prefix + src) for canon, src in names.items()}


def mlp_refs(layer: int, group: str, prefix: str) -> dict[str, Ref]:
    """A SwiGLU MLP stored as ``{prefix}{gate,up,down}_proj.weight`` (dense layers, shared experts)."""
    return named_refs(layer, group, {n: f"{n}_proj.weight" for n in ("gate", "up", "down")}, prefix)


def expert_refs(d: Decoder, layer: int, experts_prefix: str, names: set[str],
                unfused: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> dict[str, Ref]:
    """Routed experts, either one tensor per expert and matrix (what HF checkpoints hold on
    disk) or transformers 5's fused in-memory form saved as is: ``gate_up_proj [E, 2I, H]``
    (gate rows first, then up) and ``down_proj [E, H, I]``."""
    c = f"layers.{layer}.experts."
    I = d.expert_intermediate_size
    refs: dict[str, Ref] = {}
    if f"{experts_prefix}gate_up_proj" in names:
        for e in range(d.num_experts):
            refs[f"{c}{e}.gate"] = Ref(f"{experts_prefix}gate_up_proj", index=e, rows=(0, I))
            refs[f"{c}{e}.up"] = Ref(f"{experts_prefix}gate_up_proj", index=e, rows=(I, 2 * I))
            refs[f"{c}{e}.down"] = Ref(f"{experts_prefix}down_proj", index=e)
        return refs
    g, u, dn = unfused
    for e in range(d.num_experts):
        refs[f"{c}{e}.gate"] = Ref(f"{experts_prefix}{e}.{g}.weight")
        refs[f"{c}{e}.up"] = Ref(f"{experts_prefix}{e}.{u}.weight")
        refs[f"{c}{e}.down"] = Ref(f"{experts_prefix}{e}.{dn}.weight")
    return refs


def decoder_shapes(d: Decoder) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor that is not attention or shared expert: embeddings, head, norms,
    routers, experts and dense MLPs."""
    H, V, E, I = d.hidden_size, d.vocab_size, d.num_experts, d.expert_intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"embed": (V, H), "final_norm": (H,)}
    if not d.tie_word_embeddings:
        shapes["lm_head"] = (V, H)
    for layer in range(d.num_layers):
        p = f"layers.{layer}."
        shapes.update({p + "attn_norm": (H,), p + "ffn_norm": (H,)})
        if layer in d.dense_layers:
            M = d.dense_intermediate_size
            shapes.update({p + "mlp.gate": (M, H), p + "mlp.up": (M, H), p + "mlp.down": (H, M)})
            continue
        shapes[p + "router"] = (E, H)
        for e in range(E):
            q = f"{p}experts.{e}."
            shapes.update({q + "gate": (I, H), q + "up": (I, H), q + "down": (H, I)})
    return shapes


def per_layer(shapes: dict[str, tuple[int, ...]], layers, group: str = "") -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` repeated as ``layers.{l}.{group}{name}`` for each layer."""
    return {f"layers.{layer}.{group}{n}": s for layer in layers for n, s in shapes.items()}


# --- layer graphs -------------------------------------------------------------------------


class LayerGraph:
    """A layer graph's inputs (declared here) and outputs (:meth:`dense` / :meth:`moe`), as
    ``dymoe.bundle.graph_io`` names them; the architecture fills in the maths between."""

    def __init__(self, d: Decoder, layer: int, cache: dict[str, tuple[int, int]]) -> None:
        self.d = d
        self.cache = cache
        self.g = g = GraphBuilder(f"dymoe_{d.model_type}_layer_{layer}")
        self.hidden = g.input(io.LAYER_IN_HIDDEN, FLOAT, ["T", d.hidden_size])
        self.positions = g.input(io.LAYER_IN_POSITIONS, INT64, ["T"])
        self.past = {name: g.input(io.past(name), FLOAT, [heads, "P", dim]) for name, (heads, dim) in cache.items()}

    def _common(self, residual: str, attn: dict[str, str], attn_input: str) -> None:
        g, H = self.g, self.d.hidden_size
        g.output(residual, io.LAYER_OUT_RESIDUAL, FLOAT, ["T", H])
        for name, (heads, dim) in self.cache.items():
            g.output(attn[f"present_{name}"], io.present(name), FLOAT, [heads, "S", dim])
        g.output(attn["attn_colsum"], io.LAYER_OUT_ATTN_COLSUM, FLOAT, ["S"])
        g.output(attn_input, io.LAYER_OUT_ATTN_INPUT, FLOAT, ["T", H])

    def dense(self, residual: str, attn: dict[str, str], attn_input: str) -> onnx.ModelProto:
        """A layer without routed experts: ``residual`` is its whole output."""
        self._common(residual, attn, attn_input)
        return self.g.model()

    def moe(self, residual: str, expert_input: str, routed: tuple[str, str, str], attn: dict[str, str],
            attn_input: str) -> onnx.ModelProto:
        """A MoE layer: ``residual`` is everything but the routed experts (shared expert included);
        the runtime adds the experts named by ``routed`` = (ids, weights, scores) run on ``expert_input``."""
        g, d = self.g, self.d
        self._common(residual, attn, attn_input)
        ids, weights, _ = routed
        g.output(expert_input, io.LAYER_OUT_EXPERT_INPUT, FLOAT, ["T", d.hidden_size])
        g.output(ids, io.LAYER_OUT_EXPERT_IDS, INT64, ["T", d.top_k])
        g.output(weights, io.LAYER_OUT_EXPERT_WEIGHTS, FLOAT, ["T", d.top_k])
        return g.model()


def swiglu(g: GraphBuilder, x: str, t: Tensors, group: str) -> str:
    """``down(silu(gate(x)) * up(x))`` of the canonical ``{group}gate|up|down``."""
    return g.swiglu(x, t[f"{group}gate"], t[f"{group}up"], t[f"{group}down"], group.rstrip("."))


def router_graph(d: Decoder, routing: RouterConfig, t: Tensors, layer: int) -> onnx.ModelProto:
    """Layer ``layer``'s routing rule alone, on any hidden state: what the look-ahead predictor
    runs on layer l-1's state to guess layer l's experts (the layer graph applies the same block)."""
    g = GraphBuilder(f"dymoe_{d.model_type}_router_{layer}")
    x = g.input(io.ROUTER_IN, FLOAT, ["T", d.hidden_size])
    ids, weights, scores = route(g, x, t["router"], routing, t.get("router_bias"))
    g.output(ids, io.LAYER_OUT_EXPERT_IDS, INT64, ["T", d.top_k])
    g.output(weights, io.LAYER_OUT_EXPERT_WEIGHTS, FLOAT, ["T", d.top_k])
    g.output(scores, io.ROUTER_OUT_SCORES, FLOAT, ["T", d.num_experts])
    return g.model()


def embed_graph(embed: np.ndarray, form: BackboneForm = BackboneForm(),
                streamed: bool = False) -> onnx.ModelProto | StreamedModel:
    """``streamed``: the vocabulary-sized arrays stay aside until written (export's peak memory)."""
    g = GraphBuilder("dymoe_embed")
    ids = g.input(io.EMBED_IN_IDS, INT64, ["T"])
    g.output(gather_rows(g, embed, ids, form), io.EMBED_OUT, FLOAT, ["T", embed.shape[1]])
    return g.streamed() if streamed else g.model()


def head_graph(d: Decoder, final_norm: np.ndarray, lm_head: np.ndarray, form: BackboneForm = BackboneForm(),
               streamed: bool = False) -> onnx.ModelProto | StreamedModel:
    g = GraphBuilder("dymoe_head")
    x = g.input(io.HEAD_IN, FLOAT, ["T", d.hidden_size])
    x = g.rms_norm(x, final_norm, d.rms_norm_eps, "final_norm")
    g.output(head_logits(g, x, lm_head, form), io.HEAD_OUT, FLOAT, ["T", d.vocab_size])
    opsets = {MS_DOMAIN: 1} if any(n.domain == MS_DOMAIN for n in g.nodes) else None
    return g.streamed(opsets) if streamed else g.model(opsets)


# --- grouped-query attention, as Mixtral, Qwen and OLMoE checkpoints store it ---------------


def read_gqa(cfg: dict, d: Decoder, **options: Any) -> GqaConfig:
    """Heads, head size and rope from config.json; ``options`` the architecture's variations
    (qk_norm, clip_qkv, bias, sliding_window)."""
    heads = need_int(cfg, "num_attention_heads")
    positive("num_attention_heads", heads)
    kv_heads = opt_int(cfg, "num_key_value_heads") or heads
    positive("num_key_value_heads", kv_heads)
    if heads % kv_heads:
        raise CheckpointError(f"config.json: num_key_value_heads is {kv_heads}, which does not divide the {heads} "
                              "attention heads", "fix config.json; compare it with the model's original")
    head_dim = opt_int(cfg, "head_dim")
    if head_dim is None:
        if d.hidden_size % heads:
            raise CheckpointError(f"config.json: hidden_size {d.hidden_size} is not a multiple of "
                                  f"num_attention_heads {heads} (and no head_dim is given)",
                                  "fix config.json; compare it with the model's original")
        head_dim = d.hidden_size // heads
    if head_dim < 2 or head_dim % 2:
        raise CheckpointError(f"config.json: head_dim is {head_dim}; the rotary embedding needs an even head size",
                              "fix config.json; compare it with the model's original")
    for key in ("clip_qkv", "sliding_window"):
        positive(key, options.get(key))
    return GqaConfig(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, rope=rope_config(cfg),
                     rms_norm_eps=d.rms_norm_eps, **options)


def gqa_refs(cfg: GqaConfig, layer: int, prefix: str) -> dict[str, Ref]:
    """``{prefix}self_attn.{q,k,v,o}_proj`` plus biases and q/k norms as the settings say."""
    names = {n: f"{n}_proj.weight" for n in ("q", "k", "v", "o")}
    if cfg.bias:
        names |= {f"{n}_bias": f"{n}_proj.bias" for n in ("q", "k", "v")}
    if cfg.qk_norm != "none":
        names |= {"q_norm": "q_norm.weight", "k_norm": "k_norm.weight"}
    return named_refs(layer, "", names, f"{prefix}self_attn.")
