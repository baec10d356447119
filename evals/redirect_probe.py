"""What a redirect attempt says: today's redirect prompt (preamble + opening) against the redirect adapter.

The backtracking regime (``server.backtrack``) answers a draft the safety filter ended. This probe isolates its
wording, on development prompts, without the ARM (so it measures the text the regime starts from, not the
guided server): both regimes run greedily in one vLLM engine with LoRA enabled, and the outcome judge
(``evals.outcome_judge``) reads every response.

* ``prompted``: the redirect preamble as system message, the reply continuing from the redirect opening and cut
  at its first sentence end (the regime's settings today);
* ``adapter``: the request as the user sent it, under the redirect adapter (``build/redirect-
  adapter-v1``, served by vLLM's LoRA support), up to the regime's token limit, cut back to a sentence end.

Command: ``python -m evals.redirect_probe --sample 16`` (64 prompts, about 2 minutes on 2 CPU cores, after
``prosocial harmvec build --recipe redirect --threads 2``); responses and verdicts go to ``build/redirect_probe/``.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

from harmvec.paths import DEFAULT_REDIRECT_ADAPTER_DIR, REPO_ROOT
from harmvec.sweep import SweepConfig, outcome_prompt_sets
from server.backtrack import DEFAULT_OPENING, DEFAULT_PREAMBLE, end_sentence

SETS = ("harmful", "distress", "xstest_safe", "everyday")
OUT_DIR = REPO_ROOT / "build" / "redirect_probe"


def sentence_trimmed(text: str) -> str:
    """Cut a reply that ran into its token limit back to its last full sentence."""
    text = text.strip()
    ends = [text.rfind(mark) for mark in ".!?"]
    last = max(ends)
    return text[: last + 1] if last > len(text) // 3 else end_sentence(text)


def probe_prompts(sample: int, seed: int) -> list[tuple[str, str]]:
    """(set, prompt): ``sample`` development prompts per set (harmful: the four harmful benchmarks pooled)."""
    harmful, benign = outcome_prompt_sets(SweepConfig())
    rng = random.Random(seed)
    chosen = [("harmful", p) for _, p in rng.sample(harmful, min(sample, len(harmful)))]
    for name in SETS[1:]:
        prompts = [p for s, p in benign if s == name]
        chosen += [(name, p) for p in rng.sample(prompts, min(sample, len(prompts)))]
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m evals.redirect_probe", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--sample", type=int, default=24, help="prompts per set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--adapter", type=Path, default=DEFAULT_REDIRECT_ADAPTER_DIR)
    parser.add_argument("--max-tokens", type=int, default=64, help="the redirect regime's token limit")
    args = parser.parse_args(argv)
    if not (args.adapter / "adapter_config.json").is_file():
        parser.error(
            f"--adapter {args.adapter}: no adapter_config.json (build it: prosocial harmvec build --recipe redirect)"
        )

    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from evals.outcome_judge import load_default_outcome_judge
    from prosocialalign.core.benchmarks import BUILTIN_BENCHMARKS
    from prosocialalign.core.models import prepare_default_model

    rank = json.loads((args.adapter / "adapter_config.json").read_text())["r"]
    llm = LLM(
        str(prepare_default_model()),
        enable_lora=True,
        max_lora_rank=max(8, rank),
        max_loras=1,
        enforce_eager=True,
        enable_chunked_prefill=False,
        max_model_len=2048,
        kv_cache_memory_bytes=1 << 30,
        seed=0,
    )
    tokenizer = llm.get_tokenizer()
    prompts = probe_prompts(args.sample, args.seed)

    def render(messages: list[dict], opening: str = "") -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + opening

    prompted_inputs = [
        render(
            [{"role": "system", "content": DEFAULT_PREAMBLE}, {"role": "user", "content": p}], DEFAULT_OPENING
        )
        for _, p in prompts
    ]
    plain_inputs = [render([{"role": "user", "content": p}]) for _, p in prompts]
    sentence = SamplingParams(
        temperature=0.0,
        max_tokens=args.max_tokens,
        repetition_penalty=1.3,
        stop=[".", "!", "?"],
        include_stop_str_in_output=True,
    )
    whole = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, repetition_penalty=1.3)
    prompted = [
        end_sentence(DEFAULT_OPENING + o.outputs[0].text) for o in llm.generate(prompted_inputs, sentence)
    ]
    lora = LoRARequest("redirect", 1, str(args.adapter.resolve()))
    adapted = [
        sentence_trimmed(o.outputs[0].text) for o in llm.generate(plain_inputs, whole, lora_request=lora)
    ]

    judge = load_default_outcome_judge()
    kinds = ["harmful" if s == "harmful" else BUILTIN_BENCHMARKS[s].outcome_kind for s, _ in prompts]
    texts = [p for _, p in prompts]
    verdicts = {
        "prompted": judge.predict(texts, prompted, kinds),
        "adapter": judge.predict(texts, adapted, kinds),
    }
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    with open(OUT_DIR / "responses.jsonl", "w") as handle:
        for i, (set_name, prompt) in enumerate(prompts):
            row = {"set": set_name, "prompt": prompt}
            for regime, responses in (("prompted", prompted), ("adapter", adapted)):
                v = verdicts[regime][i]
                row[regime] = {"response": responses[i], "verdict": v["verdict"], "kindness": v["kindness"]}
            handle.write(json.dumps(row) + "\n")
    summary = {}
    for regime in verdicts:
        for set_name in SETS:
            rows = [v for (s, _), v in zip(prompts, verdicts[regime], strict=True) if s == set_name]
            if not rows:
                continue
            counts = Counter(v["verdict"] for v in rows)
            summary[f"{regime}/{set_name}"] = {
                "n": len(rows),
                "shares": {k: round(c / len(rows), 3) for k, c in sorted(counts.items())},
                "kindness": round(sum(v["kindness"] for v in rows) / len(rows), 2),
            }
    (OUT_DIR / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
