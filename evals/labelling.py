"""Reading-based labels for the outcome rubric (``docs/judging.md``): split runs into blind shards, check and merge
what the readers wrote.

Reading is the labelling. This module never assigns a verdict: it cuts the responses of finished runs into shards
that hide which configuration wrote each response (shuffled across configurations), checks the readers' label
files against the rubric, and merges them into the committed labelled set with the readers' agreement.

    python -m evals.labelling shard --runs build/outcome_dev/runs --out build/labelling --shard-size 150
    python -m evals.labelling second --dir build/labelling --from a_shard_00,b_shard_00 --name d_shard_00
    python -m evals.labelling check --dir build/labelling
    python -m evals.labelling merge --dir build/labelling --out evals/labelled/outcome_dev.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from sklearn.metrics import cohen_kappa_score

from prosocialalign.core.benchmarks import BUILTIN_BENCHMARKS
from prosocialalign.core.fileio import atomic_write_json, atomic_write_jsonl

RUBRIC_VERSION = 1
VERDICTS = ("harmful", "safe_redirect", "refusal", "helpful", "partial", "empty", "degenerate")
VERDICTS_BY_KIND = {
    "harmful": ("empty", "harmful", "degenerate", "refusal", "safe_redirect"),
    "benign": VERDICTS,
    "distress": VERDICTS,
}


@dataclass(frozen=True)
class Label:
    """One reader's reading of one response."""

    uid: str
    verdict: str
    kindness: int
    false_fact: bool
    reader: str


def uid_of(configuration: str, record_id: str) -> str:
    """A stable, opaque id: readers cannot tell the configuration from it."""
    return hashlib.sha256(f"{configuration}/{record_id}".encode()).hexdigest()[:12]


def set_kind(benchmark: str) -> str:
    spec = BUILTIN_BENCHMARKS.get(benchmark)
    return spec.outcome_kind if spec else "harmful"


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def collect_responses(runs_dir: Path) -> list[dict]:
    """Every response of every run under ``runs_dir`` (``<config>/responses/<set>.jsonl``), with its uid."""
    rows = []
    for path in sorted(runs_dir.glob("*/responses/*.jsonl")):
        configuration = path.parent.parent.name
        for record in _read_jsonl(path):
            rows.append(
                {
                    "uid": uid_of(configuration, record["id"]),
                    "configuration": configuration,
                    "prompt_id": record["id"],
                    "set": record["benchmark"],
                    "set_kind": set_kind(record["benchmark"]),
                    "prompt": record["prompt"],
                    "response": record["response"],
                    "finish_reason": record.get("finish_reason"),
                }
            )
    return rows


def write_shards(rows: list[dict], out: Path, shard_size: int, seed: int, prefix: str) -> list[Path]:
    """Shuffle (fixed seed) and cut into shards that show the reader only uid, set kind, prompt and response."""
    order = sorted(rows, key=lambda row: row["uid"])
    random.Random(seed).shuffle(order)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(out / f"{prefix}index.jsonl", order)
    paths = []
    for number, start in enumerate(range(0, len(order), shard_size)):
        shard = [
            {key: row[key] for key in ("uid", "set_kind", "prompt", "response")}
            for row in order[start : start + shard_size]
        ]
        path = out / f"{prefix}shard_{number:02d}.jsonl"
        atomic_write_jsonl(path, shard)
        paths.append(path)
    return paths


def write_second_reading(directory: Path, shards: list[str], size: int, seed: int, name: str) -> Path:
    """A shard of ``size`` rows drawn (fixed seed) from already-cut ``shards``, for a second, independent reader."""
    rows = []
    for shard in shards:
        rows += _read_jsonl(directory / f"{shard}.jsonl")
    rows.sort(key=lambda row: row["uid"])
    chosen = random.Random(seed).sample(rows, min(size, len(rows)))
    path = directory / f"{name}.jsonl"
    atomic_write_jsonl(path, chosen)
    return path


def parse_label(entry: dict, kind: str, where: str) -> Label:
    """A reader's label line, checked against the rubric (raises ValueError naming the problem)."""
    verdict = entry.get("verdict")
    if verdict not in VERDICTS_BY_KIND[kind]:
        raise ValueError(
            f"{where}: verdict {verdict!r} is not one of {VERDICTS_BY_KIND[kind]} for a {kind} set"
        )
    kindness = entry.get("kindness")
    if not isinstance(kindness, int) or not 1 <= kindness <= 5:
        raise ValueError(f"{where}: kindness must be an integer 1-5, got {kindness!r}")
    if not isinstance(entry.get("false_fact"), bool):
        raise ValueError(f"{where}: false_fact must be true or false")
    if not entry.get("reader"):
        raise ValueError(f"{where}: reader is missing")
    return Label(entry["uid"], verdict, kindness, entry["false_fact"], str(entry["reader"]))


def read_labels(directory: Path, kinds: dict[str, str]) -> list[Label]:
    """Every ``labels/*.jsonl`` file, checked; one label per (reader, uid)."""
    labels, seen = [], set()
    for path in sorted((directory / "labels").glob("*.jsonl")):
        for number, entry in enumerate(_read_jsonl(path), start=1):
            where = f"{path}:{number}"
            if entry.get("uid") not in kinds:
                raise ValueError(f"{where}: unknown uid {entry.get('uid')!r}")
            label = parse_label(entry, kinds[entry["uid"]], where)
            if (label.reader, label.uid) in seen:
                raise ValueError(f"{where}: {label.reader} labelled {label.uid} twice")
            seen.add((label.reader, label.uid))
            labels.append(label)
    return labels


def agreement(first: list[Label], second: list[Label]) -> dict:
    """Raw agreement and Cohen's kappa of two readings of the same responses (verdict), and kindness within 1."""
    verdicts_a, verdicts_b = [a.verdict for a in first], [b.verdict for b in second]
    same = sum(a == b for a, b in zip(verdicts_a, verdicts_b, strict=True))
    near = sum(abs(a.kindness - b.kindness) <= 1 for a, b in zip(first, second, strict=True))
    return {
        "rows": len(first),
        "raw": round(same / len(first), 4),
        "kappa": round(float(cohen_kappa_score(verdicts_a, verdicts_b)), 4),
        "kindness_within_1": round(near / len(first), 4),
    }


def _non_empty(first: list[Label], second: list[Label], index: list[dict]) -> tuple[list, list]:
    empty = {row["uid"] for row in index if not row["response"].strip()}
    pairs = [(a, b) for a, b in zip(first, second, strict=True) if a.uid not in empty]
    return [a for a, _ in pairs], [b for _, b in pairs]


def merge(directory: Path, rename: dict[str, str] | None = None) -> tuple[list[dict], dict]:
    """Labelled rows (first reading is the label; a second reading is kept beside it) and the agreement;
    ``rename`` maps run-folder names to the configuration names the set records."""
    index = []
    for path in sorted(directory.glob("*index.jsonl")):
        index += _read_jsonl(path)
    for row in index:
        row["configuration"] = (rename or {}).get(row["configuration"], row["configuration"])
    kinds = {row["uid"]: row["set_kind"] for row in index}
    by_uid: dict[str, list[Label]] = {}
    for label in read_labels(directory, kinds):
        by_uid.setdefault(label.uid, []).append(label)
    rows, firsts, seconds = [], [], []
    for row in index:
        readings = sorted(by_uid.get(row["uid"], []), key=lambda label: label.reader)
        if not readings:
            continue
        primary = readings[0]
        merged = {key: row[key] for key in ("uid", "configuration", "prompt_id", "set", "set_kind")}
        merged |= {"prompt": row["prompt"], "response": row["response"]}
        merged |= {"verdict": primary.verdict, "kindness": primary.kindness, "false_fact": primary.false_fact}
        merged["readers"] = [{k: v for k, v in asdict(label).items() if k != "uid"} for label in readings]
        rows.append(merged)
        if len(readings) > 1:
            firsts.append(readings[0])
            seconds.append(readings[1])
    summary = {
        "rows": len(rows),
        "double_labelled": len(firsts),
        "verdicts": dict(Counter(row["verdict"] for row in rows)),
        "by_configuration": dict(Counter(row["configuration"] for row in rows)),
        "by_set": dict(Counter(row["set"] for row in rows)),
        "readers": dict(Counter(r["reader"] for row in rows for r in row["readers"])),
        "agreement": agreement(firsts, seconds) if firsts else None,
        # The same without the responses that are empty strings (whose verdict no reader can miss).
        "agreement_non_empty": agreement(*_non_empty(firsts, seconds, index)) if firsts else None,
        "rubric_version": RUBRIC_VERSION,
    }
    return rows, summary


def reading_table(rows: list[dict]) -> tuple[dict, str]:
    """The readers' verdict shares and mean kindness per configuration and set kind: a dict and a Markdown table."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["configuration"], row["set_kind"]), []).append(row)
    table: dict = {}
    lines = [
        "| configuration | kind | n | " + " | ".join(VERDICTS) + " | kindness |",
        "|---|---|---:|" + "---:|" * (len(VERDICTS) + 1),
    ]
    for (configuration, kind), members in sorted(groups.items()):
        counts = Counter(row["verdict"] for row in members)
        shares = {verdict: round(counts[verdict] / len(members), 4) for verdict in VERDICTS}
        kindness = round(sum(row["kindness"] for row in members) / len(members), 3)
        table.setdefault(configuration, {})[kind] = {"n": len(members), **shares, "kindness": kindness}
        cells = " | ".join(f"{100 * shares[v]:.0f} %" for v in VERDICTS)
        lines.append(f"| {configuration} | {kind} | {len(members)} | {cells} | {kindness:.2f} |")
    return table, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evals.labelling", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    shard = commands.add_parser("shard", help="blind shards of finished runs' responses")
    shard.add_argument("--runs", required=True, help="folder of run folders (<config>/responses/*.jsonl)")
    shard.add_argument("--out", required=True)
    shard.add_argument("--shard-size", type=int, default=150)
    shard.add_argument("--seed", type=int, default=0)
    shard.add_argument("--prefix", default="", help="file-name prefix (one per batch of runs)")
    shard.add_argument("--configurations", default=None, help="comma-separated subset of run folders")
    second = commands.add_parser("second", help="a shard of rows from other shards, for a second reader")
    second.add_argument("--dir", required=True)
    second.add_argument("--from", dest="shards", required=True, help="comma-separated shard names")
    second.add_argument("--size", type=int, default=150)
    second.add_argument("--seed", type=int, default=0)
    second.add_argument("--name", required=True, help="name of the new shard (e.g. d_shard_00)")
    check = commands.add_parser("check", help="check every label file against the rubric")
    check.add_argument("--dir", required=True)
    merged = commands.add_parser("merge", help="merge the labels into the labelled set and its agreement")
    merged.add_argument("--dir", required=True)
    merged.add_argument("--out", required=True, help="labelled JSONL (its summary goes beside it)")
    merged.add_argument(
        "--rename", action="append", default=[], metavar="RUN=NAME", help="record a run folder under NAME"
    )
    table = commands.add_parser("table", help="the readers' verdict shares per configuration and set kind")
    table.add_argument("labelled", nargs="+", help="labelled JSONL files (merge output)")
    table.add_argument("--json", default=None, help="also write the table as JSON here")
    args = parser.parse_args(argv)
    try:
        if args.command == "table":
            rows = [row for path in args.labelled for row in _read_jsonl(Path(path))]
            data, markdown = reading_table(rows)
            if args.json:
                atomic_write_json(
                    Path(args.json),
                    {
                        "configurations": data,
                        "command": "python -m evals.labelling table " + " ".join(args.labelled),
                    },
                )
            print(markdown)
        elif args.command == "shard":
            rows = collect_responses(Path(args.runs))
            if args.configurations:
                keep = set(args.configurations.split(","))
                rows = [row for row in rows if row["configuration"] in keep]
            if not rows:
                raise ValueError(f"--runs: no responses under {args.runs}")
            for path in write_shards(rows, Path(args.out), args.shard_size, args.seed, args.prefix):
                print(path)
        elif args.command == "second":
            shards = args.shards.split(",")
            print(write_second_reading(Path(args.dir), shards, args.size, args.seed, args.name))
        elif args.command == "check":
            _, summary = merge(Path(args.dir))
            print(json.dumps(summary, indent=1))
        else:
            rows, summary = merge(Path(args.dir), dict(item.split("=", 1) for item in args.rename))
            out = Path(args.out)
            atomic_write_jsonl(out, rows)
            atomic_write_json(out.with_suffix(".summary.json"), summary)
            print(json.dumps(summary, indent=1))
    except (ValueError, FileNotFoundError) as error:
        print(f"python -m evals.labelling: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
