from __future__ import annotations

import os
import signal
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# measured engine costs and ORT-optimised graphs are cached per user: keep tests' apart
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="dymoe-test-cache-")
# The Ctrl-C tests need SIGINT delivered. A non-interactive shell starts background jobs (`make test &`)
# with SIGINT ignored, and an ignored signal stays ignored in every child: this process would never
# see the tests' own SIGINT, and the CLI processes they interrupt would run on. Python's handler here
# is reset to the default in each child it starts.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

from tiny_models import ARCHS, make_tiny_model  # noqa: E402

from dymoe.toolchain.export import ExportOptions, export  # noqa: E402

TEST_PRECISIONS = ("fp32", "int8", "int4", "int2")


class TinyCase:
    def __init__(self, arch: str, root: Path, **overrides) -> None:
        self.arch = arch
        self.src = root / "src"
        self.bundle = root / "bundle"
        self.model = make_tiny_model(arch, self.src, **overrides)
        # a float32 backbone: these bundles are compared with transformers to 1e-4 (the backbone precisions
        # are tested in test_backbone_precision.py)
        export(str(self.src), self.bundle, ExportOptions(precisions=TEST_PRECISIONS, backbone_precision="fp32"))


@pytest.fixture(scope="session", params=ARCHS)
def tiny(request, tmp_path_factory) -> TinyCase:
    """One tiny random model per architecture, exported once per test session."""
    return TinyCase(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> TinyCase:
    return TinyCase("qwen3_moe", tmp_path_factory.mktemp("qwen3_single"))
