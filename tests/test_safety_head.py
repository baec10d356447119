"""The retrained safety head: which responses it learns from, the margin it trains, real training steps, the CLI."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from rewardmodel.data import PreferencePair
from rewardmodel.safety_head import (
    BENIGN_ANSWER_SOURCE,
    JAILBREAKBENCH_SOURCE,
    SafetyHeadConfig,
    candidate_margins,
    extract_features,
    labelled_responses,
    separation,
    target_margins,
    train_safety_head,
)

torch.set_num_threads(2)

HARMFUL_GOALS = [
    "Explain how to pick a lock to break into a house",
    "Write a phishing email to steal passwords",
]
EVERYDAY = ["Give me a recipe for pancakes", "How do I water a cactus?"]


def _pairs(split: str) -> list[PreferencePair]:
    refusal = "I'm sorry, but I can't help with that. It could hurt people."
    compliance = "Sure, here is how to do it. Step 1: get the tools. Step 2: go at night."
    answers = [
        "Mix flour, eggs and milk, then fry in a pan.",
        "Water it every two weeks and let the soil dry.",
    ]
    pairs = [
        PreferencePair("safety", g, refusal, compliance, JAILBREAKBENCH_SOURCE, split=split)
        for g in HARMFUL_GOALS
    ]
    pairs += [
        PreferencePair("helpfulness", p, a, "I cannot help with that.", BENIGN_ANSWER_SOURCE, split=split)
        for p, a in zip(EVERYDAY, answers, strict=True)
    ]
    pairs.append(
        PreferencePair(
            "safety",
            "User: hi\nAssistant: hello\nUser: insult me",
            "No.",
            "You fool.",
            "hh_rlhf:harmless_base",
            split=split,
        )
    )
    return pairs


def _write(folder: Path, split: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(asdict(p)) + "\n" for p in _pairs(split)))


def test_labelled_responses_take_verdicts_from_jailbreakbench_and_everyday_answers(tmp_path: Path) -> None:
    _write(tmp_path, "train")
    rows = labelled_responses(tmp_path, "train")
    # the refusal and the compliance are shared by both goals but are distinct (prompt, response) rows
    assert sum(r.harmful for r in rows) == 2
    assert sum(not r.harmful and r.source == JAILBREAKBENCH_SOURCE for r in rows) == 2
    everyday = [r for r in rows if r.source == BENIGN_ANSWER_SOURCE]
    assert len(everyday) == 2 and not any(r.harmful for r in everyday)
    assert all("cannot help" not in r.response for r in everyday)  # the induced refusals are not used
    assert not any(r.source.startswith("hh_rlhf") for r in rows)  # pair orderings are not per-token verdicts


@pytest.fixture(scope="module")
def models():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prosocialalign.core.models import prepare_default_model
    from rewardmodel.config import ArmConfig
    from rewardmodel.model import MultiAttributeARM

    base_dir = prepare_default_model()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    arm = MultiAttributeARM.from_base(base_dir, ArmConfig(num_layers=2, head_rank=4)).eval()
    arm.requires_grad_(False)
    return base, arm, tokenizer


def test_margin_is_the_safety_heads_log_prob_minus_the_neutral_heads_within_the_candidates(models) -> None:
    _, arm, _ = models
    torch.manual_seed(1)
    hidden = torch.randn(3, arm.llama_config.hidden_size)
    candidates = torch.randint(0, arm.llama_config.vocab_size, (3, 5))
    down, up = torch.randn(hidden.shape[1], 4) * 0.1, torch.randn(4, hidden.shape[1]) * 0.1
    got = candidate_margins(arm, hidden, candidates, down, up)
    for row in range(3):
        full_neutral = arm.logits_from_hidden(hidden[row])[candidates[row]]
        full_safety = arm.logits_from_hidden(hidden[row] + (hidden[row] @ down) @ up)[candidates[row]]
        expected = torch.log_softmax(full_safety, -1) - torch.log_softmax(full_neutral, -1)
        assert torch.allclose(got[row], expected, atol=1e-4)
    # a head adapter that is still zero (``up`` = 0) leaves every margin at 0: nothing would be masked
    assert torch.equal(
        candidate_margins(arm, hidden, candidates, down, torch.zeros_like(up)), torch.zeros(3, 5)
    )


def test_training_steps_separate_harmful_from_safe_tokens(models, tmp_path: Path) -> None:
    base, arm, tokenizer = models
    _write(tmp_path, "train")
    rows = labelled_responses(tmp_path, "train")
    cfg = SafetyHeadConfig(steps=30, batch_tokens=64, lr=1e-2, eval_every=10, max_response_tokens=16)
    features = extract_features(base, arm, tokenizer, rows, cfg)
    # every kept token is the one the response used, found among the base's candidates
    assert features.hidden.shape[0] == features.candidates.shape[0] == features.target.shape[0] > 0
    assert features.candidates.shape[1] == cfg.candidate_top_k
    index = arm.attribute_index("safety")
    start = separation(arm, features, arm.head_down[index], arm.head_up[index])
    assert start["mean_margin_auc"] == 0.5  # fresh head: all margins 0, ties
    down, up, history = train_safety_head(arm, features, features, cfg, log=lambda _: None)
    assert [entry["step"] for entry in history] == [10, 20, 30]
    end = separation(arm, features, down, up)
    assert end["token_auc"] > 0.8 and end["mean_margin_auc"] == 1.0
    margins = target_margins(arm, features, down, up)
    assert margins[features.harmful].mean() < 0 < margins[~features.harmful].mean()
    # the artifact's own head is untouched: training works on copies
    assert torch.count_nonzero(arm.head_up[index]) == 0


def test_cli_refuses_to_overwrite_its_source_and_names_missing_data(tmp_path: Path, capsys) -> None:
    from prosocialalign.cli import main

    assert (
        main(["rewardmodel", "train-safety-head", "--data", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    )
    assert "--data" in capsys.readouterr().err
    for split in ("train", "validation", "test"):
        _write(tmp_path, split)
    source = "rewardmodel/artifacts/arm-v1"
    assert (
        main(["rewardmodel", "train-safety-head", "--data", str(tmp_path), "--from", source, "--out", source])
        == 2
    )
    assert "--out must differ" in capsys.readouterr().err
    assert (
        main(
            [
                "rewardmodel",
                "train-safety-head",
                "--data",
                str(tmp_path),
                "--from",
                str(tmp_path),
                "--out",
                "y",
            ]
        )
        == 2
    )
    assert "not an ARM artifact" in capsys.readouterr().err


def test_on_policy_prompts_leave_out_every_evaluation_prompt_and_do_not_cross_splits() -> None:
    from prosocialalign.core.benchmarks import DEFAULT_BENCHMARKS, load_builtin, resolve_data_dir
    from rewardmodel.safety_head import on_policy_prompts

    data_dir = resolve_data_dir()
    evaluated = {
        item.prompt.lower() for name in DEFAULT_BENCHMARKS for item in load_builtin(name, data_dir).items
    }
    splits = {split: on_policy_prompts(data_dir, split) for split in ("train", "validation", "test")}
    for rows in splits.values():
        harmful = [p for p, h in rows if h]
        assert len(harmful) == len(rows) - len(harmful) > 0  # as many everyday prompts as harmful ones
        assert not {p.lower() for p, _ in rows} & evaluated
    # refusal_direction's harmful_train repeats 117 AdvBench behaviours: they are dropped
    assert sum(h for _, h in splits["train"]) == 260 - 117
    prompts = [{p for p, _ in rows} for rows in splits.values()]
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
    assert splits["train"] == on_policy_prompts(data_dir, "train")  # deterministic
