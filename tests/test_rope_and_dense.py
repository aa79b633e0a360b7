"""Rope scaling and dense layers for the families that had neither before, against transformers:
Qwen3-MoE with linear, dynamic (decoding past the trained context), YaRN and Llama-3 rope; Qwen
MoE models whose ``mlp_only_layers`` / ``decoder_sparse_step`` make some layers dense. fp32
logits within 1e-4 over a prefill and decode steps, greedy tokens identical, and the budgeted
runtime running through the dense layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import make_tiny_model

from dymoe.bundle.errors import CheckpointError
from dymoe.bundle.manifest import read_manifest
from dymoe.runtime.bundle import Bundle
from dymoe.runtime.experts import StaticExperts
from dymoe.runtime.generate import generate
from dymoe.runtime.model import MoEModel
from dymoe.runtime.model_session import open_model
from dymoe.runtime.policy_config import PolicyRun
from dymoe.toolchain.export import export
from dymoe.toolchain.options import ExportOptions

PROMPT = np.random.default_rng(4).integers(0, 320, 24)

CASES = {
    "linear": ("qwen3_moe", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}),
    # trained for 12 positions: prefill and decode run past it, where the frequencies change
    "dynamic": ("qwen3_moe", {"max_position_embeddings": 12,
                              "rope_parameters": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}}),
    "yarn": ("qwen3_moe", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                               "original_max_position_embeddings": 12}}),
    "llama3": ("qwen3_moe", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 500.0,
                                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                 "original_max_position_embeddings": 12}}),
    "qwen3-mlp-only": ("qwen3_moe", {"mlp_only_layers": [1]}),
    "qwen2-sparse-step": ("qwen2_moe", {"decoder_sparse_step": 2}),
}


class Case:
    def __init__(self, arch, overrides, root):
        self.src, self.bundle = root / "src", root / "bundle"
        self.model = make_tiny_model(arch, self.src, seed=5, **overrides)
        export(str(self.src), self.bundle, ExportOptions(precisions=("fp32", "int4"), backbone_precision="fp32"))


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    arch, overrides = CASES[request.param]
    c = Case(arch, overrides, tmp_path_factory.mktemp(request.param))
    c.name = request.param
    return c


def test_fp32_logits_match_transformers(case):
    b = Bundle(case.bundle)
    model = MoEModel(b, StaticExperts(b, "fp32"))
    cache = model.new_cache()
    got = [model.forward(PROMPT[:16], cache, all_logits=True)]
    got += [model.forward(PROMPT[i:i + 1], cache) for i in range(16, 24)]
    with torch.no_grad():
        out = case.model(torch.tensor(PROMPT[:16][None]), use_cache=True)
        ref, past = [out.logits[0]], out.past_key_values
        for i in range(16, 24):
            out = case.model(torch.tensor([[PROMPT[i]]]), past_key_values=past, use_cache=True)
            ref.append(out.logits[0])
            past = out.past_key_values
    assert np.abs(np.concatenate(got) - torch.cat(ref).numpy()).max() < 1e-4


def test_greedy_generation_is_token_identical(case):
    b = Bundle(case.bundle)
    prompt = [int(t) for t in PROMPT[:16]]
    ours = generate(MoEModel(b, StaticExperts(b, "fp32")), prompt, max_new_tokens=12).token_ids
    # a fresh reference: transformers' dynamic rope keeps the longest sequence it has seen as state
    fresh = type(case.model).from_pretrained(case.src).eval()
    with torch.no_grad():
        theirs = fresh.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12,
                                     do_sample=False)[0, 16:].tolist()
    assert ours == theirs


def test_dense_layers_hold_no_experts_and_run_under_a_budget(case):
    m = read_manifest(case.bundle)
    dense = {"qwen3-mlp-only": [1], "qwen2-sparse-step": [0, 2]}.get(case.name, [])
    assert sorted(set(range(3)) - set(m.model.moe_layers)) == dense
    assert {e.layer for e in m.experts} == set(m.model.moe_layers)
    want = open_model(case.bundle, precision="fp32").generate_ids([int(t) for t in PROMPT[:8]], 6).token_ids
    run = open_model(case.bundle, policy=PolicyRun("dymoe", "100%", overrides={"ladder": "fp32"}))
    try:
        assert run.generate_ids([int(t) for t in PROMPT[:8]], 6).token_ids == want
    finally:
        run.close()


def test_unsupported_rope_is_refused(tmp_path):
    import json

    src = tmp_path / "src"
    make_tiny_model("qwen3_moe", src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0],
                              "long_factor": [1.0]}
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="longrope"):
        export(str(src), tmp_path / "b")
