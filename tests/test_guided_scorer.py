"""The engine-agnostic lexicographic scorer, on the real ARM runtime (development ARM of the shipped shape)."""

from __future__ import annotations

import pytest
import torch

from rewardmodel.artifact import arm_weights_for_serving
from rewardmodel.runtime import ArmRuntime, ArmShape
from server.backtrack import loop_start
from server.guided.scorer import SYMBOL_RUN, LexicographicScorer
from tests.support import dev_arm, spec

VOCAB = 49152
EOS = 2


@pytest.fixture(scope="module")
def runtime_factory():
    arm = dev_arm()
    shape = ArmShape.from_llama_config(arm.llama_config, tuple(arm.config.attributes))
    weights = arm_weights_for_serving(arm)
    return lambda: ArmRuntime(weights, shape, slots=4, max_len=64, dtype=torch.float32)


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
    # With ignore_eos (or min_tokens) the row runs on: EOS only, and every such step is counted as guided.
    scorer.requests[0].output.append(EOS)
    out = scorer.apply(logits(1, seed=3))
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [EOS]
    assert messages[-1]["rows"][0]["steps"] == 2


def test_a_filtered_row_keeps_eos_where_min_tokens_removed_it(runtime_factory):
    """vLLM's min_tokens processor runs first and sets EOS to -inf; the filter must still leave EOS."""
    scorer = LexicographicScorer(runtime_factory, 4, 16, EOS)
    scorer.add(0, spec("a", threshold=float("inf")), [1, 5, 6], [])
    x = logits(1)
    x[0, EOS] = float("-inf")
    out = scorer.apply(x)
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [EOS] and bool(scorer.filtered[0])


def test_preferences_shift_scores_by_the_weighted_rewards(runtime_factory):
    x = logits(1, seed=1).repeat(2, 1)
    plain = LexicographicScorer(runtime_factory, 4, 16, EOS)
    plain.add(0, spec("a", mask=False, prefs=[0, 0, 0, 0, 1]), [1, 7, 8], [])
    plain.add(1, spec("b", mask=False, prefs=[1, 0, 0, 0, 0]), [1, 7, 8], [])
    out = plain.apply(x.clone())
    # Same context, same candidates: the two rows differ only by their preference term.
    cand = torch.isfinite(out[0])
    assert torch.equal(cand, torch.isfinite(out[1]))
    # Each row's shift is its attribute head's log-prob minus the neutral head's, normalised within the candidates.
    ids = cand.nonzero().flatten()
    reference = runtime_factory()
    lp = reference.candidate_log_probs(reference.prefill(0, [1, 7, 8])[None], ids[None])[0]  # [1 + A, K]
    helpfulness, empathy = 1 + plain.attributes.index("helpfulness"), 1 + plain.attributes.index("empathy")
    torch.testing.assert_close(out[0][ids] - x[0][ids], lp[helpfulness] - lp[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[1][ids] - x[1][ids], lp[empathy] - lp[0], atol=1e-4, rtol=0)


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


def _step(scorer, slot: int, output: list[int], seed: int) -> torch.Tensor:
    """One engine step for one row: the scorer's logits, then greedy sampling appends the chosen token."""
    out = scorer.apply(logits(slot + 1, seed))
    output.append(int(out[slot].argmax()))
    return out[slot]


def _guarded_run(runtime_factory, response: float, steps: int = 4) -> tuple[LexicographicScorer, list, list]:
    """Greedy decoding of one row with the response guard judging from 3 tokens on; returns the scorer, the
    emitted tokens and the margin of each (taken from the step that chose it)."""
    scorer = LexicographicScorer(runtime_factory, 4, 16, EOS)
    output: list[int] = []
    scorer.add(0, spec("a", threshold=float("-inf"), response=response, guard_tokens=3), [1, 5, 6], output)
    margins = []
    for step in range(steps):
        row = _step(scorer, 0, output, seed=step)
        if step < 3:
            assert torch.isfinite(row[scorer.prev_cand[0]]).all()  # not judged yet; token threshold -inf
        margins.append(scorer.prev_rewards[0, scorer.safety_index][scorer.prev_cand[0] == output[-1]].item())
    return scorer, output, margins


def test_response_guard_ends_a_response_whose_mean_margin_is_low(runtime_factory):
    """From ``guard_tokens`` tokens on, a response whose emitted tokens' mean safety margin is below the response
    threshold has every candidate but EOS masked; one at or above it is not touched by the guard."""
    scorer, output, margins = _guarded_run(runtime_factory, response=-100.0)
    assert not bool(scorer.filtered[0]) and scorer.reward_count[0] == 3  # the 4th token is credited next step
    assert scorer.reward_sums[0, scorer.safety_index].item() == pytest.approx(sum(margins[:3]), abs=1e-5)
    mean = sum(margins[:3]) / 3
    below, output_below, _ = _guarded_run(runtime_factory, response=mean + 1e-3)
    assert output_below[:3] == output[:3] and output_below[3] == EOS and bool(below.filtered[0])
    above, output_above, _ = _guarded_run(runtime_factory, response=mean - 1e-3)
    assert output_above == output and not bool(above.filtered[0])


def _two_guarded_steps(runtime_factory) -> tuple[LexicographicScorer, list[int], float]:
    """Request "a" at slot 0 after two greedy steps; returns the scorer, its output and the margin sum it will
    have once its last token (sampled, not yet credited) is credited."""
    scorer = LexicographicScorer(runtime_factory, 4, 16, EOS)
    output: list[int] = []
    scorer.add(0, _guarded_spec(), [1, 5, 6], output)
    _step(scorer, 0, output, 0)
    _step(scorer, 0, output, 1)
    last = scorer.prev_rewards[0, scorer.safety_index][scorer.prev_cand[0] == output[-1]].item()
    return scorer, output, scorer.reward_sums[0, scorer.safety_index].item() + last


def _guarded_spec() -> dict:
    return spec("a", threshold=float("-inf"), response=-100.0, guard_tokens=1)


def test_a_preempted_request_keeps_its_guard_sums(runtime_factory):
    """The margin of the token sampled just before preemption is credited when the request resumes."""
    scorer, output, want = _two_guarded_steps(runtime_factory)
    scorer.remove(0)
    scorer.add(3, _guarded_spec(), [1, 5, 6], output)
    assert int(scorer.reward_count[3]) == 2 and scorer.reward_sums[
        3, scorer.safety_index
    ].item() == pytest.approx(want)
    assert int(scorer.steps[3]) == 2


def test_a_request_replaced_in_its_slot_is_parked_like_a_removed_one(runtime_factory):
    """vLLM can hand a preempted request's slot to another request without reporting the removal."""
    scorer, output, sums = _two_guarded_steps(runtime_factory)
    scorer.add(0, spec("b"), [1, 9], [])  # "a" was preempted; "b" takes its slot
    scorer.add(2, _guarded_spec(), [1, 5, 6], output)
    assert scorer.requests[0].request_id == "b" and int(scorer.reward_count[2]) == 2
    assert scorer.reward_sums[2, scorer.safety_index].item() == pytest.approx(sums)


def test_a_request_overwritten_by_a_move_is_parked(runtime_factory):
    """Condensing the batch moves a request into a preempted one's slot, again without reporting the removal."""
    scorer, output, sums = _two_guarded_steps(runtime_factory)
    scorer.add(3, spec("b"), [1, 9], [])
    count = int(scorer.reward_count[0]) + 1  # the last token is credited on resumption
    scorer.move(3, 0)
    assert scorer.requests[0].request_id == "b" and 3 not in scorer.requests
    scorer.add(1, _guarded_spec(), [1, 5, 6], output)
    assert int(scorer.reward_count[1]) == count == 2
    assert scorer.reward_sums[1, scorer.safety_index].item() == pytest.approx(sums)


def _decode_steps(scorer, slot: int, tokens: list[int]) -> list[bool]:
    """Emit ``tokens`` one per step on ``slot`` (as the engine appends them); the row's degenerate flag after
    each step."""
    flags = []
    for token in tokens:
        scorer.apply(logits(slot + 1, seed=len(flags)))
        scorer.requests[slot].output.append(token)
        flags.append(bool(scorer.degenerate[slot]))
    return flags


def test_coherence_guard_ends_a_looping_row_and_leaves_varied_text(runtime_factory):
    messages = []
    scorer = LexicographicScorer(runtime_factory, 4, 16, EOS, messages.append)
    loop = [101, 102, 103, 104] * 4
    scorer.add(0, spec("loop", mask=False, prefs=[1, 0, 0, 0, 0], coherence=True), [1, 5, 6], [])
    scorer.add(1, spec("varied", mask=False, prefs=[1, 0, 0, 0, 0], coherence=True), [1, 5, 6], [])
    scorer.add(2, spec("off", mask=False, prefs=[1, 0, 0, 0, 0], coherence=False), [1, 5, 6], [])
    flags = {0: [], 1: [], 2: []}
    varied = list(range(200, 216))
    for step in range(len(loop)):
        scorer.apply(logits(3, seed=step))
        for slot, token in ((0, loop[step]), (1, varied[step]), (2, loop[step])):
            scorer.requests[slot].output.append(token)
            flags[slot].append(bool(scorer.degenerate[slot]))
    # The third occurrence of the 4-gram is emitted at step 12; the guard sees it at the next step.
    assert flags[0].index(True) == 12 and not any(flags[1]) and not any(flags[2])
    out = scorer.apply(logits(3, seed=99))
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [EOS]  # ended: EOS only
    assert torch.isfinite(out[1]).sum() > 1
    assert messages[-1]["rows"][0]["degenerate"] is True and messages[-1]["rows"][0]["filtered"] is False
    # The API's cut point: the tokens before the loop's first repeat.
    assert loop_start(loop[:12]) == 4


def test_coherence_guard_catches_symbol_runs(runtime_factory):
    symbols = torch.zeros(VOCAB, dtype=torch.bool)
    symbols[300:340] = True  # stand-ins for emoji bytes and punctuation
    scorer = LexicographicScorer(runtime_factory, 4, 16, EOS, symbol_tokens=symbols)
    scorer.add(0, spec("emoji", mask=False, prefs=[1, 0, 0, 0, 0], coherence=True), [1, 5, 6], [7])
    flags = _decode_steps(scorer, 0, list(range(300, 300 + SYMBOL_RUN + 1)))
    assert flags.index(True) == SYMBOL_RUN
    # A resumed request reloads its recent tokens and symbol run from its output list.
    scorer.add(
        1, spec("resumed", mask=False, prefs=[1, 0, 0, 0, 0], coherence=True), [1, 5], list(range(300, 311))
    )
    assert int(scorer.symbol_run[1]) == 11
