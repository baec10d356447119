"""Fuzzing: schemathesis cases from the server's own OpenAPI schema plus hand-written edge cases, no 5xx allowed.

The target runs with guidance on (a development ARM of the trained one's shape), so the guided code paths are
fuzzed too, and with small operator limits so that the generated requests that pass validation stay cheap.
The tally goes to ``build/fuzz.json``, which ``bench/reliability.py`` copies into ``reports/reliability.json``.
"""

from __future__ import annotations

import json
import shlex
import sys
from importlib.metadata import version

import httpx
import openai
import pytest

from bench.fuzz import check_response, run_fuzz
from prosocialalign.core.fileio import atomic_write_json
from prosocialalign.core.paths import BUILD_DIR
from rewardmodel.artifact import save_artifact
from server.app import _sse
from tests.support import dev_arm, start_server

FUZZ_REPORT = BUILD_DIR / "fuzz.json"
MAX_BODY_BYTES = 65536
EXAMPLES_PER_MODE = 520  # per operation and generation mode (positive, negative): > 2,000 generated in all
OPERATIONS = {
    "GET /health",
    "GET /metrics",
    "GET /v1/models",
    "POST /v1/chat/completions",
    "POST /v1/completions",
}
SERVER_FLAGS = [
    "--max-tokens-limit", "16",  # = the completions default, so generated completions without max_tokens run
    "--max-n", "2",
    "--max-body-bytes", str(MAX_BODY_BYTES),
    "--max-model-len", "512",
    "--max-num-seqs", "16",
    "--kv-cache-gib", "0.1",
]  # fmt: skip
SERVER_ENV = {"PROSOCIAL_MAX_MESSAGES": "16", "PROSOCIAL_DEFAULT_MAX_TOKENS": "4"}


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    artifact = save_artifact(dev_arm(), tmp / "arm-dev")
    server = start_server(tmp, ["--arm-artifact", str(artifact), *SERVER_FLAGS], extra_env=SERVER_ENV)
    yield server
    server.stop()


def test_sse_events_survive_every_line_splitter():
    """JSON leaves U+0085, U+2028 and U+2029 raw, and str.splitlines / httpx's iter_lines split on them."""
    event = _sse({"choices": [{"text": "a\x85b\u2028c\u2029d\né"}]})
    assert (
        len(event.splitlines()) == 1 and json.loads(event)["choices"][0]["text"] == "a\x85b\u2028c\u2029d\né"
    )
    stream = f"data: {event}\r\n\r\ndata: [DONE]\r\n\r\n".encode()
    assert check_response(200, "text/event-stream", stream) is None
    raw = json.dumps({"choices": [{"text": "a\u2028b"}]}, ensure_ascii=False)
    assert "line break" in check_response(
        200, "text/event-stream", f"data: {raw}\n\ndata: [DONE]\n\n".encode()
    )


@pytest.mark.integration
def test_fuzzing_finds_no_server_errors(fuzz_server):
    result = run_fuzz(
        fuzz_server.base_url,
        fuzz_server.api_key,
        fuzz_server.model,
        MAX_BODY_BYTES,
        examples_per_mode=EXAMPLES_PER_MODE,
    )
    atomic_write_json(
        FUZZ_REPORT,
        {
            "command": shlex.join([sys.executable, "-m", "pytest", "tests/test_fuzz.py"]),
            "server_flags": SERVER_FLAGS + ["--arm-artifact", "<dev ARM>"],
            "server_env": SERVER_ENV,
            "schemathesis": version("schemathesis"),
            **result.to_dict(),
        },
    )
    assert set(result.generated_statuses) == OPERATIONS
    assert result.generated >= 2000
    # The generated requests reached the engine, guided, for both generation endpoints.
    for operation in ("POST /v1/chat/completions", "POST /v1/completions"):
        assert result.generated_statuses[operation].get("200", 0) >= 10, result.generated_statuses
    assert result.five_xx == 0, "\n".join(result.problems)
    assert result.problem_count == 0, "\n".join(result.problems)
    assert fuzz_server.process.poll() is None


@pytest.mark.integration
def test_server_still_serves_after_fuzzing(fuzz_server):
    client = openai.OpenAI(base_url=fuzz_server.base_url + "/v1", api_key=fuzz_server.api_key, max_retries=0)
    reply = client.chat.completions.create(
        model=fuzz_server.model,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=4,
        extra_body={"prosocial_prefs": {"empathy": 1}},
    )
    assert reply.choices[0].finish_reason in ("stop", "length", "content_filter")
    assert reply.choices[0].model_extra["prosocial"]["guided"] is True
    assert httpx.get(fuzz_server.base_url + "/health", timeout=10).status_code == 200
    # Nothing reached the catch-all handler or any other unexpected-exception path.
    assert "Traceback" not in fuzz_server.log()
