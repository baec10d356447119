"""The ARM runtime's decode step alone, as vLLM's CPU worker runs it: one thread, batch 16, the engine's matrix
product and paged attention, with the trunk's small operations from PyTorch (``TorchTrunkOps``) or from vLLM's fused
CPU kernels (``VllmCpuTrunkOps``, what the server uses), side by side in one process, steps interleaved.

At each context length it reports the median step (trunk + heads on 256 candidates) per configuration, and the
attention kernel's own time for that batch and context, so the growth from 32 to 512 tokens can be set against it.
Beside the kernel, the memory floor of the same work (the time one thread takes just to read as many bytes as the
keys and values the kernel must read) and the kernel's arithmetic rate (two multiply-adds per query head, position
and channel: scores and weighted values). Writes ``reports/bench_arm_step.json``.

    python -m bench.arm_step
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.common import machine
from prosocialalign.core.fileio import atomic_write_json
from prosocialalign.core.paths import REPORTS_DIR


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 3)


def measure(contexts: tuple[int, ...], batch: int, steps: int) -> dict:
    from prosocialalign.core.models import prepare_default_model
    from rewardmodel.runtime import ArmRuntime, TorchTrunkOps, _Step
    from server.guided.config import DEFAULT_ARM_ARTIFACT
    from server.guided.kernels import engine_kernels

    linear, attention, engine_ops = engine_kernels()
    base = prepare_default_model()
    runtimes = {
        name: ArmRuntime.from_artifact(
            base,
            DEFAULT_ARM_ARTIFACT,
            batch,
            max(contexts) + steps + 8,
            torch.bfloat16,
            "cpu",
            linear,
            attention,
            ops,
        )
        for name, ops in (("torch_ops", TorchTrunkOps), ("engine_ops", engine_ops))
    }
    rng = random.Random(0)
    candidates = torch.randint(0, 49152, (batch, 256))
    result: dict = {}
    for context in contexts:
        prompts = [[rng.randrange(1000, 40000) for _ in range(context)] for _ in range(batch)]
        for runtime in runtimes.values():
            for slot, prompt in enumerate(prompts):
                runtime.prefill(slot, prompt)
        times: dict[str, list[float]] = {name: [] for name in runtimes}
        attention_times: list[float] = []
        slots = list(range(batch))
        for _ in range(steps):
            tokens = [rng.randrange(1000, 40000) for _ in slots]
            for name, runtime in runtimes.items():
                start = time.perf_counter()
                hidden = runtime.decode(slots, tokens)
                runtime.candidate_log_probs(hidden, candidates)
                times[name].append(time.perf_counter() - start)
        # The attention kernel alone, one layer, on the engine-ops runtime's cache as it now stands.
        runtime = runtimes["engine_ops"]
        shape = runtime.shape
        slot_t = torch.arange(batch)
        positions = runtime.cache.lengths[slot_t][:, None] - 1
        plan = runtime.attention.plan(runtime.cache, slot_t, positions)
        q = torch.randn(batch, 1, shape.heads, shape.head_dim, dtype=torch.bfloat16)
        kv = torch.randn(batch, 1, shape.kv_heads, shape.head_dim, dtype=torch.bfloat16)
        step = _Step(slots=slot_t, positions=positions, plan=plan)
        for _ in range(steps):
            start = time.perf_counter()
            for layer in range(shape.num_layers):
                runtime.attention(runtime.cache, layer, step, q, kv, kv)
            attention_times.append(time.perf_counter() - start)
        result[str(context)] = {
            **{f"{name}_step_ms": _median_ms(samples) for name, samples in times.items()},
            "attention_all_layers_ms": _median_ms(attention_times),
            **_attention_floors(runtime, steps, _median_ms(attention_times)),
        }
    return result


def _attention_floors(runtime, steps: int, attention_ms: float) -> dict:
    """What the attention kernel must read per step, how fast one thread can merely read that many bytes, and the
    kernel's arithmetic rate: is the growth with context a memory limit or the kernel's own?"""
    cache, shape = runtime.cache, runtime.shape
    length = int(cache.lengths.max())
    read_bytes = 2 * shape.num_layers * cache.slots * shape.kv_heads * length * shape.head_dim
    read_bytes *= cache.kv.element_size()
    # The same number of bytes in one contiguous buffer, summed by one thread after a 64 MB read has pushed it out
    # of the caches: the memory floor with ideal access (torch's reductions over strided slices are far slower).
    buffer = torch.ones(read_bytes // cache.kv.element_size(), dtype=cache.kv.dtype)
    evict = torch.ones(32_000_000, dtype=torch.bfloat16)
    read_times = []
    for _ in range(steps):
        evict.sum()
        start = time.perf_counter()
        buffer.sum()
        read_times.append(time.perf_counter() - start)
    read_ms = _median_ms(read_times)
    flop = 4 * cache.slots * shape.heads * length * shape.head_dim * shape.num_layers
    return {
        "kv_positions": length,
        "kv_bytes_read_per_step_mb": round(read_bytes / 1e6, 2),
        "kv_read_only_ms": read_ms,
        "kv_read_gb_s": round(read_bytes / read_ms / 1e6, 1),
        "attention_gflop_per_step": round(flop / 1e9, 4),
        "attention_gflop_s": round(flop / attention_ms / 1e6, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1, help="compute threads (vLLM's CPU worker here: 1)")
    parser.add_argument("--out", type=Path, default=REPORTS_DIR / "bench_arm_step.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    contexts = measure((32, 512), args.batch, args.steps)
    speedup = {
        c: round(entry["torch_ops_step_ms"] / entry["engine_ops_step_ms"], 3) for c, entry in contexts.items()
    }
    report = {
        "contexts": contexts,
        "torch_over_engine_ops": speedup,
        "engine_ops_512_over_32": round(
            contexts["512"]["engine_ops_step_ms"] / contexts["32"]["engine_ops_step_ms"], 3
        ),
        "batch": args.batch,
        "threads": args.threads,
        "machine": machine(),
        "method": "median of interleaved decode steps (trunk + heads on 256 candidates), bfloat16, both runtimes "
        "with vLLM's oneDNN product and paged CPU attention; attention_all_layers_ms: the attention kernel "
        "alone over every layer's cache for the same batch and context (it also writes one position per row); "
        "kv_read_only_ms: one thread reading as many bytes as the kernel must (a sum over a contiguous "
        "buffer, after a 64 MB read evicted it from the caches), the memory floor of that kernel; attention_gflop_s: the kernel's rate at 4 flop per query head, position and "
        "channel",
        "command": " ".join(["python -m bench.arm_step", *(sys.argv[1:] if argv is None else argv)]),
    }
    atomic_write_json(args.out, report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
