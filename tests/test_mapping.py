"""Mapping tests on arange-filled tensors prove each architecture's split is exact.

Every source tensor of a tiny checkpoint is filled with its own block of consecutive numbers
(``offset + arange(numel)``, blocks disjoint), so every value in the file is distinct (F32). A
canonical tensor read through the architecture's mapping can then only equal the expected slice
of the expected source tensor if the mapping names the right tensor, the right expert and the
right rows. The expected Hugging Face names are written out here by hand (as the checkpoints on
disk spell them), never taken from dymoe's own mapping; ``test_names_match_transformers``
cross-checks them against what transformers itself saves.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
from tiny_models import ARCHS, tiny_config

from dymoe.bundle.errors import CheckpointError
from dymoe.bundle.safetensors_io import write_safetensors
from dymoe.toolchain.archs import ARCHITECTURES, get_architecture
from dymoe.toolchain.checkpoint import Checkpoint
from dymoe.toolchain.layout import check_coverage

# --------------------------------------------------------------------------------------------
# The hand-written expectation: Hugging Face names and which canonical tensor each one gives.
# --------------------------------------------------------------------------------------------

# MoE block name and per-expert (gate, up, down) names as the checkpoints on disk have them.
MOE = {"mixtral": "block_sparse_moe", "qwen2_moe": "mlp", "qwen3_moe": "mlp", "olmoe": "mlp"}
EXPERT_NAMES = {
    "mixtral": ("w1", "w3", "w2"),
    "qwen2_moe": ("gate_proj", "up_proj", "down_proj"),
    "qwen3_moe": ("gate_proj", "up_proj", "down_proj"),
    "olmoe": ("gate_proj", "up_proj", "down_proj"),
}
# Where transformers 5 keeps the MoE block in memory (what ``model.state_dict()`` names it).
MOE_IN_MEMORY = {"mixtral": "mlp", "qwen2_moe": "mlp", "qwen3_moe": "mlp", "olmoe": "mlp"}


@functools.cache
def _config_json(arch: str) -> str:
    d = tiny_config(arch).to_dict()
    d["model_type"] = arch
    return json.dumps(d)


def config_dict(arch: str) -> dict:
    """The tiny transformers config, exactly as config.json will hold it (a fresh copy)."""
    return json.loads(_config_json(arch))


def dims(cfg: dict) -> dict:
    H, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = cfg.get("head_dim") or H // nh
    arch = cfg["model_type"]
    return dict(
        H=H, V=cfg["vocab_size"], L=cfg["num_hidden_layers"], D=D, Q=nh * D, KV=nkv * D,
        E=cfg.get("num_experts") or cfg["num_local_experts"],  # transformers 5 Qwen3: num_local_experts
        I=cfg["moe_intermediate_size"] if arch.startswith("qwen") else cfg["intermediate_size"],
        S=cfg.get("shared_expert_intermediate_size", 0) if arch == "qwen2_moe" else 0,
    )


def expected_layout(arch: str, cfg: dict, fused_layers=(), moe_fused: str | None = None):
    """``(sources, canon)``: source name -> shape, and canonical name -> (source, selector).

    ``selector`` is a numpy index applied to the source array. Layers in ``fused_layers`` hold
    their experts as ``{moe_fused}.experts.gate_up_proj [E, 2I, H]`` (gate rows, then up rows)
    and ``{moe_fused}.experts.down_proj [E, H, I]``; the other layers one tensor per expert.
    """
    d = dims(cfg)
    H, V, D, Q, KV, E, I, S = (d[k] for k in ("H", "V", "D", "Q", "KV", "E", "I", "S"))
    tied = bool(cfg.get("tie_word_embeddings"))
    moe = MOE[arch]
    moe_fused = moe_fused or moe
    g_name, u_name, d_name = EXPERT_NAMES[arch]
    sources: dict[str, tuple[int, ...]] = {}
    canon: dict[str, tuple[str, tuple]] = {}

    def add(canonical: str | None, source: str, shape: tuple[int, ...]) -> None:
        sources[source] = shape
        if canonical is not None:
            canon[canonical] = (source, ())

    add("embed", "model.embed_tokens.weight", (V, H))
    add("final_norm", "model.norm.weight", (H,))
    if not tied:
        add("lm_head", "lm_head.weight", (V, H))
    for layer in range(d["L"]):
        p, c = f"model.layers.{layer}.", f"layers.{layer}."
        add(c + "attn_norm", p + "input_layernorm.weight", (H,))
        add(c + "ffn_norm", p + "post_attention_layernorm.weight", (H,))
        add(c + "q", p + "self_attn.q_proj.weight", (Q, H))
        add(c + "k", p + "self_attn.k_proj.weight", (KV, H))
        add(c + "v", p + "self_attn.v_proj.weight", (KV, H))
        add(c + "o", p + "self_attn.o_proj.weight", (H, Q))
        if arch == "qwen2_moe":
            add(c + "q_bias", p + "self_attn.q_proj.bias", (Q,))
            add(c + "k_bias", p + "self_attn.k_proj.bias", (KV,))
            add(c + "v_bias", p + "self_attn.v_proj.bias", (KV,))
        if arch == "qwen3_moe":  # RMSNorm per head
            add(c + "q_norm", p + "self_attn.q_norm.weight", (D,))
            add(c + "k_norm", p + "self_attn.k_norm.weight", (D,))
        if arch == "olmoe":  # RMSNorm over all heads
            add(c + "q_norm", p + "self_attn.q_norm.weight", (Q,))
            add(c + "k_norm", p + "self_attn.k_norm.weight", (KV,))
        if layer in fused_layers:
            add(c + "router", f"{p}{moe_fused}.gate.weight", (E, H))
            gu, dn = f"{p}{moe_fused}.experts.gate_up_proj", f"{p}{moe_fused}.experts.down_proj"
            add(None, gu, (E, 2 * I, H))
            add(None, dn, (E, H, I))
            for e in range(E):
                canon[f"{c}experts.{e}.gate"] = (gu, (e, slice(0, I)))
                canon[f"{c}experts.{e}.up"] = (gu, (e, slice(I, 2 * I)))
                canon[f"{c}experts.{e}.down"] = (dn, (e,))
        else:
            add(c + "router", f"{p}{moe}.gate.weight", (E, H))
            for e in range(E):
                q = f"{p}{moe}.experts.{e}."
                add(f"{c}experts.{e}.gate", f"{q}{g_name}.weight", (I, H))
                add(f"{c}experts.{e}.up", f"{q}{u_name}.weight", (I, H))
                add(f"{c}experts.{e}.down", f"{q}{d_name}.weight", (H, I))
        if arch == "qwen2_moe":
            add(c + "shared.gate", p + "mlp.shared_expert.gate_proj.weight", (S, H))
            add(c + "shared.up", p + "mlp.shared_expert.up_proj.weight", (S, H))
            add(c + "shared.down", p + "mlp.shared_expert.down_proj.weight", (H, S))
            add(c + "shared_gate", p + "mlp.shared_expert_gate.weight", (1, H))
    return sources, canon


def arange_fill(shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Each tensor its own block of consecutive values; blocks disjoint (all values distinct)."""
    out, offset = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape, dtype=np.int64))
        out[name] = (offset + np.arange(n, dtype=np.float64)).astype(np.float32).reshape(shape)
        offset += n
    assert offset < 2**24, "values must stay exact in float32"
    return out


def bf16_round(a: np.ndarray) -> np.ndarray:
    import torch

    return torch.from_numpy(np.ascontiguousarray(a)).to(torch.bfloat16).to(torch.float32).numpy()


def write_checkpoint(folder: Path, cfg: dict, tensors: dict[str, np.ndarray], dtype: str = "F32") -> Checkpoint:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    write_safetensors(folder / "model.safetensors", tensors, dtype)
    return Checkpoint(folder)


def map_and_check(ckpt: Checkpoint):
    """The architecture's settings and mapping, checked exactly as the export checks them."""
    arch = get_architecture(ckpt.model_type)
    settings = arch.read_config(ckpt.config)
    arch.model_spec(settings)
    names = set(ckpt.names())
    mapping = arch.tensor_map(settings, names)
    check_coverage(mapping, arch.shapes(settings), {n: ckpt.info(n).shape for n in names}, ckpt.model_type)
    return settings, mapping


def assert_split_exact(ckpt, mapping, canon, tensors, dtype="F32"):
    assert set(mapping) == set(canon)
    for name, (source, sel) in canon.items():
        ref = mapping[name]
        got = ckpt.read(ref.source, index=ref.index, rows=ref.rows)
        src = tensors[source] if dtype == "F32" else bf16_round(tensors[source])
        want = src[sel]
        assert got.dtype == np.float32
        assert got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=f"{name} <- {source}{sel}")


# --------------------------------------------------------------------------------------------
# Cross-check of the hand-written names against transformers itself
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_names_match_transformers(arch, tmp_path):
    """What ``save_pretrained`` writes is exactly the hand-written table (names and shapes), and
    transformers 5 holds experts in memory as ``gate_up_proj`` with gate rows first."""
    import torch
    import transformers as tf
    from safetensors.numpy import load_file

    cls = {"mixtral": tf.MixtralForCausalLM, "qwen2_moe": tf.Qwen2MoeForCausalLM,
           "qwen3_moe": tf.Qwen3MoeForCausalLM, "olmoe": tf.OlmoeForCausalLM}[arch]
    torch.manual_seed(0)
    model = cls(tiny_config(arch)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    model.save_pretrained(tmp_path)
    disk = load_file(str(tmp_path / "model.safetensors"))
    sources, _ = expected_layout(arch, config_dict(arch))
    assert {n: tuple(t.shape) for n, t in disk.items()} == sources

    cfg, d = config_dict(arch), dims(config_dict(arch))
    I = d["I"]
    sd = model.state_dict()
    g, u, dn = EXPERT_NAMES[arch]
    for layer in range(d["L"]):
        mem = f"model.layers.{layer}.{MOE_IN_MEMORY[arch]}."
        gate_up = sd[mem + "experts.gate_up_proj"].numpy()
        down = sd[mem + "experts.down_proj"].numpy()
        assert gate_up.shape == (d["E"], 2 * I, d["H"]) and down.shape == (d["E"], d["H"], I)
        np.testing.assert_array_equal(sd[mem + "gate.weight"].numpy(),
                                      disk[f"model.layers.{layer}.{MOE[arch]}.gate.weight"])
        for e in range(d["E"]):
            q = f"model.layers.{layer}.{MOE[arch]}.experts.{e}."
            np.testing.assert_array_equal(gate_up[e, :I], disk[f"{q}{g}.weight"])
            np.testing.assert_array_equal(gate_up[e, I:], disk[f"{q}{u}.weight"])
            np.testing.assert_array_equal(down[e], disk[f"{q}{dn}.weight"])
    assert cfg["model_type"] == arch


def test_every_architecture_is_covered():
    # DeepSeek's two are covered in test_deepseek.py
    assert set(ARCHITECTURES) == set(ARCHS) | {"deepseek_v2", "deepseek_v3"}


# --------------------------------------------------------------------------------------------
# The split is exact
# --------------------------------------------------------------------------------------------

SPEC_FACTS = {
    # arch: (num_experts, I, S, head_dim, qk_norm, attention_bias, shared_expert_gate)
    "mixtral": (8, 96, 0, 16, "none", False, False),
    "qwen2_moe": (8, 96, 64, 16, "none", True, True),
    "qwen3_moe": (8, 96, 0, 32, "head", False, False),
    "olmoe": (8, 96, 0, 16, "full", False, False),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_read_config(arch):
    module = get_architecture(arch)
    s = module.read_config(config_dict(arch))
    d, a = s.decoder, s.attention
    shared = getattr(s, "shared_intermediate_size", 0)
    got = (d.num_experts, d.expert_intermediate_size, shared, a.head_dim, a.qk_norm, a.bias, shared > 0)
    assert got == SPEC_FACTS[arch]
    assert (d.model_type, d.hidden_size, d.vocab_size, d.num_layers) == (arch, 64, 320, 3)
    assert (a.num_heads, a.num_kv_heads, d.top_k) == (4, 2, 2)
    spec = module.model_spec(s)
    assert spec.moe_layers == [0, 1, 2] and [(c.name, c.heads, c.dim) for c in spec.kv_cache] == [
        ("key", 2, a.head_dim), ("value", 2, a.head_dim)]


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_split_is_exact(arch, dtype, tmp_path):
    cfg = config_dict(arch)
    sources, canon = expected_layout(arch, cfg)
    tensors = arange_fill(sources)
    ckpt = write_checkpoint(tmp_path, cfg, tensors, dtype)
    assert {n: ckpt.info(n).dtype for n in ckpt.names()} == {n: dtype for n in sources}
    settings, mapping = map_and_check(ckpt)
    # the hand-written table and dymoe's canonical layout agree on names and shapes
    shapes = get_architecture(arch).shapes(settings)
    assert set(canon) == set(shapes)
    for name, (source, sel) in canon.items():
        assert np.empty(sources[source])[sel].shape == shapes[name], name
    assert_split_exact(ckpt, mapping, canon, tensors, dtype)


@pytest.mark.parametrize("arch", ARCHS)
def test_spot_checks(arch, tmp_path):
    """A few mappings spelled out literally, the way a reader of the HF checkpoint sees them."""
    cfg = config_dict(arch)
    sources, _ = expected_layout(arch, cfg)
    tensors = arange_fill(sources)
    ckpt = write_checkpoint(tmp_path, cfg, tensors)
    _, mapping = map_and_check(ckpt)

    def read(canonical):
        r = mapping[canonical]
        return ckpt.read(r.source, index=r.index, rows=r.rows)

    if arch == "mixtral":
        pre = "model.layers.1.block_sparse_moe.experts.3."
        trio = {"gate": "w1", "up": "w3", "down": "w2"}
    else:
        pre = "model.layers.1.mlp.experts.3."
        trio = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    for canonical, hf in trio.items():
        np.testing.assert_array_equal(read(f"layers.1.experts.3.{canonical}"), tensors[f"{pre}{hf}.weight"])
    np.testing.assert_array_equal(read("layers.2.o"), tensors["model.layers.2.self_attn.o_proj.weight"])
    np.testing.assert_array_equal(read("embed"), tensors["model.embed_tokens.weight"])
    np.testing.assert_array_equal(read("lm_head"), tensors["lm_head.weight"])
    if arch == "qwen2_moe":
        np.testing.assert_array_equal(read("layers.0.shared_gate"),
                                      tensors["model.layers.0.mlp.shared_expert_gate.weight"])
        np.testing.assert_array_equal(read("layers.0.k_bias"), tensors["model.layers.0.self_attn.k_proj.bias"])


# (arch, which layers are fused, MoE block name of the fused tensors)
FUSED_CASES = [
    pytest.param("mixtral", (0, 1, 2), "block_sparse_moe", id="mixtral-all"),
    pytest.param("mixtral", (1,), "block_sparse_moe", id="mixtral-mixed"),
    pytest.param(
        "mixtral", (0, 1, 2), "mlp", id="mixtral-in-memory-names"
    ),
    pytest.param("qwen2_moe", (0, 1, 2), "mlp", id="qwen2_moe-all"),
    pytest.param("qwen2_moe", (0, 2), "mlp", id="qwen2_moe-mixed"),
    pytest.param("qwen3_moe", (0, 1, 2), "mlp", id="qwen3_moe-all"),
    pytest.param("olmoe", (0, 1, 2), "mlp", id="olmoe-all"),
    pytest.param("olmoe", (2,), "mlp", id="olmoe-mixed"),
]


@pytest.mark.parametrize("arch,fused_layers,moe_name", FUSED_CASES)
def test_fused_split_is_exact(arch, fused_layers, moe_name, tmp_path):
    cfg = config_dict(arch)
    sources, canon = expected_layout(arch, cfg, fused_layers, moe_name)
    tensors = arange_fill(sources)
    ckpt = write_checkpoint(tmp_path, cfg, tensors)
    _, mapping = map_and_check(ckpt)
    assert_split_exact(ckpt, mapping, canon, tensors)
    # literal statement of the fused layout: gate rows first, then up
    I = dims(cfg)["I"]
    layer = fused_layers[0]
    gu = tensors[f"model.layers.{layer}.{moe_name}.experts.gate_up_proj"]
    dn = tensors[f"model.layers.{layer}.{moe_name}.experts.down_proj"]
    for e in (0, 5, 7):
        r = {k: mapping[f"layers.{layer}.experts.{e}.{k}"] for k in ("gate", "up", "down")}
        np.testing.assert_array_equal(ckpt.read(r["gate"].source, r["gate"].index, r["gate"].rows), gu[e, :I])
        np.testing.assert_array_equal(ckpt.read(r["up"].source, r["up"].index, r["up"].rows), gu[e, I:])
        np.testing.assert_array_equal(ckpt.read(r["down"].source, r["down"].index, r["down"].rows), dn[e])


def test_fused_split_bf16(tmp_path):
    cfg = config_dict("qwen3_moe")
    sources, canon = expected_layout("qwen3_moe", cfg, (0, 1, 2))
    tensors = arange_fill(sources)
    ckpt = write_checkpoint(tmp_path, cfg, tensors, "BF16")
    _, mapping = map_and_check(ckpt)
    assert_split_exact(ckpt, mapping, canon, tensors, "BF16")


def test_tied_embeddings(tmp_path):
    cfg = {**config_dict("olmoe"), "tie_word_embeddings": True}
    sources, canon = expected_layout("olmoe", cfg)
    assert "lm_head.weight" not in sources
    tensors = arange_fill(sources)
    ckpt = write_checkpoint(tmp_path / "a", cfg, tensors)
    settings, mapping = map_and_check(ckpt)
    assert settings.decoder.tie_word_embeddings and "lm_head" not in mapping
    assert_split_exact(ckpt, mapping, canon, tensors)
    # a tied config with an lm_head in the file would silently drop it: refuse
    tensors["lm_head.weight"] = np.zeros((320, 64), np.float32)
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        map_and_check(write_checkpoint(tmp_path / "b", cfg, tensors))


# --------------------------------------------------------------------------------------------
# Checkpoints that do not match the layout
# --------------------------------------------------------------------------------------------

EXTRA = [
    ("mixtral", "model.layers.0.self_attn.rotary_emb.inv_freq", (8,)),
    ("qwen2_moe", "model.layers.3.input_layernorm.weight", (64,)),  # a layer the config lacks
    ("qwen3_moe", "model.layers.1.mlp.experts.8.gate_proj.weight", (96, 64)),  # a 9th expert
    ("olmoe", "lm_head.bias", (320,)),
]


@pytest.mark.parametrize("arch,extra,shape", EXTRA)
def test_extra_tensor_is_named(arch, extra, shape, tmp_path):
    cfg = config_dict(arch)
    sources, _ = expected_layout(arch, cfg)
    tensors = arange_fill({**sources, extra: shape})
    with pytest.raises(CheckpointError, match="ignored") as e:
        map_and_check(write_checkpoint(tmp_path, cfg, tensors))
    assert extra in str(e.value)


def test_both_expert_forms_refused(tmp_path):
    """A layer holding its experts both fused and one per expert: one of them would be dropped."""
    cfg = config_dict("mixtral")
    sources, _ = expected_layout("mixtral", cfg)
    fused, _ = expected_layout("mixtral", cfg, (2,))
    sources.update(fused)
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.block_sparse_moe\.experts\."):
        map_and_check(write_checkpoint(tmp_path, cfg, arange_fill(sources)))


MISSING = [
    ("mixtral", "lm_head.weight"),
    ("mixtral", "model.layers.2.block_sparse_moe.experts.7.w2.weight"),
    ("qwen2_moe", "model.layers.1.self_attn.q_proj.bias"),
    ("qwen2_moe", "model.layers.0.mlp.shared_expert_gate.weight"),
    ("qwen3_moe", "model.layers.2.self_attn.k_norm.weight"),
    ("olmoe", "model.layers.0.mlp.gate.weight"),
    ("olmoe", "model.norm.weight"),
]


@pytest.mark.parametrize("arch,missing", MISSING)
def test_missing_tensor_is_named(arch, missing, tmp_path):
    cfg = config_dict(arch)
    sources, _ = expected_layout(arch, cfg)
    del sources[missing]
    with pytest.raises(CheckpointError, match="lacks") as e:
        map_and_check(write_checkpoint(tmp_path, cfg, arange_fill(sources)))
    assert missing in str(e.value)


def test_fused_down_missing_is_named(tmp_path):
    cfg = config_dict("qwen2_moe")
    sources, _ = expected_layout("qwen2_moe", cfg, (1,))
    del sources["model.layers.1.mlp.experts.down_proj"]
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.experts\.down_proj"):
        map_and_check(write_checkpoint(tmp_path, cfg, arange_fill(sources)))


# (arch, fused layers, tensor, wrong shape, message fragment)
WRONG_SHAPE = [
    ("mixtral", (), "model.layers.1.block_sparse_moe.experts.3.w1.weight", (95, 64), "shape"),
    ("mixtral", (), "model.layers.1.block_sparse_moe.experts.3.w2.weight", (96, 64), "shape"),  # transposed
    ("qwen2_moe", (), "model.layers.0.mlp.gate.weight", (7, 64), "shape"),
    ("qwen2_moe", (), "model.layers.0.mlp.shared_expert.down_proj.weight", (64, 63), "shape"),
    ("qwen3_moe", (), "model.layers.2.self_attn.q_norm.weight", (128,), "shape"),  # full, not per head
    ("olmoe", (), "model.layers.2.self_attn.k_norm.weight", (16,), "shape"),  # per head, not full
    ("olmoe", (), "model.norm.weight", (65,), "shape"),
    ("olmoe", (), "lm_head.weight", (64, 320), "shape"),
    ("qwen3_moe", (1,), "model.layers.1.mlp.experts.gate_up_proj", (8, 194, 64), "partly used"),
    ("qwen3_moe", (1,), "model.layers.1.mlp.experts.gate_up_proj", (8, 192, 65), "shape"),
    ("qwen3_moe", (1,), "model.layers.1.mlp.experts.gate_up_proj", (8, 96, 64), "shape"),  # gate only
    ("olmoe", (0,), "model.layers.0.mlp.experts.down_proj", (9, 64, 96), "partly used"),
    ("olmoe", (0,), "model.layers.0.mlp.experts.down_proj", (8, 96, 64), "shape"),
]


@pytest.mark.parametrize("arch,fused,name,shape,fragment", WRONG_SHAPE)
def test_wrong_shape(arch, fused, name, shape, fragment, tmp_path):
    cfg = config_dict(arch)
    sources, _ = expected_layout(arch, cfg, fused)
    assert name in sources and sources[name] != shape
    sources[name] = shape
    with pytest.raises(CheckpointError, match=fragment) as e:
        map_and_check(write_checkpoint(tmp_path, cfg, arange_fill(sources)))
    assert name in str(e.value)


@pytest.mark.parametrize("model_type", ["deepseek_v4", "llama", "", "Mixtral"])
def test_unknown_model_type(model_type, tmp_path):
    with pytest.raises(CheckpointError) as e:
        get_architecture(model_type)
    msg = str(e.value)
    assert repr(model_type) in msg
    for supported in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
        assert supported in msg
    # and through a checkpoint folder whose config names it
    cfg = {**config_dict("mixtral"), "model_type": model_type}  # a copy: config_dict is cached
    ckpt = write_checkpoint(tmp_path, cfg, {"x": np.zeros(2, np.float32)})
    with pytest.raises(CheckpointError, match="supports"):
        get_architecture(ckpt.model_type)


@pytest.mark.parametrize("arch", ARCHS)
def test_get_architecture_known(arch):
    module = get_architecture(arch)
    assert module.MODEL_TYPE == arch
