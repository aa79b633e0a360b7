"""dymoe's torch-free safetensors reader against the reference ``safetensors`` package, and the
checkpoint folder (single file or sharded) built on it."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from dymoe.bundle.errors import CheckpointError
from dymoe.bundle.safetensors_io import SafetensorsFile, write_safetensors
from dymoe.toolchain.checkpoint import Checkpoint

TORCH_DTYPE = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
SPECIAL = [0.0, -0.0, 1.0, -2.5, float("inf"), float("-inf"), float("nan"), 1e-40, -3e-39, 6.1e-5,
           65504.0, 3.0e38, 1.0 + 2.0**-9, 1.0 + 3 * 2.0**-9]
SHAPES = [(), (1,), (7,), (3, 5), (4, 6, 5), (0, 3), (2, 0, 4)]


def make_tensors(dtype: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of every shape in SHAPES, plus the special values, in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    out = {f"t{i}": (torch.randn(s, generator=g) * 3).to(TORCH_DTYPE[dtype]) for i, s in enumerate(SHAPES)}
    out["special"] = torch.tensor(SPECIAL, dtype=torch.float32).to(TORCH_DTYPE[dtype])
    return out


def save_reference(path: Path, tensors: dict[str, torch.Tensor], dtype: str, metadata=None) -> None:
    """Write with the safetensors package: torch for bf16 (numpy cannot name it), numpy otherwise."""
    if dtype == "BF16":
        safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    else:
        safetensors.numpy.save_file({k: v.numpy() for k, v in tensors.items()}, str(path), metadata=metadata)


def assert_same_float32(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    real = ~np.isnan(want)  # a NaN's sign carries no meaning (torch flips it for bf16)
    np.testing.assert_array_equal(np.signbit(got[real]), np.signbit(want[real]))  # -0.0 stays -0.0


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_round_trip_against_safetensors(dtype, tmp_path):
    tensors = make_tensors(dtype)
    path = tmp_path / "x.safetensors"
    save_reference(path, tensors, dtype, metadata={"format": "pt", "who": "test"})
    f = SafetensorsFile(path)
    assert sorted(f.keys()) == sorted(tensors)
    assert f.metadata == {"format": "pt", "who": "test"}
    for name, t in tensors.items():
        info = f.tensors[name]
        assert info.dtype == dtype and info.shape == tuple(t.shape) and info.numel == t.numel()
        assert_same_float32(f.read(name), t.to(torch.float32).numpy())


# (shape, index, rows): index picks along axis 0, rows a range along the next axis
SLICES = [
    ((4, 6, 5), 0, None),
    ((4, 6, 5), 3, None),
    ((4, 6, 5), 2, (0, 6)),
    ((4, 6, 5), 1, (2, 5)),
    ((4, 6, 5), 3, (5, 6)),
    ((4, 6, 5), None, (1, 3)),
    ((4, 6, 5), None, (0, 4)),
    ((7, 3), 6, None),
    ((7, 3), None, (2, 7)),
    ((7, 3), 4, (1, 2)),  # index then rows of a 1-D row: elements 1..2 of row 4
    ((8, 10, 4), 5, (5, 10)),  # the up half of a fused gate_up_proj
]


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("shape,index,rows", SLICES)
def test_read_slices(shape, index, rows, dtype, tmp_path):
    g = torch.Generator().manual_seed(1)
    # neighbours on both sides, so a slice reading past its tensor shows up
    tensors = {name: torch.randn(shape, generator=g).to(TORCH_DTYPE[dtype]) for name in ("a", "b", "c")}
    path = tmp_path / "x.safetensors"
    save_reference(path, tensors, dtype)
    full = tensors["b"].to(torch.float32)
    want = full if index is None else full[index]
    if rows is not None:
        want = want[rows[0]:rows[1]]
    got = SafetensorsFile(path).read("b", index=index, rows=rows)
    assert_same_float32(got, want.numpy())


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_chunked_reads_are_exact(dtype, tmp_path, monkeypatch):
    """Large tensors are converted a chunk at a time (a vocabulary-sized embedding never sits in
    memory twice): chunk edges inside a tensor and inside a slice change nothing, and a file cut
    short mid-tensor is still a clean error."""
    import dymoe.bundle.safetensors_io as io

    monkeypatch.setattr(io, "_READ_CHUNK", 7)  # a prime: edges land everywhere
    g = torch.Generator().manual_seed(4)
    tensors = {n: (torch.randn(11, 13, generator=g) * 3).to(TORCH_DTYPE[dtype]) for n in ("a", "b")}
    path = tmp_path / "x.safetensors"
    save_reference(path, tensors, dtype)
    f = SafetensorsFile(path)
    for name, t in tensors.items():
        assert_same_float32(f.read(name), t.to(torch.float32).numpy())
    assert_same_float32(f.read("b", rows=(3, 9)), tensors["b"].to(torch.float32)[3:9].numpy())
    with open(path, "r+b") as fh:
        fh.truncate(f.tensors["b"].end - 5)
    with pytest.raises(CheckpointError, match="short read"):
        f.read("b")


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # 3e38 -> f16 inf
@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_write_safetensors_is_read_by_safetensors(dtype, tmp_path):
    """dymoe's writer makes files the reference reader accepts, rounding as torch rounds."""
    g = torch.Generator().manual_seed(2)
    src = {f"t{i}": (torch.randn(s, generator=g) * 100).numpy() for i, s in enumerate(SHAPES)}
    src["special"] = np.array(SPECIAL, np.float32)
    # bf16 ties: 1 + 2^-8 lies halfway between 1 and 1 + 2^-7 (round to even: 1)
    src["ties"] = np.array([1 + 2.0**-8, 1 + 3 * 2.0**-8, -(1 + 2.0**-8), 256 + 1, 256 + 3], np.float32)
    path = tmp_path / "w.safetensors"
    write_safetensors(path, src, dtype)
    ref = safetensors.torch.load_file(str(path))
    assert sorted(ref) == sorted(src)
    mine = SafetensorsFile(path)
    for name, a in src.items():
        want = torch.from_numpy(a).to(TORCH_DTYPE[dtype])
        assert ref[name].dtype == want.dtype and ref[name].shape == want.shape
        assert_same_float32(ref[name].to(torch.float32).numpy(), want.to(torch.float32).numpy())
        assert_same_float32(mine.read(name), want.to(torch.float32).numpy())


def test_write_bf16_keeps_every_nan(tmp_path):
    bits = np.array([0x7FC00000, 0x7FFF8000, 0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001], np.uint32)
    path = tmp_path / "nan.safetensors"
    write_safetensors(path, {"nan": bits.view(np.float32)}, "BF16")
    assert np.isnan(SafetensorsFile(path).read("nan")).all()


# ----------------------------------------------------------------------------- damaged files


def reference_file(path: Path) -> Path:
    g = torch.Generator().manual_seed(3)
    safetensors.torch.save_file({"a": torch.randn(10, 8, generator=g), "b": torch.randn(33, generator=g)},
                                str(path))
    return path


@pytest.mark.parametrize("cut", [1, 3, 4, 100, 0.5])
def test_truncated_file(cut, tmp_path):
    path = reference_file(tmp_path / "model-00001-of-00002.safetensors")
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    payload = len(data) - 8 - n
    k = int(payload * cut) if isinstance(cut, float) else cut
    path.write_bytes(data[:-k])
    with pytest.raises(CheckpointError) as e:
        SafetensorsFile(path)
    msg = str(e.value)
    assert "model-00001-of-00002.safetensors" in msg
    assert "truncated" in msg


@pytest.mark.parametrize("keep", [0, 5, 8, 20])
def test_file_cut_inside_the_header(keep, tmp_path):
    path = reference_file(tmp_path / "m.safetensors")
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(CheckpointError, match="corrupt safetensors file") as e:
        SafetensorsFile(path)
    assert "m.safetensors" in str(e.value)


def raw_file(path: Path, header: bytes | dict | list, data: bytes = b"\0" * 16, length: int | None = None) -> Path:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)
    return path


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape,
            "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets}


GARBAGE = [
    pytest.param(b"\xff\xfe\x00garbage", None, "not valid JSON", id="binary"),
    pytest.param(b'{"a": {"dtype": ', None, "not valid JSON", id="cut-json"),
    pytest.param([1, 2, 3], None, "not a JSON object", id="json-list"),
    pytest.param(b'"just a string"', None, "not a JSON object", id="json-string"),
    pytest.param({"a": entry()}, 2**40, "does not fit", id="huge-length"),
    pytest.param({"a": entry()}, 10_000, "does not fit", id="length-past-end"),
    pytest.param({"a": {"dtype": "F32", "shape": [2]}}, None, "malformed", id="no-offsets"),
    pytest.param({"a": {"shape": [2], "data_offsets": [0, 8]}}, None, "malformed", id="no-dtype"),
    pytest.param({"a": 5}, None, "malformed", id="entry-not-object"),
    pytest.param({"a": entry(offsets=[0, 4, 8])}, None, "malformed", id="three-offsets"),
    pytest.param({"a": entry(dtype="I64", shape=(1,))}, None, "dtype I64", id="int-dtype"),
    pytest.param({"a": entry(shape=(3,))}, None, "does not match its shape", id="shape-vs-bytes"),
    pytest.param({"a": entry(offsets=(8, 0))}, None, "does not match its shape", id="reversed-offsets"),
    pytest.param({"a": entry(shape=(5,), offsets=(0, 20))}, None, "truncated", id="past-end"),
    pytest.param(
        {"a": entry(offsets=(-8, 0))}, None, "corrupt", id="negative-offsets"
    ),
    pytest.param(
        {"a": entry(shape="ab")}, None, "malformed", id="shape-not-list"
    ),
]


@pytest.mark.parametrize("header,length,fragment", GARBAGE)
def test_garbage_header(header, length, fragment, tmp_path):
    path = raw_file(tmp_path / "bad.safetensors", header, length=length)
    with pytest.raises(CheckpointError, match=fragment) as e:
        f = SafetensorsFile(path)
        f.read("a")  # a file that opened must at least not return garbage silently
    assert "bad.safetensors" in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="missing safetensors file") as e:
        SafetensorsFile(tmp_path / "nope.safetensors")
    assert "nope.safetensors" in str(e.value)
    with pytest.raises(CheckpointError):
        SafetensorsFile(tmp_path)  # a folder is not a file


# ----------------------------------------------------------------------------- checkpoint folders


def sharded(folder: Path, weight_map: dict | None = None) -> dict[str, np.ndarray]:
    """A config.json, two shards and their index; returns all tensors by name."""
    g = np.random.default_rng(4)
    shards = {
        "model-00001-of-00002.safetensors": {"a": g.standard_normal((4, 3)), "b": g.standard_normal((5,))},
        "model-00002-of-00002.safetensors": {"c": g.standard_normal((2, 2, 2)), "d": g.standard_normal((6, 1))},
    }
    (folder / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    everything = {}
    wm = {}
    for shard, ts in shards.items():
        ts = {k: v.astype(np.float32) for k, v in ts.items()}
        safetensors.numpy.save_file(ts, str(folder / shard))
        everything.update(ts)
        wm.update({k: shard for k in ts})
    index = {"metadata": {"total_size": 0}, "weight_map": wm if weight_map is None else weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return everything


def test_sharded_checkpoint(tmp_path):
    tensors = sharded(tmp_path)
    ckpt = Checkpoint(tmp_path)
    assert ckpt.model_type == "mixtral"
    assert sorted(ckpt.names()) == ["a", "b", "c", "d"]
    for name, a in tensors.items():
        assert ckpt.info(name).shape == a.shape
        assert_same_float32(ckpt.read(name), a)
    assert_same_float32(ckpt.read("c", index=1, rows=(1, 2)), tensors["c"][1, 1:2])
    assert ckpt.source_bytes() == sum(a.nbytes for a in tensors.values())
    fp = ckpt.fingerprint()
    assert fp["tensors"]["a"] == ["F32", [4, 3]]
    assert set(fp["shard_sizes"]) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}


def test_single_file_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "olmoe"}))
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    write_safetensors(tmp_path / "model.safetensors", {"w": a}, "BF16")
    ckpt = Checkpoint(tmp_path)
    assert ckpt.names() == ["w"] and ckpt.info("w").dtype == "BF16"
    assert_same_float32(ckpt.read("w", rows=(1, 3)), a[1:3])


def test_missing_shard_is_named(tmp_path):
    sharded(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing") as e:
        Checkpoint(tmp_path)
    assert "model-00002-of-00002.safetensors" in str(e.value)


def test_truncated_shard_is_named(tmp_path):
    sharded(tmp_path)
    shard = tmp_path / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(CheckpointError, match="truncated") as e:
        Checkpoint(tmp_path)
    assert "model-00001-of-00002.safetensors" in str(e.value)


S1, S2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"

BAD_MAPS = [
    # index points "c" at the first shard, which does not hold it
    pytest.param({"a": S1, "b": S1, "c": S1, "d": S2}, ["'c'", S1], id="wrong-shard"),
    # index lists a tensor no shard holds
    pytest.param({"a": S1, "b": S1, "c": S2, "d": S2, "e": S2}, ["'e'", S2], id="phantom-tensor"),
    # a shard holds a tensor the index does not list
    pytest.param({"a": S1, "c": S2, "d": S2}, [S1, "'b'"], id="unlisted-tensor"),
    # index names a shard that is not there
    pytest.param({"a": S1, "b": S1, "c": S2, "d": "model-00003-of-00002.safetensors"},
                 ["model-00003-of-00002.safetensors"], id="unknown-shard"),
]


@pytest.mark.parametrize("weight_map,named", BAD_MAPS)
def test_index_disagrees_with_shards(weight_map, named, tmp_path):
    sharded(tmp_path, weight_map)
    with pytest.raises(CheckpointError) as e:
        Checkpoint(tmp_path)
    for fragment in named:
        assert fragment in str(e.value)


@pytest.mark.parametrize("text", [
    pytest.param("{not json", id="invalid-json"),
    pytest.param('{"metadata": {}}', id="no-weight-map"),
    pytest.param('{"weight_map": []}', id="weight-map-list"),
    pytest.param("[]", id="top-level-list"),
    pytest.param('{"weight_map": {"a": 5}}', id="shard-not-string"),
])
def test_malformed_index(text, tmp_path):
    sharded(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError):
        Checkpoint(tmp_path)


def test_checkpoint_folder_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        Checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        Checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        Checkpoint(tmp_path)
