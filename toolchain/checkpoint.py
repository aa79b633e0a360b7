"""Open a Hugging Face checkpoint folder: config, safetensors shards, tokenizer files.

Tensors are read lazily through :class:`Checkpoint.read`, one at a time, so exporting a model
never holds more than one tensor of it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from dymoe.bundle.errors import CheckpointError
from dymoe.bundle.safetensors_io import SafetensorsFile, TensorInfo

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",  # transformers >= 4.47 keeps the chat template here, not in the config
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_path(model: str) -> Path:
    """A local folder, or a hub id downloaded with huggingface_hub (optional, online only)."""
    path = Path(model)
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(
                f"{model} is a file; dymoe export needs a checkpoint folder",
                "pass the folder holding config.json and the safetensors files",
            )
        return path
    if not _HUB_ID.match(model):
        raise CheckpointError(f"no checkpoint folder at {model}", "check the path")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"no folder {model}, and huggingface_hub is not installed to fetch it as a hub id",
            "pip install huggingface_hub, or download the checkpoint and pass its folder",
        ) from None
    try:
        local = snapshot_download(
            model, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "chat_template.jinja"]
        )
    except Exception as e:  # network, auth, missing repo: all user-actionable
        raise CheckpointError(
            f"could not download {model} from the hub: {e}",
            "check the id and your network, or pass a local folder",
        ) from None
    return Path(local)


class Checkpoint:
    """A checkpoint folder with its config and a name -> shard index over all tensors."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        cfg_path = self.folder / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(
                f"no config.json in {self.folder}",
                "pass a Hugging Face checkpoint folder (config.json + *.safetensors)",
            )
        try:
            self.config: dict = json.loads(cfg_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"config.json in {self.folder} is not valid JSON: {e}",
                                  "fix or re-download the checkpoint's config.json") from None
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{index} is malformed ({e})", "re-download it") from None
            if not isinstance(weight_map, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names",
                                      "re-download the index")
            for shard in sorted(set(weight_map.values())):
                self._files[shard] = SafetensorsFile(self.folder / shard)
            for name, shard in weight_map.items():
                if name not in self._files[shard].tensors:
                    raise CheckpointError(
                        f"{index.name} places {name!r} in {shard}, which does not contain it",
                        "the index and shards disagree; re-download the checkpoint",
                    )
                self._where[name] = shard
            for shard, f in self._files.items():
                extra = set(f.tensors) - {n for n, s in weight_map.items() if s == shard}
                if extra:
                    raise CheckpointError(
                        f"{shard} holds tensors the index does not list: {sorted(extra)[:5]}",
                        "the index and shards disagree; re-download the checkpoint",
                    )
        elif single.is_file():
            f = SafetensorsFile(single)
            self._files[single.name] = f
            self._where = {name: single.name for name in f.tensors}
        else:
            raise CheckpointError(
                f"no model.safetensors or model.safetensors.index.json in {self.folder}",
                "dymoe reads safetensors checkpoints only (convert .bin files with transformers)",
            )

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))

    def names(self) -> list[str]:
        return list(self._where)

    def info(self, name: str) -> TensorInfo:
        return self._files[self._where[name]].tensors[name]

    def read(self, name: str, index: int | None = None, rows: tuple[int, int] | None = None) -> np.ndarray:
        return self._files[self._where[name]].read(name, index=index, rows=rows)

    def source_bytes(self) -> int:
        return sum(i.end - i.begin for f in self._files.values() for i in f.tensors.values())

    def fingerprint(self) -> dict:
        """What identifies this checkpoint for resuming: config plus every shard's header."""
        return {
            "config": self.config,
            "tensors": {n: [self.info(n).dtype, list(self.info(n).shape)] for n in sorted(self._where)},
            "shard_sizes": {s: f.path.stat().st_size for s, f in sorted(self._files.items())},
        }
