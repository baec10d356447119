"""Where a streamed request's time goes, on our server's plain path and on ``vllm serve``, in one run.

Two measurements, both on the default model and Vicuna-bench prompts:

* **Front-end stages, in-process** (our server's code, the real tokenizer, no engine): parsing and validating the
  JSON body, rendering the chat template and tokenising, building the whole plan (both prompts, ``SamplingParams``),
  and framing one SSE chunk. Each stage's median over the prompts, in microseconds.
* **On the wire** (both servers side by side, one kept-alive connection, requests one after another, as a chat UI
  sends them), through bare httpx: time to the response headers, to the first SSE event, to the first content
  token, and the gaps between content tokens; then through the ``openai`` client: first token and gaps. Gaps a client sees beyond the engine's step are transport costs (the Nagle / delayed-ACK
  stall this profile found was one: see ``docs/latency.md``).

Writes ``reports/latency_profile.json``.

    python -m bench.latency_profile [--requests 24] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import bench_prompts, machine, percentile, run_load, vllm_serve_command
from bench.serving import ENGINE_FLAGS
from prosocialalign.core.fileio import atomic_write_json
from prosocialalign.core.launcher import ServerProcess, free_port, serve_command
from prosocialalign.core.paths import REPORTS_DIR


def _median_us(seconds: list[float]) -> float:
    return round(statistics.median(seconds) * 1e6, 1)


def frontend_stages(model_dir: Path, name: str, prompts: list[str], repeats: int = 5) -> dict[str, float]:
    """Median microseconds of each stage our API process runs before and while streaming (plain path)."""
    from transformers import AutoTokenizer

    from server.app import StreamChunks, _sse
    from server.generation import ChoiceDelta
    from server.protocol import ChatCompletionRequest
    from server.requests import RequestBuilder
    from server.settings import ServerSettings

    settings = ServerSettings(guidance=False)
    builder = RequestBuilder(settings, AutoTokenizer.from_pretrained(model_dir), name, str(model_dir))
    times: dict[str, list[float]] = {"parse": [], "template_tokenise": [], "plan": [], "sse_chunk": []}
    for prompt in prompts:
        raw = json.dumps(
            {
                "model": name,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 128,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )
        for _ in range(repeats):
            t0 = time.perf_counter()
            body = ChatCompletionRequest.model_validate_json(raw)
            t1 = time.perf_counter()
            builder.chat_prompt_ids(body)
            t2 = time.perf_counter()
            plan = builder.chat(body)
            t3 = time.perf_counter()
            chunks = StreamChunks("chatcmpl-x", "chat.completion.chunk", 0, name, plan, body.stream_options)
            delta = ChoiceDelta(0, plan.jobs[0].request_id, " word", [1234], [], None)
            _sse(chunks.envelope([chunks.choice(delta, {"delta": {"content": delta.text}}, None)]))
            t4 = time.perf_counter()
            times["parse"].append(t1 - t0)
            times["template_tokenise"].append(t2 - t1)
            times["plan"].append(t3 - t2)
            times["sse_chunk"].append(t4 - t3)
    return {
        "parse_and_validate_us": _median_us(times["parse"]),
        "chat_template_and_tokenise_us": _median_us(times["template_tokenise"]),
        "whole_plan_us": _median_us(times["plan"]),
        "sse_chunk_us": _median_us(times["sse_chunk"]),
    }


def wire_timings(base_url: str, name: str, prompts: list[str], max_tokens: int) -> dict[str, float]:
    """Sequential streamed chat requests on one kept-alive connection; medians in milliseconds."""
    headers_ms, first_event_ms, first_token_ms, gaps_ms, total_ms = [], [], [], [], []
    with httpx.Client(base_url=base_url, timeout=600) as client:
        for prompt in prompts:
            body = {
                "model": name,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "ignore_eos": True,
                "stream_options": {"include_usage": True},
            }
            start = time.perf_counter()
            first_event = last_token = None
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                headers_ms.append((time.perf_counter() - start) * 1000)
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    now = time.perf_counter()
                    first_event = first_event or now
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        break
                    choices = json.loads(payload)["choices"]
                    if choices and choices[0]["delta"].get("content"):
                        if last_token is None:
                            first_token_ms.append((now - start) * 1000)
                        else:
                            gaps_ms.append((now - last_token) * 1000)
                        last_token = now
            first_event_ms.append((first_event - start) * 1000)
            total_ms.append((time.perf_counter() - start) * 1000)

    def med(values: list[float]) -> float:
        return round(statistics.median(values), 2)

    return {
        "headers_ms": med(headers_ms),
        "first_event_ms": med(first_event_ms),
        "first_token_ms": med(first_token_ms),
        "first_token_p95_ms": round(percentile(first_token_ms, 95), 2),
        "inter_token_p50_ms": med(gaps_ms),
        "inter_token_max_ms": round(max(gaps_ms), 2),
        "request_ms": med(total_ms),
    }


def openai_client_timings(base_url: str, name: str, prompts: list[str], max_tokens: int) -> dict[str, float]:
    """The same requests through the ``openai`` client (the benchmarks' load generator at concurrency 1, one
    kept-alive connection): what most callers see. The Nagle stall showed here and not through bare httpx, whose
    reads happened to trigger the immediate ACK."""
    load = asyncio.run(run_load(base_url, name, prompts, 1, max_tokens))
    return {
        "openai_first_token_ms": round(statistics.median(load.ttft_ms), 2),
        "openai_first_token_p95_ms": round(percentile(load.ttft_ms, 95), 2),
        "openai_inter_token_p50_ms": round(statistics.median(load.itl_ms), 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=24, help="sequential requests per server and round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (drift hits both servers)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=REPORTS_DIR / "latency_profile.json")
    args = parser.parse_args(argv)

    from prosocialalign.core.models import DEFAULT_MODEL_NAME, prepare_default_model

    model_dir, name = prepare_default_model(), DEFAULT_MODEL_NAME
    prompts = bench_prompts(args.requests)
    stages = frontend_stages(model_dir, name, prompts)
    print(f"front-end stages: {stages}", flush=True)

    logs = Path(tempfile.mkdtemp(prefix="bench-latency-"))
    f = ENGINE_FLAGS
    shared = ("--dtype", f["dtype"], "--max-model-len", str(f["max_model_len"]))
    shared += ("--max-num-seqs", str(f["max_num_seqs"]))
    ours_port, peer_port = free_port(), free_port()
    servers = {
        "ours": ServerProcess(
            serve_command(
                ours_port,
                *("--model", str(model_dir), "--served-model-name", name, "--no-guidance"),
                *shared,
                *("--kv-cache-gib", str(f["kv_cache_gib"])),
            ),
            ours_port,
            logs / "ours.log",
        ),
        "vllm_serve": ServerProcess(
            vllm_serve_command(
                peer_port,
                model_dir,
                name,
                *shared,
                "--enforce-eager",
                *("--kv-cache-memory-bytes", str(int(f["kv_cache_gib"] * 2**30))),
            ),
            peer_port,
            logs / "vllm_serve.log",
        ),
    }
    rounds: dict[str, list[dict]] = {label: [] for label in servers}
    try:
        for server in servers.values():
            server.start()
            wire_timings(server.base_url, name, prompts[:2], 8)  # warm-up
        for round_ in range(args.rounds):
            for label, server in servers.items():
                timing = wire_timings(server.base_url, name, prompts, args.max_tokens)
                timing |= openai_client_timings(server.base_url, name, prompts, args.max_tokens)
                rounds[label].append(timing)
                print(f"round {round_} {label}: {timing}", flush=True)
    finally:
        for server in servers.values():
            server.stop()

    wire = {
        label: {key: round(statistics.mean(r[key] for r in runs), 2) for key in runs[0]}
        for label, runs in rounds.items()
    }
    report = {
        "frontend_stages_us": stages,
        "wire_ms": wire,
        "ours_over_vllm_serve": {
            key: round(wire["ours"][key] / wire["vllm_serve"][key], 3)
            for key in (
                "first_token_ms",
                "openai_first_token_ms",
                "inter_token_p50_ms",
                "openai_inter_token_p50_ms",
                "request_ms",
            )
        },
        "machine": machine(),
        "method": f"{args.requests} Vicuna-bench prompts per round, sequential on one kept-alive httpx "
        f"connection, streamed, greedy, ignore_eos, {args.max_tokens} tokens; servers alternate each round; "
        "wire figures are means over rounds of per-round medians; front-end stages timed in-process "
        "(our RequestBuilder with the real tokenizer, plain path)",
        "command": "python -m bench.latency_profile " + shlex.join(sys.argv[1:] if argv is None else argv),
    }
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
