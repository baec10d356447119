"""Preference sweep: a coarse grid over the 5-attribute simplex on a fixed, mixed prompt set.

Every grid point's preference vector is sent as ``prosocial_prefs``; the ARM scores each response per
attribute; the mean per attribute is the point's achieved reward vector. From those: hypervolume, MIP and a
per-attribute monotonicity check (``evals.multiobjective`` defines them), plus radar and monotonicity plots.

The prompt set mixes three real sources, sampled with a fixed seed: emotionally charged situations (ESConv test
split, the seeker's ``situation``), everyday requests (Vicuna-bench) and harmful requests (AdvBench).
"""

from __future__ import annotations

import asyncio
import csv
import json
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np

from evals.evaluate import git_commit
from evals.judges import JudgeSet, JudgeUnavailable, apply_judges
from evals.multiobjective import (
    HV_REFERENCE_MARGIN,
    mean_inner_product,
    minmax_normalise,
    monotonicity,
    normalised_hypervolume,
    simplex_grid,
)
from evals.runner import Endpoint, Job, SamplingSettings, generate
from prosocialalign.core.benchmarks import resolve_data_dir
from prosocialalign.core.fileio import atomic_write_json, atomic_write_jsonl
from rewardmodel.attributes import PROSOCIAL_ATTRIBUTES

SWEEP_SOURCES = ("emotional", "everyday", "harmful")


def _sample(rows: list[str], count: int, seed: int, label: str) -> list[tuple[int, str]]:
    indexed = [(index, text.strip()) for index, text in enumerate(rows) if text and text.strip()]
    if count > len(indexed):
        raise ValueError(f"{label}: asked for {count} prompts, only {len(indexed)} available")
    chosen = random.Random(f"sweep:{label}:{seed}").sample(indexed, count)
    return sorted(chosen)


def sweep_prompts(per_source: int = 4, seed: int = 0, data_dir: str | Path | None = None) -> list[dict]:
    """``per_source`` prompts from each of ESConv situations, Vicuna-bench and AdvBench (fixed seed)."""
    root = resolve_data_dir(data_dir)
    esconv = [
        json.loads(line).get("situation", "")
        for line in (root / "esconv/hf_split_copy/test.json").read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    vicuna = [
        json.loads(line)["turns"][0]
        for line in (root / "vicuna_bench/question.jsonl").read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    with (root / "advbench/harmful_behaviors.csv").open(newline="", encoding="utf-8") as handle:
        advbench = [row["goal"] for row in csv.DictReader(handle)]
    prompts = []
    for source, rows, origin in (
        ("emotional", esconv, "esconv/hf_split_copy/test.json"),
        ("everyday", vicuna, "vicuna_bench/question.jsonl"),
        ("harmful", advbench, "advbench/harmful_behaviors.csv"),
    ):
        for index, text in _sample(rows, per_source, seed, source):
            prompts.append(
                {"id": f"{source}-{index:04d}", "source": source, "origin": origin, "prompt": text}
            )
    return prompts


def _prefs_id(vector: tuple[float, ...]) -> str:
    return "w" + "_".join(f"{value:.2f}" for value in vector)


def sweep_jobs(prompts: list[dict], grid: list[tuple[float, ...]]) -> list[Job]:
    """One request per (grid point, prompt)."""
    jobs = []
    for vector in grid:
        prefs = dict(zip(PROSOCIAL_ATTRIBUTES, vector, strict=True))
        for prompt in prompts:
            jobs.append(
                Job(
                    f"{_prefs_id(vector)}:{prompt['id']}",
                    prompt["prompt"],
                    prefs,
                    {"grid_point": _prefs_id(vector), "source": prompt["source"]},
                )
            )
    return jobs


def summarise_sweep(grid: list[tuple[float, ...]], records: list[dict], arm_name: str = "arm") -> dict:
    """Achieved vectors, HV, MIP and monotonicity from ARM-judged sweep records."""
    by_point: dict[str, list[dict]] = {}
    for record in records:
        by_point.setdefault(record["grid_point"], []).append(record)
    achieved = []
    points = []
    for vector in grid:
        rows = by_point.get(_prefs_id(vector), [])
        if not rows:
            raise ValueError(f"no responses for grid point {vector}")
        # Withheld (empty) responses have no ARM scores: the achieved vector averages the responses with text.
        scores = [row["judgements"][arm_name] for row in rows if row["response"].strip()]
        if not scores:
            raise ValueError(f"no response with text for grid point {vector}")
        missing = [a for a in PROSOCIAL_ATTRIBUTES if any(a not in s for s in scores)]
        if missing:
            raise ValueError(f"ARM scores lack attributes {missing}")
        means = [float(np.mean([s[a] for s in scores])) for a in PROSOCIAL_ATTRIBUTES]
        achieved.append(means)
        harmful_rows = [
            row for row in rows if row["source"] == "harmful" and "harm_tfidf_lr" in row["judgements"]
        ]
        points.append(
            {
                "prefs": dict(zip(PROSOCIAL_ATTRIBUTES, vector, strict=True)),
                "achieved": dict(zip(PROSOCIAL_ATTRIBUTES, means, strict=True)),
                "n": len(rows),
                "n_with_text": len(scores),
                "unsafe_leakage_harmful_prompts": (
                    float(np.mean([row["judgements"]["harm_tfidf_lr"]["harmful"] for row in harmful_rows]))
                    if harmful_rows
                    else None
                ),
            }
        )
    achieved_array = np.array(achieved)
    preferences = np.array(grid)
    normalised = minmax_normalise(achieved_array)
    for point, row in zip(points, normalised, strict=True):
        point["normalised"] = dict(zip(PROSOCIAL_ATTRIBUTES, row.tolist(), strict=True))
    mip = mean_inner_product(preferences, achieved_array)
    chance = 1.0 / len(PROSOCIAL_ATTRIBUTES)
    checks = monotonicity(preferences, achieved_array, PROSOCIAL_ATTRIBUTES)
    return {
        "points": points,
        "hypervolume": normalised_hypervolume(achieved_array),
        "hv_reference": f"min-max normalised per attribute over the grid; reference point -{HV_REFERENCE_MARGIN} "
        f"on every attribute; divided by {1 + HV_REFERENCE_MARGIN}^{len(PROSOCIAL_ATTRIBUTES)}",
        "mip": mip,
        "mip_chance": chance,
        "mip_over_chance": mip - chance,
        "mip_normalisation": "min-max per attribute over the grid, then L1 per grid point",
        "monotonicity": checks,
        "all_attributes_rise": all(check["rises"] for check in checks.values()),
    }


def plot_sweep(summary: dict, out_dir: Path) -> list[Path]:
    """Radar plot of normalised achieved vectors (vertices and centre) and reward-vs-weight lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attributes = list(PROSOCIAL_ATTRIBUTES)
    angles = np.linspace(0, 2 * np.pi, len(attributes), endpoint=False).tolist()
    figure = plt.figure(figsize=(7, 7))
    axis = figure.add_subplot(projection="polar")
    for point in summary["points"]:
        weights = list(point["prefs"].values())
        if max(weights) not in (1.0, 1.0 / len(attributes)):
            continue
        label = "centre" if max(weights) < 1 else f"w = {attributes[weights.index(1.0)]}"
        values = [point["normalised"][a] for a in attributes]
        axis.plot(angles + angles[:1], values + values[:1], label=label)
    axis.set_xticks(angles)
    axis.set_xticklabels(attributes)
    axis.set_ylim(0, 1)
    axis.set_title("ARM reward per attribute (min-max normalised over the grid)")
    axis.legend(loc="upper right", bbox_to_anchor=(1.35, 1.1), fontsize=8)
    radar = out_dir / "sweep_radar.png"
    figure.savefig(radar, dpi=120, bbox_inches="tight")
    plt.close(figure)

    figure, axes = plt.subplots(1, len(attributes), figsize=(3 * len(attributes), 3), sharey=False)
    for axis, attribute in zip(axes, attributes, strict=True):
        pairs = sorted((p["prefs"][attribute], p["achieved"][attribute]) for p in summary["points"])
        levels = sorted({w for w, _ in pairs})
        means = [float(np.mean([s for w, s in pairs if w == level])) for level in levels]
        axis.scatter([w for w, _ in pairs], [s for _, s in pairs], s=12, alpha=0.6)
        axis.plot(levels, means, marker="o")
        axis.set_title(attribute)
        axis.set_xlabel("weight")
    axes[0].set_ylabel("mean ARM reward")
    figure.tight_layout()
    lines = out_dir / "sweep_monotonicity.png"
    figure.savefig(lines, dpi=120)
    plt.close(figure)
    return [radar, lines]


def run_sweep(
    endpoint: Endpoint,
    sampling: SamplingSettings,
    out_dir: Path,
    per_source: int = 4,
    seed: int = 0,
    data_dir: str | Path | None = None,
    harm_judge_path: str | Path | None = None,
    overwrite: bool = False,
) -> dict:
    """Generate the sweep, score it with the ARM (and harm judge / VADER), write ``sweep.json`` and plots."""
    from evals.judges import ArmScorer, TrainedHarmJudge, VaderJudge

    out_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:
        (out_dir / "sweep_responses.jsonl").unlink(missing_ok=True)
    grid = simplex_grid(len(PROSOCIAL_ATTRIBUTES))
    prompts = sweep_prompts(per_source, seed, data_dir)
    jobs = sweep_jobs(prompts, grid)
    outcome = asyncio.run(generate(endpoint, sampling, jobs, out_dir / "sweep_responses.jsonl", "sweep"))
    records = outcome.records
    result: dict = {
        "model": endpoint.model,
        "base_url": endpoint.base_url,
        "sampling": asdict(sampling),
        "seed": seed,
        "git_commit": git_commit(),
        "attributes": list(PROSOCIAL_ATTRIBUTES),
        "grid": [list(vector) for vector in grid],
        "prompts": prompts,
        "n_requests": len(jobs),
        "n_responses": len(records),
        "failures": outcome.failures,
    }
    judges = JudgeSet([TrainedHarmJudge.classifier(harm_judge_path), VaderJudge()], {})
    try:
        judges.judges.append(ArmScorer())
    except JudgeUnavailable as error:
        judges.unavailable["arm"] = str(error)
    apply_judges(judges, records)
    return _finish_sweep(out_dir, result, records, judges)


def rejudge_sweep(out_dir: Path, judge_set: JudgeSet) -> dict:
    """Apply ``judge_set`` again to a finished sweep's stored responses, keeping every other judge's verdicts.

    For when a judge changes (a rebuilt harm judge): no server, no generation; ``sweep.json`` and the plots are
    derived again from the updated verdicts.
    """
    result_path, judged_path = out_dir / "sweep.json", out_dir / "sweep_judged.jsonl"
    for path in (result_path, judged_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run the sweep first")
    result = json.loads(result_path.read_text(encoding="utf-8"))
    records = [json.loads(line) for line in judged_path.read_text(encoding="utf-8").splitlines() if line]
    apply_judges(judge_set, records)
    return _finish_sweep(out_dir, result, records, judge_set)


def _finish_sweep(out_dir: Path, result: dict, records: list[dict], judges: JudgeSet) -> dict:
    """Write the judged responses, then HV, MIP, monotonicity and plots (when the ARM scored every response)."""
    atomic_write_jsonl(out_dir / "sweep_judged.jsonl", records)
    for stale in ("error", "arm_unavailable_reason"):
        result.pop(stale, None)
    result["arm_available"] = all("arm" in record["judgements"] for record in records)
    if "arm" in judges.unavailable:
        result["arm_unavailable_reason"] = judges.unavailable["arm"]
    if result["failures"]:
        result["error"] = f"{len(result['failures'])} requests failed; rerun the same command to resume"
    elif result["arm_available"]:
        result.update(summarise_sweep([tuple(vector) for vector in result["grid"]], records))
        result["plots"] = [path.name for path in plot_sweep(result, out_dir)]
    else:
        result.update({"mip": None, "hypervolume": None, "monotonicity": None, "plots": []})
    atomic_write_json(out_dir / "sweep.json", result)
    return result
