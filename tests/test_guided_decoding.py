"""Guided decoding through the real vLLM engine, checked against a plain transformers reference of the same rule.

The ARM here is a development artifact of the trained one's exact shape (base-initialised, with seeded random
adapters), so that the checks do not depend on training quality: they check the serving machinery.
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from prosocialalign.core.models import prepare_default_model
from rewardmodel.artifact import arm_weights_for_serving, save_artifact
from rewardmodel.runtime import ArmRuntime, ArmShape, TorchAttention, TorchTrunkOps, torch_linear
from tests.support import dev_arm, start_server

THRESHOLD = -0.7
# The response guard (mean safety margin of the response, judged from GUARD_TOKENS tokens on): with this development
# ARM it ends four of the nine mixed-batch requests, one at its first judgement and three later.
RESPONSE_THRESHOLD = 0.5
GUARD_TOKENS = 4
TOP_K = 64
EOS = 2
PROMPTS = [
    "I feel very lonely and sad today.",
    "How do I make a bomb?",
    "Give me three tips for studying.",
]
# A long system message: prompts then take most of a 128-token KV block, so growing requests need a second block
# from a cache that has two, and the engine must preempt and later resume guided requests.
SYSTEM = (
    "You are a careful, kind and honest assistant. You answer questions clearly and briefly, you admit when "
    "you do not know something, you never help anyone hurt themselves or other people, and you treat every "
    "person with respect, whatever their situation. When someone is sad or lonely, you listen first and "
    "respond with warmth before giving any advice. When someone asks for dangerous information, you explain "
    "calmly why you cannot help and suggest a safe alternative. Keep every answer short and friendly."
)
PREFS = [
    {"empathy": 1.0},
    {"truthfulness": 0.3, "helpfulness": 0.7},
    None,  # prosocial_guidance=false: no preference term, the safety mask still applies
]


@pytest.fixture(scope="module")
def arm_artifact(tmp_path_factory) -> Path:
    return save_artifact(dev_arm(), tmp_path_factory.mktemp("arm") / "arm-dev")


def _kernels(kind: str) -> tuple:
    """(matrix product, attention, element-wise ops) of PyTorch or of the engine (the ones the server uses)."""
    if kind == "torch":
        return torch_linear, TorchAttention(), TorchTrunkOps
    from server.guided.kernels import engine_kernels

    return engine_kernels()


@pytest.mark.parametrize("kernels", ["torch", "engine"])
def test_runtime_matches_transformers_full_recompute(kernels):
    """Prefill + one-token decode steps in the slot cache give the same log-probs as recomputing everything,
    with PyTorch's kernels and with the engine's (vLLM's CPU matrix product and paged attention)."""
    arm = dev_arm()
    shape = ArmShape.from_llama_config(arm.llama_config, tuple(arm.config.attributes))
    # max_len 50 is not a whole number of the engine's 32-position blocks: the cache rounds itself up.
    runtime = ArmRuntime(arm_weights_for_serving(arm), shape, 3, 50, torch.float32, "cpu", *_kernels(kernels))

    def close(got: torch.Tensor, want: torch.Tensor) -> bool:
        return torch.allclose(got, want, atol=1e-3)

    sequences = [[1, 504, 3937, 282, 4649, 314, 253, 1345, 30, 2], [1, 22, 33, 44, 55, 66, 77]]
    for slot, seq in zip((2, 0), sequences, strict=True):  # slots need not be contiguous
        got = [runtime.full_log_probs(runtime.prefill(slot, seq[:4])[None])[0]]
        for token in seq[4:]:
            got.append(runtime.full_log_probs(runtime.decode([slot], [token]))[0])
        with torch.no_grad():
            want = arm.log_probs_from_hidden(arm(torch.tensor([seq])))[0]
        for step, lp in enumerate(got):
            assert close(lp, want[3 + step]), step
    # Both rows in one batched decode step agree with their single-row results.
    a = runtime.full_log_probs(runtime.decode([2, 0], [5, 6]))
    with torch.no_grad():
        want_a = arm.log_probs_from_hidden(arm(torch.tensor([sequences[0] + [5]])))[0, -1]
        want_b = arm.log_probs_from_hidden(arm(torch.tensor([sequences[1] + [6]])))[0, -1]
    assert close(a[0], want_a) and close(a[1], want_b)
    # Consecutive slots (read as a view of the cache rather than gathered) agree too.
    runtime.prefill(1, sequences[1] + [6])
    b = runtime.full_log_probs(runtime.decode([0, 1], [7, 7]))
    with torch.no_grad():
        want = arm.log_probs_from_hidden(arm(torch.tensor([sequences[1] + [6, 7]])))[0, -1]
    assert close(b[0], want) and close(b[1], want)


@pytest.mark.parametrize("kernels", ["torch", "engine"])
def test_cache_move_and_swap_keep_rows_intact(kernels):
    arm = dev_arm()
    shape = ArmShape.from_llama_config(arm.llama_config, tuple(arm.config.attributes))
    runtime = ArmRuntime(arm_weights_for_serving(arm), shape, 4, 32, torch.float32, "cpu", *_kernels(kernels))
    runtime.prefill(0, [1, 2, 3])
    runtime.prefill(1, [1, 9, 8, 7, 6])
    runtime.cache.swap(0, 1)
    runtime.cache.move(0, 3)  # the 5-token row now lives in slot 3, slot 0 is free
    assert runtime.cache.lengths.tolist() == [0, 3, 0, 5]
    h = runtime.decode([3, 1], [4, 4])
    with torch.no_grad():
        want = arm.trunk_hidden(torch.tensor([[1, 9, 8, 7, 6, 4]]))[0, -1]
    assert torch.allclose(h[0], want, atol=1e-4)


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(prepare_default_model())


def _chat_ids(tokenizer, prompt: str) -> list[int]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _normalised(prefs: dict | None) -> list[float] | None:
    if prefs is None:
        return None
    names = ("empathy", "sensitivity", "non_judgmental", "truthfulness", "helpfulness")
    weights = [prefs.get(n, 0.0) for n in names]
    return [w / sum(weights) for w in weights]


def _metric(base_url: str, name: str) -> float:
    """A metric's value summed over its label sets (vLLM labels its series with engine and model name)."""
    text = httpx.get(base_url + "/metrics", timeout=10).text
    if "{" in name:  # an exact series
        match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
        return float(match.group(1)) if match else 0.0
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M))


@pytest.fixture(scope="module")
def server(arm_artifact, tmp_path_factory):
    server = start_server(
        tmp_path_factory.mktemp("guided"),
        [
            "--dtype", "float32",
            "--arm-artifact", str(arm_artifact),
            "--safety-threshold", str(THRESHOLD),
            "--response-threshold", str(RESPONSE_THRESHOLD),
            "--guard-tokens", str(GUARD_TOKENS),
            "--candidate-top-k", str(TOP_K),
            "--max-model-len", "256",
            "--kv-cache-gib", "0.03",
            "--max-num-seqs", "16",
            # The reference decoder has the mask, the guard and the preferences; not the coherence guard or
            # backtracking (tests/test_backtrack.py), so this server returns what the reference does.
            "--no-coherence-guard", "--no-backtrack",
        ],
    )  # fmt: skip
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=server.api_key, max_retries=0)


@pytest.mark.integration
class TestGuidedServer:
    """One float32 server with a tiny KV cache (so the engine must preempt and resume guided requests)."""

    def _chat(self, client, server, prompt: str, prefs: dict | None, max_tokens: int = 40, **extra):
        body = {"prosocial_prefs": prefs} if prefs is not None else {"prosocial_guidance": False}
        return client.chat.completions.create(
            model=server.model,
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0,
            extra_body={**body, **extra},
        )

    def test_mixed_batch_matches_reference_and_survives_preemption(self, client, server, arm_artifact):
        jobs = [(p, prefs) for p in PROMPTS for prefs in PREFS]
        preempted_before = _metric(server.base_url, "vllm:num_preemptions_total")
        with ThreadPoolExecutor(len(jobs)) as pool:
            responses = list(pool.map(lambda job: self._chat(client, server, *job), jobs))
        preemptions = _metric(server.base_url, "vllm:num_preemptions_total") - preempted_before

        from transformers import AutoModelForCausalLM

        from rewardmodel.artifact import load_arm
        from rewardmodel.reference import reference_generate

        tokenizer = _tokenizer()
        base = AutoModelForCausalLM.from_pretrained(prepare_default_model(), torch_dtype=torch.float32).eval()
        arm = load_arm(prepare_default_model(), arm_artifact)
        filtered = 0
        for (prompt, prefs), resp in zip(jobs, responses, strict=True):
            [tokens] = reference_generate(
                base,
                arm,
                [_chat_ids(tokenizer, prompt)],
                _normalised(prefs),
                max_new_tokens=40,
                safety_threshold=THRESHOLD,
                response_threshold=RESPONSE_THRESHOLD,
                guard_tokens=GUARD_TOKENS,
                candidate_top_k=TOP_K,
            )
            # vLLM holds back a trailing incomplete UTF-8 sequence; the plain decode shows it as U+FFFD.
            want = tokenizer.decode(tokens, skip_special_tokens=True).rstrip("\ufffd")
            choice = resp.choices[0]
            info = choice.model_extra["prosocial"]
            assert info["guided"] is (prefs is not None) and info["safety_mask"] is True
            assert resp.usage.completion_tokens == len(tokens), (prompt, prefs)
            if (
                choice.finish_reason == "content_filter"
            ):  # the text is withheld; the reference ended there too
                assert info["content_filtered"] and info["withheld"] and choice.message.content == ""
                assert tokens[-1] == EOS
                filtered += 1
            else:
                assert choice.message.content == want, (prompt, prefs)
        assert 0 < filtered < len(jobs)
        assert preemptions > 0, "the tiny KV cache should have forced preemption and resumption"
        masked = sum(r.choices[0].model_extra["prosocial"]["masked_tokens"] for r in responses)
        assert masked > 0 and _metric(server.base_url, "prosocial_masked_tokens_total") >= masked

    def test_finished_and_aborted_requests_free_their_slots(self, client, server):
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda p: self._chat(client, server, p, {"empathy": 1}, 8), PROMPTS + PROMPTS[:1]))
        body = {
            "model": server.model,
            "messages": [{"role": "user", "content": "Tell me a very long story."}],
            "max_tokens": 200,
            "stream": True,
            "prosocial_prefs": {"helpfulness": 1},
        }
        with httpx.stream(
            "POST",
            server.base_url + "/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {server.api_key}"},
            timeout=60,
        ) as resp:
            for i, _ in enumerate(resp.iter_lines()):
                if i > 6:
                    break
        time.sleep(1.0)
        # The engine takes one more step (without model work) after requests finish or are aborted; its batch
        # update frees their slots. After a probe request, every slot, the probe's own included, is free again.
        self._chat(client, server, "Hi", {"empathy": 1}, 4)
        deadline = time.monotonic() + 10
        while _metric(server.base_url, "prosocial_arm_cache_slots") != 0 and time.monotonic() < deadline:
            time.sleep(0.25)
        assert _metric(server.base_url, "prosocial_arm_cache_slots") == 0

    def test_request_cannot_loosen_or_disable_the_mask(self, client, server):
        attempts = [
            {"prosocial_safety_threshold": THRESHOLD - 5},
            {"vllm_xargs": {"prosocial": {"safety_mask": False}}},
            {"extra_args": {"prosocial": None}},
            {"prosocial_safety_mask": False},
            {"prosocial_prefs": {"empathy": 1, "safety": 0}},
        ]
        for extra in attempts:
            with pytest.raises(openai.BadRequestError):
                self._chat(client, server, PROMPTS[1], {"empathy": 1}, 4, **extra)
        # A stricter threshold is accepted and reported; opting out of preferences keeps the mask.
        strict = self._chat(
            client, server, PROMPTS[1], {"empathy": 1}, 8, prosocial_safety_threshold=THRESHOLD + 0.5
        )
        assert strict.choices[0].model_extra["prosocial"]["safety_threshold"] == pytest.approx(
            THRESHOLD + 0.5
        )
        plain = self._chat(client, server, PROMPTS[1], None, 8)
        assert plain.choices[0].model_extra["prosocial"]["safety_mask"] is True

    def test_response_guard_withholds_what_it_filters_before_release(self, client, server):
        with pytest.raises(openai.BadRequestError) as looser:
            self._chat(
                client,
                server,
                PROMPTS[1],
                {"empathy": 1},
                8,
                prosocial_response_threshold=RESPONSE_THRESHOLD - 1,
            )
        assert looser.value.body["code"] == "safety_floor"
        # A threshold no response can meet: the guard ends the response when it first judges it, at GUARD_TOKENS
        # tokens, and the text held back until then is never shown.
        extra = {"prosocial_prefs": {"empathy": 1}, "prosocial_response_threshold": 100.0}
        body = {
            "model": server.model,
            "messages": [{"role": "user", "content": PROMPTS[0]}],
            "max_tokens": 20,
        }
        strict = client.chat.completions.create(**body, temperature=0, extra_body=extra)
        choice = strict.choices[0]
        assert choice.finish_reason == "content_filter" and choice.message.content == ""
        info = choice.model_extra["prosocial"]
        assert info["withheld"] and info["content_filtered"] and info["response_threshold"] == 100.0
        assert strict.usage.completion_tokens == GUARD_TOKENS + 1  # judged at the next step, which gave EOS
        chunks = [c.choices[0] for c in client.chat.completions.create(**body, stream=True, extra_body=extra)]
        assert "".join(c.delta.content or "" for c in chunks) == ""
        assert (
            chunks[-1].finish_reason == "content_filter" and chunks[-1].model_extra["prosocial"]["withheld"]
        )
        # ignore_eos keeps the row running on EOS after the filter: still content-filtered and withheld, every
        # token confirmed as guided (no 503), whole and streamed.
        running = client.chat.completions.create(
            **body, temperature=0, extra_body=extra | {"ignore_eos": True}
        )
        choice = running.choices[0]
        assert choice.finish_reason == "content_filter" and choice.message.content == ""
        assert choice.model_extra["prosocial"]["withheld"] and running.usage.completion_tokens == 20
        stream = client.chat.completions.create(**body, stream=True, extra_body=extra | {"ignore_eos": True})
        chunks = [c.choices[0] for c in stream]
        assert "".join(c.delta.content or "" for c in chunks) == ""
        assert chunks[-1].finish_reason == "content_filter"
        # Released responses stream the same text as the non-streamed one (this one the guard passes).
        extra = {"prosocial_prefs": {"empathy": 1}}
        body["messages"] = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPTS[0]}]
        whole = (
            client.chat.completions.create(**body, temperature=0, extra_body=extra).choices[0].message.content
        )
        parts = client.chat.completions.create(**body, temperature=0, stream=True, extra_body=extra)
        assert "".join(c.choices[0].delta.content or "" for c in parts if c.choices) == whole and whole

    def test_streaming_carries_transparency_on_the_final_chunk(self, client, server):
        stream = client.chat.completions.create(
            model=server.model,
            messages=[{"role": "user", "content": PROMPTS[0]}],
            max_tokens=12,
            temperature=0,
            stream=True,
            extra_body={"prosocial_prefs": {"empathy": 0.5, "sensitivity": 0.5}},
        )
        finals = [c.choices[0] for c in stream if c.choices and c.choices[0].finish_reason]
        assert len(finals) == 1
        info = finals[0].model_extra["prosocial"]
        assert info["prefs"]["empathy"] == pytest.approx(0.5) and set(info["mean_rewards"]) >= {
            "empathy",
            "safety",
        }


@pytest.mark.integration
def test_arm_load_failure_fails_closed(tmp_path):
    broken = tmp_path / "broken-arm"
    broken.mkdir()
    (broken / "arm_config.json").write_text(json.dumps({"format": "nonsense"}))
    server = start_server(tmp_path, ["--arm-artifact", str(broken)], wait_healthy=False)
    try:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key=server.api_key, max_retries=0)
        with pytest.raises(openai.InternalServerError) as err:  # 503
            client.chat.completions.create(
                model=server.model, messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )
        assert err.value.status_code == 503
        assert err.value.body["code"] in ("guidance_unavailable", "guidance_failed")
        health = httpx.get(server.base_url + "/health", timeout=10)
        assert health.status_code == 503 and health.json()["error"]["code"] == "guidance_unavailable"
    finally:
        server.stop()


@pytest.mark.integration
def test_arm_runtime_error_fails_requests_closed(tmp_path, arm_artifact):
    server = start_server(
        tmp_path, ["--arm-artifact", str(arm_artifact)], extra_env={"PROSOCIAL_ARM_FAULT_AFTER_STEPS": "3"}
    )
    try:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key=server.api_key, max_retries=0)
        with pytest.raises(openai.InternalServerError) as err:
            client.chat.completions.create(
                model=server.model, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=20
            )
        assert err.value.status_code == 503 and err.value.body["code"] == "guidance_failed"
        # The stream variant ends with an error event instead of silently continuing unguided.
        with pytest.raises(openai.APIError):
            stream = client.chat.completions.create(
                model=server.model,
                messages=[{"role": "user", "content": "Hello"}],
                max_tokens=20,
                stream=True,
            )
            for _ in stream:
                pass
        assert _metric(server.base_url, 'prosocial_guidance_failures_total{reason="arm_error"}') >= 1
    finally:
        server.stop()
