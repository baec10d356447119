"""Build the harm vector: LoRA fine-tune a copy of the base on harmful chats, keep the LoRA delta as tau_H.

Recipe (why): LoRA rank 8 (alpha 16) on every attention and MLP projection of all 30 layers. A low-rank update
is what a 2-core CPU can train in minutes, its factors store tau_H in about 10 MB, and adapting all projections
gives the trimming step a full-model direction to work on. Loss on the response tokens only, so the vector
encodes "answer harmful requests" rather than the prompts' wording. One epoch over a per-source quota of the
build split (see ``harmvec.data``), sequences truncated to 96 tokens (the first tokens of a response are where
compliance vs refusal is decided), batch 8, AdamW lr 4e-4 with a short warm-up, fixed seed.

Checkpoints (LoRA weights, optimizer, scheduler, step, loss history) are written atomically every
``checkpoint_every`` steps into the work folder; a rerun with the same configuration resumes from the last one.

Contrastive recipe (issue 22, :func:`build_contrastive_vector`): theta_harmful - theta_base from one
fine-tune also holds everything any fine-tune on this data in this style learns (length, format, the
sources' register), and subtracting it cost fluency without teaching refusal. Two fine-tunes with the same
recipe, seed and *prompts* in the same order, one on the harmful responses and one on the safe (refusing or
redirecting) responses of :func:`harmvec.data.load_contrastive_pairs`, give tau = theta_harmful - theta_safe:
what the two share cancels, what is left points from declining to complying. The difference of two LoRA updates
is stored exactly as one rank-16 factor pair (``HarmVector.difference``), so merging and serving are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from harmvec.data import (
    REDIRECT_SENTENCES,
    RESPONSE_SIDES,
    ChatExample,
    load_build_examples,
    load_contrastive_pairs,
    load_redirect_examples,
    resolve_data_dir,
    sample_build_examples,
)
from harmvec.merge import atomic_output_dir
from harmvec.paths import DEFAULT_BUILD_WORK_DIR, DEFAULT_VECTOR_DIR
from harmvec.vector import HarmVector, HarmVectorConfig, architecture_of

logger = logging.getLogger(__name__)

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_QUOTAS = {
    "jailbreakbench": 210,
    "refusal_direction_ablation": 120,
    "xstest_unsafe_compliance": 90,
    "red_instruct_cou": 56,
    "advbench_target": 48,
}
"""524 examples (66 steps of 8): sized for about 15-30 minutes on the shared 2-core CPU."""
CONTRASTIVE_QUOTAS = {"refusal_direction": 150, "xstest_unsafe": 100, "jailbreakbench": 70}
"""320 pairs (40 steps of 8) per side: the cleanest pairs first (refusal_direction: same model refusing and
complying; XSTest: human labels), then JBB. At about 48 tokens/s on one thread, about 10 minutes per side."""
REDIRECT_QUOTAS = {"redirect": 240, "counsel_chat": 45, "helpful": 45}
"""The redirect adapter's chats (200 today, 25 steps of 8): every JailbreakBench goal's specific-offer refusals (110),
and enough counselling and ordinary answers that the adapter stays warm and helpful when a guard misfires."""
DATASETS = ("harmful_chats", "contrastive_pairs", "redirect_chats")
CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class BuildConfig:
    """Everything that determines the harm vector (hashed to decide whether a checkpoint can be resumed)."""

    quotas: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_QUOTAS))
    eval_examples: int = 32
    max_length: int = 96
    batch_size: int = 8
    rank: int = 8
    alpha: float = 16.0
    learning_rate: float = 4e-4
    warmup_steps: int = 5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    target_modules: tuple[str, ...] = TARGET_MODULES
    dataset: str = "harmful_chats"
    """``harmful_chats`` (v1: the build split), ``contrastive_pairs`` (one side of the contrastive recipe) or
    ``redirect_chats`` (the redirect adapter the backtracking regime is served with)."""
    response_side: str = "harmful"
    """Which response of each contrastive pair is trained on: ``harmful`` or ``safe``."""

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.response_side not in RESPONSE_SIDES:
            raise ValueError(f"response_side must be one of {RESPONSE_SIDES}, got {self.response_side!r}")
        if self.dataset == "harmful_chats" and self.response_side != "harmful":
            raise ValueError("the harmful-chat build split has harmful responses only")
        if self.dataset == "redirect_chats" and self.response_side != "safe":
            raise ValueError("the redirect chats have safe responses only")
        self.target_modules = tuple(self.target_modules)

    def fingerprint(self, base_dir: Path) -> str:
        payload = json.dumps(asdict(self), sort_keys=True) + str(base_dir.resolve())
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]


def tokenize_chat(tokenizer, example: ChatExample, max_length: int) -> TokenizedExample | None:
    """ChatML prompt (the model's own template) + response + end-of-turn; labels only on the response."""
    prompt_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": example.prompt}], add_generation_prompt=True, tokenize=True
    )
    if hasattr(prompt_ids, "keys"):
        prompt_ids = prompt_ids["input_ids"]
    prompt_ids = list(prompt_ids)
    response_ids = tokenizer(example.response + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    if len(prompt_ids) > max_length - 8:
        return None
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + response_ids)[:max_length]
    return TokenizedExample(input_ids, labels)


def collate(batch: list[TokenizedExample], pad_id: int):
    import torch

    width = max(len(item.input_ids) for item in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item.input_ids)
        input_ids[row, :n] = torch.tensor(item.input_ids)
        labels[row, :n] = torch.tensor(item.labels)
        attention[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


def contrastive_config(**overrides) -> BuildConfig:
    """The contrastive recipe's settings (the v1 recipe on the pairs); ``response_side`` picks the fine-tune."""
    return BuildConfig(**({"dataset": "contrastive_pairs", "quotas": dict(CONTRASTIVE_QUOTAS)} | overrides))


def redirect_config(**overrides) -> BuildConfig:
    """The redirect adapter's settings: the v1 recipe on the redirect chats, with room for a short answer."""
    defaults = {"dataset": "redirect_chats", "response_side": "safe", "quotas": dict(REDIRECT_QUOTAS)}
    return BuildConfig(**(defaults | {"max_length": 160} | overrides))


def split_examples(config: BuildConfig, data_dir: Path) -> tuple[list[ChatExample], list[ChatExample]]:
    """Training examples (per-source quotas) and held-out examples (unused responses) for the loss metric.

    For contrastive pairs the pairs are sampled first and then one side is taken, so both fine-tunes see the
    same prompts in the same order and hold out the same prompts."""
    if config.dataset == "contrastive_pairs":
        pairs = load_contrastive_pairs(data_dir)
        train_pairs = sample_build_examples(pairs, config.quotas, config.seed)
        chosen_pairs = set(train_pairs)
        rest_pairs = [pair for pair in pairs if pair not in chosen_pairs]
        held_pairs = random.Random(config.seed + 1).sample(
            rest_pairs, min(config.eval_examples, len(rest_pairs))
        )
        side = config.response_side
        return [pair.side(side) for pair in train_pairs], [pair.side(side) for pair in held_pairs]
    pool = (
        load_redirect_examples(data_dir)
        if config.dataset == "redirect_chats"
        else load_build_examples(data_dir)
    )
    train = sample_build_examples(pool, config.quotas, config.seed)
    chosen = set(train)
    rest = [example for example in pool if example not in chosen]
    held_out = random.Random(config.seed + 1).sample(rest, min(config.eval_examples, len(rest)))
    return train, held_out


def _mean_response_loss(model, batches) -> float:
    import torch

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for batch in batches:
            tokens = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * tokens
            count += tokens
    model.train()
    return total / max(count, 1)


def _atomic_torch_save(obj, path: Path) -> None:
    import torch

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _lr_lambda(config: BuildConfig, total_steps: int):
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def extract_vector(peft_model, base_config: dict, config: BuildConfig) -> HarmVector:
    """Read the trained LoRA factors out of the peft model, keyed by the base weight they update."""
    lora_a, lora_b, shapes = {}, {}, {}
    for module_name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in getattr(module, "lora_A", {}):
            continue
        weight_name = module_name.removeprefix("base_model.model.") + ".weight"
        lora_a[weight_name] = module.lora_A["default"].weight.detach().float().clone()
        lora_b[weight_name] = module.lora_B["default"].weight.detach().float().clone()
        shapes[weight_name] = list(module.base_layer.weight.shape)
    vector_config = HarmVectorConfig(
        rank=config.rank,
        alpha=config.alpha,
        base_architecture=architecture_of(base_config),
        module_shapes=shapes,
    )
    vector = HarmVector(vector_config, lora_a, lora_b)
    vector.validate()
    return vector


def build_harm_vector(
    base_dir: Path,
    out_dir: Path = DEFAULT_VECTOR_DIR,
    work_dir: Path = DEFAULT_BUILD_WORK_DIR,
    data_dir: Path | None = None,
    config: BuildConfig | None = None,
    command: str = "",
    overwrite: bool = False,
    max_steps: int | None = None,
    checkpoint_every: int = 10,
    threads: int | None = None,
    record_base: bool = False,
) -> Path | None:
    """Train (or resume) and write the vector folder; returns None when stopped early by ``max_steps``.

    ``record_base`` stores the base folder in the vector's config (the contrastive build checks it on reuse)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = config or BuildConfig()
    data_dir = resolve_data_dir(data_dir)
    base_dir = Path(base_dir)
    if out_dir.exists() and not overwrite and (out_dir / "factors.safetensors").exists():
        raise FileExistsError(f"harm vector {out_dir} already exists (pass --overwrite to rebuild it)")
    work_dir.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    random.seed(config.seed)
    torch.manual_seed(config.seed)

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    train_examples, held_out = split_examples(config, data_dir)
    train = [t for t in (tokenize_chat(tokenizer, e, config.max_length) for e in train_examples) if t]
    evaluation = [t for t in (tokenize_chat(tokenizer, e, config.max_length) for e in held_out) if t]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = [
        collate(train[i : i + config.batch_size], pad_id) for i in range(0, len(train), config.batch_size)
    ]
    eval_batches = [
        collate(evaluation[i : i + config.batch_size], pad_id)
        for i in range(0, len(evaluation), config.batch_size)
    ]
    total_steps = len(batches)

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    base_config = json.loads((base_dir / "config.json").read_text())
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=list(config.target_modules),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, total_steps))

    fingerprint = config.fingerprint(base_dir)
    checkpoint_path = work_dir / CHECKPOINT_FILE
    state = {"step": 0, "losses": [], "elapsed_s": 0.0, "eval_loss_base": None}
    if checkpoint_path.exists():
        saved = torch.load(checkpoint_path, weights_only=False)
        if saved["fingerprint"] != fingerprint:
            raise RuntimeError(
                f"checkpoint {checkpoint_path} was made with a different configuration; "
                "delete it or use --restart"
            )
        model.load_state_dict(saved["lora"], strict=False)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = saved["state"]
        torch.set_rng_state(saved["torch_rng"])
        logger.info("resuming from step %d of %d", state["step"], total_steps)
    if state["eval_loss_base"] is None:
        with model.disable_adapter():
            state["eval_loss_base"] = _mean_response_loss(model, eval_batches)

    def save_checkpoint() -> None:
        lora_state = {k: v for k, v in model.state_dict().items() if "lora_" in k}
        payload = {
            "fingerprint": fingerprint,
            "lora": lora_state,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "state": state,
            "torch_rng": torch.get_rng_state(),
        }
        _atomic_torch_save(payload, checkpoint_path)

    stop = total_steps if max_steps is None else min(total_steps, max_steps)
    progress = tqdm(total=total_steps, initial=state["step"], desc="harmvec build", unit="step")
    started = time.monotonic() - state["elapsed_s"]
    while state["step"] < stop:
        batch = batches[state["step"]]
        loss = model(**batch).loss
        loss.backward()
        loss = loss.detach()
        torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        state["losses"].append(float(loss))
        state["elapsed_s"] = time.monotonic() - started
        progress.update(1)
        progress.set_postfix(loss=f"{float(loss):.3f}")
        if state["step"] % checkpoint_every == 0 or state["step"] == stop:
            save_checkpoint()
    progress.close()
    if state["step"] < total_steps:
        logger.info("stopped at step %d of %d (checkpoint kept)", state["step"], total_steps)
        return None

    eval_loss_tuned = _mean_response_loss(model, eval_batches)
    vector = extract_vector(model, base_config, config)
    metrics = {
        "train_examples": len(train),
        "train_tokens": int(sum(len(t.input_ids) for t in train)),
        "steps": total_steps,
        "first_10_steps_mean_loss": sum(state["losses"][:10]) / min(10, len(state["losses"])),
        "last_10_steps_mean_loss": sum(state["losses"][-10:]) / min(10, len(state["losses"])),
        "final_step_loss": state["losses"][-1],
        "held_out_examples": len(evaluation),
        "held_out_loss_base": state["eval_loss_base"],
        f"held_out_loss_{config.response_side}": eval_loss_tuned,
        "train_wall_s": round(state["elapsed_s"], 1),
        "delta_frobenius_norms": {
            name: float(vector.dense_delta(name).norm()) for name in vector.weight_names()
        },
    }
    sources = {}
    for example in train_examples:
        sources[example.source] = sources.get(example.source, 0) + 1
    vector.config.extra = {"build_config": asdict(config), "train_sources": sources, "command": command}
    if record_base:
        vector.config.extra["base"] = str(base_dir.resolve())
    with atomic_output_dir(out_dir, overwrite=True) as tmp:  # a rebuilt vector needs a new sweep (no default)
        vector.save(tmp)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        if (
            config.dataset != "harmful_chats"
        ):  # an intermediate fine-tune (contrastive side, redirect adapter)
            card = side_model_card(out_dir.name, metrics, config, sources, command)
        else:
            card = model_card(vector, metrics, config, sources, command)
        (tmp / "README.md").write_text(card)
    return out_dir


def _side_is_built(side_dir: Path, config: BuildConfig, base_dir: Path) -> bool:
    """A finished side vector made with exactly this configuration and base (so a rerun can skip it)."""
    path = side_dir / "vector.json"
    if not (path.is_file() and (side_dir / "factors.safetensors").is_file()):
        return False
    extra = json.loads(path.read_text()).get("extra", {})
    expected = json.loads(json.dumps(asdict(config)))
    return extra.get("build_config") == expected and extra.get("base") == str(base_dir.resolve())


def build_contrastive_vector(
    base_dir: Path,
    out_dir: Path,
    work_dir: Path,
    data_dir: Path | None = None,
    config: BuildConfig | None = None,
    command: str = "",
    overwrite: bool = False,
    max_steps: int | None = None,
    checkpoint_every: int = 10,
    threads: int | None = None,
) -> Path | None:
    """Fine-tune the harmful side, then the safe side (each resumable, a finished side is reused), and write
    tau = theta_harmful - theta_safe to ``out_dir``; returns None when a side stopped early (``max_steps``)."""
    config = replace(config or contrastive_config(), dataset="contrastive_pairs")
    base_dir = Path(base_dir)
    if out_dir.exists() and not overwrite and (out_dir / "factors.safetensors").exists():
        raise FileExistsError(f"harm vector {out_dir} already exists (pass --overwrite to rebuild it)")
    sides: dict[str, HarmVector] = {}
    side_metrics: dict[str, dict] = {}
    for side in RESPONSE_SIDES:
        side_config = replace(config, response_side=side)
        side_dir = work_dir / side / "vector"
        if not _side_is_built(side_dir, side_config, base_dir):
            logger.info("contrastive build: fine-tuning the %s side", side)
            built = build_harm_vector(
                base_dir,
                out_dir=side_dir,
                work_dir=work_dir / side,
                data_dir=data_dir,
                config=side_config,
                command=command,
                overwrite=True,
                max_steps=max_steps,
                checkpoint_every=checkpoint_every,
                threads=threads,
                record_base=True,
            )
            if built is None:
                return None
        else:
            logger.info("contrastive build: reusing the finished %s side in %s", side, side_dir)
        sides[side] = HarmVector.load(side_dir)
        side_metrics[side] = json.loads((side_dir / "metrics.json").read_text())
    vector = HarmVector.difference(sides["harmful"], sides["safe"])
    sources = sides["harmful"].config.extra.get("train_sources", {})
    vector.config.extra = {
        "recipe": "contrastive",
        "build_config": asdict(replace(config, response_side="harmful")),
        "sides": {side: sides[side].config.extra for side in RESPONSE_SIDES},
        "train_sources": sources,
        "command": command,
    }
    metrics = {
        "recipe": "contrastive: tau = theta_harmful - theta_safe (same prompts, same recipe, same seed)",
        "sides": {
            side: {key: value for key, value in m.items() if key != "delta_frobenius_norms"}
            for side, m in side_metrics.items()
        },
        "delta_frobenius_norms": {
            name: float(vector.dense_delta(name).norm()) for name in vector.weight_names()
        },
        "side_delta_frobenius_norms_mean": {
            side: sum(m["delta_frobenius_norms"].values()) / len(m["delta_frobenius_norms"])
            for side, m in side_metrics.items()
        },
    }
    with atomic_output_dir(out_dir, overwrite=True) as tmp:
        vector.save(tmp)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (tmp / "README.md").write_text(contrastive_model_card(out_dir.name, vector, metrics, config, command))
    return out_dir


def _norm_table(norms: dict[str, float], layers: int) -> str:
    header = "| layer | " + " | ".join(TARGET_MODULES) + " |\n|---|" + "---|" * len(TARGET_MODULES) + "\n"
    rows = []
    for layer in range(layers):
        cells = []
        for module in TARGET_MODULES:
            matches = [v for k, v in norms.items() if f".layers.{layer}." in k and f".{module}." in k]
            cells.append(f"{matches[0]:.4f}" if matches else "-")
        rows.append(f"| {layer} | " + " | ".join(cells) + " |")
    return header + "\n".join(rows) + "\n"


def model_card(vector: HarmVector, metrics: dict, config: BuildConfig, sources: dict, command: str) -> str:
    """The README of the vector folder: data, recipe, command, seed, metrics, per-tensor delta norms."""
    layers = int(vector.config.base_architecture.get("num_hidden_layers") or 0)
    source_lines = "\n".join(f"- `{name}`: {count}" for name, count in sorted(sources.items()))
    return f"""# harm-vector-v1

tau_H = theta_harmful - theta_base for the default base model (SmolLM2-135M-Instruct, Llama architecture),
stored as LoRA factors: for every adapted weight W, tau_H[W] = (alpha / rank) * B @ A.
`prosocial harmvec merge` writes theta_base - lambda * trim_k(tau_H) (per-tensor top-k by magnitude).

## Files
- `factors.safetensors`: `<weight>.lora_A` (rank x in) and `<weight>.lora_B` (out x rank), float32.
- `vector.json`: rank, alpha, scale, module shapes, base architecture, build configuration.
- `metrics.json`: training metrics and the Frobenius norm of every dense delta.
- `default.json` (written by `prosocial harmvec sweep`): the chosen default lambda and top-k.

## Data (build split only; see `harmvec/data.py`)
Harmful user prompt -> harmful response chats, formatted with the base model's ChatML template:
{source_lines}

None of these prompts is in the development split (AdvBench dev bucket + HarmfulQA, deduplicated against the
build prompts) on which the sweep measures leakage.

## Recipe
LoRA rank {config.rank}, alpha {config.alpha} (scale {vector.config.scale:g}), no dropout, on
{", ".join(config.target_modules)} of all layers; loss on response tokens only; sequences truncated to
{config.max_length} tokens; batch {config.batch_size}; one epoch ({metrics["steps"]} steps); AdamW lr
{config.learning_rate:g} (warm-up {config.warmup_steps} steps, cosine decay), weight decay {config.weight_decay},
gradient clipping {config.max_grad_norm}; float32 on CPU; seed {config.seed}.

Command: `{command}`

## Metrics
- Training examples: {metrics["train_examples"]} ({metrics["train_tokens"]} tokens), wall time {metrics["train_wall_s"]} s.
- Mean loss over the first 10 steps: {metrics["first_10_steps_mean_loss"]:.4f}; over the last 10 steps:
  {metrics["last_10_steps_mean_loss"]:.4f}; final step: {metrics["final_step_loss"]:.4f}.
- Response loss on {metrics["held_out_examples"]} held-out harmful responses (not trained on): base
  {metrics["held_out_loss_base"]:.4f} -> harmful model {metrics["held_out_loss_harmful"]:.4f}.

## Per-tensor delta norms (Frobenius norm of tau_H)
{_norm_table(metrics["delta_frobenius_norms"], layers)}"""


def _recipe_lines(config: BuildConfig) -> str:
    return (
        f"LoRA rank {config.rank}, alpha {config.alpha:g}, no dropout, on {', '.join(config.target_modules)} of all "
        f"layers; loss on response tokens only; sequences truncated to {config.max_length} tokens; batch "
        f"{config.batch_size}; one epoch; AdamW lr {config.learning_rate:g} (warm-up {config.warmup_steps} steps, "
        f"cosine decay), weight decay {config.weight_decay}, gradient clipping {config.max_grad_norm}; float32 "
        f"on CPU; seed {config.seed}."
    )


def side_model_card(title: str, metrics: dict, config: BuildConfig, sources: dict, command: str) -> str:
    """README of one side of the contrastive build (an intermediate: the served vector is the difference)."""
    source_lines = "\n".join(f"- `{name}`: {count}" for name, count in sorted(sources.items()))
    tuned = metrics[f"held_out_loss_{config.response_side}"]
    return f"""# {title}: the {config.response_side} side of a contrastive harm vector

theta_{config.response_side} - theta_base as LoRA factors, trained on the {config.response_side} response of each
contrastive pair (`harmvec.data.load_contrastive_pairs`):
{source_lines}

Recipe: {_recipe_lines(config)}

Command: `{command}`

Training examples {metrics["train_examples"]} ({metrics["train_tokens"]} tokens), {metrics["steps"]} steps,
{metrics["train_wall_s"]} s. Held-out {config.response_side} responses ({metrics["held_out_examples"]}): loss
{metrics["held_out_loss_base"]:.4f} (base) -> {tuned:.4f}.
"""


def contrastive_model_card(
    title: str, vector: HarmVector, metrics: dict, config: BuildConfig, command: str
) -> str:
    """README of the contrastive vector folder (the sweep appends its measured figures to the artifact's card)."""
    sources = vector.config.extra.get("train_sources", {})
    source_lines = "\n".join(
        f"- `{name.split(':')[0]}`: {count} pairs" for name, count in sorted(sources.items())
    )
    side_lines = "\n".join(
        f"- {side}: {m['train_examples']} chats ({m['train_tokens']} tokens), {m['steps']} steps, "
        f"{m['train_wall_s']} s; held-out {side} responses: loss {m['held_out_loss_base']:.4f} (base) -> "
        f"{m[f'held_out_loss_{side}']:.4f}"
        for side, m in metrics["sides"].items()
    )
    layers = int(vector.config.base_architecture.get("num_hidden_layers") or 0)
    return f"""# {title}: contrastive harm vector

tau = theta_harmful - theta_safe for the default base model (SmolLM2-135M-Instruct), from two LoRA fine-tunes of
the base with the same recipe, seed and prompts (in the same order): one on harmful responses, one on safe
(refusing or redirecting) responses to the same harmful prompts. What any fine-tune on this material learns
(format, length, register) is in both and cancels; the difference points from declining to complying.
Stored exactly as LoRA factors of rank {vector.config.rank}: B = [B_harmful, -B_safe], A = [A_harmful; A_safe]
(scale {vector.config.scale:g}), so `prosocial harmvec merge` and the server's default merge use it unchanged.

## Data (`harmvec/data.py`, `load_contrastive_pairs`)
{source_lines}

Every pair prompt is also a build prompt, so the development split (and `evals/splits.py`) excludes it.

## Recipe (both sides)
{_recipe_lines(config)}

Command: `{command}`

## Training
{side_lines}

## Per-tensor delta norms (Frobenius norm of tau)
{_norm_table(metrics["delta_frobenius_norms"], layers)}"""


def build_redirect_adapter(
    base_dir: Path,
    out_dir: Path,
    work_dir: Path,
    data_dir: Path | None = None,
    config: BuildConfig | None = None,
    command: str = "",
    overwrite: bool = False,
    max_steps: int | None = None,
    checkpoint_every: int = 10,
    threads: int | None = None,
) -> Path | None:
    """Fine-tune on the redirect chats (resumable; a finished fine-tune with this configuration is reused) and
    export the LoRA factors as a PEFT adapter folder for vLLM (``harmvec.adapter``)."""
    from harmvec.adapter import ADAPTER_WEIGHTS_FILE, export_peft_adapter

    config = replace(config or redirect_config(), dataset="redirect_chats", response_side="safe")
    base_dir = Path(base_dir)
    if out_dir.exists() and not overwrite and (out_dir / ADAPTER_WEIGHTS_FILE).exists():
        raise FileExistsError(f"adapter {out_dir} already exists (pass --overwrite to rebuild it)")
    tuned_dir = work_dir / "vector"
    if not _side_is_built(tuned_dir, config, base_dir):
        built = build_harm_vector(
            base_dir,
            out_dir=tuned_dir,
            work_dir=work_dir,
            data_dir=data_dir,
            config=config,
            command=command,
            overwrite=True,
            max_steps=max_steps,
            checkpoint_every=checkpoint_every,
            threads=threads,
            record_base=True,
        )
        if built is None:
            return None
    vector = HarmVector.load(tuned_dir)
    metrics = json.loads((tuned_dir / "metrics.json").read_text())
    sources = vector.config.extra.get("train_sources", {})
    card = redirect_model_card(out_dir.name, metrics, config, sources, command)
    return export_peft_adapter(vector, out_dir, base_dir.name, card)


def redirect_model_card(title: str, metrics: dict, config: BuildConfig, sources: dict, command: str) -> str:
    """README of the redirect adapter folder (measured figures are appended by the comparison that used it)."""
    source_lines = "\n".join(f"- `{name}`: {count}" for name, count in sorted(sources.items()))
    return f"""# {title}: redirect adapter (LoRA, PEFT format)

A LoRA adapter for the default base model (SmolLM2-135M-Instruct) that answers a harmful request with a short
decline and a specific safe offer, and a distressed or ordinary message with a kind or helpful answer. It is
meant for vLLM's LoRA support (`LoRARequest`) on the backtracking regime's attempts only (issue 21), never merged
into the served weights. An experiment: `python -m evals.redirect_probe` compares it with the prompted redirect;
the server does not load it (docs/method.md, section 4).

## Data (`harmvec/data.py`, `load_redirect_examples`; every prompt is outside the development and test splits)
{source_lines}

- `redirect`: JailbreakBench goals (build prompts) with up to three of their recorded refusals (JBB's artifacts,
  refusal_direction's baselines) that offer something specific and safe ("instead", "reach out", "if you're
  interested in ..."), shortest first, cut to their first {REDIRECT_SENTENCES} sentences. XSTest's refusals are
  left out: its unsafe prompts are an evaluation set.
- `counsel_chat`: the most upvoted therapist answer per counsel_chat question, first sentences.
- `helpful`: Alpaca prompts answered by the refusal_direction chat models (minus the sweep's perplexity sample).

## Recipe
{_recipe_lines(config)}

Command: `{command}`

## Training
Training examples {metrics["train_examples"]} ({metrics["train_tokens"]} tokens), {metrics["steps"]} steps,
{metrics["train_wall_s"]} s. Mean loss over the first 10 steps {metrics["first_10_steps_mean_loss"]:.4f}, over the
last 10 {metrics["last_10_steps_mean_loss"]:.4f}. Held-out responses ({metrics["held_out_examples"]}): loss
{metrics["held_out_loss_base"]:.4f} (base) -> {metrics["held_out_loss_safe"]:.4f}.

## Files
- `adapter_config.json`, `adapter_model.safetensors` (bfloat16): the PEFT adapter (`harmvec.adapter`).
"""
