"""One configuration, end to end: generate on every selected benchmark, judge, write ``results.json``.

Output folder layout::

    <out>/run.json                 what was asked (endpoint, model, sampling, benchmarks, seed, commit)
    <out>/responses/<bench>.jsonl  raw responses, appended as they arrive (resume source)
    <out>/judged/<bench>.jsonl     responses with every judge's verdict (rewritten atomically)
    <out>/results.json             per-benchmark figures and the configuration summary (atomic)
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from evals.judges import JudgeSet, apply_judges
from evals.metrics import benchmark_metrics, configuration_summary
from evals.runner import Endpoint, GenerationOutcome, Job, SamplingSettings, generate, make_client
from prosocialalign.core.benchmarks import Benchmark
from prosocialalign.core.fileio import atomic_write_json, atomic_write_jsonl

REPO_ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str | None:
    """The repository's HEAD commit (read-only git call), or None outside a checkout."""
    try:
        completed = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return completed.stdout.strip() or None if completed.returncode == 0 else None


@dataclass
class RunSettings:
    """Everything one configuration run needs."""

    name: str
    endpoint: Endpoint
    sampling: SamplingSettings
    benchmarks: list[Benchmark]
    out_dir: Path
    seed: int = 0
    sample_size: int | None = None
    sample_overrides: dict[str, int] = field(default_factory=dict)
    split: str = "all"
    prefs: dict[str, float] | None = None
    overwrite: bool = False


def _jobs(benchmark: Benchmark, prefs: dict[str, float] | None) -> list[Job]:
    return [
        Job(item.id, item.prompt, prefs, {"benchmark": benchmark.name, "category": item.category})
        for item in benchmark.items
    ]


async def _generate_all(settings: RunSettings) -> dict[str, GenerationOutcome]:
    client = make_client(settings.endpoint)
    outcomes = {}
    try:
        for benchmark in settings.benchmarks:
            outcomes[benchmark.name] = await generate(
                settings.endpoint,
                settings.sampling,
                _jobs(benchmark, settings.prefs),
                settings.out_dir / "responses" / f"{benchmark.name}.jsonl",
                description=f"{settings.name}:{benchmark.name}",
                client=client,
            )
    finally:
        await client.close()
    return outcomes


def run_meta(settings: RunSettings) -> dict:
    """The ``run.json`` content: enough to reproduce the run."""
    return {
        "configuration": settings.name,
        "base_url": settings.endpoint.base_url,
        "model": settings.endpoint.model,
        "sampling": asdict(settings.sampling),
        "prefs": settings.prefs,
        "seed": settings.seed,
        "sample_size": settings.sample_size,
        "sample_overrides": settings.sample_overrides,
        "split": settings.split,
        "benchmarks": {
            b.name: {"kind": b.kind, "n": len(b), "source": b.source} for b in settings.benchmarks
        },
        "concurrency": settings.endpoint.concurrency,
        "git_commit": git_commit(),
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def run_configuration(settings: RunSettings, judge_set: JudgeSet) -> dict:
    """Generate, judge and summarise one configuration; returns the ``results.json`` content."""
    if settings.overwrite:
        for sub in ("responses", "judged"):
            shutil.rmtree(settings.out_dir / sub, ignore_errors=True)
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    meta = run_meta(settings)
    atomic_write_json(settings.out_dir / "run.json", meta)
    outcomes = asyncio.run(_generate_all(settings))
    results: dict = {**meta, "benchmarks": {}, "failures": {}}
    for benchmark in settings.benchmarks:
        outcome = outcomes[benchmark.name]
        records = apply_judges(judge_set, outcome.records)
        atomic_write_jsonl(settings.out_dir / "judged" / f"{benchmark.name}.jsonl", records)
        judges = {judge.name: judge.kind for judge in judge_set.judges}
        results["benchmarks"][benchmark.name] = {
            "kind": benchmark.kind,
            "n": len(records),
            "n_requested": len(benchmark),
            "source": benchmark.source,
            "metrics": benchmark_metrics(benchmark.kind, records, judges),
        }
        if outcome.failures:
            results["failures"][benchmark.name] = outcome.failures
    results["judges"] = {judge.name: judge.kind for judge in judge_set.judges}
    results["judges_unavailable"] = dict(judge_set.unavailable)
    results["summary"] = configuration_summary(results)
    results["finished_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    atomic_write_json(settings.out_dir / "results.json", results)
    return results


def stored_verdicts(run_dir: Path, benchmark: str) -> list[dict] | None:
    """A finished run's judged responses for one benchmark (``judged/<benchmark>.jsonl``), None if not kept."""
    path = run_dir / "judged" / f"{benchmark}.jsonl"
    if not path.is_file():
        return None
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def derive_figures(results: dict, verdicts: dict[str, list[dict]]) -> dict:
    """Every benchmark's figures that has per-response verdicts, and the summary, derived again from them."""
    for name, records in verdicts.items():
        benchmark = results["benchmarks"][name]
        benchmark["metrics"] = benchmark_metrics(benchmark["kind"], records, results["judges"])
    results["summary"] = configuration_summary(results)
    return results


def rejudge_run(run_dir: Path, judge_set: JudgeSet) -> dict:
    """Apply ``judge_set`` again to a finished run's stored responses, keeping every other judge's verdicts.

    For when a judge's definition changes (no server needed: the responses are read from ``judged/``). The
    figures in ``results.json`` are derived again from the updated verdicts.
    """
    path = run_dir / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: nothing to judge again")
    results = json.loads(path.read_text(encoding="utf-8"))
    verdicts = {}
    for name in results["benchmarks"]:
        records = stored_verdicts(run_dir, name)
        if records is None:
            raise FileNotFoundError(
                f"{run_dir / 'judged' / name}.jsonl not found: run the configuration again"
            )
        verdicts[name] = apply_judges(judge_set, records)
        atomic_write_jsonl(run_dir / "judged" / f"{name}.jsonl", verdicts[name])
    results["judges"] = results.get("judges", {}) | {judge.name: judge.kind for judge in judge_set.judges}
    results["judges_unavailable"] = results.get("judges_unavailable", {}) | dict(judge_set.unavailable)
    derive_figures(results, verdicts)
    atomic_write_json(path, results)
    return results
