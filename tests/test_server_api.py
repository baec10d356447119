"""The real server (vLLM engine, default model) driven by the official ``openai`` client and raw HTTP."""

from __future__ import annotations

import json
import re
import time

import httpx
import openai
import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(live_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.base_url + "/v1", api_key=live_server.api_key, max_retries=0)


def _post(live_server, path: str, content: bytes | str, key: str | None = "default") -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    token = live_server.api_key if key == "default" else key
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.post(live_server.base_url + path, content=content, headers=headers, timeout=60)


def _assert_openai_error(resp: httpx.Response, status: int, param: str | None = "any") -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if param != "any":
        assert body["error"]["param"] == param, body
    return body["error"]


def _metric(live_server, name: str, labels: str = "") -> float:
    text = httpx.get(live_server.base_url + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if (
            line.startswith(name + "{" if labels or "{" in line.split(" ")[0] else name + " ")
            and labels in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_models_and_health(client, live_server):
    models = client.models.list().data
    assert [m.id for m in models] == [live_server.model]
    assert httpx.get(live_server.base_url + "/health", timeout=10).status_code == 200


def test_chat_completion_non_streaming(client, live_server):
    resp = client.chat.completions.create(
        model=live_server.model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12,
        temperature=0,
    )
    choice = resp.choices[0]
    assert resp.object == "chat.completion"
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens <= 12 and resp.usage.prompt_tokens > 5
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_length_finish_reason_and_max_completion_tokens(client, live_server):
    resp = client.chat.completions.create(
        model=live_server.model,
        messages=[{"role": "user", "content": "Write a long story about a dragon."}],
        max_completion_tokens=5,
        temperature=0,
    )
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 5


def test_streaming_matches_non_streaming_and_reports_usage(client, live_server):
    kwargs = dict(
        model=live_server.model,
        # A prompt the response guard lets through: a content-filtered choice returned whole has its text omitted,
        # while a stream keeps what the guard had already released (docs/method.md).
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        temperature=0,
    )
    full = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert full.choices[0].finish_reason != "content_filter"
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_stream_ends_with_done_marker(live_server):
    body = {
        "model": live_server.model,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 4,
        "stream": True,
    }
    with httpx.stream(
        "POST",
        live_server.base_url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {live_server.api_key}"},
        timeout=60,
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        data = [line[len("data: ") :] for line in resp.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    assert all(json.loads(d)["object"] == "chat.completion.chunk" for d in data[:-1])


def test_n_choices_and_seed_reproducibility(client, live_server):
    kwargs = dict(
        model=live_server.model,
        messages=[{"role": "user", "content": "Tell me a fun fact."}],
        max_tokens=16,
        temperature=1.0,
        n=3,
        seed=1234,
    )
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    # Each choice has its own seed, so with n=3 at temperature 1 they are not all the same text.
    assert len({c.message.content for c in a.choices}) > 1
    other = client.chat.completions.create(**{**kwargs, "seed": 99, "n": 1})
    # n choices share one prompt: usage counts it once.
    assert a.usage.prompt_tokens == other.usage.prompt_tokens


def test_stop_string(client, live_server):
    """Stop on a string taken from the middle of the unstopped greedy output: the text ends right before it."""
    kwargs = dict(model=live_server.model, prompt="1, 2, 3, 4, 5,", max_tokens=40, temperature=0)
    full = client.completions.create(**kwargs).choices[0].text
    words = full.split()
    assert len(words) >= 6, full
    stop = " " + words[len(words) // 2]
    cut = full.index(stop)
    choice = client.completions.create(**kwargs, stop=[stop]).choices[0]
    assert choice.finish_reason == "stop"
    assert choice.text == full[:cut]


def test_completions_batch_prompts_and_logprobs(client, live_server):
    resp = client.completions.create(
        model=live_server.model, prompt=["The sky is", "Water is"], max_tokens=4, temperature=0, logprobs=2
    )
    assert [c.index for c in resp.choices] == [0, 1]
    for choice in resp.choices:
        assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs)
        assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
        assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)


def test_chat_logprobs(client, live_server):
    resp = client.chat.completions.create(
        model=live_server.model,
        messages=[{"role": "user", "content": "Say yes."}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    for entry in content:
        # The base model's log-probs (before guidance, so the guided choice need not be the most likely one).
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and all(lp <= 0 for lp in tops)
        assert entry.logprob <= tops[0] + 1e-4  # the first listed is the most likely token of the vocabulary


def test_penalties_and_top_k_accepted(client, live_server):
    resp = client.chat.completions.create(
        model=live_server.model,
        messages=[{"role": "user", "content": "List fruits."}],
        max_tokens=8,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        top_p=0.9,
        user="tester",
        extra_body={"top_k": 20},
    )
    assert resp.choices[0].message.content is not None


@pytest.mark.parametrize(
    ("payload", "status", "param"),
    [
        ({"messages": []}, 400, "messages"),
        ({"temperature": 5}, 400, "temperature"),
        ({"top_p": 0}, 400, "top_p"),
        ({"n": 0}, 400, "n"),
        ({"n": 1000}, 400, "n"),
        ({"max_tokens": 0}, 400, "max_tokens"),
        ({"max_tokens": 10**9}, 400, "max_tokens"),
        ({"model": "no-such-model"}, 404, "model"),
        ({"messages": "hello"}, 400, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
        ({"prosocial_prefs": {"empathy": -0.5}}, 400, "prosocial_prefs.empathy"),
        ({"prosocial_prefs": {"empathy": 2}}, 400, "prosocial_prefs.empathy"),
        ({"prosocial_prefs": {"kindness": 1}}, 400, "prosocial_prefs.kindness"),
        ({"prosocial_prefs": {"empathy": 0, "helpfulness": 0}}, 400, "prosocial_prefs"),
        ({"prosocial_prefs": [1, 0, 0, 0, 0]}, 400, "prosocial_prefs"),
        ({"prosocial_prefs": {"empathy": "high"}}, 400, "prosocial_prefs.empathy"),
        ({"frequency_penalty": 3}, 400, "frequency_penalty"),
        ({"top_logprobs": 3}, 400, None),
        ({"logit_bias": {"1": 5}}, 400, "logit_bias"),
        ({"stop": ["a"] * 40}, 400, "stop"),
    ],
)
def test_bad_chat_requests_get_openai_errors(live_server, payload, status, param):
    body = {"model": live_server.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    body.update(payload)
    _assert_openai_error(_post(live_server, "/v1/chat/completions", json.dumps(body)), status, param)


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"",
        b"[]",
        b'{"model": "x", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
        b'{"model": "x", "messages": [{"role": "user", "content": "hi"}], "prosocial_prefs": {"empathy": Infinity}}',
        b"[" * 100_000 + b"]" * 100_000,
    ],
)
def test_malformed_bodies_get_400(live_server, raw):
    resp = _post(live_server, "/v1/chat/completions", raw)
    _assert_openai_error(resp, 400)


def test_prompt_longer_than_context(live_server):
    long_text = "word " * 3000
    body = {"model": live_server.model, "messages": [{"role": "user", "content": long_text}], "max_tokens": 4}
    error = _assert_openai_error(_post(live_server, "/v1/chat/completions", json.dumps(body)), 400)
    assert error["code"] == "context_length_exceeded"
    body = {"model": live_server.model, "prompt": long_text, "max_tokens": 4}
    error = _assert_openai_error(_post(live_server, "/v1/completions", json.dumps(body)), 400)
    assert error["code"] == "context_length_exceeded"


def test_oversized_body_gets_413(live_server):
    huge = json.dumps({"model": live_server.model, "prompt": "x" * (2 << 20)})
    _assert_openai_error(_post(live_server, "/v1/completions", huge), 413)


def test_api_key_required(live_server):
    body = json.dumps({"model": live_server.model, "messages": [{"role": "user", "content": "hi"}]})
    assert _assert_openai_error(_post(live_server, "/v1/chat/completions", body, key=None), 401)["code"] == (
        "missing_api_key"
    )
    wrong = _post(live_server, "/v1/chat/completions", body, key="wrong-key")
    assert _assert_openai_error(wrong, 401)["code"] == "invalid_api_key"
    assert live_server.api_key not in wrong.text
    assert httpx.get(live_server.base_url + "/v1/models", timeout=10).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live_server.base_url + "/v1", api_key="nope", max_retries=0).models.list()


def test_server_keeps_serving_after_errors(client, live_server):
    for raw in (b"{", b'{"model": 1}', b"null"):
        assert _post(live_server, "/v1/chat/completions", raw).status_code == 400
    resp = client.chat.completions.create(
        model=live_server.model, messages=[{"role": "user", "content": "Still there?"}], max_tokens=4
    )
    assert resp.choices[0].message.content is not None


def test_metrics_expose_vllm_and_prosocial_series(client, live_server):
    client.chat.completions.create(
        model=live_server.model, messages=[{"role": "user", "content": "Hello"}], max_tokens=2
    )
    text = httpx.get(live_server.base_url + "/metrics", timeout=10).text
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds_bucket",
        "prosocial_requests_total",
        "prosocial_request_latency_seconds_bucket",
        "prosocial_engine_healthy 1.0",
    ):
        assert name in text, name
    assert re.search(r'prosocial_requests_total\{endpoint="/v1/chat/completions",status="200"\} [1-9]', text)


def test_client_disconnect_aborts_engine_request(live_server):
    """Read a few chunks of a long stream, drop the connection, and check the engine is idle again soon after."""
    body = {
        "model": live_server.model,
        "prompt": "Once upon a time, in a small village by the sea,",  # runs long: the response guard passes it
        "max_tokens": 900,
        "temperature": 0,
        "stream": True,
    }
    aborted_before = _metric(live_server, "prosocial_aborted_requests_total")
    tokens_before = _metric(live_server, "vllm:generation_tokens_total")
    with httpx.stream(
        "POST",
        live_server.base_url + "/v1/completions",
        json=body,
        headers={"Authorization": f"Bearer {live_server.api_key}"},
        timeout=60,
    ) as resp:
        assert resp.status_code == 200
        for i, _ in enumerate(resp.iter_lines()):
            if i >= 10:
                break
    deadline = time.monotonic() + 20
    running = None
    while time.monotonic() < deadline:
        running = _metric(live_server, "vllm:num_requests_running")
        if running == 0:
            break
        time.sleep(0.5)
    assert running == 0
    # The request was aborted, long before its 900 tokens.
    assert _metric(live_server, "prosocial_aborted_requests_total") == aborted_before + 1
    assert _metric(live_server, "vllm:generation_tokens_total") - tokens_before < 900
