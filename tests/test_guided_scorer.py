"""The engine-agnostic lexicographic scorer, on the real ARM runtime (development ARM of the shipped shape)."""

from __future__ import annotations

import pytest
import torch

from rewardmodel.artifact import arm_weights_for_serving
from rewardmodel.runtime import ArmRuntime, ArmShape
from server.guided.scorer import LexicographicScorer
from tests.test_guided_decoding import dev_arm

VOCAB = 49152
EOS = 2


@pytest.fixture(scope="module")
def runtime_factory():
    arm = dev_arm()
    shape = ArmShape.from_llama_config(arm.llama_config, tuple(arm.config.attributes))
    weights = arm_weights_for_serving(arm)
    return lambda: ArmRuntime(weights, shape, slots=4, max_len=64, dtype=torch.float32)


def spec(rid: str, prefs=None, mask=True, threshold=-1.0) -> dict:
    return {
        "request_id": rid,
        "prefs": prefs,
        "safety_mask": mask,
        "safety_threshold": threshold,
        "beta": 1.0,
    }


def logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def test_unguided_rows_are_untouched_and_empty_batches_return_early(runtime_factory):
    messages = []
    scorer = LexicographicScorer(runtime_factory, 4, 32, EOS, messages.append)
    x = logits(3)
    assert torch.equal(scorer.apply(x.clone()), x)  # no guided row: early return, no step message
    assert [m["t"] for m in messages] == ["status"]
    scorer.add(1, spec("a", prefs=[1, 0, 0, 0, 0]), [1, 5, 6], [])
    out = scorer.apply(x.clone())
    assert torch.equal(out[0], x[0]) and torch.equal(out[2], x[2])
    finite = torch.isfinite(out[1])
    assert finite.sum() <= 32 and finite[EOS]  # guided row: base top-k candidates (+EOS) only


def test_eos_survives_a_mask_that_rejects_everything(runtime_factory):
    messages = []
    scorer = LexicographicScorer(runtime_factory, 4, 16, EOS, messages.append)
    scorer.add(0, spec("a", threshold=float("inf")), [1, 5, 6], [])
    out = scorer.apply(logits(1))
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [EOS]
    row = messages[-1]["rows"][0]
    assert row["filtered"] is True and row["masked"] == 15 and row["failed"] is False


def test_preferences_shift_scores_by_the_weighted_rewards(runtime_factory):
    x = logits(1, seed=1).repeat(2, 1)
    plain = LexicographicScorer(runtime_factory, 4, 16, EOS)
    plain.add(0, spec("a", mask=False, prefs=[0, 0, 0, 0, 1]), [1, 7, 8], [])
    plain.add(1, spec("b", mask=False, prefs=[1, 0, 0, 0, 0]), [1, 7, 8], [])
    out = plain.apply(x.clone())
    # Same context, same candidates: the two rows differ only by their preference term.
    cand = torch.isfinite(out[0])
    assert torch.equal(cand, torch.isfinite(out[1]))
    assert not torch.allclose(out[0][cand], out[1][cand])
    assert (out[0][cand] - x[0][cand]).max() <= 0  # log-probs are <= 0: rewards only lower a score


def test_move_and_swap_carry_request_state(runtime_factory):
    messages = []
    scorer = LexicographicScorer(runtime_factory, 4, 16, EOS, messages.append)
    out_a: list[int] = []
    scorer.add(0, spec("a", prefs=[1, 0, 0, 0, 0]), [1, 5, 6], out_a)
    scorer.add(1, spec("b", mask=False, prefs=[0, 1, 0, 0, 0]), [1, 9], [])
    scorer.apply(logits(2))
    scorer.swap(0, 1)
    scorer.move(1, 3)  # "a" now lives in slot 3
    assert scorer.requests[3].request_id == "a" and scorer.requests[0].request_id == "b"
    assert bool(scorer.has_prefs[3]) and scorer.prefs[3].tolist() == [1, 0, 0, 0, 0]
    out_a.append(11)  # the engine appended "a"'s sampled token to its live output list
    scorer.requests[0].output.append(12)
    scorer.apply(logits(4))
    steps = {r["rid"]: r["steps"] for r in messages[-1]["rows"]}
    assert steps == {"a": 2, "b": 2}
    assert int(scorer.runtime.cache.lengths[3]) == 4 and int(scorer.runtime.cache.lengths[1]) == 0
    scorer.remove(3)
    scorer.remove(0)
    assert messages[-2] == {"t": "removed", "rid": "a", "slots": 1}
    assert scorer.active_slots == 0 and messages[-1] == {"t": "removed", "rid": "b", "slots": 0}


def test_runtime_error_fails_rows_closed(runtime_factory):
    messages = []
    scorer = LexicographicScorer(runtime_factory, 4, 16, EOS, messages.append, fault_after_steps=1)
    scorer.add(0, spec("a", prefs=[1, 0, 0, 0, 0]), [1, 5], [])
    scorer.apply(logits(1))
    scorer.requests[0].output.append(9)
    out = scorer.apply(logits(1))
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [EOS]
    assert any(m["t"] == "failure" and m["rids"] == ["a"] for m in messages)
    assert messages[-1]["rows"][0]["failed"] is True


def test_load_failure_reports_not_ready_and_fails_rows():
    messages = []

    def broken():
        raise FileNotFoundError("no artifact")

    scorer = LexicographicScorer(broken, 4, 16, EOS, messages.append)
    assert messages[0] == {
        "t": "status",
        "ready": False,
        "error": "ARM load failed: FileNotFoundError: no artifact",
    }
    scorer.add(0, spec("a"), [1, 5], [])
    out = scorer.apply(logits(1))
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [EOS]


def test_a_preempted_request_resumes_with_its_counts(runtime_factory):
    """vLLM removes a preempted request and adds it back later with the tokens it already emitted."""
    messages = []
    scorer = LexicographicScorer(runtime_factory, 4, 16, EOS, messages.append)
    output: list[int] = []
    scorer.add(0, spec("a", threshold=float("-inf")), [1, 5, 6], output)
    scorer.apply(logits(1))
    output.extend([7, 8])  # two tokens emitted (both confirmed guided), then preempted
    scorer.masked[0] = 3
    scorer.remove(0)
    scorer.add(2, spec("a", threshold=float("-inf")), [1, 5, 6], output)
    assert int(scorer.steps[2]) == 2 and int(scorer.masked[2]) == 3
    scorer.apply(logits(3))
    row = messages[-1]["rows"][0]
    assert row["rid"] == "a" and row["steps"] == 3  # the cache was rebuilt from prompt + output
    assert int(scorer.runtime.cache.lengths[2]) == 5
