"""One sweep point measured with vLLM, in its own process: ``python -m harmvec.measure REQUEST.json RESULT.json``.

Each grid point runs in a fresh process so the engine's memory (weights, KV cache, worker process) is freed
between points. The worker only generates and scores likelihoods; classifying the responses (refusal markers,
XSTest string match, harm judge) happens in the parent (``harmvec.sweep``), so every point is judged by the same
code.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class MeasureRequest:
    """What to run against one model folder."""

    model_dir: str
    harmful_prompts: list[str]
    safe_prompts: list[str]
    benign_chats: list[tuple[str, str]]
    max_tokens: int = 64
    max_model_len: int = 1024
    kv_cache_gib: float = 1.0
    perplexity_max_response_tokens: int = 128
    seed: int = 0

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> MeasureRequest:
        raw = json.loads(path.read_text())
        raw["benign_chats"] = [tuple(pair) for pair in raw["benign_chats"]]
        return cls(**raw)


@dataclass
class MeasureResult:
    """Raw outputs of one point: responses in prompt order and the pooled benign-text likelihood."""

    harmful_responses: list[str]
    safe_responses: list[str]
    perplexity: float
    perplexity_tokens: int
    timings_s: dict[str, float] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> MeasureResult:
        return cls(**json.loads(path.read_text()))


def benign_token_ids(
    tokenizer, prompt: str, response: str, max_response_tokens: int
) -> tuple[list[int], int]:
    """Chat-formatted prompt + response ids, and where the response starts (only it is scored)."""
    prefix = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
    )
    if hasattr(prefix, "keys"):
        prefix = prefix["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"][:max_response_tokens]
    return list(prefix) + list(response_ids), len(prefix)


def _perplexity(llm, request: MeasureRequest) -> tuple[float, int]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    tokenizer = llm.get_tokenizer()
    encoded = [
        benign_token_ids(tokenizer, prompt, response, request.perplexity_max_response_tokens)
        for prompt, response in request.benign_chats
    ]
    encoded = [
        (ids, start) for ids, start in encoded if len(ids) < request.max_model_len and start < len(ids)
    ]
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids, _ in encoded], params, use_tqdm=False)
    nll, count = 0.0, 0
    for (ids, start), output in zip(encoded, outputs, strict=True):
        for position in range(start, len(ids)):
            nll -= output.prompt_logprobs[position][ids[position]].logprob
            count += 1
    return math.exp(nll / max(count, 1)), count


def run_request(request: MeasureRequest) -> MeasureResult:
    """Start vLLM on the folder, answer both prompt sets greedily, score the benign chats."""
    from vllm import LLM, SamplingParams

    timings: dict[str, float] = {}
    started = time.monotonic()
    llm = LLM(
        model=request.model_dir,
        dtype="bfloat16",
        enforce_eager=True,
        max_model_len=request.max_model_len,
        kv_cache_memory_bytes=int(request.kv_cache_gib * 2**30),
        enable_prefix_caching=False,
        seed=request.seed,
    )
    timings["engine_start"] = time.monotonic() - started
    try:
        started = time.monotonic()
        params = SamplingParams(temperature=0.0, max_tokens=request.max_tokens)
        prompts = request.harmful_prompts + request.safe_prompts
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
        texts = [output.outputs[0].text for output in outputs]
        timings["generate"] = time.monotonic() - started

        started = time.monotonic()
        perplexity, tokens = _perplexity(llm, request)
        timings["perplexity"] = time.monotonic() - started
    finally:
        # Stop the engine process now: left to interpreter teardown, it sometimes aborted this process
        # ("terminate called without an active exception") after the result was complete.
        llm.llm_engine.engine_core.shutdown()
    n_harmful = len(request.harmful_prompts)
    return MeasureResult(texts[:n_harmful], texts[n_harmful:], perplexity, tokens, timings)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m harmvec.measure REQUEST.json RESULT.json", file=sys.stderr)
        return 2
    request = MeasureRequest.load(Path(argv[0]))
    result = run_request(request)
    Path(argv[1]).write_text(json.dumps(asdict(result), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
