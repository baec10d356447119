"""vLLM Model Runner V2 logits-processor adapter for the lexicographic scorer (the V1 one is ``v1.py``).

V2 hands a processor less than V1 does, and this adapter fills the gaps:

- **Slots.** ``add_request(slot, params)`` names a persistent slot; the slot may still hold a request that left
  (the scorer parks it, as it does for V1's unlisted removals). Warm-up and unguided requests are declined and
  their slot is freed.
- **Token history.** It lives on the device (``req_states.all_token_ids``), not in live Python lists: the
  prefill tokens (prompt, plus the partial output of a request resumed after preemption) are copied once, when
  ``apply_staged_writes`` follows an admission, then each step the tokens a row gained.
- **Rows.** Reordered every step; mapped to slots through ``ctx.idx_mapping_np`` (the host copy of
  ``idx_mapping``; without speculative decoding, which is refused, ``expanded_idx_mapping`` is the same).
- **Chunked prefill.** A prefill chunk before the last reaches ``apply``, but its sampled token is dropped: such
  rows are left alone until the chunk that completes the prefill.
- **Departures.** V2 does not announce them. A request is taken as gone when its slot is given to another
  request, when it is re-admitted elsewhere (preempted and resumed), or when its slot is missing from
  ``DEPARTED_AFTER_STEPS`` consecutive guided steps; the scorer then publishes ``removed`` so the API's slot gauge
  stays right. A slot that reappears without being re-admitted is the same request (it was only not
  scheduled): it is resumed from the engine's token history, its counters restored, never left unguided.
"""

from __future__ import annotations

import torch
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcessor, LogitsProcRequestState

from server.guided.common import build_scorer, guidance_spec, refuse_speculative_decoding, validate_spec
from server.guided.spec import GuidanceSpec

# Running requests are scheduled every step unless the step's token budget runs out (a long chunked prefill
# ahead of them); 64 steps absent is far past that, and a false departure only costs an ARM cache rebuild.
DEPARTED_AFTER_STEPS = 64


class ProsocialLogitsProcessor(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params) -> None:
        validate_spec(sampling_params)

    def __init__(self, vllm_config, req_states: LogitsProcRequestState) -> None:
        refuse_speculative_decoding(vllm_config)
        self.req_states = req_states
        self.scorer = build_scorer(vllm_config, req_states.device, slots=req_states.max_num_reqs)
        self.specs: dict[
            int, GuidanceSpec
        ] = {}  # slot -> spec of the guided request the engine last admitted there
        self._admitted: dict[
            int, GuidanceSpec
        ] = {}  # admitted this step: their tokens are read after the flush
        self._last_seen: dict[int, int] = {}
        self._step = 0

    def add_request(self, req_idx: int, sampling_params) -> bool:
        spec = guidance_spec(sampling_params)
        self._admitted.pop(req_idx, None)
        if spec is None:  # unguided, or the runner's warm-up (no extra_args): whatever held the slot has left
            self.specs.pop(req_idx, None)
            self.scorer.remove(req_idx)
            return False
        self.specs[req_idx] = self._admitted[req_idx] = spec
        return True

    def apply_staged_writes(self) -> None:
        """Hand the admitted requests to the scorer, with the prefill tokens the runner has just flushed."""
        if not self._admitted:
            return
        slots = list(self._admitted)
        prompt_lens = self.req_states.prompt_len.np[slots].tolist()
        prefill_lens = self.req_states.prefill_len.np[slots].tolist()
        tokens = self.req_states.all_token_ids.gpu[slots, : max(prefill_lens)].tolist()  # one copy for all
        for slot, prompt_len, prefill_len, ids in zip(slots, prompt_lens, prefill_lens, tokens, strict=True):
            spec = self._admitted[slot]
            held = self._slot_of(spec.request_id)
            if held is not None and held != slot:  # preempted at ``held``, resumed here: park it first
                self.scorer.remove(held)
            self.scorer.add(slot, spec, ids[:prompt_len], ids[prompt_len:prefill_len])
            self._last_seen[slot] = self._step
        self._admitted.clear()

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        self._step += 1
        slots = ctx.idx_mapping_np.tolist()
        if len(slots) != logits.shape[0]:
            raise RuntimeError(f"{logits.shape[0]} logits rows for {len(slots)} requests: one each expected")
        seq_lens = ctx.seq_lens_upper_bound_np[: len(slots)].tolist()  # exact without speculative decoding
        prefill_lens = self.req_states.prefill_len.np
        row_slots = [-1] * len(slots)
        reads = []  # (slot, tokens the scorer holds, tokens the engine holds) for rows with new tokens
        for row, (slot, seq_len) in enumerate(zip(slots, seq_lens, strict=True)):
            if slot not in self.specs:  # unguided, declined, or a padding row (negative slot)
                continue
            self._last_seen[slot] = self._step
            if seq_len < prefill_lens[slot]:  # a prefill chunk before the last: its sampled token is dropped
                continue
            row_slots[row] = slot
            request = self.scorer.requests.get(slot)
            known = 0 if request is None else len(request.prompt) + len(request.output)
            if seq_len > known:
                reads.append((slot, known, seq_len))
        self._read_tokens(reads)
        self._forget_departed()
        return self.scorer.apply(logits, row_slots)

    def _read_tokens(self, reads: list[tuple[int, int, int]]) -> None:
        """Copy each row's new tokens from the device in one gather (usually the one token sampled last step)."""
        if not reads:
            return
        index_slots = [slot for slot, known, seq_len in reads for _ in range(known, seq_len)]
        positions = [p for _, known, seq_len in reads for p in range(known, seq_len)]
        flat = self.req_states.all_token_ids.gpu[index_slots, positions].tolist()
        offset = 0
        for slot, known, seq_len in reads:
            new, offset = flat[offset : offset + seq_len - known], offset + seq_len - known
            request = self.scorer.requests.get(slot)
            if request is None:  # taken as departed, but it was only not scheduled: the same request, resumed
                prompt_len = int(self.req_states.prompt_len.np[slot])
                self.scorer.add(slot, self.specs[slot], new[:prompt_len], new[prompt_len:])
            else:
                request.output.extend(new)

    def _slot_of(self, request_id: str) -> int | None:
        return next((s for s, r in self.scorer.requests.items() if r.request_id == request_id), None)

    def _forget_departed(self) -> None:
        cutoff = self._step - DEPARTED_AFTER_STEPS
        for slot in [s for s in self.scorer.requests if self._last_seen.get(s, self._step) < cutoff]:
            self.scorer.remove(slot)
