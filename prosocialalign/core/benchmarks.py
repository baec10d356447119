"""Benchmark prompt sets: the built-in safety benchmarks from the shared data folder and user files.

Every built-in loader checks the published prompt count, so a truncated or swapped file fails loudly instead of
silently shrinking a benchmark. A user file in one of the same formats loads through ``load_benchmark_file``.
"""

from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from prosocialalign.core.paths import default_data_dir

HARMFUL = "harmful"
"""Prompts a safe model must not comply with: measured as unsafe leakage and refusal rate."""
SAFE = "safe"
"""Prompts a model should answer (XSTest safe): measured as compliance (over-refusal)."""

SET_KINDS = ("harmful", "benign", "distress")
"""What a reader expects of a set's answers (the outcome rubric, ``docs/judging.md``): a safe reply to a harmful
request, a useful answer to a benign one, a kind and useful reply to an emotionally charged message."""

SPLITS = ("dev", "test", "all")
"""``dev``: the prompts every quality figure is developed and labelled on; ``test``: held out from that work;
``all``: every prompt (the published benchmark sizes)."""

FORMATS = ("advbench_csv", "xstest_csv", "prompt_csv", "json_list", "json_nested", "jsonl", "text")
_PROMPT_KEYS = ("prompt", "goal", "question", "instruction", "text")


class BenchmarkError(ValueError):
    """A benchmark file is missing, malformed or has the wrong number of prompts."""


@dataclass(frozen=True)
class PromptItem:
    """One prompt of a benchmark, with an id that is stable across runs (used for resuming)."""

    id: str
    prompt: str
    benchmark: str
    category: str | None = None


@dataclass(frozen=True)
class Benchmark:
    """A named prompt set and how its responses are scored."""

    name: str
    kind: str
    items: tuple[PromptItem, ...]
    source: str

    def __len__(self) -> int:
        return len(self.items)


@dataclass(frozen=True)
class BuiltinSpec:
    """Where a built-in benchmark lives under the data folder and how many prompts it must have."""

    relative_path: str
    fmt: str
    kind: str
    expected_count: int
    xstest_label: str | None = None
    citation: str = ""
    set_kind: str = ""
    trained_on: bool = False
    """Some of its prompts are in a split that a model of the project trains on (the ARM's training split)."""

    @property
    def outcome_kind(self) -> str:
        return self.set_kind or ("harmful" if self.kind == HARMFUL else "benign")


BUILTIN_BENCHMARKS: dict[str, BuiltinSpec] = {
    "advbench": BuiltinSpec(
        "advbench/harmful_behaviors.csv", "advbench_csv", HARMFUL, 520, citation="Zou et al. 2023"
    ),
    "dangerousqa": BuiltinSpec(
        "red_instruct/harmful_questions/dangerousqa.json",
        "json_list",
        HARMFUL,
        200,
        citation="Bhardwaj & Poria 2023",
    ),
    "harmfulqa": BuiltinSpec(
        "red_instruct/harmful_questions/harmfulqa.json",
        "json_nested",
        HARMFUL,
        1960,
        citation="Bhardwaj & Poria 2023",
    ),
    "catqa": BuiltinSpec(
        "red_instruct/harmful_questions/catqa_english.json",
        "json_nested",
        HARMFUL,
        550,
        citation="Bhardwaj, Anh & Poria 2024",
    ),
    "xstest_unsafe": BuiltinSpec(
        "xstest/xstest_prompts.csv",
        "xstest_csv",
        HARMFUL,
        200,
        "unsafe",
        citation="Röttger et al. 2024",
        trained_on=True,
    ),
    "xstest_safe": BuiltinSpec(
        "xstest/xstest_prompts.csv",
        "xstest_csv",
        SAFE,
        250,
        "safe",
        citation="Röttger et al. 2024",
        trained_on=True,
    ),
    "everyday": BuiltinSpec(
        "mt_bench/question.jsonl+vicuna_bench/question.jsonl",
        "everyday",
        SAFE,
        160,
        citation="Zheng et al. 2023 (MT-bench, Vicuna-bench first turns)",
    ),
    "distress": BuiltinSpec(
        "esconv+empathy_mental_health/emotional-reactions-reddit.csv",
        "distress",
        SAFE,
        3476,
        citation="Liu et al. 2021 (ESConv situations); Sharma et al. 2020 (EPITOME seeker posts)",
        set_kind="distress",
    ),
}
"""The five unsafe-leakage sets, the over-refusal set of issue 6, everyday questions and emotionally charged
messages (the outcome rubric's benign and distress sets)."""

DEFAULT_BENCHMARKS = ("advbench", "dangerousqa", "harmfulqa", "catqa", "xstest_unsafe", "xstest_safe")
"""What ``prosocial eval`` runs without ``--benchmarks``: the six published safety sets."""


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The shared data folder: the argument, else ``$PROSOCIAL_DATA_DIR``, else ``<repo>/../shared/data``."""
    if data_dir is not None:
        path = Path(data_dir)
    else:
        path = default_data_dir()
    if not path.is_dir():
        raise BenchmarkError(f"data directory {path} does not exist (set --data-dir or PROSOCIAL_DATA_DIR)")
    return path


def _text_of(entry: object, where: str) -> str:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict):
        for key in _PROMPT_KEYS:
            if isinstance(entry.get(key), str):
                return entry[key]
        turns = entry.get("turns")
        if isinstance(turns, list) and turns and isinstance(turns[0], str):
            return turns[0]
    raise BenchmarkError(f"{where}: cannot find a prompt in entry {str(entry)[:80]!r}")


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _rows_advbench(path: Path) -> list[tuple[str, str | None, str | None]]:
    rows = _read_csv(path)
    if rows and "goal" not in rows[0]:
        raise BenchmarkError(f"{path}: advbench_csv needs a 'goal' column")
    return [(row["goal"], None, None) for row in rows]


def _rows_prompt_csv(path: Path) -> list[tuple[str, str | None, str | None]]:
    rows = _read_csv(path)
    if rows and "prompt" not in rows[0]:
        raise BenchmarkError(f"{path}: prompt_csv needs a 'prompt' column")
    return [(row["prompt"], row.get("category") or row.get("type"), row.get("id")) for row in rows]


def _rows_xstest(path: Path, label: str | None) -> list[tuple[str, str | None, str | None]]:
    rows = _read_csv(path)
    if rows and not {"prompt", "label"} <= set(rows[0]):
        raise BenchmarkError(f"{path}: xstest_csv needs 'prompt' and 'label' columns")
    return [
        (row["prompt"], row.get("type"), row.get("id"))
        for row in rows
        if label is None or row["label"] == label
    ]


def _rows_json_list(path: Path) -> list[tuple[str, str | None, str | None]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise BenchmarkError(f"{path}: json_list needs a JSON list at the top level")
    return [(_text_of(entry, str(path)), _category_of(entry), None) for entry in data]


def _category_of(entry: object) -> str | None:
    if isinstance(entry, dict) and isinstance(entry.get("category"), str):
        return entry["category"]
    return None


def _rows_json_nested(path: Path) -> list[tuple[str, str | None, str | None]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise BenchmarkError(f"{path}: json_nested needs a JSON object {{category: ...}} at the top level")
    rows: list[tuple[str, str | None, str | None]] = []

    def walk(node: object, trail: list[str]) -> None:
        if isinstance(node, dict):
            for key, child in node.items():
                walk(child, trail + [str(key)])
        elif isinstance(node, list):
            for entry in node:
                rows.append((_text_of(entry, str(path)), "/".join(trail) or None, None))
        else:
            raise BenchmarkError(f"{path}: unexpected value under {'/'.join(trail)!r}")

    walk(data, [])
    return rows


def _rows_jsonl(path: Path) -> list[tuple[str, str | None, str | None]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise BenchmarkError(f"{path}:{number}: not JSON ({error})") from error
            rows.append((_text_of(entry, f"{path}:{number}"), _category_of(entry), None))
    return rows


def _rows_text(path: Path) -> list[tuple[str, str | None, str | None]]:
    return [(line, None, None) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _rows_everyday(data_dir: Path) -> list[tuple[str, str | None, str | None]]:
    """First turns of MT-bench (80) and Vicuna-bench (80): everyday requests a helpful model answers."""
    rows = []
    for source in ("mt_bench", "vicuna_bench"):
        for number, (text, category, _) in enumerate(_rows_jsonl(data_dir / source / "question.jsonl")):
            rows.append((text, f"{source}/{category}", f"{source}-{number:03d}"))
    return rows


def _rows_distress(data_dir: Path) -> list[tuple[str, str | None, str | None]]:
    """Emotionally charged first-person messages: ESConv seekers' situations (validation, test and failed
    conversations) and EPITOME's Reddit seeker posts, deduplicated, in file order."""
    texts: list[tuple[str, str]] = []
    for name in ("valid.json", "test.json"):
        for line in (data_dir / "esconv" / "hf_split_copy" / name).read_text(encoding="utf-8").splitlines():
            if line.strip():
                texts.append((json.loads(line)["situation"], "esconv"))
    for entry in json.loads((data_dir / "esconv" / "FailedESConv.json").read_text(encoding="utf-8")):
        texts.append((entry["situation"], "esconv"))
    for row in _read_csv(data_dir / "empathy_mental_health" / "emotional-reactions-reddit.csv"):
        texts.append((row["seeker_post"], "epitome"))
    seen: set[str] = set()
    rows = []
    for text, source in texts:
        text = " ".join(text.split())
        if 12 <= len(text) <= 600 and text.casefold() not in seen:
            seen.add(text.casefold())
            rows.append((text, source, None))
    return rows


def detect_format(path: Path) -> str:
    """Guess the format of a benchmark file from its extension and header or top-level JSON type."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            header = next(csv.reader(handle), [])
        if "goal" in header:
            return "advbench_csv"
        if "prompt" in header and "label" in header:
            return "xstest_csv"
        if "prompt" in header:
            return "prompt_csv"
        raise BenchmarkError(f"{path}: CSV needs a 'goal' or 'prompt' column (found {header})")
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        return "json_list" if isinstance(data, list) else "json_nested"
    if suffix == ".txt":
        return "text"
    raise BenchmarkError(
        f"{path}: cannot detect the format from {suffix!r}; pass --format (one of {FORMATS})"
    )


def _read_rows(path: Path, fmt: str, xstest_label: str | None) -> list[tuple[str, str | None, str | None]]:
    if not path.is_file():
        raise BenchmarkError(f"benchmark file {path} does not exist")
    readers = {
        "advbench_csv": _rows_advbench,
        "prompt_csv": _rows_prompt_csv,
        "json_list": _rows_json_list,
        "json_nested": _rows_json_nested,
        "jsonl": _rows_jsonl,
        "text": _rows_text,
    }
    if fmt == "xstest_csv":
        return _rows_xstest(path, xstest_label)
    if fmt not in readers:
        raise BenchmarkError(f"unknown benchmark format {fmt!r}; known: {', '.join(FORMATS)}")
    return readers[fmt](path)


def _to_benchmark(
    name: str, kind: str, path: Path, rows: list[tuple[str, str | None, str | None]]
) -> Benchmark:
    items = []
    seen: set[str] = set()
    for index, (text, category, native_id) in enumerate(rows):
        item_id = f"{name}-{native_id}" if native_id else f"{name}-{index:05d}"
        if item_id in seen:
            raise BenchmarkError(f"{path}: duplicate prompt id {item_id!r}")
        seen.add(item_id)
        items.append(PromptItem(item_id, text.strip(), name, category))
    return Benchmark(name, kind, tuple(items), str(path))


def load_builtin(name: str, data_dir: str | os.PathLike[str] | None = None) -> Benchmark:
    """Load one built-in benchmark and check its prompt count."""
    if name not in BUILTIN_BENCHMARKS:
        raise BenchmarkError(f"unknown benchmark {name!r}; known: {', '.join(BUILTIN_BENCHMARKS)}")
    spec = BUILTIN_BENCHMARKS[name]
    root = resolve_data_dir(data_dir)
    path = root / spec.relative_path
    if spec.fmt == "everyday":
        rows, path = _rows_everyday(root), root
    elif spec.fmt == "distress":
        rows, path = _rows_distress(root), root
    else:
        rows = _read_rows(path, spec.fmt, spec.xstest_label)
    if len(rows) != spec.expected_count:
        raise BenchmarkError(f"{name}: expected {spec.expected_count} prompts in {path}, found {len(rows)}")
    return _to_benchmark(name, spec.kind, path, rows)


def load_benchmark_file(
    path: str | os.PathLike[str], fmt: str | None = None, kind: str = HARMFUL, name: str | None = None
) -> list[Benchmark]:
    """Load a user's benchmark file; an XSTest-format file with both labels gives a safe and an unsafe set."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"benchmark file {path} does not exist")
    if kind not in (HARMFUL, SAFE):
        raise BenchmarkError(f"benchmark kind must be {HARMFUL!r} or {SAFE!r}, not {kind!r}")
    fmt = fmt or detect_format(path)
    name = name or path.stem.replace(" ", "_")
    if fmt == "xstest_csv":
        labels = {row["label"] for row in _read_csv(path) if "label" in row}
        benchmarks = []
        for label, label_kind in (("unsafe", HARMFUL), ("safe", SAFE)):
            if label in labels:
                rows = _read_rows(path, fmt, label)
                benchmarks.append(_to_benchmark(f"{name}_{label}", label_kind, path, rows))
        if not benchmarks:
            raise BenchmarkError(f"{path}: no rows labelled 'safe' or 'unsafe'")
        return benchmarks
    rows = _read_rows(path, fmt, None)
    if not rows:
        raise BenchmarkError(f"{path}: no prompts found")
    return [_to_benchmark(name, kind, path, rows)]


def sample_items(benchmark: Benchmark, size: int | None, seed: int) -> Benchmark:
    """A fixed-seed sample of ``size`` prompts (all when ``size`` is None or too big), in file order."""
    if size is None or size >= len(benchmark.items):
        return benchmark
    if size <= 0:
        raise BenchmarkError(f"sample size must be positive, got {size}")
    rng = random.Random(f"{benchmark.name}:{seed}")
    chosen = sorted(rng.sample(range(len(benchmark.items)), size))
    return Benchmark(
        benchmark.name, benchmark.kind, tuple(benchmark.items[i] for i in chosen), benchmark.source
    )
