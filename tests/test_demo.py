"""The shipped demo model through dymoe: its bundle's fp32 experts score the held-out text as
transformers does (within the default int8 backbone's bound), and `dymoe demo` runs end to end on a
fresh cache, then reuses its bundle."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dymoe.bundle.manifest import read_manifest
from dymoe.demo import DEMO_PRECISIONS, demo_model_dir, ensure_demo_bundle
from dymoe.runtime.bundle import Bundle
from dymoe.runtime.evaluate import perplexity
from dymoe.runtime.experts import StaticExperts
from dymoe.runtime.model import MoEModel
from dymoe.runtime.tokenizer import TextTokenizer
from dymoe.toolchain.options import BACKBONE_PRECISION

WINDOW, WINDOWS = 128, 6


@pytest.fixture(scope="module")
def demo_bundle() -> Path:
    return ensure_demo_bundle()


def test_demo_bundle_perplexity_matches_transformers(demo_bundle):
    from transformers import AutoModelForCausalLM

    folder = demo_model_dir()
    ids = TextTokenizer(folder / "tokenizer.json").encode((folder / "heldout.txt").read_text())
    b = Bundle(demo_bundle)
    ours = perplexity(MoEModel(b, StaticExperts(b, "fp32")), ids, WINDOW, WINDOWS)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(WINDOWS):
            chunk = torch.tensor([ids[i * WINDOW:(i + 1) * WINDOW]])
            logp = torch.log_softmax(model(chunk).logits[0, :-1].double(), -1)
            nll -= logp[torch.arange(WINDOW - 1), chunk[0, 1:]].sum().item()
            n += WINDOW - 1
    theirs = float(np.exp(nll / n))
    assert ours.tokens == n
    # the demo exports with the default int8 backbone: within its documented bound of the float model (README
    # "Backbone precision"); a float32 backbone matches transformers to 1e-4 (test_parity.py)
    assert read_manifest(demo_bundle).backbone.precision == BACKBONE_PRECISION == "int8"
    assert abs(ours.ppl - theirs) / theirs < 5e-3
    assert ours.ppl < 0.25 * b.spec.vocab_size  # a trained model, far from uniform guessing
    assert Bundle(demo_bundle).precisions == list(DEMO_PRECISIONS)


def test_dymoe_demo_runs_and_reuses_its_bundle(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    runs = []
    for _ in range(2):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "dymoe.cli", "demo"], capture_output=True, text=True, env=env,
                              timeout=600)
        runs.append(time.perf_counter() - t0)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "time per output token" in proc.stdout and "What this shows" in proc.stdout
        assert "dymoe" in proc.stdout and "lru" in proc.stdout and "held-out perplexity" in proc.stdout
        assert "Medians of 8 runs per policy" in proc.stdout  # repeated, and it says so
        assert "Traceback" not in proc.stderr and "toy model" in proc.stderr
        assert "dymoe demo --widen 8" in proc.stderr  # where the realistic-size comparison is
    bundles = list((tmp_path / "dymoe" / "demo").glob("bundle-*"))
    assert len(bundles) == 1 and (bundles[0] / "manifest.json").is_file()


def test_demo_widen_is_for_the_shipped_model_only(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dymoe.cli", "demo", "--widen", "8", "--model", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith("error: --widen"), proc.stderr
