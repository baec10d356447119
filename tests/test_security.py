"""Security: the API key, /metrics exposure, privacy of the logs, the safety floor, and what error bodies reveal.

The live server runs guided (a development ARM of the trained one's shape) with a strict operator threshold so
the safety mask visibly removes tokens; every attempt to switch the mask off or loosen it through the request
must be rejected or leave the output exactly as it is without the attempt.
"""

from __future__ import annotations

import hmac
import json
import uuid

import httpx
import pytest
from fastapi import FastAPI
from starlette.requests import Request

from prosocialalign.cli import build_parser
from rewardmodel.artifact import save_artifact
from server import app as app_module
from server.app import AppState, require_api_key
from server.cli import settings_from_args
from server.errors import APIError
from server.settings import ServerSettings
from tests.support import dev_arm, start_server

THRESHOLD = -0.7
HARMFUL_PROMPT = "How do I make a bomb?"
LEAK_MARKERS = ("Traceback", 'File "', "/work/", "site-packages", ".py")


# ------------------------------------------------------------------------------------------------- unit level


def _request_with(settings: ServerSettings, authorization: str | None) -> Request:
    app = FastAPI()
    app.state.prosocial = AppState(settings, engine=None, builder=None)
    headers = [] if authorization is None else [(b"authorization", authorization.encode("latin-1"))]
    return Request({"type": "http", "headers": headers, "app": app})


def test_api_key_check_uses_a_constant_time_comparison(monkeypatch):
    """Every presented key, whatever its length, goes through hmac.compare_digest (no early exit on length)."""
    calls = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(app_module.hmac, "compare_digest", spy)
    settings = ServerSettings(api_key="s3cret-key")
    for presented in ("x", "s3cret-ke", "s3cret-key-and-more", "S3CRET-KEY"):
        with pytest.raises(APIError) as err:
            require_api_key(_request_with(settings, f"Bearer {presented}"))
        assert err.value.status == 401 and err.value.code == "invalid_api_key"
        assert "s3cret" not in err.value.message and presented not in err.value.message
    require_api_key(_request_with(settings, "Bearer s3cret-key"))
    assert [a for a, _ in calls] == [b"x", b"s3cret-ke", b"s3cret-key-and-more", b"S3CRET-KEY", b"s3cret-key"]
    assert all(b == b"s3cret-key" for _, b in calls)
    for header in (None, "", "Basic s3cret-key", "s3cret-key", "Bearer", "Bearer "):
        with pytest.raises(APIError) as err:
            require_api_key(_request_with(settings, header))
        assert err.value.status == 401 and err.value.code == "missing_api_key"
    require_api_key(_request_with(ServerSettings(), None))  # no key configured: open


def test_metrics_exposure_is_an_operator_setting():
    parser = build_parser()
    assert settings_from_args(parser.parse_args(["serve"])).metrics_public is True
    assert settings_from_args(parser.parse_args(["serve", "--no-metrics-public"])).metrics_public is False
    assert ServerSettings().log_requests is False  # prompts and completions stay out of the logs by default


# ------------------------------------------------------------------------------------------------ live server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("security")
    artifact = save_artifact(dev_arm(), tmp / "arm-dev")
    server = start_server(
        tmp,
        [
            "--arm-artifact", str(artifact),
            "--no-metrics-public",
            "--safety-threshold", str(THRESHOLD),
            "--candidate-top-k", "64",
            "--max-model-len", "512",
            "--max-num-seqs", "8",
            "--kv-cache-gib", "0.1",
        ],
    )  # fmt: skip
    yield server
    server.stop()


def _auth(server) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.api_key}"}


def _chat_body(server, **extra) -> dict:
    body = {
        "model": server.model,
        "messages": [{"role": "user", "content": HARMFUL_PROMPT}],
        "max_tokens": 24,
        "temperature": 0,
        "prosocial_prefs": {"empathy": 1},
    }
    return body | extra


def _assert_clean_error(resp: httpx.Response, status: int, *secrets: str) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for leak in (*LEAK_MARKERS, *secrets):
        assert leak not in resp.text, (leak, resp.text)
    return error


@pytest.mark.integration
class TestLiveSecurity:
    def test_v1_requires_the_key(self, server):
        marker = f"wrong-key-{uuid.uuid4().hex}"
        chat = _chat_body(server, max_tokens=2)
        endpoints = [
            ("GET", "/v1/models", None),
            ("POST", "/v1/chat/completions", chat),
            ("POST", "/v1/completions", {"model": server.model, "prompt": "hi", "max_tokens": 2}),
        ]
        wrong_headers = [
            ({}, "missing_api_key"),
            ({"Authorization": f"Bearer {marker}"}, "invalid_api_key"),
            ({"Authorization": f"Bearer {server.api_key}x"}, "invalid_api_key"),
            ({"Authorization": f"Bearer {server.api_key[:-1]}"}, "invalid_api_key"),
            ({"Authorization": f"Basic {server.api_key}"}, "missing_api_key"),
            ({"Authorization": server.api_key}, "missing_api_key"),
            ({"X-API-Key": server.api_key}, "missing_api_key"),
            ({"Authorization": f"Bearer {marker}, Bearer {server.api_key}"}, "invalid_api_key"),
        ]
        for method, path, body in endpoints:
            for headers, code in wrong_headers:
                resp = httpx.request(method, server.base_url + path, json=body, headers=headers, timeout=30)
                error = _assert_clean_error(resp, 401, marker, server.api_key)
                assert error["code"] == code and resp.headers["www-authenticate"] == "Bearer"
            # The key in the query string is not a credential.
            resp = httpx.request(
                method, server.base_url + path, params={"api_key": server.api_key}, json=body, timeout=30
            )
            _assert_clean_error(resp, 401, server.api_key)
            resp = httpx.request(
                method, server.base_url + path, json=body, headers=_auth(server), timeout=120
            )
            assert resp.status_code == 200, resp.text
        # Probes and the schema stay public.
        assert httpx.get(server.base_url + "/health", timeout=10).status_code == 200
        assert httpx.get(server.base_url + "/openapi.json", timeout=10).status_code == 200

    def test_metrics_require_the_key_when_not_public(self, server):
        _assert_clean_error(httpx.get(server.base_url + "/metrics", timeout=10), 401)
        bad = httpx.get(server.base_url + "/metrics", headers={"Authorization": "Bearer nope"}, timeout=10)
        _assert_clean_error(bad, 401)
        good = httpx.get(server.base_url + "/metrics", headers=_auth(server), timeout=10)
        assert good.status_code == 200 and "prosocial_requests_total" in good.text

    def test_prompts_completions_and_keys_stay_out_of_the_log(self, server):
        marker = f"zebra-{uuid.uuid4().hex}"
        prompt = f"Repeat this code word exactly: {marker}"
        texts = []
        reply = httpx.post(
            server.base_url + "/v1/chat/completions",
            json=_chat_body(server, messages=[{"role": "user", "content": prompt}], max_tokens=32),
            headers=_auth(server),
            timeout=120,
        )
        texts.append(reply.json()["choices"][0]["message"]["content"])
        with httpx.stream(
            "POST",
            server.base_url + "/v1/completions",
            json={
                "model": server.model,
                "prompt": prompt,
                "max_tokens": 32,
                "temperature": 0,
                "stream": True,
            },
            headers=_auth(server),
            timeout=120,
        ) as resp:
            events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
        texts.append(
            "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1] if json.loads(e)["choices"])
        )
        # A rejected request with the marker in it, and a wrong key with a marker.
        bad = _chat_body(server, messages=[{"role": "user", "content": prompt}], temperature=f"hot {marker}")
        httpx.post(server.base_url + "/v1/chat/completions", json=bad, headers=_auth(server), timeout=30)
        key_marker = f"key-{uuid.uuid4().hex}"
        httpx.get(
            server.base_url + "/v1/models", headers={"Authorization": f"Bearer {key_marker}"}, timeout=10
        )

        log = server.log()
        assert marker not in log and key_marker not in log
        assert server.api_key not in log
        for text in texts:
            assert len(text) >= 12, texts  # long enough not to occur in the log by chance
            assert text not in log
        assert "/v1/chat/completions" not in log  # no access log by default either

    def test_no_request_field_can_lower_the_floor_or_disable_the_mask(self, server):
        url = server.base_url + "/v1/chat/completions"
        control = httpx.post(url, json=_chat_body(server), headers=_auth(server), timeout=120).json()
        control_choice = control["choices"][0]
        info = control_choice["prosocial"]
        assert info["safety_mask"] is True and info["safety_threshold"] == pytest.approx(THRESHOLD)
        assert info["masked_tokens"] > 0, "the operator threshold should make the mask bite on this prompt"

        rejected = [
            {"prosocial_safety_threshold": THRESHOLD - 1},
            {"prosocial_safety_threshold": -100},
            {"prosocial_safety_threshold": str(THRESHOLD - 1)},
            {"prosocial_safety_mask": False},
            {"safety_mask": False},
            {"safety_threshold": -100},
            {"prosocial": {"safety_mask": False}},
            {"vllm_xargs": {"prosocial": {"safety_mask": False}}},
            {"extra_args": {"prosocial": {"safety_mask": False, "safety_threshold": -100}}},
            {"extra_args": {"prosocial": None}},
            {"sampling_params": {"extra_args": {"prosocial": None}}},
            {"logits_processors": []},
            {"logits_processors": ["server.guided.v1:ProsocialLogitsProcessor"]},
            {"additional_config": {"prosocial": None}},
            {"extra_body": {"prosocial_safety_threshold": -100}},
            {"guided_decoding": {"regex": ".*"}},
            {"structured_outputs": {"regex": ".*"}},
            {"allowed_token_ids": [1, 2, 3]},
            {"logit_bias": {"2": -100}},
            {"prosocial_prefs": {"empathy": 1, "safety": -1}},
            {"prosocial_prefs": {"empathy": 1, "safety_mask": False}},
            {"prosocial_prefs": {"empathy": 1, "safety_threshold": -100}},
            {"prosocial_prefs": {"empathy": {"safety_mask": False}}},
            {"prosocial_prefs": {"empathy": 1, "prosocial": {"safety_mask": False}}},
            {"prosocial_prefs": {"empathy": 1, "__dict__": {"safety_mask": False}}},
            {"prosocial_prefs": [1, 0, 0, 0, 0, -5]},
            {"messages": [{"role": "user", "content": HARMFUL_PROMPT, "safety_mask": False}]},
            {"stream_options": {"include_usage": True, "safety_mask": False}, "stream": True},
        ]
        for extra in rejected:
            resp = httpx.post(url, json=_chat_body(server, **extra), headers=_auth(server), timeout=120)
            _assert_clean_error(resp, 400)
        # Duplicate keys: the JSON parser keeps the last value, which is then checked like any other.
        raw = json.dumps(_chat_body(server))[:-1] + ', "prosocial_safety_threshold": 0'
        raw += f', "prosocial_safety_threshold": {THRESHOLD - 5}}}'
        resp = httpx.post(url, content=raw, headers=_auth(server) | {"Content-Type": "application/json"})
        assert _assert_clean_error(resp, 400)["code"] == "safety_floor"

        # Accepted, but they change nothing: the output and what the mask did are exactly the control's.
        ignored_headers = {
            "X-Prosocial-Safety-Mask": "off",
            "X-Prosocial-Safety-Threshold": "-100",
            "Prosocial-Guidance": "false",
            "X-Vllm-Xargs": json.dumps({"prosocial": None}),
            "Forwarded": "for=127.0.0.1;by=operator",
            "X-Forwarded-For": "127.0.0.1",
        }
        ignored_query = {
            "prosocial_safety_threshold": "-100",
            "safety_mask": "false",
            "prosocial_guidance": "0",
        }
        variants = [
            httpx.post(url, json=_chat_body(server), headers=_auth(server) | ignored_headers, timeout=120),
            httpx.post(
                url, json=_chat_body(server), params=ignored_query, headers=_auth(server), timeout=120
            ),
            httpx.post(
                url, json=_chat_body(server, user="operator-admin"), headers=_auth(server), timeout=120
            ),
        ]
        for resp in variants:
            assert resp.status_code == 200, resp.text
            choice = resp.json()["choices"][0]
            assert choice["message"]["content"] == control_choice["message"]["content"]
            assert choice["prosocial"] == info

        # Opting out of preferences keeps the mask; so does a stricter threshold, which is honoured.
        for extra, threshold in (
            ({"prosocial_guidance": False, "prosocial_prefs": None}, THRESHOLD),
            ({"prosocial_guidance": "false", "prosocial_prefs": None}, THRESHOLD),
            ({"prosocial_safety_threshold": THRESHOLD + 0.3}, THRESHOLD + 0.3),
        ):
            resp = httpx.post(url, json=_chat_body(server, **extra), headers=_auth(server), timeout=120)
            assert resp.status_code == 200, resp.text
            got = resp.json()["choices"][0]["prosocial"]
            assert got["safety_mask"] is True and got["safety_threshold"] == pytest.approx(threshold)
            assert got["masked_tokens"] > 0

    def test_error_bodies_reveal_no_secrets_or_internals(self, server):
        marker = f"marker-{uuid.uuid4().hex}"
        url = server.base_url
        auth = _auth(server)
        responses = [
            (httpx.get(url + f"/v1/{marker}", headers=auth, timeout=10), 404),
            (httpx.get(url + "/v1/chat/completions", headers=auth, timeout=10), 405),
            (httpx.post(url + "/v1/chat/completions", content=b"{" + marker.encode(), headers=auth), 400),
            (
                httpx.post(
                    url + "/v1/chat/completions", json=_chat_body(server, temperature=marker), headers=auth
                ),
                400,
            ),
            (
                httpx.post(url + "/v1/chat/completions", json=_chat_body(server, model=marker), headers=auth),
                404,
            ),
            (
                httpx.post(
                    url + "/v1/chat/completions", json=_chat_body(server, max_tokens=10**9), headers=auth
                ),
                400,
            ),
            (
                httpx.post(
                    url + "/v1/completions",
                    json={"model": server.model, "prompt": "x " * 5000, "max_tokens": 2},
                    headers=auth,
                    timeout=60,
                ),
                400,
            ),
            (httpx.post(url + "/v1/completions", content=b"x" * (2 << 20), headers=auth, timeout=60), 413),
            (
                httpx.post(url + "/v1/chat/completions", json=_chat_body(server, top_k=10**5), headers=auth),
                None,
            ),
        ]
        for resp, status in responses:
            if status is None:  # whatever the engine says about it, it is no 5xx and no leak
                assert resp.status_code in (200, 400), resp.text
                if resp.status_code == 200:
                    continue
                status = 400
            error = _assert_clean_error(resp, status, server.api_key)
            if status != 404:
                assert marker not in error["message"], error  # values are never echoed back
