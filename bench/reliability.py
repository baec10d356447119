"""Reliability under load with disconnects: streaming chat clients, a share of which hang up mid-stream.

Usage: ``python -m bench.reliability [--requests 1000 --concurrency 64 ...]`` -> ``reports/reliability.json``.

It starts the guided server, warms it up, then sends ``--requests`` streaming chat requests from ``--concurrency``
clients on loopback: mixed guided (each with its own seeded random ``prosocial_prefs``) and unguided
(``prosocial_guidance: false``, the operator's safety mask still on), ``max_tokens`` drawn from 16-48, and a
seeded 20 % of them disconnecting after a random number of streamed tokens. Afterwards it checks that

- every request that did not disconnect completed correctly (HTTP 200, a finish_reason, usage, the ``prosocial``
  object matching the request, ``[DONE]``);
- nothing leaked: one final guided probe request runs (the logits processor learns of finished and aborted
  requests from the engine's next step, and the engine's gauges are refreshed by steps too); once the gauges
  settle, ``vllm:num_requests_running`` + ``vllm:num_requests_waiting``, ``prosocial_arm_cache_slots`` and
  ``prosocial_requests_in_flight`` must all be 0 (see ``leak_check``);
- resident memory (the server's whole process tree) grew by less than 5 % between the first and the last quarter
  of the run (mean of 1 s samples, taken after the warm-up).

The fuzzing figures come from ``build/fuzz.json`` (written by ``tests/test_fuzz.py``); when that file is missing
the fuzzer runs here, against this server, after the load run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from bench.common import bench_prompts, machine, percentile
from prosocialalign.core.fileio import atomic_write_json
from prosocialalign.core.launcher import ServerProcess, free_port, serve_command
from prosocialalign.core.paths import BUILD_DIR, REPORTS_DIR
from rewardmodel.attributes import PROSOCIAL_ATTRIBUTES

DEFAULT_REPORT = REPORTS_DIR / "reliability.json"
DEFAULT_FUZZ_REPORT = BUILD_DIR / "fuzz.json"
API_KEY = "reliability-bench-key"
FINISH_REASONS = {"stop", "length", "content_filter"}
RSS_GROWTH_TARGET = 0.05


@dataclass(frozen=True)
class LoadConfig:
    requests: int = 1000
    concurrency: int = 64
    disconnect_fraction: float = 0.2
    min_tokens: int = 16
    max_tokens: int = 48
    guided_fraction: float = 0.5
    warmup: int = 128  # two rounds of the full concurrency: the batch-size-dependent buffers all exist
    temperature: float = 0.8
    seed: int = 0


@dataclass(frozen=True)
class RequestSpec:
    index: int
    prompt: str
    max_tokens: int
    prefs: dict[str, float] | None  # None: prosocial_guidance=false
    disconnect_after: int | None  # hang up after this many streamed tokens; None: read to the end

    def body(self, model: str, temperature: float) -> dict:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": self.prompt}],
            "max_tokens": self.max_tokens,
            "temperature": temperature,
            "seed": self.index,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.prefs is None:
            body["prosocial_guidance"] = False
        else:
            body["prosocial_prefs"] = self.prefs
        if self.disconnect_after is not None:
            body["ignore_eos"] = True  # so the stream is still running when the client hangs up
        return body


@dataclass
class Outcome:
    index: int
    guided: bool
    disconnected: bool = False
    problem: str | None = None
    latency_s: float | None = None
    ttft_s: float | None = None
    completion_tokens: int = 0
    finish_reason: str | None = None


def plan_requests(config: LoadConfig, prompts: list[str]) -> list[RequestSpec]:
    """Seeded: which requests are guided (and with which preferences), how long, and which hang up where."""
    rng = random.Random(config.seed)
    specs = []
    for index in range(config.requests):
        max_tokens = rng.randint(config.min_tokens, config.max_tokens)
        prefs = None
        if rng.random() < config.guided_fraction:
            chosen = rng.sample(PROSOCIAL_ATTRIBUTES, rng.randint(1, len(PROSOCIAL_ATTRIBUTES)))
            prefs = {name: round(rng.uniform(0.05, 1.0), 3) for name in chosen}
        disconnect = rng.randint(1, max_tokens - 1) if rng.random() < config.disconnect_fraction else None
        specs.append(RequestSpec(index, prompts[index % len(prompts)], max_tokens, prefs, disconnect))
    return specs


def _check_final(spec: RequestSpec, finish: str | None, info: dict | None, usage: dict | None) -> str | None:
    if finish not in FINISH_REASONS:
        return f"finish_reason {finish!r}"
    if usage is None or not 1 <= usage.get("completion_tokens", 0) <= spec.max_tokens:
        return f"usage {usage!r} for max_tokens={spec.max_tokens}"
    if finish == "length" and usage["completion_tokens"] != spec.max_tokens:
        return f"finish_reason length after {usage['completion_tokens']} of {spec.max_tokens} tokens"
    if (
        info is None
        or info.get("guided") is not (spec.prefs is not None)
        or info.get("safety_mask") is not True
    ):
        return f"prosocial info {info!r} does not match the request"
    return None


async def run_one(client: httpx.AsyncClient, spec: RequestSpec, model: str, temperature: float) -> Outcome:
    """Stream one request; hang up at ``spec.disconnect_after`` tokens if set; judge the result."""
    outcome = Outcome(spec.index, spec.prefs is not None)
    start = time.perf_counter()
    tokens, finish, info, usage, done = 0, None, None, None, False
    try:
        async with client.stream("POST", "/v1/chat/completions", json=spec.body(model, temperature)) as resp:
            if resp.status_code != 200:
                outcome.problem = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return outcome
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    done = True
                    break
                try:
                    payload = json.loads(data)
                except ValueError:
                    outcome.problem = f"event is not JSON: {data[:200]!r}"
                    return outcome
                if "error" in payload:
                    outcome.problem = f"error event: {data[:200]}"
                    return outcome
                usage = payload.get("usage") or usage
                for choice in payload["choices"]:
                    if choice["delta"].get("content"):
                        tokens += 1
                        if outcome.ttft_s is None:
                            outcome.ttft_s = time.perf_counter() - start
                    if choice.get("finish_reason"):
                        finish, info = choice["finish_reason"], choice.get("prosocial")
                if spec.disconnect_after is not None and tokens >= spec.disconnect_after and finish is None:
                    outcome.disconnected = True  # leaving the block closes the connection mid-stream
                    return outcome
    except httpx.HTTPError as exc:
        outcome.problem = f"{type(exc).__name__}: {exc}"
        return outcome
    outcome.latency_s = time.perf_counter() - start
    outcome.finish_reason = finish
    outcome.completion_tokens = (usage or {}).get("completion_tokens", 0)
    outcome.problem = "no [DONE]" if not done else _check_final(spec, finish, info, usage)
    return outcome


@dataclass
class RssSamples:
    """Resident memory samples tagged with how many requests had finished when each was taken."""

    samples: list[tuple[int, float]] = field(default_factory=list)

    def mean_between(self, start: float, end: float) -> float | None:
        """Mean of the samples taken while between ``start`` and ``end`` requests had finished."""
        values = [mb for done, mb in self.samples if start <= done < end]
        return statistics.fmean(values) if values else None

    def quarter_means(self, total: int) -> tuple[float | None, float | None]:
        return self.mean_between(0, total / 4), self.mean_between(3 * total / 4, total + 1)

    def decile_means(self, total: int) -> list[float | None]:
        """The trajectory: a plateau after warm-up is allocator behaviour, a steady climb is a leak."""
        edges = [total * i / 10 for i in range(10)] + [total + 1]
        return [_round(self.mean_between(a, b), 1) for a, b in zip(edges, edges[1:], strict=False)]


async def run_load(
    base_url: str,
    api_key: str,
    model: str,
    specs: list[RequestSpec],
    config: LoadConfig,
    rss_mb: Callable[[], float] | None = None,
) -> tuple[list[Outcome], float, RssSamples]:
    """All requests, ``config.concurrency`` at a time; returns the outcomes, the wall time and RSS samples."""
    semaphore = asyncio.Semaphore(config.concurrency)
    finished = [0]
    rss = RssSamples()
    limits = httpx.Limits(max_connections=config.concurrency, max_keepalive_connections=config.concurrency)
    headers = {"Authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, limits=limits, timeout=httpx.Timeout(600, connect=30)
    ) as client:

        async def one(spec: RequestSpec) -> Outcome:
            async with semaphore:
                outcome = await run_one(client, spec, model, config.temperature)
            finished[0] += 1
            return outcome

        async def sample_rss() -> None:
            while True:
                rss.samples.append((finished[0], await asyncio.to_thread(rss_mb)))
                await asyncio.sleep(1.0)

        sampler = asyncio.ensure_future(sample_rss()) if rss_mb is not None else None
        start = time.perf_counter()
        try:
            outcomes = await asyncio.gather(*(one(spec) for spec in specs))
        finally:
            wall = time.perf_counter() - start
            if sampler is not None:
                sampler.cancel()
    return list(outcomes), wall, rss


def scrape(base_url: str, api_key: str) -> str:
    resp = httpx.get(base_url + "/metrics", headers={"Authorization": f"Bearer {api_key}"}, timeout=30)
    resp.raise_for_status()
    return resp.text


def metric_total(text: str, name: str) -> float:
    """Sum of a metric's samples over all label sets (0 when absent)."""
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? ([-+0-9.eEinfNa]+)$", re.M)
    return sum(float(value) for value in pattern.findall(text))


def leak_check(base_url: str, api_key: str, model: str, settle_s: float = 15.0) -> dict:
    """After the load: one guided probe, then the engine's and the processor's gauges once they settle.

    The logits processor hears of finished and aborted requests in the batch update of the engine's next step
    (vLLM runs one, without model work, after requests finish or are aborted); the engine's running/waiting gauges
    are also refreshed by steps. The probe guarantees such steps after the last load request, and the probe's own
    slot is freed by the step after it finished. So once settled, everything must read 0; any slot or request
    still held after ``settle_s`` is a leak.
    """
    probe = httpx.post(
        base_url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {api_key}"},
        json={
            "model": model,
            "messages": [{"role": "user", "content": "Hello!"}],
            "max_tokens": 4,
            "prosocial_prefs": {"empathy": 1},
        },
        timeout=120,
    )
    probe.raise_for_status()
    names = {
        "engine_running": "vllm:num_requests_running",
        "engine_waiting": "vllm:num_requests_waiting",
        "arm_cache_slots": "prosocial_arm_cache_slots",
        "api_in_flight": "prosocial_requests_in_flight",
    }
    deadline = time.monotonic() + settle_s
    while True:
        text = scrape(base_url, api_key)
        gauges = {key: metric_total(text, name) for key, name in names.items()}
        if not any(gauges.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    return {f"{key}_after_probe": value for key, value in gauges.items()} | {
        "leaked_engine_requests": int(gauges["engine_running"] + gauges["engine_waiting"]),
        "leaked_arm_slots": int(gauges["arm_cache_slots"]),
    }


def summarise(
    specs: list[RequestSpec], outcomes: list[Outcome], wall_s: float, rss: RssSamples, tokens_generated: float
) -> dict:
    """The load figures: counts, problems, throughput, latency percentiles and memory growth."""
    completed = [o for o in outcomes if not o.disconnected and o.problem is None]
    failed = [o for o in outcomes if not o.disconnected and o.problem is not None]
    latencies = [o.latency_s for o in completed if o.latency_s is not None]
    ttfts = [o.ttft_s for o in completed if o.ttft_s is not None]
    first, last = rss.quarter_means(len(specs))
    finishes: dict[str, int] = {}
    for o in completed:
        finishes[o.finish_reason] = finishes.get(o.finish_reason, 0) + 1
    return {
        "requests": len(specs),
        "guided": sum(1 for s in specs if s.prefs is not None),
        "unguided": sum(1 for s in specs if s.prefs is None),
        "planned_disconnects": sum(1 for s in specs if s.disconnect_after is not None),
        "disconnected": sum(1 for o in outcomes if o.disconnected),
        "completed": len(completed),
        "failed": len(failed),
        "failure_examples": [f"request {o.index}: {o.problem}" for o in failed[:10]],
        "finish_reasons": finishes,
        "wall_s": round(wall_s, 2),
        "throughput_req_s": round(len(specs) / wall_s, 3),
        "completed_req_s": round(len(completed) / wall_s, 3),
        "completion_tokens_of_completed": sum(o.completion_tokens for o in completed),
        "engine_generated_tokens": int(tokens_generated),
        "engine_tok_s": round(tokens_generated / wall_s, 2),
        "latency_s": {
            "p50": _round(percentile(latencies, 50)),
            "p95": _round(percentile(latencies, 95)),
            "p99": _round(percentile(latencies, 99)),
        },
        "ttft_s": {"p50": _round(percentile(ttfts, 50)), "p95": _round(percentile(ttfts, 95))},
        "rss_mb_first_quarter": _round(first, 1),
        "rss_mb_last_quarter": _round(last, 1),
        "rss_samples": len(rss.samples),
        "rss_mb_by_decile": rss.decile_means(len(specs)),
        "rss_growth": _round((last / first - 1) if first and last else None, 4),
    }


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def run_reliability(
    base_url: str,
    api_key: str,
    model: str,
    config: LoadConfig,
    rss_mb: Callable[[], float] | None = None,
    rss_by_process: Callable[[], dict[str, float]] | None = None,
) -> dict:
    """Warm-up, the load run, then the leak check; returns the summary (see ``summarise`` and ``leak_check``).

    ``rss_by_process``, if given, is read before and after the load run (which process any growth is in).
    """
    prompts = bench_prompts(max(config.requests, config.warmup))
    if config.warmup:
        warm = plan_requests(LoadConfig(requests=config.warmup, seed=config.seed + 1), prompts)
        asyncio.run(run_load(base_url, api_key, model, warm, config))
    specs = plan_requests(config, prompts)
    before = rss_by_process() if rss_by_process is not None else None
    tokens_before = metric_total(scrape(base_url, api_key), "vllm:generation_tokens_total")
    outcomes, wall, rss = asyncio.run(run_load(base_url, api_key, model, specs, config, rss_mb))
    tokens = metric_total(scrape(base_url, api_key), "vllm:generation_tokens_total") - tokens_before
    figures = summarise(specs, outcomes, wall, rss, tokens)
    if rss_by_process is not None:
        figures["rss_mb_by_process"] = {"before_load": before, "after_load": rss_by_process()}
    return figures | leak_check(base_url, api_key, model)


def process_rss_mb(server: ServerProcess) -> dict[str, float]:
    """Resident memory of each process of the server's tree, named by its command line's first words."""
    sizes: dict[str, float] = {}
    for pid in server.pids():
        try:
            name = " ".join(
                Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:4]
            )
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        kb = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
        sizes[f"{pid} {name.strip()}"] = round(kb / 1024, 1)
    return sizes


# ---------------------------------------------------------------------------------------------------- the CLI


def _fuzz_figures(fuzz_report: Path, server: ServerProcess, model: str, max_body_bytes: int) -> dict:
    if fuzz_report.is_file():
        fuzz = json.loads(fuzz_report.read_text())
        return {
            "fuzz_requests": fuzz["requests"],
            "fuzz_5xx": fuzz["five_xx"],
            "fuzz_source": f"{fuzz_report} ({fuzz.get('command', 'tests/test_fuzz.py')})",
        }
    from bench.fuzz import run_fuzz

    result = run_fuzz(server.base_url, API_KEY, model, max_body_bytes)
    return {
        "fuzz_requests": result.requests,
        "fuzz_5xx": result.five_xx,
        "fuzz_problems": result.problem_count,
        "fuzz_source": "bench.fuzz.run_fuzz against this benchmark's server, after the load run",
    }


def build_parser() -> argparse.ArgumentParser:
    defaults = LoadConfig()
    p = argparse.ArgumentParser(prog="python -m bench.reliability", description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=defaults.requests)
    p.add_argument("--concurrency", type=int, default=defaults.concurrency)
    p.add_argument("--disconnect-fraction", type=float, default=defaults.disconnect_fraction)
    p.add_argument("--min-tokens", type=int, default=defaults.min_tokens)
    p.add_argument("--max-tokens", type=int, default=defaults.max_tokens)
    p.add_argument("--guided-fraction", type=float, default=defaults.guided_fraction)
    p.add_argument(
        "--warmup", type=int, default=None, help="requests sent before measuring (default: 2 x --concurrency)"
    )
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument(
        "--arm-artifact", type=Path, default=None, help="ARM artifact (default: the shipped arm-v2)"
    )
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--fuzz-report", type=Path, default=DEFAULT_FUZZ_REPORT)
    p.add_argument("--out", type=Path, default=DEFAULT_REPORT)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 <= args.disconnect_fraction <= 1 or not 0 <= args.guided_fraction <= 1:
        raise SystemExit("--disconnect-fraction and --guided-fraction must be in [0, 1]")
    if not 2 <= args.min_tokens <= args.max_tokens:
        raise SystemExit("--min-tokens must be at least 2 and at most --max-tokens")
    config = LoadConfig(
        args.requests,
        args.concurrency,
        args.disconnect_fraction,
        args.min_tokens,
        args.max_tokens,
        args.guided_fraction,
        2 * args.concurrency if args.warmup is None else args.warmup,
        seed=args.seed,
    )
    flags = [
        "--api-key", API_KEY,
        "--max-num-seqs", str(config.concurrency),
        "--max-tokens-limit", str(max(64, config.max_tokens)),
        "--max-n", "2",
        "--max-body-bytes", str(args.max_body_bytes),
    ]  # fmt: skip
    if args.arm_artifact is not None:
        flags += ["--arm-artifact", str(args.arm_artifact.resolve())]
    port = free_port()
    log_dir = Path(tempfile.mkdtemp(prefix="prosocial-reliability-"))
    server = ServerProcess(
        serve_command(port, *flags),
        port,
        log_dir / "server.log",
        env={"PROSOCIAL_DEFAULT_MAX_TOKENS": "16"},
        api_key=API_KEY,
    )
    print(f"starting the server (log: {server.log_path})", flush=True)
    model = server.start()
    try:
        print(f"load: {config.requests} requests, {config.concurrency} clients", flush=True)
        figures = run_reliability(
            server.base_url, API_KEY, model, config, server.rss_mb, lambda: process_rss_mb(server)
        )
        fuzz = _fuzz_figures(args.fuzz_report, server, model, args.max_body_bytes)
    finally:
        server.stop()
    report = {
        "command": shlex.join([sys.executable, "-m", "bench.reliability", *(argv or sys.argv[1:])]),
        "machine": machine(),
        "config": asdict(config),
        "server_flags": flags,
        "arm_artifact": str(args.arm_artifact or "rewardmodel/artifacts/arm-v2"),
        **figures,
        **fuzz,
    }
    report["targets"] = {
        "fuzz_5xx == 0": report["fuzz_5xx"] == 0,
        "failed == 0": report["failed"] == 0,
        "leaked_engine_requests == 0": report["leaked_engine_requests"] == 0,
        "leaked_arm_slots == 0": report["leaked_arm_slots"] == 0,
        "rss_growth < 0.05": report["rss_growth"] is not None and report["rss_growth"] < RSS_GROWTH_TARGET,
    }
    report["passed"] = all(report["targets"].values())
    atomic_write_json(args.out, report)
    print(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
