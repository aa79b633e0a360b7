"""The library API behind ``dymoe run``: open a bundle once (all experts resident at one
precision, or a memory-budgeted policy), generate many times, report metrics."""

from __future__ import annotations

import resource
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dymoe.bundle.progress import ProgressFn

from .bundle import Bundle
from .experts import ExpertExecutor, StaticExperts
from .generate import Cancel, GenerationResult, generate
from .memory import current_rss
from .model import MoEModel
from .policy_config import PolicyRun
from .sampling import SamplingParams
from .tokenizer import TextTokenizer

if TYPE_CHECKING:
    from dymoe.targets.providers import ExecutionTarget


@dataclass
class ModelSession:
    bundle: Bundle
    model: MoEModel
    tokenizer: TextTokenizer
    label: str
    orchestrator: object | None = None  # runtime.orchestrator.Orchestrator for budgeted policies
    _decode_bytes_from: int = 0
    _rss_peak: int = 0  # highest RSS sampled after each token of the last generation
    _since: object = None  # the orchestrator's counters when the last generation began

    def generate(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, stream: Callable[[str], object] | None = None,
                 cancel: Cancel | None = None) -> GenerationResult:
        return self.generate_ids(self.tokenizer.encode(prompt), max_new_tokens, temperature, top_p, seed, stream,
                                 cancel)

    def generate_ids(self, ids: list[int], max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                     seed: int = 0, stream: Callable[[str], object] | None = None,
                     cancel: Cancel | None = None) -> GenerationResult:
        """``stream`` gets each piece of new text as it completes (whole characters only);
        ``cancel`` (e.g. a ``threading.Event``) stops the generation before its next token."""
        decoder = self.tokenizer.stream()
        loader = self.orchestrator.loader if self.orchestrator else None

        self._rss_peak = current_rss()
        if self.orchestrator is not None:
            self._since = self.orchestrator.begin()

        def on_token(t: int) -> None:
            self._rss_peak = max(self._rss_peak, current_rss())
            if loader is not None and not decoder.ids:  # first token: prefill is over
                self._decode_bytes_from = loader.totals.bytes_read
            text = decoder.push(t)
            if stream and text:
                stream(text)

        return generate(self.model, ids, max_new_tokens, SamplingParams(temperature, top_p, seed),
                        on_token=on_token, cancel=cancel)

    def metrics(self, result: GenerationResult) -> dict:
        times = result.token_times_s
        m = {
            "bundle": str(self.bundle.path),
            "experts": self.label,
            "prompt_tokens": len(result.prompt_ids),
            "new_tokens": len(result.token_ids),
            "ttft_s": result.ttft_s,
            "tpot_s": result.tpot_s,
            "tpot_p50_s": float(np.percentile(times, 50)) if times else 0.0,
            "tpot_p90_s": float(np.percentile(times, 90)) if times else 0.0,
            "token_times_s": times,
            "stop_reason": result.stop_reason,
            # sampled after every token of this generation; the process-lifetime peak (which
            # includes earlier runs in the same process) is reported beside it
            "peak_rss_bytes": self._rss_peak,
            "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            # resident outside any expert budget: embeddings, attention, head, with their external data
            "backbone_file_bytes": self._backbone_file_bytes(),
            "prompt_ids": result.prompt_ids,
            "token_ids": result.token_ids,
            "text": self.tokenizer.decode(result.token_ids),
        }
        if self.orchestrator is not None:
            m.update(self.orchestrator.report(decode_tokens=max(len(times), 1),
                                              decode_bytes=self.orchestrator.loader.totals.bytes_read
                                              - self._decode_bytes_from, since=self._since))
        return m

    def _backbone_file_bytes(self) -> int:
        m = self.bundle.manifest
        rels = [d for r in self.model.backbone_files for d in (r, *m.backbone.external_data.get(r, ()))]
        return sum(m.files[r].bytes for r in rels)

    def totals(self) -> dict[str, int]:
        """Counters since the session opened, for a long-running process (a server's metrics).
        Read them from the thread that generates: the resident set is single-threaded."""
        out = {"rss_bytes": current_rss()}
        orch = self.orchestrator
        if orch is None:  # every expert resident at one precision: no cache, nothing read later
            out["expert_resident_bytes"] = getattr(self.model.experts, "resident_file_bytes", 0)
            return out
        out.update(expert_requests=orch.c.requests, expert_hits=orch.c.hits,
                   expert_bytes_read=orch.loader.totals.bytes_read, expert_loads=orch.loader.totals.loads,
                   expert_resident_bytes=orch.resident.used, expert_budget_bytes=orch.resident.budget)
        return out

    def close(self) -> None:
        if self.orchestrator is not None:
            self.orchestrator.close()


def open_model(path: Path, precision: str | None = None, experts: ExpertExecutor | None = None,
               progress: ProgressFn | None = None, policy: PolicyRun | None = None,
               target: ExecutionTarget | None = None) -> ModelSession:
    """Open a bundle: with ``policy``, a memory-budgeted orchestrated run; otherwise every
    expert resident at ``precision`` (default: the bundle's highest). ``target`` (or the policy's)
    is where the graphs run (default: the CPU)."""
    bundle = Bundle(path, target or (policy.target if policy else None))
    tokenizer = TextTokenizer(bundle.tokenizer_path())
    if policy is not None:
        from .build import build_orchestrator

        orch = build_orchestrator(bundle, policy)
        try:
            model = MoEModel(bundle, orch)
            orch.start()
        except BaseException:
            orch.close()
            raise
        return ModelSession(bundle, model, tokenizer, f"policy {policy.policy}", orch)
    precision = precision or bundle.precisions[0]
    if experts is None and bundle.target.profile is not None:  # every expert resident: does it fit the device?
        from .device_memory import check_fits, device_costs

        m, target = bundle.manifest, bundle.target
        bundle.check_precision(precision)
        need = (sum(m.files[e.variants[precision].path].bytes for e in m.experts) if target.is_cpu  # at least
                else device_costs(m, target)[precision] * len(m.experts))
        check_fits(m, target.profile, need, f"every expert at {precision}")
    model = MoEModel(bundle, experts or StaticExperts(bundle, precision, progress=progress))
    return ModelSession(bundle, model, tokenizer, precision)
