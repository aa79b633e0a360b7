"""ONNX external data for backbone graphs whose tensors would not fit one protobuf (2 GiB).

Real sizes (a 151,936 x 2048 float32 embedding, 1.2 GB) are exercised by ``benchmarks/backbone_size.py``;
here a tiny threshold sends every backbone tensor to external data so each path runs in seconds:
the files are written beside their graphs, listed in the manifest with their sha256, verified when
loaded and handed to ONNX Runtime from memory, and the bundle computes exactly what the inline one
does. A graph that names a file the manifest does not list for it is refused, whatever lies in the
working directory: ONNX Runtime never opens a path from inside a graph.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dymoe.bundle.errors import BundleError, ChecksumError
from dymoe.bundle.fsutil import sha256_file
from dymoe.bundle.manifest import read_manifest, verify_file
from dymoe.runtime.bundle import Bundle
from dymoe.runtime.experts import StaticExperts
from dymoe.runtime.model import MoEModel
from dymoe.toolchain import export as export_mod
from dymoe.toolchain.export import export
from dymoe.toolchain.external_data import move_out
from dymoe.toolchain.options import ExportOptions

PROMPT = np.random.default_rng(4).integers(0, 320, 12)


def logits(bundle: Path) -> np.ndarray:
    b = Bundle(bundle)
    model = MoEModel(b, StaticExperts(b, "int4"))
    cache = model.new_cache()
    return np.concatenate([model.forward(PROMPT[:8], cache, all_logits=True),
                           *(model.forward(PROMPT[i:i + 1], cache) for i in range(8, 12))])


def _export(src: Path, out: Path, limit: int, **kw) -> None:
    export(str(src), out, ExportOptions(precisions=("int4",), backbone_precision="int8", external_data_bytes=limit,
                                        **kw))


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_qwen3):
    root = tmp_path_factory.mktemp("external")
    _export(tiny_qwen3.src, root / "inline", 1 << 30)
    _export(tiny_qwen3.src, root / "external", 0)
    return root / "inline", root / "external"


def test_every_backbone_graph_keeps_its_tensors_beside_it(bundles):
    inline, external = bundles
    m = read_manifest(external)
    assert read_manifest(inline).backbone.external_data == {}
    assert set(m.backbone.external_data) == set(m.backbone.graphs())
    for graph, data in m.backbone.external_data.items():
        assert data == [graph + ".data"]
        verify_file(external, m, data[0])
        proto = onnx.load_model(external / graph, load_external_data=False)
        locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == {Path(data[0]).name}
        assert all(len(t.raw_data) < 1024 for t in proto.graph.initializer)  # only small constants stay inline
    on_disk = {str(p.relative_to(external)) for p in external.rglob("*") if p.is_file()}
    assert on_disk - {"manifest.json", ".dymoe.lock"} == set(m.files)


def test_external_data_computes_what_inline_graphs_do(bundles):
    inline, external = bundles
    np.testing.assert_array_equal(logits(external), logits(inline))


def test_a_damaged_data_file_is_a_checksum_error(bundles, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(bundles[1], b)
    data = b / "backbone" / "layer_001.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 1
    data.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError, match="layer_001.onnx.data"):
        logits(b)


def _unlist(bundle: Path, graph: str) -> None:
    """The manifest stops naming ``graph``'s data file as its external data (the file stays listed)."""
    data = json.loads((bundle / "manifest.json").read_text())
    del data["backbone"]["external_data"][graph]
    (bundle / "manifest.json").write_text(json.dumps(data))


def _relocate(bundle: Path, graph: str, location: str) -> None:
    """Point every external tensor of ``graph`` at ``location`` and keep the manifest consistent."""
    proto = onnx.load_model(bundle / graph, load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    (bundle / graph).write_bytes(proto.SerializeToString())
    data = json.loads((bundle / "manifest.json").read_text())
    data["files"][graph] = {"bytes": (bundle / graph).stat().st_size, "sha256": sha256_file(bundle / graph)}
    (bundle / "manifest.json").write_text(json.dumps(data))


@pytest.mark.parametrize("how", ["unlisted", "outside"])
def test_a_graph_never_makes_onnx_runtime_open_a_file(bundles, tmp_path, monkeypatch, how):
    """Loaded from bytes, ONNX Runtime would resolve a graph's external data against the working
    directory: here that directory holds exactly the bytes the graph wants, and it is still refused."""
    b = tmp_path / "b"
    shutil.copytree(bundles[1], b)
    graph = "backbone/head.onnx"
    cwd = tmp_path / "cwd" / "deeper"
    cwd.mkdir(parents=True)
    if how == "unlisted":
        _unlist(b, graph)
        shutil.copy(b / "backbone" / "head.onnx.data", cwd / "head.onnx.data")
    else:
        _relocate(b, graph, "../outside.data")
        shutil.copy(b / "backbone" / "head.onnx.data", cwd.parent / "outside.data")
    monkeypatch.chdir(cwd)
    with pytest.raises(BundleError, match="cannot load .*head.onnx"):
        logits(b)


def test_external_data_of_an_expert_graph_is_refused(bundles, tmp_path, monkeypatch):
    """Expert graphs never have external data; a crafted one naming a file beside the working
    directory is refused too (every session gets the in-memory table)."""
    b = tmp_path / "b"
    shutil.copytree(bundles[0], b)
    m = read_manifest(b)
    rel = m.expert(0, 0).variants["int4"].path
    proto = onnx.load_model(b / rel)
    (tmp_path / "w.data").write_bytes(proto.graph.initializer[0].raw_data)
    move_out(proto, "w.data", 0)
    (b / rel).write_bytes(proto.SerializeToString())
    data = json.loads((b / "manifest.json").read_text())
    data["files"][rel] = {"bytes": (b / rel).stat().st_size, "sha256": sha256_file(b / rel)}
    (b / "manifest.json").write_text(json.dumps(data))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BundleError, match="cannot load"):
        logits(b)


def test_move_out_takes_the_largest_tensors_until_the_rest_fits():
    sizes = {"a": 1000, "b": 400, "c": 300, "d": 10}  # float32 elements
    inits = [numpy_helper.from_array(np.full(n, i, np.float32), name) for i, (name, n) in enumerate(sizes.items())]
    graph = helper.make_graph([], "g", [], [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1000])], inits)
    model = helper.make_model(graph)
    pieces = move_out(model, "g.onnx.data", limit=4 * 500)
    moved = [t.name for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert moved == ["a", "b"]  # 4 * 300 bytes stay inline (and d, below the floor, always does)
    everything = helper.make_model(helper.make_graph([], "g", [], [], [numpy_helper.from_array(t) for t in
                                                                       map(numpy_helper.to_array, inits)]))
    move_out(everything, "x", limit=0)
    assert [t.data_location == TensorProto.EXTERNAL for t in everything.graph.initializer] == [True, True, True, False]
    blob = b"".join(pieces)
    for t in model.graph.initializer:
        if t.name in moved:
            e = {x.key: x.value for x in t.external_data}
            assert int(e["offset"]) % 64 == 0
            got = np.frombuffer(blob[int(e["offset"]):int(e["offset"]) + int(e["length"])], np.float32)
            np.testing.assert_array_equal(got, np.full(sizes[t.name], list(sizes).index(t.name), np.float32))
    assert move_out(helper.make_model(helper.make_graph([], "g", [], [], [])), "x", 0) == []


def test_resume_redoes_a_graph_whose_data_file_was_lost(tiny_qwen3, bundles, tmp_path, monkeypatch):
    """An interrupted export keeps finished graphs only together with their data files."""
    out = tmp_path / "b"
    real = export_mod._backbone_task

    def stop_at_head(*args):
        if args[5] == "head":
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(export_mod, "_backbone_task", stop_at_head)
    with pytest.raises(KeyboardInterrupt):
        _export(tiny_qwen3.src, out, 0)
    assert (out / "backbone" / "embed.onnx").is_file() and not (out / "manifest.json").exists()
    os.remove(out / "backbone" / "embed.onnx.data")
    monkeypatch.setattr(export_mod, "_backbone_task", real)
    _export(tiny_qwen3.src, out, 0)
    m = read_manifest(out)
    for rel in m.files:
        verify_file(out, m, rel)
    np.testing.assert_array_equal(logits(out), logits(bundles[1]))


def test_info_reports_external_data(bundles):
    proc = subprocess.run([sys.executable, "-m", "dymoe.cli", "info", str(bundles[1])], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "int8 layers, int8 embedding, int8 LM head" in proc.stdout
    assert "keep large tensors in external data" in proc.stdout


def test_requantize_keeps_the_backbone_and_its_external_data(tiny_qwen3, tmp_path):
    """dymoe requantize rewrites experts only: the quantized backbone and its data files stay listed."""
    from dymoe.toolchain.quantizers import QuantizerOptions
    from dymoe.toolchain.requantize import RequantizeOptions, requantize

    out = tmp_path / "b"
    export(str(tiny_qwen3.src), out, ExportOptions(precisions=("fp32", "int4"), backbone_precision="int4",
                                                   external_data_bytes=0, quantizer="rtn"))
    before = read_manifest(out)
    after = requantize(out, RequantizeOptions(quantizer=QuantizerOptions("hqq")))
    assert after.backbone == before.backbone and after.backbone.external_data
    assert after.expert(0, 0).variants["int4"].path != before.expert(0, 0).variants["int4"].path
    for rel in after.files:
        verify_file(out, after, rel)
    logits(out)  # runs


def test_run_metrics_count_the_backbone_with_its_external_data(bundles):
    from dymoe.runtime.model_session import open_model

    session = open_model(bundles[1])
    m = session.metrics(session.generate_ids([1, 2, 3], max_new_tokens=2))
    session.close()
    man = read_manifest(bundles[1])
    bb = man.backbone
    graphs = [bb.embed, *bb.layers, bb.head]
    assert m["backbone_file_bytes"] == sum(man.files[r].bytes + man.files[r + ".data"].bytes for r in graphs)
