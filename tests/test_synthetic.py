"""Synthetic checkpoints: the layouts the benchmarks measure open as real ones do, and large
layers are split into shards."""

from __future__ import annotations

import json

import numpy as np

import dymoe.toolchain.synthetic as synthetic
from dymoe.toolchain.export import open_checkpoint
from dymoe.toolchain.synthetic import write_synthetic_checkpoint


def test_qwen3_moe_layout_with_its_own_head_dim(tmp_path, monkeypatch):
    """Qwen3-30B-A3B's attention is 32 x 128 wide on a hidden size of 2048: head_dim is not
    hidden // heads. A layer beyond SHARD_BYTES continues in further shards."""
    monkeypatch.setattr(synthetic, "SHARD_BYTES", 20_000)
    folder = write_synthetic_checkpoint(tmp_path / "q3", hidden=32, intermediate=16, experts=6, top_k=2, layers=2,
                                        heads=4, kv_heads=2, head_dim=16, vocab=64, model_type="qwen3_moe")
    src = open_checkpoint(str(folder))  # maps every tensor exactly once, with the config's shapes
    assert src.spec.model_type == "qwen3_moe" and src.spec.num_experts == 6 and src.spec.top_k == 2
    assert src.settings.attention.head_dim == 16
    assert src.ckpt.info("model.layers.1.self_attn.q_proj.weight").shape == (64, 32)
    shards = set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert {"model-layer000.safetensors", "model-layer000-001.safetensors"} <= shards
    a = src.ckpt.read("model.layers.0.mlp.experts.5.down_proj.weight")
    assert a.shape == (32, 16) and 0.01 < float(np.std(a)) < 0.03


def test_mixtral_layout_is_unchanged(tmp_path):
    """The default layout and its bytes are what the tests and benchmarks were written against."""
    folder = write_synthetic_checkpoint(tmp_path / "m", hidden=32, intermediate=16, experts=4, layers=2, heads=4,
                                        kv_heads=2, vocab=64)
    src = open_checkpoint(str(folder))
    assert src.spec.model_type == "mixtral"
    assert sorted(p.name for p in folder.glob("*.safetensors")) == [
        "model-layer000.safetensors", "model-layer001.safetensors", "model-top.safetensors"]
    rng = np.random.default_rng(0)  # the seeded draws, in the order they were always made
    embed = rng.standard_normal((64, 32), dtype=np.float32) * 0.02
    np.testing.assert_allclose(src.ckpt.read("model.embed_tokens.weight"), embed, rtol=1e-2, atol=1e-4)  # bf16
