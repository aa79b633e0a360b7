"""``dymoe upgrade`` on a real schema-2 bundle (``tests/data/schema2-qwen2_moe``, written by the
release before the redesign, with the tiny Qwen2-MoE checkpoint it came from): the bundle runs
again, computes what transformers computes, keeps its expert files byte for byte, survives an
interruption at any point, and a second upgrade changes nothing."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dymoe.bundle.errors import BundleError
from dymoe.bundle.manifest import SCHEMA_VERSION, read_manifest, verify_file
from dymoe.runtime.bundle import Bundle
from dymoe.runtime.experts import StaticExperts
from dymoe.runtime.model import MoEModel
from dymoe.toolchain import upgrade as upgrade_mod
from dymoe.toolchain.upgrade import upgrade

FIXTURE = Path(__file__).parent / "data" / "schema2-qwen2_moe"
PROMPT = np.random.default_rng(6).integers(0, 320, 20)


@pytest.fixture()
def old(tmp_path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(FIXTURE / "bundle", copy)
    return copy


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".dymoe.lock"}


def test_an_old_bundle_is_refused_with_the_way_out(old):
    proc = subprocess.run([sys.executable, "-m", "dymoe.cli", "run", str(old), "-p", "hi"], capture_output=True,
                          text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "schema_version 2" in proc.stderr and f"dymoe upgrade {old}" in proc.stderr


def test_upgrade_runs_like_transformers_and_keeps_the_experts(old):
    before = json.loads((old / "manifest.json").read_text())
    experts = [v["path"] for e in before["experts"] for v in e["variants"].values()]
    proc = subprocess.run([sys.executable, "-m", "dymoe.cli", "upgrade", str(old)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    m = read_manifest(old)
    assert m.schema_version == SCHEMA_VERSION and m.model.moe_layers == [0, 1]
    for rel in m.files:
        verify_file(old, m, rel)
    for rel in experts:  # the same files, unchanged
        assert m.files[rel].sha256 == before["files"][rel]["sha256"]
    assert not [rel for rel in before["backbone"]["layers"] if (old / rel).exists()]  # old graphs deleted
    on_disk = {str(p.relative_to(old)) for p in old.rglob("*") if p.is_file()}
    assert on_disk == set(m.files) | {"manifest.json", ".dymoe.lock"}

    from transformers import Qwen2MoeForCausalLM

    ref_model = Qwen2MoeForCausalLM.from_pretrained(FIXTURE / "source").eval()
    b = Bundle(old)
    model = MoEModel(b, StaticExperts(b, "fp32"))
    ours = model.forward(PROMPT, model.new_cache(), all_logits=True)
    with torch.no_grad():
        ref = ref_model(torch.tensor(PROMPT[None])).logits[0].numpy()
    assert np.abs(ours - ref).max() < 1e-4


def test_an_interrupted_upgrade_leaves_a_usable_bundle_and_resumes(old, monkeypatch):
    before = _hashes(old)
    real = upgrade_mod.write_model
    calls = []

    def dies_on_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(upgrade_mod, "write_model", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        upgrade(old)
    # the old bundle is untouched (its files and manifest): only new, unlisted files were added
    after = _hashes(old)
    assert {k: v for k, v in after.items() if k in before} == before
    with pytest.raises(BundleError, match="dymoe upgrade"):
        read_manifest(old)
    monkeypatch.undo()
    m = upgrade(old)
    assert m.schema_version == SCHEMA_VERSION
    first = _hashes(old)
    assert upgrade(old).to_json() == m.to_json() and _hashes(old) == first  # a current bundle: nothing to do


def test_a_crash_after_the_switch_is_cleaned_up_by_a_rerun(old, monkeypatch):
    monkeypatch.setattr(upgrade_mod, "remove_listed", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        upgrade(old)
    monkeypatch.undo()
    assert read_manifest(old).schema_version == SCHEMA_VERSION  # switched
    assert (old / "backbone" / "layer_000.onnx").exists()  # but the old graphs are still there
    upgrade(old)
    assert not (old / "backbone" / "layer_000.onnx").exists()  # the rerun deleted them


def _as_schema3(bundle: Path) -> dict:
    """Rewrite a current bundle's manifest as schema 3 wrote it: no word on how the backbone is stored."""
    data = json.loads((bundle / "manifest.json").read_text())
    assert data["backbone"]["precision"] == "fp32" and data["backbone"]["external_data"] == {}
    data["schema_version"] = 3
    data["backbone"] = {k: data["backbone"][k] for k in ("embed", "layers", "head", "routers")}
    (bundle / "manifest.json").write_text(json.dumps(data))
    return data


def test_schema3_upgrade_rewrites_the_manifest_alone(tiny_qwen3, tmp_path):
    b = tmp_path / "s3"
    shutil.copytree(tiny_qwen3.bundle, b)
    _as_schema3(b)
    before = _hashes(b)
    proc = subprocess.run([sys.executable, "-m", "dymoe.cli", "run", str(b), "-p", "hi"], capture_output=True,
                          text=True)
    assert proc.returncode == 1 and "schema_version 3" in proc.stderr and f"dymoe upgrade {b}" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "dymoe.cli", "upgrade", str(b)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    after = _hashes(b)
    assert {k for k in after if after[k] != before.get(k)} == {"manifest.json"}  # no graph touched
    m = read_manifest(b)
    assert (m.schema_version, m.backbone.precision, m.backbone.external_data) == (SCHEMA_VERSION, "fp32", {})
    assert m.files == read_manifest(tiny_qwen3.bundle).files
    upgrade(b)  # a second upgrade changes nothing
    assert _hashes(b) == after


def test_schema3_manifest_with_a_later_field_is_refused(tiny_qwen3, tmp_path):
    b = tmp_path / "s3"
    shutil.copytree(tiny_qwen3.bundle, b)
    data = _as_schema3(b)
    data["backbone"]["precision"] = "int4"
    (b / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="backbone.precision"):
        upgrade(b)
