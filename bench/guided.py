"""Guided-decoding benchmark, one run, same machine, same prompts, 128 output tokens, concurrency 1 / 8 / 16.

Configurations:
  plain            our server, no logits processor (--no-guidance)
  unguided         processor loaded, requests carry no guidance (--no-safety-mask --default-prefs {}): the early
                   return
  guided           safety mask + every request its own preference vector (as in real serving); the response
                   guard off, see ``main``
  guided_same      safety mask + all requests one shared preference vector
  guided_default   the default guidance (response guard, backtracking), requests ending at EOS: latency only
                   (TTFT = time to the first *released* token; the guard holds the first tokens until judged)
  reference        GenARM-style transformers ``generate`` + a logits processor calling the same ARM; it can only
                   batch requests that share a preference vector, so per-request prefs run one at a time
  reference_same   the same with all requests sharing one vector (one batch)
Also: ARM milliseconds per generated token at 32 vs 512 tokens of context (batch 16), peak RSS of the guided
server's processes during the 16-stream run, and the ARM's cost relative to the base (MACs per token).
Writes ``reports/bench_guided.json``.

    python -m bench.guided [--rounds 1] [--reference-requests 2]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shlex
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from bench.common import bench_prompts, latency_summary, machine, run_load
from prosocialalign.core.fileio import atomic_write_json
from prosocialalign.core.launcher import ServerProcess, free_port, serve_command
from prosocialalign.core.paths import REPORTS_DIR
from rewardmodel.attributes import PROSOCIAL_ATTRIBUTES

SHARED_PREFS = {
    "empathy": 0.4,
    "sensitivity": 0.2,
    "non_judgmental": 0.2,
    "truthfulness": 0.1,
    "helpfulness": 0.1,
}
COMMON_FLAGS = (
    "--dtype",
    "bfloat16",
    "--max-model-len",
    "2048",
    "--max-num-seqs",
    "64",
    "--kv-cache-gib",
    "1",
)


def request_prefs(i: int) -> dict[str, float]:
    """A different preference vector for every request (seeded Dirichlet(1) draw)."""
    rng = random.Random(1000 + i)
    draws = [rng.gammavariate(1.0, 1.0) for _ in PROSOCIAL_ATTRIBUTES]
    return {a: round(d / sum(draws), 4) for a, d in zip(PROSOCIAL_ATTRIBUTES, draws, strict=True)}


class RssSampler:
    """Samples a server's process-tree RSS in the background; keeps the peak."""

    def __init__(self, server: ServerProcess) -> None:
        self.server, self.peak_mb, self._stop = server, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self.server.rss_mb())
            time.sleep(0.2)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def arm_metric(server: ServerProcess, name: str) -> float:
    text = httpx.get(server.base_url + "/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def reference_tok_s(
    prompts: list[str], per_request_prefs: bool, concurrency: int, max_tokens: int, n: int
) -> float:
    """GenARM-style reference: batches only requests that share a preference vector."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prosocialalign.core.models import prepare_default_model
    from rewardmodel.artifact import load_arm
    from rewardmodel.reference import reference_generate
    from server.guided.config import DEFAULT_ARM_ARTIFACT

    base_dir = prepare_default_model()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16).eval()
    arm = load_arm(base_dir, DEFAULT_ARM_ARTIFACT, dtype=torch.bfloat16).eval()
    ids = [
        tokenizer(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            ),
            add_special_tokens=False,
        )["input_ids"]
        for p in prompts
    ]

    def normalised(prefs: dict) -> list[float]:
        return [prefs[a] / sum(prefs.values()) for a in PROSOCIAL_ATTRIBUTES]

    generated, start = 0, time.perf_counter()
    if per_request_prefs:
        for i in range(min(n, len(ids))):  # one request at a time: no two share a vector
            out = reference_generate(
                base, arm, [ids[i]], normalised(request_prefs(i)), max_tokens, ignore_eos=True
            )
            generated += sum(len(t) for t in out)
    else:
        batch = ids[:concurrency]
        out = reference_generate(base, arm, batch, normalised(SHARED_PREFS), max_tokens, ignore_eos=True)
        generated += sum(len(t) for t in out)
    return generated / (time.perf_counter() - start)


def arm_ms_per_token(
    contexts: tuple[int, ...] = (32, 512), batch: int = 16, steps: int = 24, threads: int = 1
) -> dict[str, float]:
    """Wall time of the ARM runtime's decode step (trunk and heads) per row, every row at a given context length.

    With ``threads`` compute threads: vLLM's CPU worker, where the processor runs, keeps one core of this 2-core
    machine for itself and leaves the other to the API process (its log: "Reducing Torch threads from 2 to 1").
    The median step, not the mean: on a shared machine one preempted step would otherwise move the figure.
    """
    from prosocialalign.core.models import prepare_default_model
    from rewardmodel.runtime import ArmRuntime
    from server.guided.config import DEFAULT_ARM_ARTIFACT
    from server.guided.kernels import engine_kernels

    runtime = ArmRuntime.from_artifact(  # as the server builds it: with the engine's kernels
        prepare_default_model(),
        DEFAULT_ARM_ARTIFACT,
        batch,
        1024,
        torch.bfloat16,
        "cpu",
        *engine_kernels(),
    )
    rng = random.Random(0)
    result = {}
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    for context in contexts:
        for slot in range(batch):
            runtime.prefill(slot, [rng.randrange(1000, 40000) for _ in range(context)])
        slots = list(range(batch))
        cand = torch.randint(0, runtime.shape.vocab, (batch, 256))
        runtime.decode(slots, [5] * batch)  # warm-up
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            h = runtime.decode(slots, [rng.randrange(1000, 40000) for _ in slots])
            runtime.candidate_log_probs(h, cand)
            times.append(time.perf_counter() - start)
        result[str(context)] = round(statistics.median(times) * 1000 / batch, 3)
    torch.set_num_threads(previous_threads)
    return result


def macs_ratio(candidate_top_k: int = 256) -> dict[str, float]:
    """ARM vs base multiply-accumulates per generated token (matmuls only; attention over the context excluded)."""
    import json

    from prosocialalign.core.models import prepare_default_model
    from server.guided.config import DEFAULT_ARM_ARTIFACT

    cfg = json.loads((prepare_default_model() / "config.json").read_text())
    arm_cfg = json.loads((DEFAULT_ARM_ARTIFACT / "arm_config.json").read_text())["arm_config"]
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * (cfg.get("head_dim") or h // cfg["num_attention_heads"])
    layer = h * h * 2 + h * kv * 2 + 3 * h * i
    base = cfg["num_hidden_layers"] * layer + v * h
    attributes = len(arm_cfg["attributes"])
    r = arm_cfg["head_rank"]
    arm = arm_cfg["num_layers"] * layer + attributes * 2 * h * r + (attributes + 1) * candidate_top_k * h
    return {"base_macs": base, "arm_macs": arm, "arm_to_base_cost": round(arm / base, 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--reference-requests", type=int, default=2, help="per-request-prefs reference sample"
    )
    parser.add_argument("--out", type=Path, default=REPORTS_DIR / "bench_guided.json")
    args = parser.parse_args(argv)

    prompts = bench_prompts(2 * max(args.concurrency))
    logs = Path(tempfile.mkdtemp(prefix="bench-guided-"))
    servers = {}
    for label, flags in {
        "plain": ("--no-guidance",),
        "unguided": ("--no-safety-mask", "--default-prefs", "{}"),
        # The response guard off: with ignore_eos a row it ends runs on emitting EOS without the ARM, which
        # would flatter the guided figure; every guided row here pays the ARM for all its tokens.
        "guided": ("--no-response-guard",),
        # As served by default (response guard, backtracking): for the time to the first *released* token.
        "guided_default": (),
    }.items():
        port = free_port()
        servers[label] = ServerProcess(
            serve_command(port, *COMMON_FLAGS, *flags), port, logs / f"{label}.log"
        )

    runs: dict[str, dict[int, list]] = {}
    peak_rss = 0.0
    try:
        model = None
        for server in servers.values():
            model = server.start()
            asyncio.run(run_load(server.base_url, model, prompts[:2], 2, 8))  # warm-up
        plans = {
            "plain": (servers["plain"], lambda i: {}),
            "unguided": (servers["unguided"], lambda i: {}),
            "guided": (servers["guided"], lambda i: {"prosocial_prefs": request_prefs(i)}),
            "guided_same_prefs": (servers["guided"], lambda i: {"prosocial_prefs": SHARED_PREFS}),
            # Ends at EOS like a real request (backtracking needs it): latency figures only, no tok/s.
            "guided_default": (
                servers["guided_default"],
                lambda i: {"prosocial_prefs": request_prefs(i), "ignore_eos": False},
            ),
        }
        for round_ in range(args.rounds):
            for c in args.concurrency:
                batch = prompts[: max(2 * c, 4)]
                for label, (server, extra) in plans.items():
                    if label == "guided" and c == max(args.concurrency):
                        with RssSampler(server) as sampler:
                            result = asyncio.run(
                                run_load(server.base_url, model, batch, c, args.max_tokens, "x", extra)
                            )
                        peak_rss = max(peak_rss, sampler.peak_mb)
                    else:
                        result = asyncio.run(
                            run_load(server.base_url, model, batch, c, args.max_tokens, "x", extra)
                        )
                    runs.setdefault(label, {}).setdefault(c, []).append(result)
                    print(f"round {round_} c={c} {label}: {result.summary()}", flush=True)
        arm_seconds = arm_metric(servers["guided"], "prosocial_arm_forward_seconds_sum")
        arm_steps = arm_metric(servers["guided"], "prosocial_arm_forward_seconds_count")
    finally:
        for server in servers.values():
            server.stop()

    reference = {}
    for c in args.concurrency:
        reference[c] = {
            "reference_tok_s": reference_tok_s(prompts, True, c, args.max_tokens, args.reference_requests),
            "reference_same_prefs_tok_s": reference_tok_s(prompts, False, c, args.max_tokens, c),
        }
        print(f"c={c} reference: {reference[c]}", flush=True)

    report: dict = {"concurrency": {}}
    for c in args.concurrency:
        tok = {label: statistics.mean(r.tok_s for r in runs[label][c]) for label in runs}
        del tok["guided_default"]
        entry = {
            "plain_tok_s": round(tok["plain"], 2),
            "unguided_tok_s": round(tok["unguided"], 2),
            "guided_tok_s": round(tok["guided"], 2),
            "guided_same_prefs_tok_s": round(tok["guided_same_prefs"], 2),
            "reference_tok_s": round(reference[c]["reference_tok_s"], 2),
            "reference_same_prefs_tok_s": round(reference[c]["reference_same_prefs_tok_s"], 2),
        }
        entry["ratios"] = {
            "guided_over_plain": round(tok["guided"] / tok["plain"], 3),
            "unguided_over_plain": round(tok["unguided"] / tok["plain"], 3),
            "guided_over_reference": round(tok["guided"] / reference[c]["reference_tok_s"], 2),
            "guided_same_over_reference_same": round(
                tok["guided_same_prefs"] / reference[c]["reference_same_prefs_tok_s"], 2
            ),
        }
        entry["latency_ms"] = {label: latency_summary(runs[label][c]) for label in runs}
        entry["errors"] = sum(r.errors for label in runs for r in runs[label][c])
        entry["content_filtered"] = sum(r.content_filtered for label in runs for r in runs[label][c])
        report["concurrency"][str(c)] = entry
    costs = macs_ratio()
    report.update(
        {
            "arm_ms_per_token": arm_ms_per_token(),
            "peak_rss_mb": round(peak_rss, 1),
            "arm_to_base_cost": costs["arm_to_base_cost"],
            "arm_to_base_detail": costs
            | {"measured_mean_arm_step_ms": round(1000 * arm_seconds / max(arm_steps, 1), 2)},
            "machine": machine(),
            "method": "streaming chat requests, greedy, ignore_eos, 128 tokens; our servers loaded alternately; "
            "the guided server without the response guard (every row pays the ARM for all 128 tokens); "
            "latency_ms: TTFT p50/p95 (request sent -> first content chunk) and inter-token p50 per "
            "configuration; guided_default = the server's default guidance (response guard holding the first "
            "tokens until judged, backtracking), requests ending at EOS, so its TTFT is the time to the first "
            "released token; "
            "reference = transformers generate (bf16) + ReferenceGuidedProcessor with full ARM recompute per step; "
            f"per-request-prefs reference measured on {args.reference_requests} requests run one at a time; "
            "ARM ms per token: the runtime alone with the engine's kernels, one thread as in vLLM's CPU worker",
            "command": "python -m bench.guided " + shlex.join(sys.argv[1:] if argv is None else argv),
        }
    )
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
