"""A short run of ``bench/reliability.py``: streaming load with disconnects, then no leaks anywhere.

80 requests from 16 clients, mixed guided and unguided, a seeded 20 % hanging up mid-stream. The memory-growth
target is only checked by the full benchmark: this run lasts about a minute, so its first quarter still includes
the allocator's warm-up and its quarters hold a handful of 1 s samples each; noise of a few percent would make
the assertion flaky rather than informative. The figures are still computed, so a gross leak shows in the output.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from bench.reliability import LoadConfig, run_reliability
from rewardmodel.artifact import save_artifact
from tests.support import dev_arm, start_server

pytestmark = pytest.mark.integration

CONFIG = LoadConfig(requests=80, concurrency=16, min_tokens=8, max_tokens=24, warmup=8, seed=7)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reliability")
    artifact = save_artifact(dev_arm(), tmp / "arm-dev")
    flags = ["--arm-artifact", str(artifact), "--max-num-seqs", "16", "--max-tokens-limit", "64"]
    server = start_server(tmp, [*flags, "--max-model-len", "3072"])  # room for a prompt over 2,048 tokens
    yield server
    server.stop()


def test_load_with_disconnects_leaves_nothing_behind(server):
    figures = run_reliability(server.base_url, server.api_key, server.model, CONFIG, server.rss_mb)
    print(figures)
    assert figures["requests"] == 80 and figures["guided"] > 0 and figures["unguided"] > 0
    assert figures["disconnected"] >= 5, figures
    assert figures["failed"] == 0, figures["failure_examples"]
    assert figures["completed"] + figures["disconnected"] == 80
    assert figures["leaked_engine_requests"] == 0, figures
    assert figures["leaked_arm_slots"] == 0, figures
    assert figures["api_in_flight_after_probe"] == 0, figures
    assert figures["latency_s"]["p50"] is not None and figures["rss_mb_first_quarter"] is not None
    assert server.process.poll() is None


def test_seeded_long_prompt_next_to_running_requests_does_not_kill_the_engine(server):
    """A seeded request whose prompt is longer than vLLM's default step budget (2,048 tokens), sent while another
    request is decoding.

    vLLM's model runner rewinds a seeded request's random generator after a partial (chunked) prefill step, which
    the CPU generator cannot do: the worker raised and took the whole engine down, one request sufficed. The server
    turns chunked prefill off on the CPU (``server/engine.py``), so every prefill completes in one step.
    """
    headers = {"Authorization": f"Bearer {server.api_key}"}
    url = server.base_url + "/v1/completions"
    running = {"model": server.model, "prompt": "1, 2, 3,", "max_tokens": 64, "ignore_eos": True}
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 250  # about 2,500 tokens
    seeded = {"model": server.model, "prompt": long_prompt, "max_tokens": 4, "temperature": 0.8, "seed": 5}
    with ThreadPoolExecutor(2) as pool:
        background = pool.submit(httpx.post, url, json=running, headers=headers, timeout=300)
        time.sleep(1.0)  # the first request is decoding when the long prompt arrives
        reply = httpx.post(url, json=seeded, headers=headers, timeout=300)
        assert background.result().status_code == 200
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["prompt_tokens"] > 2048
    assert httpx.get(server.base_url + "/health", timeout=10).status_code == 200
    assert server.process.poll() is None
