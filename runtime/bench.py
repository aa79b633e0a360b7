"""``dymoe bench``: policies side by side on one bundle (optionally across budgets), with
accuracy beside speed; writes JSON and plots. The measuring itself is runtime.compare."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

from dymoe.bundle.errors import InputError
from dymoe.bundle.fsutil import read_user_text
from dymoe.bundle.progress import Counter, ProgressFn

from .build import plan
from .bundle import Bundle
from .compare import Comparison, accuracy, speed_runs
from .evaluate import reference_precision
from .policy_config import PolicyRun
from .tokenizer import TextTokenizer


@dataclass
class BenchOptions:
    policies: list[str]
    budgets: list[str]
    base: PolicyRun = field(default_factory=lambda: PolicyRun("lru"))
    prompts: list[str] | None = None  # texts; None: the prompts that ship with dymoe
    prompt_tokens: int | None = None  # synthetic length: prompts cut or repeated to this many tokens
    new_tokens: int = 32
    repeats: int = 3
    accuracy: bool = True
    data: Path | None = None  # held-out text for perplexity
    window: int = 128
    windows: int = 4


def default_prompts() -> list[str]:
    text = (resources.files("dymoe") / "data" / "prompts.txt").read_text()
    return [line for line in text.splitlines() if line.strip()]


def read_prompts(path: Path) -> list[str]:
    """One prompt per line, or JSON Lines with a ``prompt`` or ``text`` field."""
    try:
        lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except FileNotFoundError:
        raise InputError(f"prompts file {path} not found", "check the path") from None
    except UnicodeDecodeError:
        raise InputError(f"prompts file {path} is not UTF-8 text", "save it as UTF-8") from None
    if not lines:
        raise InputError(f"prompts file {path} is empty", "one prompt per line, or JSON Lines with 'prompt'")
    if lines[0].lstrip().startswith("{"):
        out = []
        for i, line in enumerate(lines, 1):
            try:
                obj = json.loads(line)
                out.append(str(obj.get("prompt", obj.get("text"))) if isinstance(obj, dict) else None)
            except ValueError:
                out.append(None)
            if out[-1] in (None, "None"):
                raise InputError(f"{path}:{i} is not a JSON object with a 'prompt' or 'text' field",
                                 "fix that line, or use plain text with one prompt per line")
        return out
    return lines


def prompt_ids(tok: TextTokenizer, texts: list[str], length: int | None, context: int) -> list[list[int]]:
    out = []
    for text in texts:
        ids = tok.encode(text)
        if length:
            ids = (ids * (length // max(len(ids), 1) + 1))[:length]
        out.append(ids[: context - 1])
    return out


def check(bundle: Bundle, opts: BenchOptions) -> None:
    """Every policy and budget must be runnable: fail before any run, not halfway."""
    if not opts.policies:
        raise InputError("no policies to compare", "pass e.g. --policies lru,dymoe")
    for budget in opts.budgets:
        for policy in opts.policies:
            plan(bundle, replace(opts.base, policy=policy, budget=budget))


def run_bench(bundle_path: Path, opts: BenchOptions, progress: ProgressFn | None = None) -> dict:
    bundle = Bundle(bundle_path, opts.base.target)
    check(bundle, opts)
    tok = TextTokenizer(bundle.tokenizer_path())
    prompts = prompt_ids(tok, opts.prompts or default_prompts(), opts.prompt_tokens,
                         bundle.spec.max_position_embeddings)
    ids = None
    if opts.accuracy:
        if opts.data is None:
            raise InputError("accuracy needs held-out text", "pass --data FILE, or --no-accuracy")
        ids = tok.encode(read_user_text(opts.data, "--data"))
    per_budget = len(opts.policies) * (1 + opts.repeats * len(prompts) + (1 if opts.accuracy else 0))
    counter = Counter(progress, "bench", per_budget * len(opts.budgets))
    results, ref = [], None
    for budget in opts.budgets:
        base = replace(opts.base, budget=budget)
        runs, warm = speed_runs(bundle_path, opts.policies, base, prompts, opts.new_tokens, opts.repeats, counter)
        ppl, agree = {}, {}
        if ids is not None:
            ref, ppl, agree = accuracy(bundle_path, opts.policies, base, ids, opts.window, opts.windows, counter,
                                      reference=ref)
        summary = Comparison(runs, ppl, agree).summary()
        warm_summary = Comparison(warm, ppl, agree).summary()
        results.append({"budget": budget, "policies": {p: {**summary[p], "runs": runs[p]} for p in opts.policies},
                        "warm": {p: {**warm_summary[p], "runs": warm[p]} for p in opts.policies}})
    reference = reference_precision(bundle.precisions)
    return {
        "bundle": str(bundle_path),
        "model_type": bundle.spec.model_type,
        "options": {"policies": opts.policies, "budgets": opts.budgets, "io": opts.base.io,
                    "storage_profile": opts.base.storage_profile, "new_tokens": opts.new_tokens,
                    "prompt_tokens": [len(p) for p in prompts], "repeats": opts.repeats,
                    "full_precision": opts.base.full_precision or bundle.precisions[0]},
        "reference": None if ref is None else {"precision": reference, "perplexity": ref.ppl, "tokens": ref.tokens},
        "results": results,
    }
