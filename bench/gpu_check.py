"""The GPU build's device check, second half: a short guided-vs-plain benchmark, and the report.

``bench/gpu_check.sh`` is the one command (fresh venv with the gpu extra, the guided-decoding correctness test,
then this module inside that venv). This module starts the server twice on the default model, plain
(``--no-guidance``) and guided (safety mask, every request its own preference vector, response guard off as in
``bench.guided``, so every guided row pays the ARM for every token), streams the same requests through each at
concurrency 16, and writes ``reports/gpu_check.json`` with the test outcome, the tokens/s, which model runner
and adapter the guided server used (from its log) and the versions it ran on.

    python -m bench.gpu_check --junit build/gpu_check/correctness.xml [--out reports/gpu_check.json]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shlex
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from bench.common import bench_prompts, run_load
from bench.guided import COMMON_FLAGS, arm_metric, request_prefs
from prosocialalign.core.fileio import atomic_write_json
from prosocialalign.core.launcher import ServerProcess, free_port, serve_command
from prosocialalign.core.paths import REPORTS_DIR

RUNNER_LINE = re.compile(r"vLLM runs Model Runner (V\d): guided decoding through (\S+)")


def prompts(n: int) -> tuple[list[str], str]:
    """The benchmarks' Vicuna-bench prompts where the data is present, else the guided-decoding test's."""
    try:
        return bench_prompts(n), "vicuna_bench (bench.common.bench_prompts)"
    except OSError:
        from tests.test_guided_decoding import PROMPTS

        return [PROMPTS[i % len(PROMPTS)] for i in range(n)], "tests.test_guided_decoding.PROMPTS"


def correctness(junit: Path, command: str) -> dict:
    """The pytest run's outcome, read from its JUnit XML (absent: the run did not get that far)."""
    if not junit.is_file():
        return {"command": command, "ran": False, "passed": False}
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    failed = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    ran = counts["tests"] - counts["skipped"]
    return {
        "command": command,
        "ran": True,
        **counts,
        "failed": failed,
        "passed": ran > 0 and not counts["failures"] and not counts["errors"],
    }


def device() -> dict:
    import torch
    import vllm

    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
        capture_output=True,
        text=True,
    )
    return {
        "gpu": smi.stdout.strip() or f"nvidia-smi failed: {smi.stderr.strip()}",
        "cuda_available": torch.cuda.is_available(),
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--junit", type=Path, required=True, help="the correctness test's JUnit XML")
    parser.add_argument(
        "--test-command", default="", help="how the correctness test was run (for the report)"
    )
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=REPORTS_DIR / "gpu_check.json")
    args = parser.parse_args(argv)

    batch, source = prompts(2 * args.concurrency)
    logs = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    configs = {
        "plain": (("--no-guidance",), lambda i: {}),
        "guided": (("--no-response-guard",), lambda i: {"prosocial_prefs": request_prefs(i)}),
    }
    results, adapter, arm = {}, None, {}
    for label, (flags, extra) in configs.items():
        port = free_port()
        server = ServerProcess(serve_command(port, *COMMON_FLAGS, *flags), port, logs / f"{label}.log")
        try:
            model = server.start()
            asyncio.run(run_load(server.base_url, model, batch[:2], 2, 8, "x", extra))  # warm-up
            result = asyncio.run(
                run_load(server.base_url, model, batch, args.concurrency, args.max_tokens, "x", extra)
            )
            results[label] = result
            print(f"c={args.concurrency} {label}: {result.summary()}", flush=True)
            if label == "guided":
                steps = arm_metric(server, "prosocial_arm_forward_seconds_count")
                seconds = arm_metric(server, "prosocial_arm_forward_seconds_sum")
                arm = {"arm_steps": int(steps), "mean_arm_step_ms": round(1000 * seconds / max(steps, 1), 2)}
        finally:
            server.stop()
        if label == "guided":
            found = RUNNER_LINE.search(server.log_path.read_text(errors="replace"))
            adapter = {"model_runner": found.group(1), "processor": found.group(2)} if found else None

    plain, guided = results["plain"], results["guided"]
    report = {
        "ran_on_gpu": True,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": device(),
        "adapter": adapter,
        "correctness": correctness(args.junit, args.test_command),
        "benchmark": {
            "concurrency": args.concurrency,
            "requests": len(batch),
            "max_tokens": args.max_tokens,
            "prompts": source,
            "plain": plain.summary(),
            "guided": guided.summary() | arm,
            "guided_over_plain": round(guided.tok_s / plain.tok_s, 3) if plain.tok_s else None,
            "method": "streaming chat requests, greedy, ignore_eos; the default model; server flags "
            + shlex.join(COMMON_FLAGS)
            + "; guided = safety mask + per-request preferences, response guard off; one warm-up, one run each",
        },
        "command": "bash bench/gpu_check.sh",
    }
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}")
    ok = report["correctness"]["passed"] and adapter is not None and arm.get("arm_steps", 0) > 0
    ok = ok and not plain.errors and not guided.errors
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
