"""Crash-safe JSON and JSONL files.

Per-response JSONL files are appended one flushed line at a time, so an interrupted run loses at most the line
being written; ``read_jsonl_repair`` drops such a truncated last line (from the file too) before resuming.
Final JSON files are written to a temporary file and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def read_jsonl_repair(path: Path) -> list[dict]:
    """Every complete record of a JSONL file; a truncated or unparsable last line is cut off the file.

    A bad line that is *not* the last one means the file is corrupt for another reason: that raises.
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    records: list[dict] = []
    good_end = 0
    lines = data.split(b"\n")
    for index, raw in enumerate(lines):
        is_last = index == len(lines) - 1
        if not raw.strip():
            if not is_last:
                good_end += len(raw) + 1
            continue
        complete = not is_last  # the last chunk has no trailing newline: it was cut mid-write
        try:
            record = json.loads(raw) if complete else None
        except json.JSONDecodeError:
            record = None
        if record is None:
            if complete and index < len(lines) - 2:
                raise ValueError(f"{path}: line {index + 1} is not valid JSON and is not the last line")
            break
        records.append(record)
        good_end += len(raw) + 1
    if good_end != len(data):
        with path.open("r+b") as handle:
            handle.truncate(good_end)
    return records


class JsonlAppender:
    """Appends one JSON record per line and flushes it to disk immediately."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._handle = path.open("a", encoding="utf-8")

    def append(self, record: dict) -> None:
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _atomic_write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: Path, payload: Any) -> Path:
    """Write JSON through a temporary file and a rename."""
    return _atomic_write_text(path, json.dumps(payload, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def atomic_write_jsonl(path: Path, records: list[dict]) -> Path:
    """Write a whole JSONL file through a temporary file and a rename."""
    return _atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def atomic_write_text(path: Path, text: str) -> Path:
    """Write a text file (Markdown report) through a temporary file and a rename."""
    return _atomic_write_text(path, text)
