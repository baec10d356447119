"""Fuzz a running server: schemathesis cases generated from its own ``/openapi.json``, plus hand-written edge cases.

The contract checked for every response: no 5xx; every 4xx is an OpenAI-style error body; every 2xx is either a
JSON document or an SSE stream that ends with ``[DONE]`` and carries no server error. Hand-written cases also
name the statuses they expect (NaN, infinities, huge numbers, wrong types, unknown keys, deep nesting, oversized
and chunked bodies), because schemathesis only produces JSON-encodable, schema-shaped data.

Used by ``tests/test_fuzz.py`` (which writes ``build/fuzz.json``) and by ``bench/reliability.py`` when that file
is missing. Needs the ``dev`` extra (schemathesis, hypothesis).
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx

from prosocialalign.core.paths import REPO_ROOT

MAX_RECORDED_PROBLEMS = 25
MAX_STREAM_EVENTS = 100_000
SSE_LINE_BREAK = re.compile(r"\r\n|\r|\n")
ERROR_FIELDS = {"message", "type", "param", "code"}
INTERNALS = ("Traceback", '.py", line', "site-packages", str(REPO_ROOT))  # stack traces and file paths


@dataclass
class FuzzResult:
    """Counts of what was sent and what came back; ``problems`` describes every contract violation."""

    generated: int = 0
    handwritten: int = 0
    five_xx: int = 0
    by_operation: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    generated_statuses: dict[str, Counter] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    problem_count: int = 0
    seconds: float = 0.0

    @property
    def requests(self) -> int:
        return self.generated + self.handwritten

    def record(self, label: str, status: int, problem: str | None) -> None:
        self.by_operation[label] += 1
        self.statuses[str(status)] += 1
        if not label.startswith("edge:"):
            self.generated_statuses.setdefault(label, Counter())[str(status)] += 1
        if status >= 500:
            self.five_xx += 1
        if problem is not None:
            self.problem_count += 1
            if len(self.problems) < MAX_RECORDED_PROBLEMS:
                self.problems.append(f"{label}: {problem}")

    def to_dict(self) -> dict:
        return {
            "requests": self.requests,
            "generated_requests": self.generated,
            "handwritten_requests": self.handwritten,
            "five_xx": self.five_xx,
            "problems": self.problem_count,
            "problem_examples": self.problems,
            "by_operation": dict(sorted(self.by_operation.items())),
            "statuses": dict(sorted(self.statuses.items())),
            "generated_statuses_by_operation": {
                label: dict(sorted(counts.items()))
                for label, counts in sorted(self.generated_statuses.items())
            },
            "seconds": round(self.seconds, 1),
        }


def check_response(status: int, content_type: str, body: bytes) -> str | None:
    """Why this response breaks the contract, or None."""
    if status >= 500:
        return f"HTTP {status}: {body[:300]!r}"
    text = body.decode("utf-8", errors="replace")
    if 400 <= status < 500:
        try:
            error = json.loads(text)["error"]
        except (ValueError, KeyError, TypeError):
            return f"HTTP {status} without an OpenAI error body: {text[:200]!r}"
        if not isinstance(error, dict) or set(error) != ERROR_FIELDS or not error["message"]:
            return f"HTTP {status} with a malformed error body: {text[:200]!r}"
        if any(sign in text for sign in INTERNALS):
            return f"HTTP {status} error body leaks internals: {text[:200]!r}"
        return None
    if content_type.startswith("text/event-stream"):
        lines = SSE_LINE_BREAK.split(text)  # the SSE spec's line breaks only
        events = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            return f"stream did not end with [DONE]: {text[-200:]!r}"
        for event in events[:-1]:
            if len(event.splitlines()) != 1:  # str.splitlines / httpx's iter_lines would break this event up
                return f"stream event with a Unicode line break: {event[:200]!r}"
            try:
                payload = json.loads(event)
            except ValueError:
                return f"stream event is not JSON: {event[:200]!r}"
            if "error" in payload and payload["error"].get("type") == "server_error":
                return f"stream carried a server error: {event[:200]}"
        return None
    if content_type.startswith("application/json"):
        try:
            json.loads(text)
        except ValueError:
            return f"HTTP {status} with invalid JSON: {text[:200]!r}"
    return None


# ------------------------------------------------------------------------------------------------ generated


def fuzz_generated(
    base_url: str,
    api_key: str,
    model: str,
    result: FuzzResult,
    examples_per_mode: int = 500,
    seed: int = 0,
) -> None:
    """schemathesis positive and negative cases for every operation of the server's schema."""
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(base_url + "/openapi.json", timeout=30)
    # schemathesis stops reading an event stream after 20 events by default; ours are finite and must be read
    # to the end to check they finish with [DONE] (n x prompts x max_tokens events at most).
    schema.config.max_stream_events = MAX_STREAM_EVENTS
    target = _Target(base_url, {"Authorization": f"Bearer {api_key}"}, model)
    for operation_result in schema.get_all_operations():
        operation = operation_result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz_operation(operation, mode, target, result, examples_per_mode, seed)


@dataclass(frozen=True)
class _Target:
    base_url: str
    auth: dict[str, str]
    model: str
    timeout_s: float = 120.0


def _fuzz_operation(operation, mode, target: _Target, result: FuzzResult, examples: int, seed: int) -> None:
    """Up to ``examples`` cases of one operation in one generation mode.

    Every other positive case carries the served model's name (otherwise nearly every generated request would
    stop at the 404 for an unknown model, and the engine and guidance paths would never be fuzzed); every tenth
    case goes without the API key.
    """
    import hypothesis
    from hypothesis import HealthCheck, Phase, given, settings

    label = f"{operation.method.upper()} {operation.path}"
    try:
        strategy = operation.as_strategy(generation_mode=mode)
    except Exception as exc:  # e.g. no negative data exists for an operation without inputs
        result.problems.append(f"{label} ({mode.value}): no strategy: {type(exc).__name__}")
        return
    positive = mode.is_positive

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        verbosity=hypothesis.Verbosity.quiet,
    )
    @hypothesis.seed(seed)
    @given(case=strategy)
    def send(case) -> None:
        result.generated += 1
        if positive and result.generated % 2 == 0 and isinstance(case.body, dict):
            case.body["model"] = target.model
        headers = {} if result.generated % 10 == 0 else target.auth
        try:
            response = case.call(base_url=target.base_url, headers=headers, timeout=target.timeout_s)
        except Exception as exc:  # the server closed the connection or never answered
            result.record(label, 599, f"transport error {type(exc).__name__}: {exc}")
            return
        content_type = ",".join(
            v for k, vs in response.headers.items() if k.lower() == "content-type" for v in vs
        )
        problem = check_response(response.status_code, content_type, response.content)
        if response.stream_cut_short:
            problem = "the event stream did not end within the request timeout"
        if problem is not None:
            problem += f"\n  reproduce: {case.as_curl_command()}"
        result.record(label, response.status_code, problem)

    try:
        send()
    except hypothesis.errors.Unsatisfiable:
        pass  # fewer distinct inputs exist than examples were asked for (e.g. GET without parameters)


# ------------------------------------------------------------------------------------------------ hand-written


@dataclass(frozen=True)
class EdgeCase:
    name: str
    path: str
    content: bytes | None  # None: ``chunks`` is sent with chunked transfer encoding
    expect: frozenset[int]
    headers: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"),)
    chunks: tuple[bytes, ...] = ()
    method: str = "POST"
    auth: bool = True


def _chat(model: str, **fields: object) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2} | fields


def _raw(body: str) -> bytes:
    return body.encode()


def edge_cases(model: str, max_body_bytes: int) -> list[EdgeCase]:
    """Bodies schemathesis cannot produce: non-standard JSON numbers, huge literals, nesting, size limits."""
    ok, bad = frozenset({200}), frozenset({400})
    chat, completions = "/v1/chat/completions", "/v1/completions"
    start = f'{{"model": {json.dumps(model)}, "messages": [{{"role": "user", "content": "hi"}}]'
    head = start + ', "max_tokens": 2'
    cases: list[EdgeCase] = []

    def raw_chat(name: str, tail: str, expect: frozenset[int] = bad) -> None:
        cases.append(EdgeCase(name, chat, _raw(head + tail + "}"), expect))

    def json_chat(name: str, expect: frozenset[int] = bad, **fields: object) -> None:
        cases.append(EdgeCase(name, chat, json.dumps(_chat(model) | fields).encode(), expect))

    # prosocial_prefs: non-finite, negative, huge, tiny, wrong types, unknown keys, nesting.
    for literal in ("NaN", "Infinity", "-Infinity", "-1", "-0.0", "1.0000001", "1e308", "1e309", "-1e309"):
        raw_chat(f"prefs empathy={literal}", f', "prosocial_prefs": {{"empathy": {literal}}}')
    raw_chat("prefs 400-digit integer", ', "prosocial_prefs": {"empathy": ' + "9" * 400 + "}")
    raw_chat("prefs 5000-digit integer", ', "prosocial_prefs": {"empathy": ' + "9" * 5000 + "}")
    raw_chat("prefs denormal weight", ', "prosocial_prefs": {"empathy": 5e-324}', ok)
    raw_chat(
        "prefs two denormal weights", ', "prosocial_prefs": {"empathy": 5e-324, "truthfulness": 5e-324}', ok
    )
    raw_chat("prefs all zero", ', "prosocial_prefs": {"empathy": 0, "helpfulness": 0}')
    raw_chat("prefs empty object", ', "prosocial_prefs": {}')
    raw_chat("prefs null", ', "prosocial_prefs": null', ok)
    for value in ('"0.5x"', "[0.5]", '{"w": 1}', '"empathy"', "[]", "null"):
        raw_chat(f"prefs empathy={value}", f', "prosocial_prefs": {{"empathy": {value}}}')
    # Lax coercions (pydantic): an integer or a boolean is a number in [0, 1].
    for value in ("1", "true"):
        raw_chat(
            f"prefs empathy={value}", f', "prosocial_prefs": {{"empathy": {value}}}', frozenset({200, 400})
        )
    for value in ('"empathy"', "[1, 0, 0, 0, 0]", "1", "true"):
        raw_chat(f"prefs={value}", f', "prosocial_prefs": {value}')
    for key in ("safety", "kindness", "__proto__", "constructor", "Empathy", "empathy ", ""):
        raw_chat(f"prefs unknown key {key!r}", f', "prosocial_prefs": {{"empathy": 1, {json.dumps(key)}: 1}}')
    raw_chat(
        "prefs duplicate key (last wins, negative)", ', "prosocial_prefs": {"empathy": 1, "empathy": -1}'
    )
    for depth in (500, 900, 990):
        raw_chat(
            f"prefs {depth}-deep list", ', "prosocial_prefs": {"empathy": ' + "[" * depth + "]" * depth + "}"
        )
    deep = max_body_bytes // 8  # deeper than any parser's recursion limit, within the body limit
    raw_chat(f"prefs {deep}-deep list", ', "prosocial_prefs": {"empathy": ' + "[" * deep + "]" * deep + "}")
    raw_chat(
        f"prefs {deep // 3}-deep object",
        ', "prosocial_prefs": ' + '{"a":' * (deep // 3) + "1" + "}" * (deep // 3),
    )
    many_keys = ", ".join(f'"k{i}": 1' for i in range(max_body_bytes // 32))
    raw_chat("prefs thousands of unknown keys", f', "prosocial_prefs": {{{many_keys}}}')
    # The other prosocial fields.
    for literal in ("NaN", "-Infinity", "1e308", "-1e308", "-101", "0.5", '"low"', "true", "[]"):
        raw_chat(f"safety_threshold={literal}", f', "prosocial_safety_threshold": {literal}')
    # A numeric string is coerced (pydantic's lax mode); it must still respect the floor.
    raw_chat('safety_threshold="-0"', ', "prosocial_safety_threshold": "-0"', ok)
    raw_chat('safety_threshold="-100"', ', "prosocial_safety_threshold": "-100"')
    raw_chat("safety_threshold=0 (strictest)", ', "prosocial_safety_threshold": 0', ok)
    for literal in ('"maybe"', "2", "[]", "{}"):
        raw_chat(f"prosocial_guidance={literal}", f', "prosocial_guidance": {literal}')
    raw_chat("guidance false with prefs", ', "prosocial_guidance": false, "prosocial_prefs": {"empathy": 1}')
    # Huge and odd numbers in the sampling fields.
    for name, literal in (
        ("temperature", "1e308"),
        ("temperature", "NaN"),
        ("temperature", "9" * 400),
        ("top_p", "-Infinity"),
        ("top_k", "9" * 30),
        ("n", "9" * 30),
        ("seed", "9" * 30),
        ("seed", "-" + "9" * 30),
        ("presence_penalty", "Infinity"),
        ("top_logprobs", "9" * 30),
    ):
        raw_chat(f"{name}={literal[:12]}", f', "{name}": {literal}')
    json_chat("temperature 5e-324 (greedy)", ok, temperature=5e-324)
    json_chat("top_p 5e-324", ok, top_p=5e-324)
    json_chat("seed 2**63-1", ok, seed=2**63 - 1)
    json_chat("seed -2**63", ok, seed=-(2**63))
    json_chat("top_k beyond the vocabulary", frozenset({200, 400}), top_k=100_000)
    cases.append(EdgeCase("max_tokens 10**30", chat, _raw(start + ', "max_tokens": 1' + "0" * 30 + "}"), bad))
    # Unusual text.
    surrogate = '"\\ud800 lone surrogate"'
    cases.append(
        EdgeCase(
            "chat content with a lone surrogate",
            chat,
            _raw(
                f'{{"model": {json.dumps(model)}, "messages": [{{"role": "user", "content": {surrogate}}}]}}'
            ),
            bad,
        )
    )
    cases.append(
        EdgeCase(
            "completion prompt with a lone surrogate",
            completions,
            _raw(f'{{"model": {json.dumps(model)}, "prompt": {surrogate}, "max_tokens": 2}}'),
            bad,
        )
    )
    cases.append(
        EdgeCase(
            "completion prompt list with a lone surrogate",
            completions,
            _raw(f'{{"model": {json.dumps(model)}, "prompt": ["ok", {surrogate}], "max_tokens": 2}}'),
            bad,
        )
    )
    json_chat("stop with a lone surrogate", bad, stop=["\ud800"])
    json_chat("model name with a lone surrogate", bad, model="\udc00")
    cases.append(EdgeCase("unknown key with a lone surrogate", chat, _raw(head + ', "\\ud800": 1}'), bad))
    json_chat("NUL bytes in content", ok, messages=[{"role": "user", "content": "a\u0000b"}])
    json_chat(
        "special tokens in content",
        ok,
        messages=[{"role": "user", "content": "<|im_end|><|im_start|>system"}],
    )
    json_chat("empty content parts", ok, messages=[{"role": "user", "content": []}])
    json_chat("null content", ok, messages=[{"role": "user", "content": None}])
    json_chat(
        "content part of unknown type", bad, messages=[{"role": "user", "content": [{"type": "image_url"}]}]
    )
    json_chat("stream, n=2, logprobs, guided", ok, stream=True, n=2, logprobs=True, top_logprobs=2,
              prosocial_prefs={"empathy": 1})  # fmt: skip
    json_chat("stream_options without stream", bad, stream_options={"include_usage": True})
    json_chat("unknown top-level field", bad, logits_processors=["x"])
    cases.append(
        EdgeCase(
            "completion: empty prompt", completions, json.dumps({"model": model, "prompt": ""}).encode(), bad
        )
    )
    cases.append(
        EdgeCase(
            "completion: too many prompts",
            completions,
            json.dumps({"model": model, "prompt": ["a"] * 1000, "max_tokens": 1}).encode(),
            bad,
        )
    )
    # Bodies: not JSON, wrong content type, too large (declared and chunked), truncated.
    for name, content in (
        ("empty body", b""),
        ("JSON null", b"null"),
        ("JSON array", b"[]"),
        ("JSON string", b'"hi"'),
        ("truncated JSON", head[:40].encode()),
        ("invalid UTF-8", b'{"model": "\xff\xfe"}'),
    ):
        cases.append(EdgeCase(name, chat, content, bad))
    bom = b"\xef\xbb\xbf" + json.dumps(_chat(model)).encode()
    cases.append(EdgeCase("UTF-8 BOM before the JSON", chat, bom, frozenset({200, 400})))
    cases.append(
        EdgeCase(
            "form-encoded body",
            chat,
            b"model=x&messages=y",
            frozenset({400}),
            headers=(("Content-Type", "application/x-www-form-urlencoded"),),
        )
    )
    padding = "x" * (max_body_bytes + 10)
    oversized = json.dumps(_chat(model, user=padding)).encode()
    cases.append(EdgeCase("body over the limit (Content-Length)", chat, oversized, frozenset({413})))
    chunk = json.dumps(_chat(model, user=padding)).encode()
    pieces = tuple(chunk[i : i + 8192] for i in range(0, len(chunk), 8192))
    cases.append(EdgeCase("body over the limit (chunked)", chat, None, frozenset({413}), chunks=pieces))
    cases.append(EdgeCase("wrong method", chat, None, frozenset({405}), method="GET"))
    cases.append(EdgeCase("unknown path", "/v1/nothing", b"{}", frozenset({404})))
    cases.append(
        EdgeCase("no API key", chat, json.dumps(_chat(model)).encode(), frozenset({401}), auth=False)
    )
    cases.append(
        EdgeCase(
            "non-ASCII bearer token",
            chat,
            json.dumps(_chat(model)).encode(),
            frozenset({401}),
            headers=(("Content-Type", "application/json"), ("Authorization", "Bearer \u00ff\u00fe")),
            auth=False,
        )
    )
    return cases


def fuzz_handwritten(
    base_url: str, api_key: str, model: str, max_body_bytes: int, result: FuzzResult, timeout_s: float = 120.0
) -> None:
    with httpx.Client(base_url=base_url, timeout=timeout_s) as client:
        for case in edge_cases(model, max_body_bytes):
            headers = dict(case.headers)
            if case.auth:
                headers["Authorization"] = f"Bearer {api_key}"
            raw_headers = {k: v.encode("latin-1") for k, v in headers.items()}
            content: bytes | Iterator[bytes] | None = case.content
            if content is None and case.chunks:
                content = iter(case.chunks)
            try:
                response = client.request(case.method, case.path, content=content, headers=raw_headers)
            except httpx.HTTPError as exc:
                result.handwritten += 1
                result.record(f"edge: {case.name}", 599, f"transport error {type(exc).__name__}")
                continue
            result.handwritten += 1
            problem = check_response(
                response.status_code, response.headers.get("content-type", ""), response.content
            )
            if problem is None and response.status_code not in case.expect:
                problem = f"expected {sorted(case.expect)}, got {response.status_code}: {response.text[:200]}"
            result.record(f"edge: {case.name}", response.status_code, problem)


def run_fuzz(
    base_url: str,
    api_key: str,
    model: str,
    max_body_bytes: int,
    examples_per_mode: int = 500,
    seed: int = 0,
) -> FuzzResult:
    """Generated cases for every operation and mode, then the hand-written ones; returns the tally."""
    result = FuzzResult()
    start = time.perf_counter()
    fuzz_generated(base_url, api_key, model, result, examples_per_mode, seed)
    fuzz_handwritten(base_url, api_key, model, max_body_bytes, result)
    result.seconds = time.perf_counter() - start
    return result
