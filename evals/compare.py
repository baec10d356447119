"""Run several configurations one server at a time, then the sweep and the report: one reproducible command."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from evals.evaluate import RunSettings, run_configuration
from evals.judges import JudgeSet
from evals.launcher import CompareConfig, LauncherError, LocalServer
from evals.report import write_report
from evals.runner import Endpoint, SamplingSettings, served_model_name
from evals.sweep import run_sweep
from prosocialalign.core.benchmarks import Benchmark


@dataclass
class ComparePlan:
    """What ``prosocial eval compare`` runs."""

    config: CompareConfig
    selected: list[str]
    endpoints: dict[str, str]
    api_key: str
    model: str | None
    sampling: SamplingSettings
    benchmarks: list[Benchmark]
    out_dir: Path
    seed: int = 0
    sample_size: int | None = None
    sample_overrides: dict[str, int] = field(default_factory=dict)
    split: str = "all"
    concurrency: int = 8
    sweep: bool = True
    sweep_per_source: int = 4
    overwrite: bool = False
    harm_judge_path: str | Path | None = None


def _groups(plan: ComparePlan) -> dict[str, list[str]]:
    unknown = [name for name in plan.selected if name not in plan.config.configurations]
    if unknown:
        raise LauncherError(f"--configurations: unknown {unknown}; known: {list(plan.config.configurations)}")
    groups: dict[str, list[str]] = {}
    for name in plan.selected:
        groups.setdefault(plan.config.configurations[name].server, []).append(name)
    return groups


def _endpoint_for(plan: ComparePlan, server: str, names: list[str]) -> str | None:
    if server in plan.endpoints:
        return plan.endpoints[server]
    urls = {plan.endpoints[name] for name in names if name in plan.endpoints}
    if len(urls) > 1:
        raise LauncherError(
            f"--endpoint: configurations on server {server!r} were given different URLs {urls}"
        )
    return urls.pop() if urls else None


def run_comparison(plan: ComparePlan, judge_factory: Callable[[], JudgeSet]) -> dict:
    """Each server group: start it (or use the given endpoint), run its configurations, stop it; then report."""
    known = set(plan.config.configurations) | set(plan.config.servers)
    for name in plan.endpoints:
        if name not in known:
            raise LauncherError(
                f"--endpoint {name}=...: not a configuration or server name ({sorted(known)})"
            )
    run_dirs: dict[str, Path] = {}
    sweep_dir: Path | None = None
    for server_name, names in _groups(plan).items():
        url = _endpoint_for(plan, server_name, names)
        server = None
        if url is None:
            server = LocalServer(
                plan.config.servers[server_name],
                plan.api_key,
                plan.out_dir / "logs",
                plan.config.host,
                plan.config.variables,
            )
            url = server.start()
        try:
            model = plan.model or asyncio.run(served_model_name(url, plan.api_key))
            endpoint = Endpoint(url, plan.api_key, model, concurrency=plan.concurrency)
            for name in names:
                spec = plan.config.configurations[name]
                run_dirs[name] = plan.out_dir / "runs" / name
                settings = RunSettings(
                    name=name,
                    endpoint=endpoint,
                    sampling=plan.sampling,
                    benchmarks=plan.benchmarks,
                    out_dir=run_dirs[name],
                    seed=plan.seed,
                    sample_size=plan.sample_size,
                    sample_overrides=plan.sample_overrides,
                    split=plan.split,
                    prefs=spec.prefs,
                    overwrite=plan.overwrite,
                )
                run_configuration(settings, judge_factory())
                if plan.sweep and name == plan.config.sweep_configuration:
                    sweep_dir = plan.out_dir / "sweep"
                    run_sweep(
                        endpoint,
                        plan.sampling,
                        sweep_dir,
                        per_source=plan.sweep_per_source,
                        seed=plan.seed,
                        harm_judge_path=plan.harm_judge_path,
                        overwrite=plan.overwrite,
                    )
        finally:
            if server is not None:
                server.stop()
    return write_report(
        run_dirs, plan.out_dir, sweep_dir, plan.harm_judge_path, plan.config.sweep_configuration
    )
