"""The strict manifest reader, checksummed bundle file reads and atomic writes."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from pathlib import Path

import pytest

from dymoe.bundle.errors import BundleError, ChecksumError
from dymoe.bundle.fsutil import atomic_write_bytes, atomic_write_text, sha256_file
from dymoe.bundle.manifest import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    Backbone,
    CacheTensor,
    ExpertEntry,
    ExpertVariant,
    FileEntry,
    Manifest,
    ModelSpec,
    Quantization,
    Source,
    read_manifest,
    read_verified,
    verify_file,
)

FILES = {
    "backbone/embed.onnx": b"embed graph bytes",
    "backbone/layer0.onnx": b"layer zero",
    "backbone/layer1.onnx": b"layer one",
    "backbone/head.onnx": b"head",
    "backbone/router_000.onnx": b"router zero",
    "backbone/router_001.onnx": b"router one",
    "backbone/embed.onnx.data": b"the embedding table",  # listed, named by no graph unless an edit says so
    "tokenizer.json": b"{}",
    **{f"experts/l{layer}e{e}.{p}.onnx": f"expert {layer} {e} {p}".encode() for layer in range(2) for e in range(2)
       for p in ("fp16", "int4")},
    "experts/l0e0.int4.onnx": bytes(range(256)) * 3,
}


def make_manifest(files: dict[str, bytes] | None = None) -> Manifest:
    spec = ModelSpec(
        model_type="qwen3_moe", hidden_size=64, vocab_size=320, num_layers=2, num_experts=2, top_k=1,
        expert_intermediate_size=96, moe_layers=[0, 1],
        kv_cache=[CacheTensor("key", 2, 32), CacheTensor("value", 2, 32)],
        max_position_embeddings=128, bos_token_id=None, eos_token_ids=[1, 2],
    )
    experts = [
        ExpertEntry(layer, e, {
            "fp16": ExpertVariant(f"experts/l{layer}e{e}.fp16.onnx", "fp16", 0.0, 0.0),
            "int4": ExpertVariant(f"experts/l{layer}e{e}.int4.onnx", "int4", 0.031, 0.05),
        })
        for layer in range(2) for e in range(2)
    ]
    files = files if files is not None else FILES
    return Manifest(
        schema_version=SCHEMA_VERSION,
        dymoe_version="0.1.0",
        created_utc="2024-01-01T00:00:00Z",
        source=Source(model="tiny/qwen3", model_type="qwen3_moe", fingerprint_sha256="ab" * 32, source_bytes=123),
        model=spec,
        quantization=Quantization(precisions=["fp16", "int4"], block_size=32, method="rtn",
                                  formats={"fp16": "float", "int4": "matmulnbits"}),
        tools={"onnx": "1.17", "numpy": "2.0"},
        tokenizer=["tokenizer.json"],
        backbone=Backbone(embed="backbone/embed.onnx", layers=["backbone/layer0.onnx", "backbone/layer1.onnx"],
                          head="backbone/head.onnx", routers=["backbone/router_000.onnx", "backbone/router_001.onnx"]),
        experts=experts,
        architecture={"attention": {"num_heads": 4, "head_dim": 32, "rope": {"rope_type": "default"}}, "note": None},
        files={rel: FileEntry(len(b), hashlib.sha256(b).hexdigest()) for rel, b in files.items()},
    )


def write_bundle(folder: Path) -> Manifest:
    m = make_manifest()
    for rel, data in FILES.items():
        atomic_write_bytes(folder / rel, data)
    m.write(folder)
    return m


def test_write_read_round_trip(tmp_path):
    m = write_bundle(tmp_path)
    back = read_manifest(tmp_path)
    assert back == m
    assert isinstance(back.model, ModelSpec) and isinstance(back.experts[3].variants["int4"], ExpertVariant)
    assert isinstance(back.files["backbone/embed.onnx"], FileEntry)
    assert back.expert(1, 0).layer == 1 and back.expert(1, 0).expert == 0
    assert back.expert(1, 1).variants["fp16"].path == "experts/l1e1.fp16.onnx"
    assert back.to_json() == m.to_json()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


DELETE = object()


def edited(data: dict, path: tuple, value) -> dict:
    data = copy.deepcopy(data)
    node = data
    for key in path[:-1]:
        node = node[key]
    if value is DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return data


# (path into the JSON, new value or DELETE, the field the error must name)
BAD_EDITS = [
    # unknown fields
    (("foo",), 1, "foo"),
    (("model", "foo"), 1, "model.foo"),
    (("source", "extra"), "x", "source.extra"),
    (("quantization", "bits"), 4, "quantization.bits"),
    (("experts", 0, "variants", "int4", "foo"), 1, "experts[0].variants.int4.foo"),
    (("files", "backbone/embed.onnx", "md5"), "x", "files.backbone/embed.onnx.md5"),
    # missing fields
    (("model", "top_k"), DELETE, "model.top_k"),
    (("model", "bos_token_id"), DELETE, "model.bos_token_id"),  # optional value, required key
    (("backbone",), DELETE, "backbone"),
    (("backbone", "head"), DELETE, "backbone.head"),
    (("experts", 1, "variants", "fp16", "path"), DELETE, "experts[1].variants.fp16.path"),
    (("experts", 2, "layer"), DELETE, "experts[2].layer"),
    (("quantization", "formats"), DELETE, "quantization.formats"),
    (("files", "backbone/layer0.onnx", "sha256"), DELETE, "files.backbone/layer0.onnx.sha256"),
    (("created_utc",), DELETE, "created_utc"),
    # wrong types
    (("model", "hidden_size"), "64", "model.hidden_size"),
    (("model", "hidden_size"), True, "model.hidden_size"),
    (("model", "hidden_size"), 64.0, "model.hidden_size"),
    (("model", "top_k"), 1.5, "model.top_k"),
    (("model", "moe_layers"), [0, "1"], "model.moe_layers[1]"),
    (("model", "kv_cache", 0, "heads"), "2", "model.kv_cache[0].heads"),
    (("model", "bos_token_id"), "1", "model.bos_token_id"),
    (("backbone", "routers"), "backbone/router_000.onnx", "backbone.routers"),
    (("architecture",), [], "architecture"),
    (("model", "model_type"), None, "model.model_type"),
    (("model", "eos_token_ids"), [1, "2"], "model.eos_token_ids[1]"),
    (("model", "eos_token_ids"), 5, "model.eos_token_ids"),
    (("model",), [], "model"),
    (("source",), "tiny/qwen3", "source"),
    (("source", "source_bytes"), "123", "source.source_bytes"),
    (("tools",), ["onnx"], "tools"),
    (("tools", "onnx"), 1.17, "tools.onnx"),
    (("tokenizer",), "tokenizer.json", "tokenizer"),
    (("experts",), {}, "experts"),
    (("experts", 0), [], "experts[0]"),
    (("experts", 3, "variants", "int4", "weight_rel_error"), "0.1", "experts[3].variants.int4.weight_rel_error"),
    (("files", "backbone/embed.onnx", "bytes"), "17", "files.backbone/embed.onnx.bytes"),
    (("dymoe_version",), 1, "dymoe_version"),
    # schema version
    (("schema_version",), SCHEMA_VERSION + 1, "schema_version"),
    (("schema_version",), 0, "schema_version"),
    (("schema_version",), str(SCHEMA_VERSION), "schema_version"),
    (("schema_version",), None, "schema_version"),
    (("schema_version",), float(SCHEMA_VERSION), "schema_version"),
    (("schema_version",), DELETE, "schema_version"),
]


@pytest.mark.parametrize("path,value,field", BAD_EDITS, ids=[f"{'.'.join(map(str, p))}" for p, _, _ in BAD_EDITS])
def test_strict_reader_names_the_field(path, value, field, tmp_path):
    data = json.loads(write_bundle(tmp_path).to_json())
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(edited(data, path, value)))
    with pytest.raises(BundleError) as e:
        read_manifest(tmp_path)
    assert type(e.value) is BundleError
    assert field in e.value.message
    if field != "schema_version":
        assert f"'{field}'" in e.value.message  # the whole dotted name, quoted
    assert e.value.hint


# Edits the reader accepts, with what it must make of them.
GOOD_EDITS = [
    (("architecture", "attention", "num_heads"), 8, lambda m: m.architecture["attention"]["num_heads"] == 8),
    (("architecture", "extra"), {"a": [1, 2.5, None]}, lambda m: m.architecture["extra"] == {"a": [1, 2.5, None]}),
    (("model", "bos_token_id"), 7, lambda m: m.model.bos_token_id == 7),
    (("quantization", "formats", "int4"), "qdq", lambda m: m.quantization.formats["int4"] == "qdq"),
    (("backbone", "external_data"), {"backbone/embed.onnx": ["backbone/embed.onnx.data"]},
     lambda m: m.backbone.external_data == {"backbone/embed.onnx": ["backbone/embed.onnx.data"]}),
    (("backbone",), {k: v for k, v in json.loads(make_manifest().to_json())["backbone"].items()
                     if k in ("embed", "layers", "head", "routers")},
     lambda m: (m.backbone.precision, m.backbone.embedding, m.backbone.lm_head, m.backbone.external_data)
     == ("fp32", "fp32", "fp32", {})),  # fields schema 4 added are optional: their default is schema 3's
]


@pytest.mark.parametrize("path,value,check", GOOD_EDITS)
def test_strict_reader_accepts(path, value, check, tmp_path):
    data = json.loads(write_bundle(tmp_path).to_json())
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(edited(data, path, value)))
    assert check(read_manifest(tmp_path))


# Well-formed JSON that names impossible or unsafe things: refused before any file is opened.
BAD_CONTENT = [
    (("files",), DELETE, "which files does not list"),
    (("experts", 0, "variants"), {}, "experts[0] has variants"),
    (("backbone", "head"), "../head.onnx", "'..'"),
    (("backbone", "head"), "/etc/passwd", "is absolute"),
    (("files", "../x.onnx"), {"bytes": 1, "sha256": "ab" * 32}, "'..'"),
    (("files", "a\\b.onnx"), {"bytes": 1, "sha256": "ab" * 32}, "backslash"),
    (("files", "backbone/embed.onnx", "sha256"), "../../x", "not a sha256"),
    (("source", "fingerprint_sha256"), "xyz", "not a sha256"),
    (("model", "top_k"), 3, "more than the 2 experts"),
    (("model", "top_k"), 0, "top_k is 0"),
    (("model", "moe_layers"), [1, 0], "moe_layers"),
    (("model", "moe_layers"), [0, 2], "moe_layers"),
    (("model", "kv_cache"), [], "kv_cache"),
    (("model", "kv_cache", 1, "name"), "key", "kv_cache"),
    (("backbone", "routers"), ["backbone/router_000.onnx"], "backbone.routers lists 1"),
    (("quantization", "precisions"), ["fp16", "int3"], "quantization.precisions"),
    (("quantization", "formats", "int4"), "exe", "quantization.formats"),
    (("experts", 1, "expert"), 0, "experts[1] is layer 0 expert 0"),
    # schema 4: how the backbone is stored
    (("backbone", "precision"), "int2", "backbone.precision"),
    (("backbone", "embedding"), "int4", "backbone.embedding"),
    (("backbone", "lm_head"), "fp8", "backbone.lm_head"),
    (("backbone", "precision"), "int8", "backbone.quantizer"),  # integer codes, but no quantizer named
    (("backbone", "quantizer"), "hqq", "backbone.quantizer"),  # a quantizer for float weights
    (("backbone", "formats"), {"int8": "qdq"}, "backbone.formats"),  # a form for float linears
    (("backbone", "external_data"), {"backbone/nope.onnx": ["backbone/nope.onnx.data"]}, "not a backbone graph"),
    (("backbone", "external_data"), {"backbone/head.onnx": ["backbone/head.onnx.data"]}, "which files does not list"),
    (("backbone", "external_data"), {"backbone/embed.onnx": ["experts/l0e0.int4.onnx"]}, "beside its own graph"),
    (("backbone", "external_data"), {"backbone/embed.onnx": ["backbone/head.onnx"]}, "beside its own graph"),
    (("backbone", "external_data"), {"backbone/embed.onnx": ["../embed.onnx.data"]}, "'..'"),
    (("backbone", "external_data"), {"backbone/embed.onnx": ["backbone/embed.onnx.data"],
                                     "backbone/head.onnx": ["backbone/embed.onnx.data"]}, "one graph per file"),
]


@pytest.mark.parametrize("path,value,needle", BAD_CONTENT,
                         ids=[f"{'.'.join(map(str, p))}={v!r}" for p, v, _ in BAD_CONTENT])
def test_impossible_or_unsafe_manifest_is_refused(path, value, needle, tmp_path):
    data = json.loads(write_bundle(tmp_path).to_json())
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(edited(data, path, value)))
    with pytest.raises(BundleError) as e:
        read_manifest(tmp_path)
    assert needle in e.value.message, e.value.message
    assert e.value.hint


@pytest.mark.parametrize("content", [b"{", b"", b"\xff\xfe{}", b"[1, 2]", b'"manifest"', b"null"])
def test_not_a_manifest(content, tmp_path):
    (tmp_path / MANIFEST_NAME).write_bytes(content)
    with pytest.raises(BundleError) as e:
        read_manifest(tmp_path)
    assert MANIFEST_NAME in str(e.value)


def test_missing_manifest_in_unfinished_bundle(tmp_path):
    atomic_write_bytes(tmp_path / "backbone" / "embed.onnx", b"x")
    with pytest.raises(BundleError, match="no manifest.json") as e:
        read_manifest(tmp_path)
    assert "rerun" in e.value.hint and "export" in e.value.hint
    assert str(tmp_path) in e.value.message


def test_missing_manifest_in_empty_folder(tmp_path):
    with pytest.raises(BundleError) as e:
        read_manifest(tmp_path)
    assert "dymoe export" in e.value.hint and "rerun" not in e.value.hint


def test_no_bundle_folder(tmp_path):
    with pytest.raises(BundleError, match="no bundle folder"):
        read_manifest(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleError):
        read_manifest(tmp_path / "file")


# ----------------------------------------------------------------------------- verified reads


def _verify(bundle, manifest, rel):
    return verify_file(bundle, manifest, rel).read_bytes()


READERS = [pytest.param(read_verified, id="read_verified"), pytest.param(_verify, id="verify_file")]


@pytest.mark.parametrize("reader", READERS)
def test_verified_read_intact(reader, tmp_path):
    m = write_bundle(tmp_path)
    for rel, data in FILES.items():
        assert reader(tmp_path, m, rel) == data
    assert verify_file(tmp_path, m, "backbone/embed.onnx") == tmp_path / "backbone" / "embed.onnx"


def _flip_one_byte(p: Path) -> None:
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x01
    p.write_bytes(bytes(b))


DAMAGE = [
    pytest.param(_flip_one_byte, id="one-bit"),
    pytest.param(lambda p: p.write_bytes(p.read_bytes() + b"\0"), id="appended"),
    pytest.param(lambda p: p.write_bytes(p.read_bytes()[:-1]), id="truncated"),
    pytest.param(lambda p: p.write_bytes(b""), id="emptied"),
]


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("reader", READERS)
def test_changed_bytes_checksum_error(reader, damage, tmp_path):
    m = write_bundle(tmp_path)
    rel = "experts/l0e0.int4.onnx"
    damage(tmp_path / rel)
    with pytest.raises(ChecksumError) as e:
        reader(tmp_path, m, rel)
    assert rel in e.value.message
    # the other files are still fine
    assert reader(tmp_path, m, "backbone/embed.onnx") == FILES["backbone/embed.onnx"]


@pytest.mark.parametrize("reader", READERS)
def test_missing_bundle_file(reader, tmp_path):
    m = write_bundle(tmp_path)
    rel = "backbone/layer0.onnx"
    (tmp_path / rel).unlink()
    with pytest.raises(BundleError, match="missing") as e:
        reader(tmp_path, m, rel)
    assert not isinstance(e.value, ChecksumError)
    assert rel in e.value.message


@pytest.mark.parametrize("reader", READERS)
def test_file_not_in_manifest(reader, tmp_path):
    m = write_bundle(tmp_path)
    atomic_write_bytes(tmp_path / "extra.onnx", b"x")
    with pytest.raises(BundleError, match="lists no file extra.onnx") as e:
        reader(tmp_path, m, "extra.onnx")
    assert not isinstance(e.value, ChecksumError)


# ----------------------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("data", [b"", b"x", bytes(range(256)) * 5000])
def test_atomic_write_bytes(data, tmp_path):
    target = tmp_path / "a" / "b" / "file.bin"
    digest = atomic_write_bytes(target, data)
    assert digest == hashlib.sha256(data).hexdigest() == sha256_file(target)
    assert target.read_bytes() == data
    assert os.listdir(target.parent) == ["file.bin"]
    # overwrite in place
    digest2 = atomic_write_bytes(target, data + b"more")
    assert digest2 == hashlib.sha256(data + b"more").hexdigest()
    assert target.read_bytes() == data + b"more"
    assert os.listdir(target.parent) == ["file.bin"]


def test_atomic_write_text(tmp_path):
    text = "héllo\n"
    assert atomic_write_text(tmp_path / "t.txt", text) == hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert (tmp_path / "t.txt").read_bytes() == text.encode("utf-8")
    assert os.listdir(tmp_path) == ["t.txt"]


def test_atomic_write_failure_leaves_no_temp_file(tmp_path):
    target = tmp_path / "dir"
    target.mkdir()
    (target / "keep").write_text("k")
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"data")  # cannot replace a non-empty folder with a file
    assert sorted(os.listdir(tmp_path)) == ["dir"]
    assert os.listdir(target) == ["keep"]


def test_manifest_is_plain_dataclasses():
    m = make_manifest()
    assert dataclasses.asdict(m)["model"]["eos_token_ids"] == [1, 2]
    assert json.loads(m.to_json())["schema_version"] == SCHEMA_VERSION


@pytest.mark.parametrize("version", [1, 2, 3])
def test_older_schemas_point_to_the_upgrade(tmp_path, version):
    """Schema 1 and 2 bundles have layer graphs this runtime no longer runs (the runtime routed);
    schema 3 did not record how the backbone is stored: the reader says how to upgrade them in place."""
    write_bundle(tmp_path)
    data = json.loads((tmp_path / MANIFEST_NAME).read_text())
    data["schema_version"] = version
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(BundleError, match=f"schema_version {version}") as e:
        read_manifest(tmp_path)
    assert f"dymoe upgrade {tmp_path}" in e.value.hint
