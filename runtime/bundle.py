"""An opened bundle: its manifest, the execution target its graphs run on, and sessions built
from checksum-verified bytes."""

from __future__ import annotations

from pathlib import Path

from dymoe.bundle.errors import BundleError, InputError
from dymoe.bundle.manifest import Manifest, read_manifest, read_verified
from dymoe.bundle.paths import resolve_file
from dymoe.targets.providers import CPU_TARGET, ExecutionTarget

from .ort_session import backbone_threads, create_session


class Bundle:
    def __init__(self, path: Path, target: ExecutionTarget | None = None) -> None:
        self.path = Path(path)
        self.manifest: Manifest = read_manifest(self.path)
        self.spec = self.manifest.model
        self.target = target or CPU_TARGET

    @property
    def precisions(self) -> list[str]:
        return self.manifest.quantization.precisions

    def check_precision(self, precision: str) -> str:
        if precision not in self.precisions:
            raise InputError(
                f"precision {precision!r} is not in this bundle (it has {', '.join(self.precisions)})",
                "choose one of those, or re-export with --precisions including it",
            )
        return precision

    def read(self, rel: str) -> bytes:
        return read_verified(self.path, self.manifest, rel)

    def session(self, rel: str, threads: int | None = None):
        return create_session(self.read(rel), threads or backbone_threads(), str(self.path / rel), target=self.target,
                              external_data=self.external_data(rel), arena=True)

    def external_data(self, rel: str) -> dict[str, bytes]:
        """Graph ``rel``'s external data files as the manifest lists them, checksum-verified, by the name
        the graph gives each (relative to its folder, which the manifest reader checked it shares)."""
        return {data.rpartition("/")[2]: self.read(data) for data in self.manifest.backbone.external_data.get(rel, ())}

    def expert_graph(self, precision: str, rel: str) -> dict:
        """What the session factory needs to know of an expert graph to place it: the target, the
        manifest's format of ``precision``, the width, and the graph's sha256 (prebuilt engines)."""
        return dict(target=self.target, expert_format=self.manifest.quantization.formats[precision],
                    hidden_size=self.spec.hidden_size, key=self.manifest.files[rel].sha256, precision=precision)

    def expert_rel(self, layer: int, expert: int, precision: str) -> str:
        try:
            return self.manifest.expert(layer, expert).variants[precision].path
        except (KeyError, IndexError):
            raise BundleError(f"manifest.json has no {precision} variant of expert {expert} in layer {layer}",
                              "re-export the bundle") from None

    def tokenizer_path(self) -> Path:
        rel = "tokenizer/tokenizer.json"
        if rel not in self.manifest.tokenizer:
            raise BundleError(f"bundle {self.path} has no tokenizer", "re-export from a folder with tokenizer.json")
        self.read(rel)  # verify the checksum before trusting it
        return resolve_file(self.path, rel)
