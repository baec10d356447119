"""The lexicographic decoding rule, independent of any engine interface.

Every attribute's token-level reward is its head's log-prob relative to the attribute-free (neutral) head,
``r_a(v) = log pi_a(v) - log pi_neutral(v)`` (ARM log-probs normalised within the candidates): what the
attribute's adapter adds, without the fluency prior that every head shares with the ARM's truncated trunk (the
statistic the evaluation's ARM scorer reports). Per guided row and step:
1. candidates: the base model's top-k tokens, EOS always included; everything else is removed;
2. hard constraint: a candidate gets ``-inf`` when its safety margin ``r_safety(v)`` is below the request's token
   threshold; and every candidate does once the response has ``guard_tokens`` tokens whose mean margin is below
   the response threshold (the *response guard*: the ARM's safety reward of the response so far, which tells
   harmful from safe text far better than one token's margin does; no continuation of an unsafe response is
   safe). EOS is never masked, so a row always keeps a candidate, and a row left with only EOS is
   *content-filtered*; filtered before the guard passed its first ``guard_tokens`` tokens, its text is *withheld*
   (the API holds them back until then);
3. within the safe set: ``base_logit(v) + (1/beta) * sum_i w_i * r_i(v)`` over the five prosocial attributes
   (under the coherence guard, never above 0 for a symbol token: the term cannot push a row into emoji runs);
4. coherence guard: a row whose emitted tokens loop (its last 4 tokens occurred twice before in its last
   ``RECENT_TOKENS``, or its last 8 tokens once before) or run into symbols (``SYMBOL_RUN`` tokens in a row with no
   letter or digit: emoji, punctuation, whitespace) is ended like a filtered one and flagged *degenerate*, so the
   API can backtrack it. One comparison of the row's recent tokens with themselves per step, for all rows at once.

State lives in tensors indexed by batch slot (vLLM style); an adapter maps an engine's batch bookkeeping onto
``add`` / ``remove`` / ``move`` / ``swap`` and calls ``apply`` once per step.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from rewardmodel.attributes import ALL_ATTRIBUTES, PROSOCIAL_ATTRIBUTES, SAFETY_ATTRIBUTE
from server.guided.spec import GuidanceSpec

logger = logging.getLogger(__name__)

NEG_INF = float("-inf")
PARKED_LIMIT = 1024  # stats kept for requests that left the batch, in case they were preempted and come back
RECENT_TOKENS = 96  # the coherence guard looks for repeats among a row's last emitted tokens
LOOP_NGRAMS = ((4, 3), (8, 2))  # (n, occurrences): the last n tokens occurring this often is a loop
SYMBOL_RUN = 12  # this many tokens in a row without a letter or digit is degenerate


def symbol_token_mask(decoded: list[str]) -> Tensor:
    """[vocab] bool from each token's decoded text: True where it has no letter or digit (emoji bytes,
    punctuation, whitespace), for the coherence guard's symbol-run rule."""
    return torch.tensor([not any(ch.isalnum() for ch in text) for text in decoded], dtype=torch.bool)


@dataclass
class RowRequest:
    """The Python-side part of a slot: identity and token lists (``output`` grows in place as the engine decodes)."""

    request_id: str
    prompt: list[int]
    output: list[int]


class LexicographicScorer:
    def __init__(
        self,
        runtime_factory: Callable[[], object],
        slots: int,
        candidate_top_k: int,
        eos_token_id: int,
        publish: Callable[[dict], None] = lambda message: None,
        fault_after_steps: int | None = None,
        symbol_tokens: Tensor | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.slots = slots
        self.device = torch.device(device)  # the engine's: per-slot state lives beside the logits and the ARM
        self.k = candidate_top_k
        self.eos = eos_token_id
        self.publish = publish
        self.fault_after_steps = fault_after_steps
        # [vocab] bool: tokens with no letter or digit (None: the symbol-run rule is off)
        self.symbol_tokens = symbol_tokens
        self.total_steps = 0
        self.error: str | None = None
        try:
            self.runtime = runtime_factory()
        except Exception as exc:  # fail closed: guided requests will end with a guidance failure
            logger.exception("the ARM could not be loaded")
            self.runtime, self.error = None, f"ARM load failed: {type(exc).__name__}: {exc}"
        attrs = self.runtime.shape.attributes if self.runtime is not None else ALL_ATTRIBUTES
        if self.runtime is not None and set(attrs) != set(ALL_ATTRIBUTES):
            self.runtime, self.error = None, f"ARM attributes {attrs} differ from {ALL_ATTRIBUTES}"
        self.attributes = tuple(attrs)
        # Indices into the per-attribute rewards (the runtime's rows 1.. minus its row 0, the neutral head).
        self.pref_index = [self.attributes.index(a) for a in PROSOCIAL_ATTRIBUTES]
        self.safety_index = self.attributes.index(SAFETY_ATTRIBUTE)
        publish({"t": "status", "ready": self.error is None, "error": self.error})

        A = len(self.attributes)
        self.requests: dict[int, RowRequest] = {}
        self._parked: OrderedDict[str, tuple] = OrderedDict()
        # Per-request state, one row per slot, declared once: every tensor moves with its request (``_per_slot``);
        # the counters are also parked when a request leaves the batch and restored if it was preempted.
        self._per_slot: list[Tensor] = []
        self._counters: list[Tensor] = []

        def per_slot(*tail: int, dtype=torch.float32, fill: float = 0, counter: bool = False) -> Tensor:
            tensor = torch.full((slots, *tail), fill, dtype=dtype, device=self.device)
            self._per_slot.append(tensor)
            if counter:
                self._counters.append(tensor)
            return tensor

        long, flag = torch.long, torch.bool
        self.prefs = per_slot(len(PROSOCIAL_ATTRIBUTES))
        self.has_prefs = per_slot(dtype=flag)
        self.mask_on = per_slot(dtype=flag)
        self.threshold = per_slot()
        self.inv_beta = per_slot(fill=1.0)
        self.steps = per_slot(dtype=long, counter=True)
        self.masked = per_slot(dtype=long, counter=True)
        self.filtered = per_slot(dtype=flag, counter=True)
        self.failed = per_slot(dtype=flag, counter=True)
        # Rewards of the emitted tokens credited so far, per attribute; the response guard's running mean margin
        # is reward_sums[:, safety_index] / reward_count.
        self.reward_sums = per_slot(A, counter=True)
        self.reward_count = per_slot(dtype=long, counter=True)
        self.response_threshold = per_slot()
        self.guard_tokens = per_slot(dtype=long)  # 0: no response guard for this row
        self.withheld = per_slot(dtype=flag, counter=True)
        self.coherence_on = per_slot(dtype=flag)
        self.degenerate = per_slot(dtype=flag, counter=True)
        # The last emitted tokens, oldest first, and the current run of symbol tokens (the coherence guard).
        self.recent = per_slot(RECENT_TOKENS, dtype=long, fill=-1)
        self.symbol_run = per_slot(dtype=long)
        # Last step's candidates and their rewards, to credit the one each row emitted.
        self.prev_cand = per_slot(self.k, dtype=long, fill=-1, counter=True)
        self.prev_rewards = per_slot(A, self.k, counter=True)

    # ------------------------------------------------------------------------------------ batch bookkeeping
    def add(self, slot: int, spec: GuidanceSpec, prompt: list[int], output: list[int]) -> None:
        """A request joins at ``slot`` (new, or resumed after preemption: its cache is rebuilt from the lists)."""
        # vLLM can give a removed request's slot to a new one without listing it as removed
        # (``BatchUpdateBuilder.pop_removed``): park it.
        if slot in self.requests:
            self.remove(slot)
        self.requests[slot] = RowRequest(spec.request_id, list(prompt), output)
        prefs = spec.prefs
        self.has_prefs[slot] = prefs is not None
        self.prefs[slot] = torch.tensor(prefs if prefs is not None else [0.0] * len(PROSOCIAL_ATTRIBUTES))
        self.mask_on[slot] = spec.safety_mask
        self.threshold[slot] = spec.safety_threshold
        self.inv_beta[slot] = 1.0 / spec.beta
        guard = spec.response_threshold
        self.response_threshold[slot] = guard if guard is not None else 0.0
        self.guard_tokens[slot] = spec.guard_tokens if guard is not None else 0
        self.coherence_on[slot] = spec.coherence_guard
        for t in self._counters:
            t[slot] = 0
        # A request resumed after preemption: the tokens it already emitted were guided (and confirmed) before.
        parked = self._parked.pop(spec.request_id, None) if output else None
        if parked is not None:
            for t, value in zip(self._counters, parked, strict=True):
                t[slot] = value
            # The last token was sampled after the last step (so not credited yet): credit it now.
            if len(output) == int(self.steps[slot]):
                self._credit_emitted([slot], [output[-1]])
        self.steps[slot] = len(output)
        self.prev_cand[slot] = -1
        self._remember(slot, output)
        if self.runtime is not None:
            self.runtime.cache.free(slot)

    def remove(self, slot: int) -> None:
        request = self.requests.pop(slot, None)
        if request is not None:
            self._parked[request.request_id] = tuple(t[slot].clone() for t in self._counters)
            while len(self._parked) > PARKED_LIMIT:
                self._parked.popitem(last=False)
            # The absolute count, not a decrement: the API's gauge then always equals the slots held here.
            self.publish({"t": "removed", "rid": request.request_id, "slots": self.active_slots})
        if self.runtime is not None:
            self.runtime.cache.free(slot)

    def move(self, src: int, dst: int) -> None:
        # dst held a request vLLM removed without listing it (condensing the batch fills the hole): park it.
        if dst in self.requests:
            self.remove(dst)
        if src in self.requests:
            self.requests[dst] = self.requests.pop(src)
        for t in self._per_slot:
            t[dst] = t[src]
        if self.runtime is not None:
            self.runtime.cache.move(src, dst)

    def swap(self, a: int, b: int) -> None:
        ra, rb = self.requests.pop(a, None), self.requests.pop(b, None)
        if ra is not None:
            self.requests[b] = ra
        if rb is not None:
            self.requests[a] = rb
        for t in self._per_slot:
            t[[a, b]] = t[[b, a]]
        if self.runtime is not None:
            self.runtime.cache.swap(a, b)

    @property
    def active_slots(self) -> int:
        return len(self.requests)

    # ------------------------------------------------------------------------------------------- the step
    def apply(self, logits: Tensor, row_slots: list[int] | None = None) -> Tensor:
        """Guide the held requests' rows in place. Row i is slot i (vLLM's V1 runner) unless ``row_slots`` gives
        each row's slot (-1: leave the row alone), for an engine that orders rows anew every step (V2)."""
        if row_slots is None:
            rows, by_slot = sorted(s for s in self.requests if s < logits.shape[0]), logits
        else:
            picked = sorted((s, i) for i, s in enumerate(row_slots) if s in self.requests)
            rows = [s for s, _ in picked]
        if not rows:
            return logits
        if row_slots is not None:  # the rule indexes logits by slot: guide a slot-indexed copy of these rows
            where = torch.tensor([i for _, i in picked], device=logits.device)
            by_slot = logits.new_empty(rows[-1] + 1, logits.shape[1])
            by_slot[rows] = logits[where]
        start = time.perf_counter()
        try:
            if self.runtime is None:
                raise RuntimeError(self.error or "ARM unavailable")
            self._guide(by_slot, rows)
        except Exception as exc:
            logger.exception("guidance failed for %d rows; ending them (fail closed)", len(rows))
            self._fail(by_slot, rows, f"{type(exc).__name__}: {exc}")
        if row_slots is not None:
            logits[where] = by_slot[rows]
        self._publish_step(rows, time.perf_counter() - start)
        return logits

    def _guide(self, logits: Tensor, rows: list[int]) -> None:
        ended = (self.failed | self.filtered | self.degenerate)[torch.tensor(rows)].tolist()  # one read
        if any(ended):
            # Failed or filtered rows only get EOS until they finish. That is one step when EOS stops them; with
            # ``ignore_eos`` they run on, and each of those steps counts as guided (the API confirms every token
            # it releases).
            ended_t = torch.tensor([s for s, e in zip(rows, ended, strict=True) if e])
            self._only_eos(logits, ended_t)
            self.steps[ended_t] += 1
            rows = [s for s, e in zip(rows, ended, strict=True) if not e]
            if not rows:
                return
        self.total_steps += 1
        if self.fault_after_steps is not None and self.total_steps > self.fault_after_steps:
            raise RuntimeError("injected ARM fault (fault_after_steps)")
        hidden = self._advance_caches(rows)
        slot_t = torch.tensor(rows)
        # The rows' logits, edited in place: a view when the rows are consecutive (the usual batch), else a copy
        # written back at the end.
        in_place = logits.dtype == torch.float32 and rows[-1] - rows[0] == len(rows) - 1  # sorted, distinct
        block = logits[rows[0] : rows[0] + len(rows)] if in_place else logits[slot_t].float()
        eos_logit = block[:, self.eos].clone()
        block[:, self.eos] = float("inf")  # EOS is always a candidate
        cand = torch.topk(block, self.k, dim=-1).indices  # [R, K]
        block[:, self.eos] = eos_logit
        lp = self.runtime.candidate_log_probs(hidden.to(self.runtime.dtype), cand)  # [R, 1 + A, K]
        rewards = lp[:, 1:, :] - lp[:, :1, :]  # [R, A, K]: each attribute's head against the neutral head

        score = block.gather(1, cand)
        reward = torch.einsum("rp,rpk->rk", self.prefs[slot_t], rewards[:, self.pref_index, :])
        if self.symbol_tokens is not None:
            # Under the coherence guard the preference term may not push toward emoji, punctuation or
            # whitespace: it is what turned replies to distressed people into emoji runs.
            bounded = self.symbol_tokens[cand] & self.coherence_on[slot_t, None]
            reward = torch.where(bounded, reward.clamp(max=0.0), reward)
        score = score + torch.where(self.has_prefs[slot_t, None], self.inv_beta[slot_t, None] * reward, 0.0)
        margin = rewards[:, self.safety_index, :]
        is_eos = cand == self.eos
        emitted = self.steps[slot_t]  # tokens the row has emitted before this step
        guard = self.guard_tokens[slot_t]
        mean_margin = self.reward_sums[slot_t, self.safety_index] / self.reward_count[slot_t].clamp(min=1)
        tripped = (guard > 0) & (emitted >= guard) & (mean_margin < self.response_threshold[slot_t])
        unsafe = (margin < self.threshold[slot_t, None]) | tripped[:, None]
        masked = unsafe & ~is_eos & self.mask_on[slot_t, None]
        filtered = (masked | is_eos).all(1) & self.mask_on[slot_t]
        degenerate = self._degenerate(slot_t) & ~filtered
        masked |= degenerate[:, None] & ~is_eos
        score.masked_fill_(masked, NEG_INF)  # score is this step's own tensor: edited in place
        # A filtered row keeps EOS even where an earlier processor (vLLM's min_tokens) set it to -inf.
        score.masked_fill_(is_eos & (filtered | degenerate)[:, None] & score.isneginf(), 0.0)

        block.fill_(NEG_INF)
        block.scatter_(1, cand, score)
        if not in_place:
            logits[slot_t] = block.to(logits.dtype)

        self.steps[slot_t] += 1
        self.masked[slot_t] += masked.sum(1)
        self.withheld[slot_t] |= filtered & ~self.filtered[slot_t] & (emitted <= guard)
        self.filtered[slot_t] |= filtered
        self.degenerate[slot_t] |= degenerate
        self.prev_cand[slot_t] = cand
        self.prev_rewards[slot_t] = rewards

    def _advance_caches(self, rows: list[int]) -> Tensor:
        """Feed every row's not-yet-seen tokens to the ARM; returns each row's last hidden state [R, H]."""
        hidden: dict[int, Tensor] = {}
        decode_slots, decode_tokens = [], []
        fed_counts = self.runtime.cache.lengths[torch.tensor(rows)].tolist()  # one read, not one per row
        for slot, fed in zip(rows, fed_counts, strict=True):
            request = self.requests[slot]
            if fed > 0 and len(request.prompt) + len(request.output) - fed == 1:
                decode_slots.append(slot)
                decode_tokens.append(request.output[-1])
            else:  # joined or resumed: (re)build the cache from the token lists (add() emptied the slot)
                hidden[slot] = self.runtime.extend(slot, (request.prompt + request.output)[fed:])
        if decode_slots:
            self._credit_emitted(decode_slots, decode_tokens)
            self._push_recent(torch.tensor(decode_slots), torch.tensor(decode_tokens, device=self.device))
            for slot, h in zip(decode_slots, self.runtime.decode(decode_slots, decode_tokens), strict=True):
                hidden[slot] = h
        return torch.stack([hidden[s] for s in rows])

    def _credit_emitted(self, slots: list[int], tokens: list[int]) -> None:
        """Add the rewards (from the previous step) of the token each row just emitted to its totals."""
        slot_t, token_t = torch.tensor(slots), torch.tensor(tokens, device=self.device)
        match = self.prev_cand[slot_t] == token_t[:, None]  # [R, K]
        found = match.any(1)
        self.reward_sums[slot_t] += (self.prev_rewards[slot_t] * match[:, None, :]).sum(-1)  # [R, A]
        self.reward_count[slot_t] += found.long()

    def _remember(self, slot: int, output: list[int]) -> None:
        """Load a (re)joining row's recent tokens and symbol run from its output so far."""
        tail = output[-RECENT_TOKENS:]
        self.recent[slot] = -1
        if tail:
            self.recent[slot, RECENT_TOKENS - len(tail) :] = torch.tensor(tail, device=self.device)
        run = 0
        if self.symbol_tokens is not None:
            for token in reversed(tail):
                if not self.symbol_tokens[token]:
                    break
                run += 1
        self.symbol_run[slot] = run

    def _push_recent(self, slot_t: Tensor, token_t: Tensor) -> None:
        self.recent[slot_t] = torch.cat([self.recent[slot_t, 1:], token_t[:, None]], dim=1)
        if self.symbol_tokens is not None:
            is_symbol = self.symbol_tokens[token_t]
            self.symbol_run[slot_t] = torch.where(is_symbol, self.symbol_run[slot_t] + 1, 0)

    def _degenerate(self, slot_t: Tensor) -> Tensor:
        """[R] bool: the coherence guard's verdict on each row's emitted tokens (vectorised over rows)."""
        recent = self.recent[slot_t]  # [R, W]
        looping = torch.zeros(len(slot_t), dtype=torch.bool, device=self.device)
        for n, times in LOOP_NGRAMS:
            windows = recent.unfold(1, n, 1)  # [R, W - n + 1, n]
            last = windows[:, -1:, :]
            seen = ((windows == last).all(-1) & (last >= 0).all(-1)).sum(1)
            looping |= seen >= times
        return (looping | (self.symbol_run[slot_t] >= SYMBOL_RUN)) & self.coherence_on[slot_t]

    def _only_eos(self, logits: Tensor, slot_t: Tensor) -> None:
        eos_values = logits[slot_t, self.eos].clone()
        logits[slot_t] = NEG_INF
        logits[slot_t, self.eos] = torch.nan_to_num(eos_values, neginf=0.0)

    def _fail(self, logits: Tensor, rows: list[int], reason: str) -> None:
        slot_t = torch.tensor(rows)
        self.failed[slot_t] = True
        self._only_eos(logits, slot_t)
        self.publish({"t": "failure", "reason": reason, "rids": [self.requests[s].request_id for s in rows]})

    # ------------------------------------------------------------------------------------------- telemetry
    def _publish_step(self, rows: list[int], seconds: float) -> None:
        slot_t = torch.tensor(rows)
        means = (self.reward_sums[slot_t] / self.reward_count[slot_t, None].clamp(min=1)).tolist()
        # One read per tensor for the whole batch, not one per row.
        counts, steps, masked = (t[slot_t].tolist() for t in (self.reward_count, self.steps, self.masked))
        filtered, withheld, failed, degenerate = (
            t[slot_t].tolist() for t in (self.filtered, self.withheld, self.failed, self.degenerate)
        )
        self.publish(
            {
                "t": "step",
                "arm_s": seconds,
                "batch": len(rows),
                "slots": self.active_slots,
                "rows": [
                    {
                        "rid": self.requests[s].request_id,
                        "steps": steps[i],
                        "masked": masked[i],
                        "filtered": filtered[i],
                        "withheld": withheld[i],
                        "degenerate": degenerate[i],
                        "failed": failed[i],
                        "rewards": dict(zip(self.attributes, means[i], strict=True)) if counts[i] else None,
                    }
                    for i, s in enumerate(rows)
                ],
            }
        )
