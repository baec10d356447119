"""Resuming after an interruption: truncated JSONL repair, skipping finished ids, refusing mixed settings, and
atomic final files. The endpoint here is a closed port, so any request that is sent fails for real."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from evals.runner import Endpoint, Job, SamplingSettings, SettingsMismatch, generate, v1_url
from prosocialalign.core.fileio import JsonlAppender, atomic_write_json, read_jsonl_repair
from prosocialalign.core.launcher import free_port


def _closed_endpoint() -> Endpoint:
    return Endpoint(
        f"http://127.0.0.1:{free_port()}", "key", "model", concurrency=2, timeout_s=5, max_retries=0
    )


def _record(job: Job, endpoint: Endpoint, sampling: SamplingSettings) -> dict:
    return {
        "id": job.id,
        "prompt": job.prompt,
        "prefs": job.prefs,
        "response": f"answer to {job.prompt}",
        "settings": {"model": endpoint.model, "sampling": asdict(sampling)},
    }


def test_truncated_last_line_is_dropped_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "responses.jsonl"
    with JsonlAppender(path) as appender:
        appender.append({"id": "a", "response": "one"})
        appender.append({"id": "b", "response": "two"})
    complete = path.read_bytes()
    path.write_bytes(complete + b'{"id": "c", "respo')
    assert [r["id"] for r in read_jsonl_repair(path)] == ["a", "b"]
    assert path.read_bytes() == complete
    assert read_jsonl_repair(tmp_path / "absent.jsonl") == []


def test_corrupt_line_in_the_middle_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "responses.jsonl"
    path.write_text('{"id": "a"}\nnot json\n{"id": "c"}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl_repair(path)


def test_atomic_json_leaves_no_temporary_file(tmp_path: Path) -> None:
    atomic_write_json(tmp_path / "out.json", {"x": 1})
    atomic_write_json(tmp_path / "out.json", {"x": 2})
    assert json.loads((tmp_path / "out.json").read_text()) == {"x": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


async def test_resume_sends_only_the_missing_requests(tmp_path: Path) -> None:
    endpoint, sampling = _closed_endpoint(), SamplingSettings(max_tokens=16)
    jobs = [Job(f"set-{i}", f"prompt {i}") for i in range(3)]
    path = tmp_path / "responses.jsonl"
    with JsonlAppender(path) as appender:
        for job in jobs[:2]:
            appender.append(_record(job, endpoint, sampling))
    with path.open("a") as handle:
        handle.write(json.dumps(_record(jobs[2], endpoint, sampling))[:25])  # killed mid-write
    outcome = await generate(endpoint, sampling, jobs, path)
    assert outcome.resumed == 2 and outcome.generated == 0
    assert list(outcome.failures) == ["set-2"]  # only the unfinished job reached the (closed) endpoint
    assert [r["id"] for r in outcome.records] == ["set-0", "set-1"]
    assert [r["id"] for r in read_jsonl_repair(path)] == ["set-0", "set-1"]


async def test_resume_refuses_other_settings_or_prefs(tmp_path: Path) -> None:
    endpoint, sampling = _closed_endpoint(), SamplingSettings(max_tokens=16)
    job = Job("set-0", "prompt", {"empathy": 1.0})
    path = tmp_path / "responses.jsonl"
    with JsonlAppender(path) as appender:
        appender.append(_record(job, endpoint, sampling))
    with pytest.raises(SettingsMismatch, match="other settings"):
        await generate(endpoint, SamplingSettings(max_tokens=32), [job], path)
    with pytest.raises(SettingsMismatch, match="prefs"):
        await generate(endpoint, sampling, [Job("set-0", "prompt", {"helpfulness": 1.0})], path)


def test_sampling_validation_and_url() -> None:
    with pytest.raises(ValueError, match="--top-p"):
        SamplingSettings(top_p=0)
    with pytest.raises(ValueError, match="--max-tokens"):
        SamplingSettings(max_tokens=0)
    assert v1_url("http://h:1") == v1_url("http://h:1/v1/") == "http://h:1/v1"
