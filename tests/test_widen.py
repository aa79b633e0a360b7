"""The widened demo model computes the demo model's function with larger experts: the benchmark
of realistic expert sizes keeps the trained routing and its accuracy."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dymoe.bundle.errors import CheckpointError
from dymoe.bundle.manifest import read_manifest
from dymoe.demo import demo_model_dir
from dymoe.runtime.bundle import Bundle
from dymoe.runtime.experts import StaticExperts
from dymoe.runtime.model import MoEModel
from dymoe.toolchain.checkpoint import Checkpoint
from dymoe.toolchain.expert_graph import reference_forward
from dymoe.toolchain.export import export
from dymoe.toolchain.options import ExportOptions
from dymoe.toolchain.widen import widen_checkpoint, widen_expert


def test_a_widened_expert_computes_the_same_function():
    rng = np.random.default_rng(0)
    gate, up, down = rng.standard_normal((8, 16)), rng.standard_normal((8, 16)), rng.standard_normal((16, 8))
    wg, wu, wd = widen_expert(gate, up, down, 5, np.random.default_rng(1))
    assert wg.shape == wu.shape == (40, 16) and wd.shape == (16, 40)
    shares = wd.reshape(16, 8, 5) / down[:, :, None]
    assert (shares > 0).all() and np.allclose(shares.sum(axis=-1), 1.0)  # positive shares summing to one
    x = rng.standard_normal((6, 16)).astype(np.float32)
    np.testing.assert_allclose(reference_forward(x, wg, wu, wd), reference_forward(x, gate, up, down),
                               rtol=1e-5, atol=1e-5)


def test_the_widened_demo_model_predicts_what_the_demo_model_predicts(tmp_path):
    wide = widen_checkpoint(demo_model_dir(), tmp_path / "wide", factor=3, seed=7)
    cfg = json.loads((wide / "config.json").read_text())
    assert cfg["moe_intermediate_size"] == 3 * 64 and cfg["dymoe_widened"] == {
        "factor": 3, "seed": 7, "source_intermediate": 64}
    assert Checkpoint(wide).source_bytes() > 2 * Checkpoint(demo_model_dir()).source_bytes()
    logits = []
    for src, name in ((demo_model_dir(), "narrow"), (wide, "wide")):
        # float32 backbone: int8 activations in a quantized one would blur the 1e-3 comparison
        export(str(src), tmp_path / f"bundle_{name}", ExportOptions(precisions=("fp32",), backbone_precision="fp32"))
        b = Bundle(tmp_path / f"bundle_{name}")
        model = MoEModel(b, StaticExperts(b, "fp32"))
        ids = np.random.default_rng(3).integers(0, 4096, 40)
        logits.append(model.forward(ids, model.new_cache(), all_logits=True))
    assert np.abs(logits[0] - logits[1]).max() < 1e-3
    assert (logits[0].argmax(-1) == logits[1].argmax(-1)).all()
    m = read_manifest(tmp_path / "bundle_wide")
    assert m.model.expert_intermediate_size == 192


def test_widening_is_deterministic_and_refuses_a_bad_factor(tmp_path):
    a = widen_checkpoint(demo_model_dir(), tmp_path / "a", factor=2, seed=1)
    b = widen_checkpoint(demo_model_dir(), tmp_path / "b", factor=2, seed=1)
    assert Checkpoint(a).fingerprint()["tensors"] == Checkpoint(b).fingerprint()["tensors"]
    assert (a / "model-layer003.safetensors").read_bytes() == (b / "model-layer003.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="factor 0"):
        widen_checkpoint(demo_model_dir(), tmp_path / "c", factor=0)
