"""Concurrent generation against a live OpenAI-compatible endpoint, resumable after an interruption.

Each finished response is appended (and flushed) to a per-benchmark JSONL file as soon as it arrives; a rerun
with the same output folder skips the ids already there, so an interrupted evaluation continues where it
stopped. Failed requests are not written, so a rerun retries them.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prosocialalign.core.fileio import JsonlAppender, read_jsonl_repair


def v1_url(base_url: str) -> str:
    """Accept both ``http://host:port`` and ``http://host:port/v1`` and return the latter."""
    url = base_url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


@dataclass(frozen=True)
class SamplingSettings:
    """Sampling sent with every request; ``seed`` is the per-request OpenAI ``seed`` (None: not sent)."""

    temperature: float = 0.0
    max_tokens: int = 256
    top_p: float = 1.0
    seed: int | None = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if self.max_tokens < 1:
            raise ValueError(f"--max-tokens must be >= 1, got {self.max_tokens}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class Endpoint:
    """Where to send requests."""

    base_url: str
    api_key: str
    model: str
    concurrency: int = 8
    timeout_s: float = 300.0
    max_retries: int = 3

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"--concurrency must be >= 1, got {self.concurrency}")


@dataclass(frozen=True)
class Job:
    """One chat request: a single user turn, optional ``prosocial_prefs``, and fields copied into the record."""

    id: str
    prompt: str
    prefs: dict[str, float] | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class GenerationOutcome:
    """What a generation pass did."""

    records: list[dict]
    generated: int
    resumed: int
    failures: dict[str, str]


class SettingsMismatch(ValueError):
    """A partial output file was produced with other settings; resuming would mix two experiments."""


def make_client(endpoint: Endpoint):
    """The official async OpenAI client for an endpoint."""
    from openai import AsyncOpenAI

    return AsyncOpenAI(
        base_url=v1_url(endpoint.base_url),
        api_key=endpoint.api_key,
        timeout=endpoint.timeout_s,
        max_retries=endpoint.max_retries,
    )


async def served_model_name(base_url: str, api_key: str) -> str:
    """The first model id the endpoint lists (used when ``--model`` is not given)."""
    client = make_client(Endpoint(base_url, api_key, model=""))
    try:
        models = await client.models.list()
    finally:
        await client.close()
    if not models.data:
        raise RuntimeError(f"{base_url} lists no models; pass --model")
    return models.data[0].id


async def _request(client, endpoint: Endpoint, sampling: SamplingSettings, job: Job) -> dict:
    options: dict = {
        "model": endpoint.model,
        "messages": [{"role": "user", "content": job.prompt}],
        "temperature": sampling.temperature,
        "max_tokens": sampling.max_tokens,
        "top_p": sampling.top_p,
    }
    if sampling.seed is not None:
        options["seed"] = sampling.seed
    if job.prefs is not None:
        options["extra_body"] = {"prosocial_prefs": job.prefs}
    started = time.perf_counter()
    completion = await client.chat.completions.create(**options)
    choice = completion.choices[0]
    usage = completion.usage
    return {
        "response": choice.message.content or "",
        "finish_reason": choice.finish_reason,
        "completion_tokens": usage.completion_tokens if usage else None,
        "latency_s": round(time.perf_counter() - started, 4),
        "served_model": completion.model,
        # The server's transparency object (mean ARM rewards, masked tokens, ...); None from other servers.
        "prosocial": (choice.model_extra or {}).get("prosocial"),
    }


def _settings_signature(endpoint: Endpoint, sampling: SamplingSettings) -> dict:
    return {"model": endpoint.model, "sampling": asdict(sampling)}


def _check_resumable(existing: list[dict], signature: dict, path: Path) -> None:
    for record in existing:
        if record.get("settings") != signature:
            raise SettingsMismatch(
                f"{path} holds responses made with other settings ({record.get('settings')} vs {signature}); "
                "use another --out folder or pass --overwrite"
            )


async def generate(
    endpoint: Endpoint,
    sampling: SamplingSettings,
    jobs: list[Job],
    out_path: Path,
    description: str = "",
    client=None,
) -> GenerationOutcome:
    """Send every job not yet in ``out_path``, appending each response as it arrives."""
    from tqdm.auto import tqdm

    existing = read_jsonl_repair(out_path)
    signature = _settings_signature(endpoint, sampling)
    _check_resumable(existing, signature, out_path)
    done = {record["id"]: record for record in existing}
    for job in jobs:
        if job.id in done and done[job.id].get("prefs") != job.prefs:
            raise SettingsMismatch(
                f"{out_path}: {job.id} was generated with prefs {done[job.id].get('prefs')}, not {job.prefs}; "
                "use another --out folder or pass --overwrite"
            )
    pending = [job for job in jobs if job.id not in done]
    owns_client = client is None
    client = client or make_client(endpoint)
    semaphore = asyncio.Semaphore(endpoint.concurrency)
    failures: dict[str, str] = {}
    progress = tqdm(
        total=len(jobs), initial=len(jobs) - len(pending), desc=description or out_path.stem, unit="req"
    )

    async def run_one(job: Job, appender: JsonlAppender) -> None:
        async with semaphore:
            try:
                result = await _request(client, endpoint, sampling, job)
            except Exception as error:  # noqa: BLE001 - any failure is recorded and retried on the next run
                failures[job.id] = f"{type(error).__name__}: {error}"
                progress.update(1)
                return
        record = {"id": job.id, "prompt": job.prompt, "prefs": job.prefs, **job.extra, **result}
        record["settings"] = signature
        appender.append(record)
        done[job.id] = record
        progress.update(1)

    try:
        with JsonlAppender(out_path) as appender:
            await asyncio.gather(*(run_one(job, appender) for job in pending))
    finally:
        progress.close()
        if owns_client:
            await client.close()
    ordered = [done[job.id] for job in jobs if job.id in done]
    return GenerationOutcome(ordered, len(pending) - len(failures), len(jobs) - len(pending), failures)
