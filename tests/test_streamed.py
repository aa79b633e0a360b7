"""Vocabulary-sized initializers are written from their numpy arrays (toolchain/streamed.py): the file
must be exactly the model built the ordinary way, inline or with external data, and writing it must
not make the copies it exists to avoid."""

from __future__ import annotations

import tracemalloc

import numpy as np
import onnx
import pytest

from dymoe.runtime.ort_session import create_session
from dymoe.toolchain import onnx_build
from dymoe.toolchain.archs.base import Decoder, embed_graph, head_graph
from dymoe.toolchain.backbone_forms import BackboneForm
from dymoe.toolchain.external_data import write_graph
from dymoe.toolchain.streamed import StreamedModel, _varint
from dymoe.toolchain.vocab_rows import VocabRows

V, H = 3000, 64


@pytest.fixture
def defer_small(monkeypatch):
    monkeypatch.setattr(onnx_build, "DEFER_BYTES", 4096)  # the test tables are deferred like a real vocabulary


def _table() -> np.ndarray:
    return (np.random.default_rng(5).standard_normal((V, H)) * 0.05).astype(np.float32)


def _rows(w: np.ndarray) -> VocabRows:
    return VocabRows(lambda a, b: w[a:b].copy(), w.shape, slab_rows=700)


def _decoder() -> Decoder:
    return Decoder(model_type="qwen3_moe", hidden_size=H, vocab_size=V, num_layers=1, rms_norm_eps=1e-6,
                   max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=None, eos_token_ids=(),
                   num_experts=4, top_k=2, expert_intermediate_size=32)


def _graphs(w: np.ndarray, form: BackboneForm, streamed: bool):
    norm = np.ones(H, np.float32)
    return {"embed": embed_graph(_rows(w), form, streamed=streamed),
            "head": head_graph(_decoder(), norm, _rows(w), form, streamed=streamed)}


def _run(blob: bytes, what: str, external: dict[str, bytes] | None = None) -> np.ndarray:
    s = create_session(blob, 1, what, external_data=external)
    if what == "embed":
        return s.run(None, {"input_ids": np.array([0, 2999, 17, 17])})[0]
    x = np.random.default_rng(0).standard_normal((2, H)).astype(np.float32)
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def test_varint_is_protobufs():
    assert [_varint(n) for n in (0, 1, 127, 128, 300, 2**32)] == [
        b"\x00", b"\x01", b"\x7f", b"\x80\x01", b"\xac\x02", b"\x80\x80\x80\x80\x10"]


@pytest.mark.parametrize("precision,target", [("fp32", "ort"), ("fp16", "ort"), ("int8", "ort"),
                                              ("int8", "tensorrt")])
def test_the_streamed_file_is_the_model(defer_small, precision, target):
    w = _table()
    form = BackboneForm(precision, 32, "rtn", target)
    plain, streamed = _graphs(w, form, False), _graphs(w, form, True)
    for what in ("embed", "head"):
        s = streamed[what]
        assert isinstance(s, StreamedModel) and s.arrays, what  # the vocabulary-sized arrays were kept aside
        assert not any(t.name in s.arrays for t in s.model.graph.initializer)
        blob = b"".join(bytes(c) for c in s.chunks())
        assert onnx.load_from_string(blob) == s.materialize() == plain[what]
        np.testing.assert_array_equal(_run(blob, what), _run(plain[what].SerializeToString(), what))


@pytest.mark.parametrize("limit", [0, 10**12, 200_000])  # everything outside, everything inline, some of each
def test_write_graph_streams_inline_and_external(defer_small, tmp_path, limit):
    w = _table()
    form = BackboneForm("int8", 32, "rtn")
    want = _run(_graphs(w, form, False)["head"].SerializeToString(), "head")
    written = write_graph(tmp_path, "backbone/head.onnx", _graphs(w, form, True)["head"], limit)
    blob = (tmp_path / "backbone/head.onnx").read_bytes()
    data = tmp_path / "backbone/head.onnx.data"
    assert ("backbone/head.onnx.data" in written) == (limit < 10**12) == data.exists()
    assert written["backbone/head.onnx"]["bytes"] == len(blob)
    external = {"head.onnx.data": data.read_bytes()} if data.exists() else None
    np.testing.assert_array_equal(_run(blob, "head", external), want)


def test_writing_a_streamed_table_makes_no_copy_of_it(defer_small, tmp_path):
    """Python-side allocations while an int8 embedding of 8 MiB of codes is quantized, built and written:
    before, the codes, their transposed copy and the bytes made for protobuf were alive together (and
    the serialised model), three times the codes; built as a plain model it is still 2.2 times. Streamed:
    the codes, the scales (a quarter of the codes, twice) and one slab's work, 1.5 times."""
    v, h = 16384, 512
    w = (np.random.default_rng(1).standard_normal((v, h)) * 0.05).astype(np.float32)
    rows = VocabRows(lambda a, b: w[a:b].copy(), w.shape, slab_rows=512)
    form = BackboneForm("int8", 32, "rtn")
    tracemalloc.start()
    try:
        write_graph(tmp_path, "embed.onnx", embed_graph(rows, form, streamed=True), 10**12)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    codes = v * h
    assert peak < 1.75 * codes, f"peak {peak / 2**20:.1f} MiB for {codes / 2**20:.0f} MiB of codes"
    assert (tmp_path / "embed.onnx").stat().st_size > codes
