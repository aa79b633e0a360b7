"""Policy settings: the named presets of ``--policy``, a TOML file (``--policy-config``), and
command-line overrides, resolved in that order into one :class:`PolicyConfig`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dymoe.bundle.compat import tomllib
from dymoe.bundle.errors import InputError
from dymoe.bundle.precisions import SKIP
from dymoe.targets.providers import ExecutionTarget

from .policy import parse_ladder

POLICIES = ("ondemand", "lru", "lru-prefetch", "static-int4", "static-int2", "dymoe")
SCHEDULES = ("constant", "cosine", "calibrated")
EVICTIONS = ("lru", "priority", "reuse")


@dataclass
class PolicyConfig:
    name: str
    ladder: list[str] = field(default_factory=list)  # resolved precisions, high to low (may end in skip)
    # r: share of a layer's selected experts kept at ladder[0]; with cosine, the deepest layer's
    retention: float = 0.5
    retention_max: float = 1.0  # cosine: r at the first layer
    schedule: str = "constant"
    eviction: str = "lru"
    cache: bool = True  # False: load every use, keep nothing (on-demand offloading)
    prefetch: int = 0  # look-ahead depth in layers (0, 1 or 2)
    prefetch_top: int = 0  # experts predicted per layer (0: the model's top-k)
    renormalize: bool = False  # rescale kept experts' weights when some are skipped
    serve_lower_while_promoting: bool = False
    heavy_fraction: float = 0.1  # prefill: share of prompt tokens that count as heavy hitters
    pin_fraction: float = 0.0  # share of the budget pinned to calibration's hottest experts
    fit_precisions: bool = False  # cap each expert's precision so all of them fit (policy.home_precisions)
    on_load_error: str = "error"  # or "fallback": use another precision of that expert
    loader_workers: int = 2  # one reads while another builds; ORT releases the GIL in both
    compute_threads: int = 1  # a prompt's experts run on this many threads at once (ORT releases the GIL)


def preset(name: str, precisions: list[str], top: str | None = None) -> dict:
    """Settings of a named policy for a bundle with ``precisions`` (highest first); ``top`` is
    the full precision of the baselines (default: the highest)."""
    top = top or precisions[0]
    steps = [p for p in ("int8", "int4", "int2") if p in precisions]
    presets = {
        "ondemand": dict(ladder=top, cache=False),
        "lru": dict(ladder=top),
        "lru-prefetch": dict(ladder=top, prefetch=1),
        "static-int4": dict(ladder="int4"),
        "static-int2": dict(ladder="int2"),
        # the paper's critical-high / rest-low precision with a cosine depth schedule, look-ahead
        # prefetch; beyond the paper: each expert's top precision fitted to the budget (hot experts
        # int8 when everything fits at int4, int4/int2 when little fits), reuse-distance eviction,
        # and a resident lower copy answering while its promotion loads
        "dymoe": dict(ladder="/".join(steps) if len(steps) > 1 else top, retention=0.5, retention_max=1.0,
                      schedule="cosine", prefetch=1, eviction="reuse", fit_precisions=True,
                      serve_lower_while_promoting=True),
    }
    if name not in presets:
        raise InputError(f"unknown policy {name!r}", f"choose one of {', '.join(POLICIES)}")
    return presets[name]


def resolve(name: str, precisions: list[str], file: Path | None = None, top: str | None = None,
            **overrides) -> PolicyConfig:
    """Preset, then the TOML file's keys, then explicit overrides (``None`` means not given)."""
    if top is not None and top not in precisions:
        raise InputError(f"full precision {top!r} is not in this bundle", f"choose one of {', '.join(precisions)}")
    settings = preset(name, precisions, top)
    if file is not None:
        try:
            data = tomllib.loads(Path(file).read_text())
        except FileNotFoundError:
            raise InputError(f"policy config {file} not found", "check the path") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"policy config {file} is not valid TOML ({e})", "fix the file") from None
        known = {f.name for f in dataclasses.fields(PolicyConfig)} - {"name"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"policy config {file}: unknown key {unknown[0]!r}",
                             f"known keys: {', '.join(sorted(known))}")
        settings.update(data)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    ladder = settings.pop("ladder")
    cfg = PolicyConfig(name=name, ladder=parse_ladder(ladder, precisions) if isinstance(ladder, str)
                       else parse_ladder("/".join(ladder), precisions), **settings)
    _validate(cfg)
    return cfg


def _validate(cfg: PolicyConfig) -> None:
    checks = [
        (cfg.schedule in SCHEDULES, f"schedule {cfg.schedule!r}", f"choose {', '.join(SCHEDULES)}"),
        (cfg.eviction in EVICTIONS, f"eviction {cfg.eviction!r}", f"choose {', '.join(EVICTIONS)}"),
        (0.0 < cfg.retention <= 1.0, f"retention {cfg.retention}", "use a value in (0, 1]"),
        (cfg.retention <= cfg.retention_max <= 1.0, f"retention_max {cfg.retention_max}",
         "use a value between retention and 1"),
        (cfg.prefetch in (0, 1, 2), f"prefetch depth {cfg.prefetch}", "use 0, 1 or 2 layers"),
        (0.0 < cfg.heavy_fraction <= 1.0, f"heavy_fraction {cfg.heavy_fraction}", "use a value in (0, 1]"),
        (0.0 <= cfg.pin_fraction < 1.0, f"pin_fraction {cfg.pin_fraction}", "use a value in [0, 1)"),
        (cfg.on_load_error in ("error", "fallback"), f"on_load_error {cfg.on_load_error!r}",
         "choose error or fallback"),
        (cfg.loader_workers >= 1, f"loader_workers {cfg.loader_workers}", "use at least 1"),
        (cfg.compute_threads >= 1, f"compute_threads {cfg.compute_threads}", "use at least 1"),
        (cfg.cache or cfg.prefetch == 0, "prefetch without a cache", "prefetched experts need a cache"),
        (cfg.ladder[-1] != SKIP or len(cfg.ladder) > 1, f"ladder {cfg.ladder}", "a ladder needs a precision"),
    ]
    for ok, what, hint in checks:
        if not ok:
            raise InputError(f"invalid policy setting: {what}", hint)


def retention_schedule(cfg: PolicyConfig, num_layers: int, calibrated: list[float] | None = None) -> list[float]:
    """r(l) for every layer."""
    from .policy import cosine_retention

    if cfg.schedule == "constant":
        return [cfg.retention] * num_layers
    if cfg.schedule == "cosine":
        return [cosine_retention(layer, num_layers, cfg.retention_max, cfg.retention) for layer in range(num_layers)]
    if not calibrated or len(calibrated) != num_layers:
        raise InputError("schedule 'calibrated' needs calibration.json in the bundle",
                         "run dymoe calibrate BUNDLE first, or use --schedule cosine")
    return list(calibrated)


@dataclass
class PolicyRun:
    """What a budgeted run needs beside the policy: how to read and how much may be resident."""

    policy: str = "dymoe"
    budget: str = "100%"
    policy_config: Path | None = None
    io: str = "cached"
    storage_profile: str | None = None
    engine_cache: str | None = "auto"  # "auto": the user cache folder; a folder; None: off
    full_precision: str | None = None  # what "full precision" means (default: the bundle's highest)
    overrides: dict = field(default_factory=dict)  # PolicyConfig fields given on the command line
    on_note: Callable[[str], None] | None = None  # told of fallbacks as they happen (the CLI prints them)
    target: ExecutionTarget | None = None  # where the graphs run (None: the CPU)
