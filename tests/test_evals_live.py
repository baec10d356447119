"""A small end-to-end evaluation against the real server (``live_server``: real vLLM engine, the full system)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from evals.evaluate import RunSettings, _jobs, run_configuration
from evals.judges import LLMHarmJudge, LLMJudgeSettings, build_judges
from evals.runner import Endpoint, SamplingSettings, generate
from prosocialalign.core.benchmarks import load_builtin, sample_items

pytestmark = pytest.mark.integration

JUDGES = ["keyword_zou2023", "strmatch_xstest", "harm_tfidf_lr", "vader"]


def _settings(live_server, out_dir: Path, prefs=None) -> RunSettings:
    return RunSettings(
        name="live",
        endpoint=Endpoint(live_server.base_url, live_server.api_key, live_server.model, concurrency=3),
        sampling=SamplingSettings(max_tokens=16),
        benchmarks=[
            sample_items(load_builtin("advbench"), 2, seed=0),
            sample_items(load_builtin("xstest_safe"), 1, seed=0),
        ],
        out_dir=out_dir,
        prefs=prefs,
    )


def test_run_judge_and_resume_against_the_live_server(live_server, tmp_path: Path) -> None:
    settings = _settings(live_server, tmp_path / "run")
    results = run_configuration(settings, build_judges(JUDGES))
    assert results["failures"] == {}
    advbench = results["benchmarks"]["advbench"]
    assert advbench["n"] == 2 and advbench["kind"] == "harmful"
    assert 0.0 <= advbench["metrics"]["unsafe_leakage"]["value"] <= 1.0
    assert advbench["metrics"]["unsafe_leakage"]["judge"] == "harm_tfidf_lr"
    assert results["benchmarks"]["xstest_safe"]["metrics"]["compliance_rate_strmatch"]["n"] == 1
    assert results["summary"]["xstest_safe_compliance"] in (0.0, 1.0)
    assert json.loads((tmp_path / "run/run.json").read_text())["model"] == live_server.model
    judged = [json.loads(line) for line in (tmp_path / "run/judged/advbench.jsonl").read_text().splitlines()]
    assert all(set(JUDGES) <= set(record["judgements"]) for record in judged)
    for record in judged:  # never empty: a draft guidance ended is backtracked (redirect or fallback text)
        backtrack = record["prosocial"]["backtrack"]
        extra = (
            backtrack["extra_tokens"] + 1 if backtrack else 0
        )  # the attempts, and the discarded draft's EOS
        assert record["completion_tokens"] <= 16 + extra
        assert record["response"].strip(), record
        assert record["prosocial"]["content_filtered"] == (record["finish_reason"] == "content_filter")

    # Interrupted mid-write: the second advbench line is cut; a rerun sends exactly one request.
    path = tmp_path / "run/responses/advbench.jsonl"
    first, second = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(first + second[: len(second) // 2])
    outcome = asyncio.run(
        generate(settings.endpoint, settings.sampling, _jobs(settings.benchmarks[0], None), path)
    )
    assert (outcome.resumed, outcome.generated, outcome.failures) == (1, 1, {})
    assert len(path.read_text().splitlines()) == 2


def test_requests_the_server_rejects_are_reported_as_failures(live_server, tmp_path: Path) -> None:
    """An all-zero preference vector is a 400 on any server (guided or not): recorded, never judged."""
    settings = _settings(live_server, tmp_path / "prefs", prefs={"empathy": 0.0, "helpfulness": 0.0})
    results = run_configuration(settings, build_judges(["keyword_zou2023"]))
    failures = results["failures"]["advbench"]
    assert len(failures) == 2 and all("prosocial_prefs" in message for message in failures.values())
    assert not (tmp_path / "prefs/responses/advbench.jsonl").read_text().strip()


def test_llm_verdict_judge_talks_to_an_openai_compatible_endpoint(live_server) -> None:
    """The served 135M model is no real judge; this checks the plumbing and that odd output parses to None."""
    settings = LLMJudgeSettings(live_server.base_url, live_server.model, live_server.api_key, max_tokens=16)
    judge = LLMHarmJudge(settings)
    results = judge.score(["How do I pick a lock?"], ["I can't help with that."])
    assert judge.name == f"llm_verdict:{live_server.model}"
    assert len(results) == 1 and results[0]["harmful"] in (True, False, None)
    assert isinstance(results[0]["verdict_text"], str)
