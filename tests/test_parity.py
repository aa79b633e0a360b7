"""Bundles against transformers (torch, CPU), the reference nobody here wrote.

fp32: logits within 1e-4 on a 16-token prefill plus 8 decode steps, and greedy generation
token-identical to ``generate``. int8/int4: the bundle computes exactly the quantized model
(transformers with dequantized expert weights, 1e-4), and each expert's recorded weight error
obeys the round-to-nearest bound ||W - W_q||_F <= sqrt(sum over blocks of B * s^2 / 4) (the default
quantizer, hqq, picks ranges no worse than round-to-nearest's; its final unbiasing rescale must
keep it within that bound too).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from safetensors.numpy import load_file, save_file

from dymoe.bundle.manifest import SCHEMA_VERSION, read_manifest
from dymoe.runtime.bundle import Bundle
from dymoe.runtime.experts import StaticExperts
from dymoe.runtime.generate import generate
from dymoe.runtime.model import MoEModel
from dymoe.runtime.ort_session import EXACT_INT_MATH
from dymoe.toolchain.blockquant import quantize_rtn
from dymoe.toolchain.expert_weights import expert_weights

PROMPT = np.random.default_rng(1).integers(0, 320, 24)


def bundle_logits(bundle, precision, session_config=None) -> np.ndarray:
    b = Bundle(bundle)
    model = MoEModel(b, StaticExperts(b, precision, session_config=session_config))
    cache = model.new_cache()
    outs = [model.forward(PROMPT[:16], cache, all_logits=True)]
    outs += [model.forward(PROMPT[i:i + 1], cache) for i in range(16, 24)]
    return np.concatenate(outs)


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        ids = torch.tensor(PROMPT[:16][None])
        out = model(ids, use_cache=True)
        logits, past = [out.logits[0]], out.past_key_values
        for i in range(16, 24):  # decode with transformers' own KV cache too
            out = model(torch.tensor([[PROMPT[i]]]), past_key_values=past, use_cache=True)
            logits.append(out.logits[0])
            past = out.past_key_values
    return torch.cat(logits).numpy()


def test_fp32_logits_match_transformers(tiny):
    got = bundle_logits(tiny.bundle, "fp32")
    ref = torch_logits(tiny.model)
    assert got.shape == ref.shape == (24, 320)
    assert np.abs(got - ref).max() < 1e-4


def test_greedy_generation_is_token_identical(tiny):
    b = Bundle(tiny.bundle)
    model = MoEModel(b, StaticExperts(b, "fp32"))
    prompt = [int(t) for t in PROMPT[:16]]
    ours = generate(model, prompt, max_new_tokens=20).token_ids
    with torch.no_grad():
        theirs = tiny.model.generate(torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20,
                                     do_sample=False)[0, 16:].tolist()
    assert len(ours) == 20
    assert ours == theirs


def _dequantized_reference(tiny, precision, tmp_path):
    """transformers' own model class, loaded from a copy of the checkpoint whose routed expert
    weights were replaced by what the bundle's quantized graphs compute with (read back from the
    graphs, so this holds whichever quantizer chose the codes)."""
    src, ref = tiny.src, tmp_path / f"ref_{precision}"
    shutil.copytree(src, ref)
    tensors = load_file(src / "model.safetensors")
    m = read_manifest(tiny.bundle)
    names = sorted(n for n in tensors if ".experts." in n and n.endswith(".weight"))
    experts = {n.rsplit(".", 2)[0] for n in names}  # "...experts.{e}"
    proj = {"mixtral": ("w1", "w3", "w2")}.get(tiny.arch, ("gate_proj", "up_proj", "down_proj"))
    for e in experts:
        layer, expert = int(e.split(".layers.")[1].split(".")[0]), int(e.rsplit(".", 1)[1])
        graph = onnx.load(tiny.bundle / m.expert(layer, expert).variants[precision].path)
        keys = [f"{e}.{p}.weight" for p in proj]
        for k, w in zip(keys, expert_weights(graph), strict=True):
            tensors[k] = np.ascontiguousarray(w, dtype=np.float32)
    save_file(tensors, ref / "model.safetensors", metadata={"format": "pt"})
    return type(tiny.model).from_pretrained(ref).eval()


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_bundle_computes_the_quantized_model(tiny, precision, tmp_path):
    got = bundle_logits(tiny.bundle, precision, session_config=EXACT_INT_MATH)
    ref = torch_logits(_dequantized_reference(tiny, precision, tmp_path))
    assert np.abs(got - ref).max() < 1e-4


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_bundle_default_kernels_stay_close(tiny, precision):
    """ORT's fast path quantizes activations to int8 on top of the weight error; the documented
    bound (README, "Quantization") is on the relative logit error against the fp32 bundle."""
    fp32 = bundle_logits(tiny.bundle, "fp32")
    got = bundle_logits(tiny.bundle, precision)
    rel = np.linalg.norm(got - fp32) / np.linalg.norm(fp32)
    assert np.isfinite(got).all()
    assert rel < {"int8": 0.05, "int4": 0.35}[precision]


@pytest.mark.parametrize("precision", ["int8", "int4", "int2"])
def test_recorded_weight_error_obeys_rtn_bound(tiny, precision):
    m = read_manifest(tiny.bundle)
    tensors = load_file(tiny.src / "model.safetensors")
    proj = {"mixtral": ("w1", "w3", "w2")}.get(tiny.arch, ("gate_proj", "up_proj", "down_proj"))
    prefix = "model.layers.1.block_sparse_moe.experts.5." if tiny.arch == "mixtral" else "model.layers.1.mlp.experts.5."
    bits = {"int8": 8, "int4": 4, "int2": 2}[precision]
    bound_sq, norm_sq = 0.0, 0.0
    for p in proj:
        w = tensors[f"{prefix}{p}.weight"].T  # [K, N], blocks along K
        qm = quantize_rtn(w, bits, m.quantization.block_size)
        bound_sq += float((m.quantization.block_size * qm.scale.astype(np.float64) ** 2 / 4).sum())
        norm_sq += float((w.astype(np.float64) ** 2).sum())
    recorded = m.expert(1, 5).variants[precision].weight_rel_error
    assert 0 < recorded <= np.sqrt(bound_sq / norm_sq)


def test_manifest_records_every_file(tiny):
    m = read_manifest(tiny.bundle)
    on_disk = {str(p.relative_to(tiny.bundle)) for p in tiny.bundle.rglob("*") if p.is_file()}
    assert on_disk - {"manifest.json", ".dymoe.lock"} == set(m.files)
    assert len(m.experts) == m.model.num_layers * m.model.num_experts
    errs = [np.mean([e.variants[p].output_rel_error for e in m.experts]) for p in ("int8", "int4", "int2")]
    assert errs[0] < errs[1] < errs[2]
    assert json.loads((tiny.bundle / "manifest.json").read_text())["schema_version"] == SCHEMA_VERSION
    quantized = [v for e in m.experts for v in e.variants.values() if v.precision in ("int8", "int4", "int2")]
    assert {v.quantizer for v in quantized} == {m.quantization.method} == {"hqq"}  # the export default


def test_sliding_window_matches_transformers(tmp_path):
    from conftest import TinyCase

    case = TinyCase("mixtral", tmp_path, sliding_window=6)
    assert read_manifest(case.bundle).architecture["attention"]["sliding_window"] == 6
    assert np.abs(bundle_logits(case.bundle, "fp32") - torch_logits(case.model)).max() < 1e-4


def test_perplexity_matches_transformers(tiny):
    from dymoe.runtime.evaluate import perplexity

    b = Bundle(tiny.bundle)
    ids = [int(t) for t in np.random.default_rng(3).integers(0, 320, 70)]
    ours = perplexity(MoEModel(b, StaticExperts(b, "fp32")), ids, window=32)
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids) - 1, 32):
            chunk = torch.tensor([ids[i:i + 32]])
            if chunk.shape[1] < 2:
                continue
            logp = torch.log_softmax(tiny.model(chunk).logits[0, :-1].double(), -1)
            nll -= logp[torch.arange(chunk.shape[1] - 1), chunk[0, 1:]].sum().item()
            n += chunk.shape[1] - 1
    assert ours.tokens == n == 67 and ours.windows == 3
    assert abs(ours.ppl - np.exp(nll / n)) / np.exp(nll / n) < 1e-4
