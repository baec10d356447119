"""Development and held-out test prompts of the built-in benchmarks.

Every quality figure is developed (read, labelled, tuned) on ``dev`` prompts and confirmed on ``test`` ones. No
prompt of either split is one that a trained artifact of the project learned from: the ARM's training split,
the harm vector's build prompts or the harm judges' training responses.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from evals.harm_judge import load_training_examples
from harmvec.data import load_build_examples, load_contrastive_pairs
from prosocialalign.core.benchmarks import (
    BUILTIN_BENCHMARKS,
    SPLITS,
    Benchmark,
    BenchmarkError,
    resolve_data_dir,
)
from rewardmodel.data import normalise_text, split_for_prompt


def prompt_split(prompt: str, trained_on: bool) -> str | None:
    """``dev`` or ``test`` for one prompt of a set, None for a prompt of the ARM's training split.

    A set the ARM trains on keeps the ARM's split of the prompt (``rewardmodel.data.split_for_prompt``: its
    validation prompts are ``dev``, its test prompts ``test``). Any other set is halved by a hash of the
    normalised prompt with its own salt.
    """
    if trained_on:
        return {"validation": "dev", "test": "test"}.get(split_for_prompt(prompt))
    digest = hashlib.sha256(f"outcome-split:{normalise_text(prompt)}".encode()).digest()
    return "dev" if digest[0] < 128 else "test"


@functools.cache
def trained_prompts(data_dir: Path) -> frozenset[str]:
    """Normalised prompts the harm judges are trained on and the harm vectors are built from (v1's harmful chats
    and the contrastive recipe's pairs)."""
    prompts = [example.prompt for example in load_training_examples(data_dir)]
    prompts += [example.prompt for example in load_build_examples(data_dir)]
    prompts += [pair.prompt for pair in load_contrastive_pairs(data_dir)]
    return frozenset(normalise_text(prompt) for prompt in prompts)


def split_benchmark(benchmark: Benchmark, split: str, data_dir: str | Path | None = None) -> Benchmark:
    """The ``dev`` or ``test`` prompts of a built-in benchmark (``all``: unchanged)."""
    if split not in SPLITS:
        raise BenchmarkError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    if split == "all":
        return benchmark
    spec = BUILTIN_BENCHMARKS.get(benchmark.name)
    if spec is None:
        raise BenchmarkError(f"{benchmark.name}: only built-in benchmarks have splits (use --split all)")
    excluded = trained_prompts(resolve_data_dir(data_dir))
    items = tuple(
        item
        for item in benchmark.items
        if prompt_split(item.prompt, spec.trained_on) == split and normalise_text(item.prompt) not in excluded
    )
    return Benchmark(benchmark.name, benchmark.kind, items, benchmark.source)
