"""Serving benchmark: our server vs vLLM's own OpenAI server vs vLLM's offline ``LLM``, in one run.

Same model folder, same prompts (Vicuna-bench), 128 output tokens per request (ignore_eos), greedy, streaming
clients at concurrency 1 / 8 / 16. Both servers run side by side and are loaded in alternation, round after
round, so drift in a shared machine hits both alike. Writes ``reports/bench_serving.json``.

    python -m bench.serving [--rounds 2] [--out reports/bench_serving.json]
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import bench_prompts, latency_summary, machine, run_load, vllm_serve_command
from prosocialalign.core.fileio import atomic_write_json
from prosocialalign.core.launcher import ServerProcess, free_port, serve_command
from prosocialalign.core.paths import REPORTS_DIR

ENGINE_FLAGS = {"dtype": "bfloat16", "max_model_len": 2048, "max_num_seqs": 64, "kv_cache_gib": 1.0}


def offline_tok_s(
    model_dir: Path, prompts: list[str], concurrency: list[int], max_tokens: int
) -> dict[int, float]:
    """vLLM's offline engine on the same prompts, ``c`` prompts per ``generate`` call."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(model_dir),
        dtype=ENGINE_FLAGS["dtype"],
        max_model_len=ENGINE_FLAGS["max_model_len"],
        max_num_seqs=ENGINE_FLAGS["max_num_seqs"],
        kv_cache_memory_bytes=int(ENGINE_FLAGS["kv_cache_gib"] * 2**30),
        enforce_eager=True,
    )
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    llm.chat(conversations[:2], params, use_tqdm=False)  # warm-up
    results = {}
    for c in concurrency:
        batch = conversations[: max(2 * c, 4)]
        start = time.perf_counter()
        tokens = 0
        for i in range(0, len(batch), c):
            outs = llm.chat(batch[i : i + c], params, use_tqdm=False)
            tokens += sum(len(o.outputs[0].token_ids) for o in outs)
        results[c] = tokens / (time.perf_counter() - start)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="alternating measurement rounds per level")
    parser.add_argument("--out", type=Path, default=REPORTS_DIR / "bench_serving.json")
    args = parser.parse_args(argv)

    from prosocialalign.core.models import DEFAULT_MODEL_NAME, prepare_default_model

    model_dir = prepare_default_model()
    name = DEFAULT_MODEL_NAME
    prompts = bench_prompts(2 * max(args.concurrency))
    logs = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    f = ENGINE_FLAGS
    ours_port = free_port()
    ours = ServerProcess(
        serve_command(
            ours_port,
            *("--model", str(model_dir), "--served-model-name", name, "--no-guidance"),
            *("--dtype", f["dtype"], "--max-model-len", str(f["max_model_len"])),
            *("--max-num-seqs", str(f["max_num_seqs"]), "--kv-cache-gib", str(f["kv_cache_gib"])),
        ),
        port=ours_port,
        log_path=logs / "ours.log",
    )
    vllm_port = free_port()
    peer = ServerProcess(
        vllm_serve_command(
            vllm_port,
            model_dir,
            name,
            *("--dtype", f["dtype"], "--max-model-len", str(f["max_model_len"])),
            *("--max-num-seqs", str(f["max_num_seqs"]), "--enforce-eager"),
            *("--kv-cache-memory-bytes", str(int(f["kv_cache_gib"] * 2**30))),
        ),
        port=vllm_port,
        log_path=logs / "vllm_serve.log",
    )
    results: dict[str, dict[int, list]] = {"ours": {}, "vllm_serve": {}}
    try:
        for server in (ours, peer):
            server.start()
            asyncio.run(run_load(server.base_url, name, prompts[:2], 2, 16))  # warm-up
        for round_ in range(args.rounds):
            for c in args.concurrency:
                batch = prompts[: max(2 * c, 4)]
                for label, server in (("ours", ours), ("vllm_serve", peer)):
                    result = asyncio.run(run_load(server.base_url, name, batch, c, args.max_tokens))
                    results[label].setdefault(c, []).append(result)
                    print(f"round {round_} c={c} {label}: {result.summary()}", flush=True)
    finally:
        ours.stop()
        peer.stop()
    offline = offline_tok_s(model_dir, prompts, args.concurrency, args.max_tokens)

    report: dict = {"concurrency": {}}
    for c in args.concurrency:
        ours_runs, peer_runs = results["ours"][c], results["vllm_serve"][c]
        ours_tok = statistics.mean(r.tok_s for r in ours_runs)
        peer_tok = statistics.mean(r.tok_s for r in peer_runs)
        report["concurrency"][str(c)] = {
            "ours_tok_s": round(ours_tok, 2),
            "vllm_serve_tok_s": round(peer_tok, 2),
            "offline_tok_s": round(offline[c], 2),
            "ours_vs_vllm_serve": round(ours_tok / peer_tok, 3),
            **latency_summary(ours_runs),
            **latency_summary(peer_runs, "vllm_serve_"),
            "ttft_p50_vs_vllm_serve": round(
                latency_summary(ours_runs)["ttft_p50_ms"] / latency_summary(peer_runs)["ttft_p50_ms"], 3
            ),
            "errors": sum(r.errors for r in ours_runs + peer_runs),
            "requests_per_round": ours_runs[0].requests,
        }
    report.update(
        {
            "machine": machine(),
            "model": f"{name} ({f['dtype']}, enforce_eager, max_num_seqs {f['max_num_seqs']})",
            "output_tokens_per_request": args.max_tokens,
            "rounds": args.rounds,
            "method": "streaming chat requests, greedy, ignore_eos; servers loaded alternately; "
            "tok/s = completion tokens / wall time of the level; offline = LLM.chat with c prompts per call; "
            "TTFT = request sent -> first content chunk, ITL = gaps between later content chunks, percentiles "
            "over every request of every round",
            "command": "python -m bench.serving " + shlex.join(sys.argv[1:] if argv is None else argv),
        }
    )
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
