"""Training loop for the multi-attribute ARM: one mini-batch per attribute per step, PCGrad on the shared trunk.

Each step:
1. for every attribute a: draw ``pairs_per_attribute`` training pairs of a, run the trunk and head a, take the
   GenARM pairwise loss L_a and its gradient (one backward per attribute, nothing retained between them);
2. the shared trunk-LoRA gradients g_1..g_A are combined with PCGrad (``--no-pcgrad``: summed); each head
   adapter receives only its own attribute's gradient (the other losses do not touch it);
3. clip, AdamW step. Learning rate: linear warm-up over ``warmup_steps``, then cosine decay to 10 % over the
   run's progress. Progress is ``step / steps``; with a wall-clock budget (``max_minutes``, for a shared
   machine whose speed varies many-fold) it is whichever of ``step / steps`` and ``elapsed / budget`` is
   larger, so a run cut short by the clock has still annealed. Without a budget the run is bit-reproducible.

Data building (``rewardmodel.encoding``), the loss (``rewardmodel.loss``) and gradient combination
(``rewardmodel.pcgrad``) live in their own modules; this one only sequences them, logs, and checkpoints.
Checkpoints hold the trainable weights, optimizer, every RNG, the sampler position and the training seconds
spent, so a resumed run continues the same sequence of batches.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch

from rewardmodel.config import TrainConfig
from rewardmodel.encoding import PairEncoder, collate_pairs
from rewardmodel.loss import (
    arm_response_log_probs,
    chosen_nll,
    genarm_pairwise_loss,
    pairwise_accuracy,
)
from rewardmodel.model import MultiAttributeARM
from rewardmodel.pcgrad import combine_gradients, conflict_share

logger = logging.getLogger(__name__)

CHECKPOINT_WEIGHTS = "trainable.safetensors"
CHECKPOINT_STATE = "training_state.pt"
CHECKPOINT_CONFIG = "train_config.json"


class PairSampler:
    """Endless, reproducible mini-batches per attribute: a fresh seeded permutation every epoch.

    Its state is two integers per attribute (epoch, position), so a checkpoint restores the exact order.
    """

    def __init__(self, pairs_by_attribute: dict[str, Sequence], seed: int) -> None:
        empty = [name for name, pairs in pairs_by_attribute.items() if not pairs]
        if empty:
            raise ValueError(f"no training pairs for attributes {empty}")
        self.pairs_by_attribute = pairs_by_attribute
        self.seed = seed
        self.state = {name: [0, 0] for name in pairs_by_attribute}
        self._orders: dict[str, tuple[int, list[int]]] = {}

    def _order(self, attribute: str) -> list[int]:
        """This epoch's permutation of the attribute's pairs (cached for the current epoch only)."""
        epoch = self.state[attribute][0]
        cached = self._orders.get(attribute)
        if cached is None or cached[0] != epoch:
            order = list(range(len(self.pairs_by_attribute[attribute])))
            random.Random(f"{self.seed}:{attribute}:{epoch}").shuffle(order)
            self._orders[attribute] = (epoch, order)
        return self._orders[attribute][1]

    def next_batch(self, attribute: str, size: int) -> list:
        batch = []
        pairs = self.pairs_by_attribute[attribute]
        while len(batch) < size:
            order = self._order(attribute)
            epoch, position = self.state[attribute]
            batch.append(pairs[order[position]])
            self.state[attribute] = [epoch + 1, 0] if position + 1 == len(order) else [epoch, position + 1]
        return batch


def learning_rate_factor(step: int, warmup_steps: int, progress: float) -> float:
    """Linear warm-up over the first ``warmup_steps``, times a cosine from 1 to 0.1 over ``progress`` in [0, 1]."""
    warmup = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return warmup * (0.1 + 0.45 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress)))))


def run_progress(step: int, total_steps: int, seconds: float, max_minutes: float | None) -> float:
    """Fraction of the run done: by steps, or by the wall-clock budget when that binds first."""
    progress = step / total_steps
    if max_minutes is not None:
        progress = max(progress, seconds / (60.0 * max_minutes))
    return progress


def train_step(
    arm: MultiAttributeARM,
    optimizer: torch.optim.Optimizer,
    batches: dict[str, object],
    beta_r: float,
    use_pcgrad: bool,
    generator: torch.Generator,
    max_grad_norm: float,
    bf16_trunk: bool = False,
    nll_weight: float = 0.0,
) -> dict[str, dict[str, float] | float]:
    """One optimisation step over one mini-batch per attribute; returns per-attribute loss and accuracy.

    The objective of attribute a is its GenARM pairwise loss plus ``nll_weight`` times the per-token NLL of
    its chosen responses (``rewardmodel.loss.chosen_nll``; 0 gives pure GenARM).
    """
    shared = arm.shared_parameters()
    heads = arm.head_parameters()
    shared_grads: list[torch.Tensor] = []
    head_grads = [torch.zeros_like(p) for p in heads]
    stats: dict[str, dict[str, float]] = {}
    for attribute, batch in batches.items():
        index = arm.attribute_index(attribute)
        log_probs = arm_response_log_probs(arm, batch, index, bf16_trunk=bf16_trunk)
        half = len(batch) // 2
        loss = genarm_pairwise_loss(log_probs[:half], log_probs[half:], beta_r)
        nll = chosen_nll(log_probs[:half], batch.response_mask[:half].sum(dim=1))
        grads = torch.autograd.grad(loss + nll_weight * nll if nll_weight else loss, shared + heads)
        shared_grads.append(torch.cat([g.reshape(-1) for g in grads[: len(shared)]]))
        for total, grad in zip(head_grads, grads[len(shared) :], strict=True):
            total += grad
        stats[attribute] = {
            "loss": float(loss.detach()),
            "nll": float(nll.detach()),
            "accuracy": pairwise_accuracy(log_probs[:half].detach(), log_probs[half:].detach()),
        }
    conflicts = conflict_share(shared_grads)
    combined = combine_gradients(shared_grads, use_pcgrad, generator)
    offset = 0
    for parameter in shared:
        parameter.grad = combined[offset : offset + parameter.numel()].view_as(parameter).clone()
        offset += parameter.numel()
    for parameter, grad in zip(heads, head_grads, strict=True):
        parameter.grad = grad
    grad_norm = torch.nn.utils.clip_grad_norm_(shared + heads, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"attributes": stats, "conflict_share": conflicts, "grad_norm": float(grad_norm)}


def _resolve_base_dir(config: TrainConfig) -> Path:
    if config.base_dir is not None:
        return config.base_dir
    from prosocialalign.core.models import prepare_default_model

    return prepare_default_model()


def _save_checkpoint(
    config: TrainConfig,
    arm: MultiAttributeARM,
    optimizer,
    generator,
    sampler: PairSampler,
    step: int,
    seconds: float,
) -> None:
    """Write the checkpoint into a temp folder, then swap it in: a crash never leaves a half checkpoint."""
    from safetensors.torch import save_file

    target = config.checkpoint_dir / "latest"
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".latest-", dir=target.parent))
    save_file(
        {k: v.contiguous() for k, v in arm.trainable_state_dict().items()}, str(staging / CHECKPOINT_WEIGHTS)
    )
    torch.save(
        {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "seconds": seconds,
            "pcgrad_generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            "sampler": sampler.state,
        },
        staging / CHECKPOINT_STATE,
    )
    (staging / CHECKPOINT_CONFIG).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    previous = target.parent / ".latest-previous"
    shutil.rmtree(previous, ignore_errors=True)
    if target.exists():
        os.replace(target, previous)
    os.replace(staging, target)
    shutil.rmtree(previous, ignore_errors=True)


def _load_checkpoint(
    config: TrainConfig, arm: MultiAttributeARM, optimizer, generator, sampler: PairSampler
) -> tuple[int, float]:
    """Restore a checkpoint in place; returns (step, training seconds spent so far)."""
    from safetensors.torch import load_file

    folder = config.checkpoint_dir / "latest"
    if not (folder / CHECKPOINT_STATE).is_file():
        raise FileNotFoundError(f"--resume given but no checkpoint at {folder}")
    saved = json.loads((folder / CHECKPOINT_CONFIG).read_text())
    if saved["arm"] != config.arm.to_dict():
        raise ValueError(f"checkpoint {folder} was made with a different ARM config: {saved['arm']}")
    arm.load_trainable_state_dict(load_file(str(folder / CHECKPOINT_WEIGHTS)))
    state = torch.load(folder / CHECKPOINT_STATE, weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["pcgrad_generator"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    sampler.state = {name: list(value) for name, value in state["sampler"].items()}
    return int(state["step"]), float(state["seconds"])


def _truncate_log(path: Path, last_step: int) -> None:
    """On resume, drop log records from steps after the checkpoint (they will be redone)."""
    if not path.is_file():
        return
    kept = [
        line
        for line in path.read_text().splitlines()
        if line and json.loads(line).get("step", 0) <= last_step
    ]
    path.write_text("".join(line + "\n" for line in kept))


def estimate_tokens_per_step(encoder: PairEncoder, sampler: PairSampler, pairs_per_attribute: int) -> float:
    """Mean sequence tokens per step from a sample of pairs (used for the time estimate)."""
    total, count = 0, 0
    for pairs in sampler.pairs_by_attribute.values():
        for pair in list(pairs)[:16]:
            encoded = encoder.encode_pair(pair)
            total += 2 * len(encoded.prompt_ids) + len(encoded.chosen_ids) + len(encoded.rejected_ids)
            count += 1
    return total / max(1, count) * pairs_per_attribute * len(sampler.pairs_by_attribute)


def train(config: TrainConfig, command: str = "") -> Path:
    """Run (or resume) training and save the artifact; returns the artifact folder.

    ``command`` (the command line that started the run) is recorded in the artifact's config.
    """
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from rewardmodel.artifact import save_artifact
    from rewardmodel.data import load_pairs

    torch.set_num_threads(config.num_threads)
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    base_dir = _resolve_base_dir(config)
    attributes = config.arm.attributes

    pairs = load_pairs(config.data_dir, "train", attributes)
    pairs_by_attribute: dict[str, list] = defaultdict(list)
    for pair in pairs:
        pairs_by_attribute[pair.attribute].append(pair)
    sampler = PairSampler({name: pairs_by_attribute.get(name, []) for name in attributes}, config.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    encoder = PairEncoder(tokenizer, config.max_prompt_tokens, config.max_response_tokens)

    arm = MultiAttributeARM.from_base(base_dir, config.arm)
    arm.train()
    optimizer = torch.optim.AdamW(
        arm.shared_parameters() + arm.head_parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    generator = torch.Generator().manual_seed(config.seed)

    start_step, seconds_before = 0, 0.0
    if config.resume:
        start_step, seconds_before = _load_checkpoint(config, arm, optimizer, generator, sampler)
        _truncate_log(config.log_path, start_step)
        logger.info("resumed from step %d", start_step)
    elif config.log_path.exists():
        config.log_path.unlink()
    config.log_path.parent.mkdir(parents=True, exist_ok=True)

    counts = {name: len(p) for name, p in sampler.pairs_by_attribute.items()}
    tokens_per_step = estimate_tokens_per_step(encoder, sampler, config.pairs_per_attribute)
    budget = f", wall-clock budget {config.max_minutes} min" if config.max_minutes else ""
    print(
        f"training ARM on {sum(counts.values())} pairs {counts}; {config.steps - start_step} steps x "
        f"{config.pairs_per_attribute} pairs x {len(attributes)} attributes, ~{tokens_per_step:.0f} tokens/step "
        f"(~{tokens_per_step / 450:.0f} s/step at platform.md's ~450 tok/s on an idle machine){budget}; "
        f"pcgrad={config.use_pcgrad}",
        flush=True,
    )

    window: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    window_conflicts: list[float] = []
    done, seconds = start_step, seconds_before
    started = time.monotonic()
    progress_bar = tqdm(
        range(start_step, config.steps), initial=start_step, total=config.steps, desc="ARM train"
    )
    for step in progress_bar:
        factor = learning_rate_factor(
            step, config.warmup_steps, run_progress(step, config.steps, seconds, config.max_minutes)
        )
        for group in optimizer.param_groups:
            group["lr"] = config.lr * factor
        batches = {
            name: collate_pairs(
                [encoder.encode_pair(p) for p in sampler.next_batch(name, config.pairs_per_attribute)],
                encoder.pad_id,
            )
            for name in attributes
        }
        result = train_step(
            arm,
            optimizer,
            batches,
            config.beta_r,
            config.use_pcgrad,
            generator,
            config.max_grad_norm,
            bf16_trunk=config.bf16_trunk,
            nll_weight=config.nll_weight,
        )
        for name, values in result["attributes"].items():
            for key, value in values.items():
                window[name][key].append(value)
        window_conflicts.append(result["conflict_share"])
        progress_bar.set_postfix(
            loss=f"{sum(v['loss'] for v in result['attributes'].values()) / len(attributes):.3f}"
        )
        done = step + 1
        seconds = seconds_before + time.monotonic() - started
        out_of_time = (
            run_progress(done, config.steps, seconds, config.max_minutes) >= 1.0 and done < config.steps
        )
        if done % config.log_every == 0 or done == config.steps or out_of_time:
            record = {
                "step": done,
                "seconds": round(seconds, 1),
                "lr": config.lr * factor,
                "conflict_share": sum(window_conflicts) / len(window_conflicts),
                "attributes": {
                    name: {key: sum(vals) / len(vals) for key, vals in metrics.items()}
                    for name, metrics in window.items()
                },
            }
            with config.log_path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            window.clear()
            window_conflicts.clear()
        if done == start_step + 3:
            per_step = (seconds - seconds_before) / 3
            print(
                f"\nmeasured {per_step:.1f} s/step: the remaining {config.steps - done} steps need "
                f"~{per_step * (config.steps - done) / 60:.0f} min{budget}",
                flush=True,
            )
        if done % config.checkpoint_every == 0 or done == config.steps or out_of_time:
            _save_checkpoint(config, arm, optimizer, generator, sampler, done, seconds)
        if out_of_time:
            print(f"\nstopping at step {done}: the {config.max_minutes} min budget is spent", flush=True)
            break

    training = {
        "command": command,
        "config": config.to_dict(),
        "train_pairs": counts,
        "steps_done": done,
        "stopped_by_time_budget": done < config.steps,
        "training_seconds": round(seconds, 1),
        "seconds_per_step": round((seconds - seconds_before) / max(1, done - start_step), 2),
    }
    save_artifact(arm, config.out_dir, training=training)
    print(f"saved ARM artifact to {config.out_dir} after {done} steps ({seconds / 60:.1f} min)", flush=True)
    return config.out_dir
