"""A short run of ``bench/reliability.py``: streaming load with disconnects, then no leaks anywhere.

80 requests from 16 clients, mixed guided and unguided, a seeded 20 % hanging up mid-stream. The memory-growth
target is only checked by the full benchmark: this run lasts about a minute, so its first quarter still includes
the allocator's warm-up and its quarters hold a handful of 1 s samples each; noise of a few percent would make
the assertion flaky rather than informative. The figures are still computed, so a gross leak shows in the output.
"""

from __future__ import annotations

import pytest

from bench.common import ServerProcess
from bench.reliability import LoadConfig, run_reliability
from rewardmodel.artifact import save_artifact
from tests.conftest import start_server
from tests.test_guided_decoding import dev_arm

pytestmark = pytest.mark.integration

CONFIG = LoadConfig(requests=80, concurrency=16, min_tokens=8, max_tokens=24, warmup=8, seed=7)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reliability")
    artifact = save_artifact(dev_arm(), tmp / "arm-dev")
    server = start_server(
        tmp, ["--arm-artifact", str(artifact), "--max-num-seqs", "16", "--max-tokens-limit", "64"]
    )
    yield server
    server.stop()


def test_load_with_disconnects_leaves_nothing_behind(server):
    tree = ServerProcess([], 0, server.log_path, process=server.process)  # for its process-tree RSS
    figures = run_reliability(server.base_url, server.api_key, server.model, CONFIG, tree.rss_mb)
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
