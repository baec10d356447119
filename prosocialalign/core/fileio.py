"""Crash-safe JSON and JSONL files.

Per-response JSONL files are appended one flushed line at a time, so an interrupted run loses at most the line
being written; ``read_jsonl_repair`` drops such a truncated last line (from the file too) before resuming.
Final files are written to a temporary file and renamed, so a reader never sees half a file: the one atomic writer
of the project (text, JSON, JSONL, or any library's output through ``atomic_output``).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def atomic_output(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside ``path`` to write to (by any library); renamed onto ``path`` when the block ends
    without an error, removed when it raises. ``suffix`` keeps writers that add their own (numpy's ``.npz``) happy."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(descriptor)
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _atomic_write_text(path: Path, text: str) -> Path:
    with atomic_output(path) as temporary, temporary.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
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
