"""Assemble a budgeted run: policy settings, measured engine costs, budget, depth schedule,
look-ahead predictor, calibration priors, storage and loader -> an Orchestrator."""

from __future__ import annotations

from pathlib import Path

from .budget import parse_budget
from .bundle import Bundle
from .costs import EngineCosts, engine_costs, estimate
from .device_memory import check_fits, device_costs
from .engine_cache import EngineCache
from .loader import Loader
from .orchestrator import Orchestrator, check_budget
from .policy_config import PolicyConfig, PolicyRun, resolve, retention_schedule
from .predictor import Predictor
from .storage import Storage, load_profile


def plan(bundle: Bundle, run: PolicyRun) -> tuple[PolicyConfig, EngineCosts, int]:
    """Resolve the policy, measure engine costs and check the budget, loading no expert."""
    cfg = resolve(run.policy, bundle.precisions, run.policy_config, run.full_precision, **run.overrides)
    target = bundle.target
    # on the CPU what an engine adds to RSS (and to its peak while built), measured; on a GPU
    # its device bytes, estimated, with the host-side build scratch estimated from the files
    if target.is_cpu:
        costs = engine_costs(bundle.path, "bundle" if run.engine_cache is None else "engine")
    else:
        costs = EngineCosts(device_costs(bundle.manifest, target), estimate(bundle.path).scratch)
    spec = bundle.spec
    all_top = costs.resident[run.full_precision or bundle.precisions[0]] * len(spec.moe_layers) * spec.num_experts
    budget = parse_budget(run.budget, all_top)
    check_budget(cfg, costs, budget, spec.top_k)
    check_fits(bundle.manifest, target.profile, budget, f"--budget {run.budget} ({budget / 2**20:,.0f} MiB)")
    return cfg, costs, budget


def build_orchestrator(bundle: Bundle, run: PolicyRun) -> Orchestrator:
    cfg, costs, budget = plan(bundle, run)
    spec = bundle.spec
    calibrated, priors = None, None
    if cfg.schedule == "calibrated" or cfg.eviction == "priority" or cfg.pin_fraction:
        from dymoe.bundle.calibration import load_calibration, priors_of, retention_of

        cal = load_calibration(bundle.path, bundle.manifest)  # None when the bundle has not been calibrated
        if cal is not None:
            priors = priors_of(cal)
            if cfg.schedule == "calibrated":
                calibrated = retention_of(cal, cfg.ladder[-1])
    retention = retention_schedule(cfg, spec.num_layers, calibrated)
    storage = Storage(run.io, load_profile(run.storage_profile) if run.storage_profile else None)
    # ORT's optimised graphs are CPU graphs; GPU targets have TensorRT's engines (--engines) instead
    engines = None if run.engine_cache is None or not bundle.target.is_cpu else EngineCache(
        None if run.engine_cache == "auto" else Path(run.engine_cache))
    loader = Loader(bundle, storage, workers=cfg.loader_workers, engine_cache=engines)
    try:
        return Orchestrator(bundle, cfg, loader, costs, budget, retention,
                            predictor=Predictor(bundle) if cfg.prefetch else None,
                            priors=priors if (cfg.eviction == "priority" or cfg.pin_fraction) else None,
                            on_note=run.on_note)
    except BaseException:
        loader.close()
        raise
