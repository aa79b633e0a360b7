"""DeepSeek-V2 and V3 bundles against transformers (torch, CPU): Multi-head Latent Attention
with and without low-rank queries, a compressed KV cache, shared experts, a dense first layer,
greedy and group-limited softmax routing (V2), sigmoid routing with a selection-only correction
bias, groups and a routed scaling factor (V3), and YaRN rope past the original context.

fp32 logits within 1e-4 on a 16-token prefill plus 8 decode steps through the bundle's own cache,
and greedy generation token-identical to ``generate``; the routing decisions inside the layer
graphs equal transformers' router modules; the tensor mapping is exact on arange-filled weights.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_models import make_tiny_model

from dymoe.bundle import graph_io as io
from dymoe.bundle.manifest import read_manifest
from dymoe.runtime.bundle import Bundle
from dymoe.runtime.experts import StaticExperts
from dymoe.runtime.generate import generate
from dymoe.runtime.model import MoEModel
from dymoe.runtime.model_session import open_model
from dymoe.runtime.policy_config import PolicyRun
from dymoe.toolchain.export import export
from dymoe.toolchain.options import ExportOptions

PROMPT = np.random.default_rng(2).integers(0, 320, 24)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 12,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}

CASES = {
    # V2-Lite's shape: no q compression, greedy top-k, two shared experts
    "v2-lite": ("deepseek_v2", {}),
    # V2 with low-rank queries, group-limited routing and a scaling factor
    "v2-groups": ("deepseek_v2", {"q_lora_rank": 24, "topk_method": "group_limited_greedy", "n_group": 4,
                                  "topk_group": 2, "routed_scaling_factor": 2.0}),
    # V3: sigmoid + correction bias, 4 groups keep 2, renormalised, x2.5, YaRN past position 12
    "v3-yarn": ("deepseek_v3", {"rope_parameters": YARN, "routed_scaling_factor": 2.5}),
    # V3 with rope on halves instead of interleaved pairs, no groups, no renormalisation
    "v3-half": ("deepseek_v3", {"rope_interleave": False, "n_group": 1, "topk_group": 1, "norm_topk_prob": False}),
}


class Case:
    def __init__(self, arch, overrides, root):
        self.arch = arch
        self.src, self.bundle = root / "src", root / "bundle"
        self.model = make_tiny_model(arch, self.src, seed=7, **overrides)
        export(str(self.src), self.bundle, ExportOptions(precisions=("fp32", "int4"), backbone_precision="fp32"))


@pytest.fixture(scope="module", params=list(CASES))
def ds(request, tmp_path_factory):
    arch, overrides = CASES[request.param]
    return Case(arch, overrides, tmp_path_factory.mktemp(request.param))


def _bundle_logits(bundle, precision="fp32"):
    b = Bundle(bundle)
    model = MoEModel(b, StaticExperts(b, precision))
    cache = model.new_cache()
    outs = [model.forward(PROMPT[:16], cache, all_logits=True)]
    outs += [model.forward(PROMPT[i:i + 1], cache) for i in range(16, 24)]
    return np.concatenate(outs), cache


def _torch_logits(model):
    with torch.no_grad():
        out = model(torch.tensor(PROMPT[:16][None]), use_cache=True)
        logits, past = [out.logits[0]], out.past_key_values
        for i in range(16, 24):
            out = model(torch.tensor([[PROMPT[i]]]), past_key_values=past, use_cache=True)
            logits.append(out.logits[0])
            past = out.past_key_values
    return torch.cat(logits).numpy()


def test_fp32_logits_match_transformers(ds):
    got, _ = _bundle_logits(ds.bundle)
    ref = _torch_logits(ds.model)
    assert got.shape == ref.shape == (24, 320)
    assert np.abs(got - ref).max() < 1e-4


def test_greedy_generation_is_token_identical(ds):
    b = Bundle(ds.bundle)
    prompt = [int(t) for t in PROMPT[:16]]
    ours = generate(MoEModel(b, StaticExperts(b, "fp32")), prompt, max_new_tokens=20).token_ids
    with torch.no_grad():
        theirs = ds.model.generate(torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20,
                                   do_sample=False)[0, 16:].tolist()
    assert ours == theirs and len(ours) == 20


def test_the_cache_stays_compressed(ds):
    """Per token and layer the cache holds the latent and one shared rope key, not per-head K/V."""
    m = read_manifest(ds.bundle)
    cfg = json.loads((ds.src / "config.json").read_text())
    assert [(c.name, c.heads, c.dim) for c in m.model.kv_cache] == [
        ("ckv", 1, cfg["kv_lora_rank"]), ("kpe", 1, cfg["qk_rope_head_dim"])]
    full = 2 * cfg["num_attention_heads"] * (cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"])
    assert m.model.kv_bytes_per_token() == 4 * 3 * (16 + 8) < 4 * 3 * full
    _, cache = _bundle_logits(ds.bundle)
    assert cache.nbytes() == 24 * m.model.kv_bytes_per_token()


def test_dense_first_layer_and_shared_experts(ds):
    m = read_manifest(ds.bundle)
    assert m.model.moe_layers == [1, 2]
    assert {e.layer for e in m.experts} == {1, 2} and len(m.backbone.routers) == 2
    cfg = json.loads((ds.src / "config.json").read_text())
    assert m.architecture["shared_intermediate_size"] == cfg["n_shared_experts"] * cfg["moe_intermediate_size"]


def test_routing_in_the_graph_equals_transformers_router(ds):
    """The layer graph's expert ids and weights are what transformers' router module picks for the
    same hidden states; the router graph (the look-ahead predictor) picks the same too."""
    import onnxruntime as ort

    b = Bundle(ds.bundle)
    layer = 1
    x = np.random.default_rng(3).standard_normal((12, 64)).astype(np.float32)
    router = ds.model.model.layers[layer].mlp.gate
    with torch.no_grad():
        _, weights, ids = router(torch.from_numpy(x))
    order = torch.argsort(-weights, dim=-1, stable=True)
    ids, weights = ids.gather(1, order).numpy(), weights.gather(1, order).numpy()
    sess = ort.InferenceSession(b.read(b.manifest.backbone.routers[0]), providers=["CPUExecutionProvider"])
    got_ids, got_w = sess.run([io.LAYER_OUT_EXPERT_IDS, io.LAYER_OUT_EXPERT_WEIGHTS], {io.ROUTER_IN: x})
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_allclose(got_w, weights, rtol=1e-5, atol=1e-6)


def test_policies_run_through_dense_layers(ds):
    """A budgeted run with look-ahead prefetch across the dense layer computes what the
    all-resident fp32 run computes at a full budget; int4 experts under a small budget run too."""
    s = open_model(ds.bundle, precision="fp32")
    prompt = [int(t) for t in PROMPT[:10]]
    want = s.generate_ids(prompt, max_new_tokens=8).token_ids
    for policy, budget in (("lru-prefetch", "100%"), ("dymoe", "100%")):
        run = open_model(ds.bundle, policy=PolicyRun(policy, budget, overrides={"ladder": "fp32"}
                                                     if policy == "dymoe" else {}))
        try:
            result = run.generate_ids(prompt, max_new_tokens=8)
            m = run.metrics(result)
        finally:
            run.close()
        assert result.token_ids == want, policy
        assert set(m["precision_mix"]) == {"1", "2"}  # experts only in the MoE layers
    small = open_model(ds.bundle, policy=PolicyRun("static-int4", "30%"))
    try:
        assert len(small.generate_ids(prompt, max_new_tokens=8).token_ids) == 8
    finally:
        small.close()


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_mapping_is_exact_on_arange_weights(arch, tmp_path):
    """Every checkpoint tensor, filled with its own block of consecutive numbers, lands in the
    canonical tensor the hand-written table names (transformers' own save_pretrained names)."""
    from safetensors.numpy import load_file, save_file

    from dymoe.toolchain.archs import get_architecture
    from dymoe.toolchain.checkpoint import Checkpoint
    from dymoe.toolchain.layout import check_coverage

    src = tmp_path / "src"
    make_tiny_model(arch, src, q_lora_rank=24)
    tensors = load_file(src / "model.safetensors")
    offset = 0
    for name in sorted(tensors):
        n = tensors[name].size
        tensors[name] = (offset + np.arange(n, dtype=np.float64)).astype(np.float32).reshape(tensors[name].shape)
        offset += n
    save_file(tensors, src / "model.safetensors")
    ckpt = Checkpoint(src)
    module = get_architecture(arch)
    settings = module.read_config(ckpt.config)
    mapping = module.tensor_map(settings, set(ckpt.names()))
    check_coverage(mapping, module.shapes(settings), {n: ckpt.info(n).shape for n in ckpt.names()}, arch)
    table = {"layers.1.q_a": "self_attn.q_a_proj.weight", "layers.1.q_a_norm": "self_attn.q_a_layernorm.weight",
             "layers.1.q_b": "self_attn.q_b_proj.weight", "layers.1.kv_a": "self_attn.kv_a_proj_with_mqa.weight",
             "layers.1.kv_a_norm": "self_attn.kv_a_layernorm.weight", "layers.1.kv_b": "self_attn.kv_b_proj.weight",
             "layers.1.o": "self_attn.o_proj.weight", "layers.1.router": "mlp.gate.weight",
             "layers.1.experts.5.up": "mlp.experts.5.up_proj.weight",
             "layers.1.shared.down": "mlp.shared_experts.down_proj.weight"}
    table = {k: f"model.layers.1.{v}" for k, v in table.items()}
    table |= {"layers.0.mlp.gate": "model.layers.0.mlp.gate_proj.weight", "embed": "model.embed_tokens.weight"}
    if arch == "deepseek_v3":
        table["layers.2.router_bias"] = "model.layers.2.mlp.gate.e_score_correction_bias"
    for canon, source in table.items():
        ref = mapping[canon]
        np.testing.assert_array_equal(ckpt.read(ref.source, index=ref.index, rows=ref.rows), tensors[source])
