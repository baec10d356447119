"""The multi-attribute ARM: loss, PCGrad, encoding, model equivalence with the base, training, artifacts."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from rewardmodel.attributes import ALL_ATTRIBUTES
from rewardmodel.data import PreferencePair
from rewardmodel.encoding import SequenceBatch, collate_pairs, collate_sequences
from rewardmodel.loss import genarm_pairwise_loss, pairwise_accuracy, sum_response_log_probs
from rewardmodel.pcgrad import combine_gradients, conflict_share, pcgrad

torch.set_num_threads(2)


# ------------------------------------------------------------------------------------------ loss and PCGrad
def test_genarm_loss_matches_hand_computed_values() -> None:
    chosen = torch.tensor([-10.0, -20.0])
    rejected = torch.tensor([-12.0, -15.0])
    # beta * (chosen - rejected) = [1.0, -2.5]; -log sigmoid(x) = log(1 + e^-x)
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(2.5))) / 2
    assert float(genarm_pairwise_loss(chosen, rejected, beta_r=0.5)) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="beta_r"):
        genarm_pairwise_loss(chosen, rejected, beta_r=0.0)


def test_pairwise_accuracy_counts_ties_as_half() -> None:
    assert pairwise_accuracy(torch.tensor([3.0, 1.0, 2.0, 5.0]), torch.tensor([1.0, 2.0, 2.0, 4.0])) == 0.625


def test_pcgrad_removes_the_conflicting_component() -> None:
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    # g1 . g2 = -1: g1' = g1 + 0.5 g2 = [0.5, 0.5]; g2' = g2 + 1.0 g1 = [0, 1]
    combined = pcgrad([g1, g2], torch.Generator().manual_seed(0))
    assert torch.allclose(combined, torch.tensor([0.5, 1.5]))
    # each projected gradient is orthogonal to the original it conflicted with
    assert float(torch.tensor([0.5, 0.5]).dot(g2)) == 0.0
    assert float(torch.tensor([0.0, 1.0]).dot(g1)) == 0.0
    assert conflict_share([g1, g2]) == 1.0


def test_pcgrad_leaves_non_conflicting_gradients_unchanged() -> None:
    g1, g2, g3 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, 0.0]), torch.tensor([0.0, 0.0, 2.0])
    generator = torch.Generator().manual_seed(3)
    assert torch.equal(pcgrad([g1, g2, g3], generator), g1 + g2 + g3)
    assert conflict_share([g1, g2, g3]) == 0.0
    # one conflicting pair among three: the orthogonal third gradient passes through untouched, in any order
    h1, h2, h3 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([-1.0, 1.0, 0.0]), torch.tensor([0.0, 0.0, 1.0])
    for seed in range(5):
        result = pcgrad([h1, h2, h3], torch.Generator().manual_seed(seed))
        assert torch.allclose(result, torch.tensor([0.5, 1.5, 1.0]))
    assert torch.equal(combine_gradients([h1, h2, h3], False, generator), h1 + h2 + h3)


def test_learning_rate_schedule_follows_steps_or_the_clock() -> None:
    from rewardmodel.train import learning_rate_factor, run_progress

    assert learning_rate_factor(0, 4, 0.0) == pytest.approx(0.25)
    assert learning_rate_factor(10, 4, 0.0) == pytest.approx(1.0)
    assert learning_rate_factor(10, 4, 1.0) == pytest.approx(0.1)
    assert run_progress(5, 10, seconds=0.0, max_minutes=None) == 0.5
    assert run_progress(5, 10, seconds=540.0, max_minutes=10) == 0.9  # the clock binds first


# ------------------------------------------------------------------------------------------ batching
def test_sum_response_log_probs_reads_shifted_response_positions() -> None:
    batch = collate_sequences([[5, 6], [7]], [[1, 2], [3, 0, 2]], pad_id=9)
    assert batch.input_ids.tolist() == [[5, 6, 1, 2], [7, 3, 0, 2]]
    assert batch.response_mask.tolist() == [[False, False, True, True], [False, True, True, True]]
    # hidden[b, t] IS the log-prob row used to predict token t+1
    table = torch.log_softmax(torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4).sin(), dim=-1)
    totals = sum_response_log_probs(table, batch, lambda h: h)
    expected_row0 = table[0, 1, 1] + table[0, 2, 2]
    expected_row1 = table[1, 0, 3] + table[1, 1, 0] + table[1, 2, 2]
    assert torch.allclose(totals, torch.stack([expected_row0, expected_row1]))


# ------------------------------------------------------------------------------------------ real base model
@pytest.fixture(scope="module")
def base_dir() -> Path:
    from prosocialalign.core.models import prepare_default_model

    return prepare_default_model()


@pytest.fixture(scope="module")
def encoder(base_dir: Path):
    from transformers import AutoTokenizer

    from rewardmodel.encoding import PairEncoder

    return PairEncoder(AutoTokenizer.from_pretrained(base_dir), max_prompt_tokens=24, max_response_tokens=12)


def _pairs(split: str = "train") -> list[PreferencePair]:
    """Hand-made pairs, two per attribute, with a clear stylistic contrast the ARM can pick up."""
    prompts = ["I failed my exam and feel awful.", "Can you help me with my homework about volcanoes?"]
    good = ["I'm sorry, that sounds really hard. It makes sense to feel upset.", "Of course, happy to help."]
    bad = ["Whatever. Study harder next time, it is your own fault.", "No. Do it yourself."]
    return [
        PreferencePair(attribute, prompt, chosen, rejected, source="hand", split=split)
        for attribute in ALL_ATTRIBUTES
        for prompt, chosen, rejected in zip(prompts, good, bad, strict=True)
    ]


def test_encoder_uses_the_chat_template_and_truncates(encoder) -> None:
    tokenizer = encoder.tokenizer
    prompt = "Hello there"
    template = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    assert encoder.encode_prompt(prompt) == tokenizer(template, add_special_tokens=False)["input_ids"]
    short = encoder.encode_response("Fine, thanks.")
    assert short[-1] == encoder.end_of_turn_id and tokenizer.decode(short[:-1]) == "Fine, thanks."
    long_response = encoder.encode_response(" ".join(["word"] * 50))
    assert len(long_response) == 12 and encoder.end_of_turn_id not in long_response  # cut: no end-of-turn
    long_prompt = " ".join(f"w{i}" for i in range(200))
    decoded = tokenizer.decode(encoder.encode_prompt(long_prompt))
    assert "w199" in decoded and "w0 " not in decoded and decoded.startswith("<|im_start|>system")


def test_fresh_arm_equals_the_base_model_cut_after_its_layers(base_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from rewardmodel.config import ArmConfig
    from rewardmodel.model import MultiAttributeARM

    arm = MultiAttributeARM.from_base(base_dir, ArmConfig(num_layers=2)).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 504, 2683, 28, 1351, 314], [1, 504, 9, 77, 2, 2]])
    mask = torch.tensor([[1] * 6, [1] * 4 + [0, 0]])
    with torch.no_grad():
        states = base(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        expected_hidden = states[2]  # after the first two decoder layers, before the final norm
        hidden = arm(ids, mask)
        assert hidden.shape == (2, 6, len(ALL_ATTRIBUTES), 576)
        # fresh LoRA (B = 0) and head adapters (up = 0) leave every attribute at the truncated base
        for a in range(len(ALL_ATTRIBUTES)):
            assert torch.allclose(hidden[:, :, a][mask.bool()], expected_hidden[mask.bool()], atol=1e-5)
        expected_logits = base.lm_head(base.model.norm(expected_hidden))
        assert torch.allclose(arm.logits_from_hidden(hidden[:, :, 0]), expected_logits, atol=1e-4)
    trainable = {n for n, p in arm.named_parameters() if p.requires_grad}
    assert "trunk.embed_tokens.weight" not in trainable and "final_norm.weight" not in trainable
    assert {"head_down", "head_up"} <= trainable and all(
        ".lora_" in n for n in trainable - {"head_down", "head_up"}
    )


def test_training_steps_lower_the_loss(base_dir: Path, encoder) -> None:
    from rewardmodel.config import ArmConfig
    from rewardmodel.loss import arm_response_log_probs
    from rewardmodel.model import MultiAttributeARM
    from rewardmodel.train import train_step

    torch.manual_seed(0)
    arm = MultiAttributeARM.from_base(base_dir, ArmConfig(num_layers=2))
    batches: dict[str, SequenceBatch] = {}
    for attribute in ALL_ATTRIBUTES:
        pairs = [p for p in _pairs() if p.attribute == attribute]
        batches[attribute] = collate_pairs([encoder.encode_pair(p) for p in pairs], encoder.pad_id)

    def mean_loss() -> float:
        with torch.no_grad():
            losses = []
            for attribute, batch in batches.items():
                log_probs = arm_response_log_probs(arm, batch, arm.attribute_index(attribute))
                losses.append(float(genarm_pairwise_loss(log_probs[:2], log_probs[2:], 0.1)))
        return sum(losses) / len(losses)

    before = mean_loss()
    optimizer = torch.optim.AdamW(arm.shared_parameters() + arm.head_parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        stats = train_step(arm, optimizer, batches, 0.1, True, generator, max_grad_norm=1.0)
    after = mean_loss()
    assert set(stats["attributes"]) == set(ALL_ATTRIBUTES)
    assert after < before - 0.05, (before, after)


def _write_split(folder: Path, pairs: list[PreferencePair], split: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(asdict(p)) + "\n" for p in pairs))


def _tiny_config(tmp_path: Path, base_dir: Path, steps: int, resume: bool = False, out: str = "arm"):
    from rewardmodel.config import ArmConfig, TrainConfig

    return TrainConfig(
        data_dir=tmp_path / "data",
        out_dir=tmp_path / out,
        checkpoint_dir=tmp_path / f"ckpt-{out}",
        base_dir=base_dir,
        steps=steps,
        pairs_per_attribute=1,
        lr=3e-3,
        warmup_steps=1,
        max_prompt_tokens=16,
        max_response_tokens=8,
        log_every=1,
        checkpoint_every=2,
        resume=resume,
        arm=ArmConfig(num_layers=2, lora_rank=4, lora_alpha=8.0, head_rank=4),
    )


def test_train_resume_artifact_round_trip_and_base_mismatch(
    tmp_path: Path, base_dir: Path, encoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file

    from rewardmodel import train as train_module
    from rewardmodel.artifact import (
        CONFIG_FILE,
        WEIGHTS_FILE,
        ArtifactMismatchError,
        arm_weights_for_serving,
        load_arm,
    )
    from rewardmodel.loss import arm_response_log_probs

    _write_split(tmp_path / "data", _pairs(), "train")
    straight = train_module.train(_tiny_config(tmp_path, base_dir, steps=3, out="straight"))
    # a run killed during step 3 (after the step-2 checkpoint), then resumed, ends where the straight run does
    real_step, calls = train_module.train_step, []

    def killed_at_third_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", killed_at_third_step)
    with pytest.raises(KeyboardInterrupt):
        train_module.train(_tiny_config(tmp_path, base_dir, steps=3, out="resumed"))
    monkeypatch.setattr(train_module, "train_step", real_step)
    resumed = train_module.train(_tiny_config(tmp_path, base_dir, steps=3, resume=True, out="resumed"))
    straight_weights, resumed_weights = load_file(straight / WEIGHTS_FILE), load_file(resumed / WEIGHTS_FILE)
    assert straight_weights.keys() == resumed_weights.keys()
    for name, tensor in straight_weights.items():
        assert torch.allclose(tensor, resumed_weights[name], atol=1e-6), name
    assert any(float(t.abs().max()) > 0 for n, t in straight_weights.items() if "lora_B" in n)  # it trained
    log = [
        json.loads(line) for line in (tmp_path / "ckpt-resumed" / "train_log.jsonl").read_text().splitlines()
    ]
    assert [record["step"] for record in log] == [1, 2, 3]
    assert set(log[0]["attributes"]["empathy"]) == {"loss", "accuracy", "nll"}

    # round trip: the loaded artifact gives the same log-probs as the model that was saved
    artifact_bytes = sum(f.stat().st_size for f in straight.iterdir())
    assert artifact_bytes < 25 * 2**20
    arm = load_arm(base_dir, straight)
    assert not arm.training and not any(p.requires_grad for p in arm.parameters())
    batch = collate_pairs([encoder.encode_pair(p) for p in _pairs()[:2]], encoder.pad_id)
    again = load_arm(base_dir, straight)
    with torch.no_grad():
        for attribute in ("empathy", "safety"):
            index = arm.attribute_index(attribute)
            assert torch.equal(
                arm_response_log_probs(arm, batch, index), arm_response_log_probs(again, batch, index)
            )
    saved = load_file(straight / WEIGHTS_FILE)
    for name, tensor in arm.trainable_state_dict().items():
        assert torch.equal(tensor, saved[name])

    # merged serving weights reproduce the trunk exactly in a plain LlamaModel
    from transformers.models.llama.modeling_llama import LlamaModel

    weights = arm_weights_for_serving(arm)
    plain = LlamaModel(arm.llama_config).eval()
    plain_state = {k: v for k, v in weights.items() if k in plain.state_dict()}
    plain_state["norm.weight"] = torch.ones(576)  # the plain model's own final norm is not used below
    plain.load_state_dict(plain_state, strict=True)
    plain.norm = torch.nn.Identity()
    with torch.no_grad():
        expected = arm.trunk_hidden(batch.input_ids, batch.attention_mask)
        merged = plain(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        assert torch.allclose(merged, expected, atol=1e-4)
    assert weights["head_adapters.safety.up"].shape == (4, 576)
    assert weights["lm_head.weight"] is weights["embed_tokens.weight"]

    # evaluation report on a tiny test split: ARM, both baselines, the HH-RLHF subset and an "ablation" artifact
    from rewardmodel.data import HH_RLHF_SOURCE
    from rewardmodel.evaluate import EvalConfig, run_evaluation

    test_pairs = [
        PreferencePair(
            p.attribute,
            p.prompt,
            p.chosen,
            p.rejected,
            HH_RLHF_SOURCE if p.attribute == "safety" else "hand",
            split="test",
        )
        for p in _pairs()
    ]
    _write_split(tmp_path / "data", test_pairs, "test")
    report = run_evaluation(
        EvalConfig(
            data_dir=tmp_path / "data",
            artifact_dir=straight,
            ablation_artifact_dir=resumed,
            base_dir=base_dir,
            report_path=tmp_path / "report.json",
            max_pairs_per_attribute=1,
            command="test",
        )
    )
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert set(report["attributes"]) == set(ALL_ATTRIBUTES)
    for row in [*report["attributes"].values(), report["safety_hh_rlhf_test"]]:
        assert row["test_pairs"] == 1 and row["baseline_length"] == 1.0  # every chosen text here is longer
        assert row["accuracy"] in (0.0, 0.5, 1.0) and row["baseline_base_lm"] in (0.0, 0.5, 1.0)
    assert report["ablation_no_pcgrad"]["attributes"]["empathy"]["test_pairs"] == 1
    assert 0.0 <= report["mean_accuracy"] <= 1.0 and report["command"] == "test"

    # a base that differs from the artifact's is refused with a message naming the difference
    document = json.loads((straight / CONFIG_FILE).read_text())
    document["base"]["embedding_sha256"] = "0" * 64
    (straight / CONFIG_FILE).write_text(json.dumps(document))
    with pytest.raises(ArtifactMismatchError, match="embedding_sha256"):
        load_arm(base_dir, straight)
    document["base"]["num_hidden_layers"] = 24
    (straight / CONFIG_FILE).write_text(json.dumps(document))
    with pytest.raises(ArtifactMismatchError, match="num_hidden_layers"):
        load_arm(base_dir, straight)


def test_calibration_threshold_masks_at_most_the_quantile_of_safe_tokens() -> None:
    from rewardmodel.calibrate import quantile_threshold

    margins = torch.tensor([0.5, -3.0, 1.0, -1.0, 0.0, 2.0, -2.0, 0.2, 0.3, 0.4])
    assert quantile_threshold(margins, 0.2) == -2.0  # k = 2: the 2nd smallest; only -3 lies below it
    assert quantile_threshold(margins, 0.35) == -1.0  # k = 3; -3 and -2 lie below it
    assert quantile_threshold(margins, 0.01) == -3.0  # k = 0 -> the smallest: nothing masked
    for q in (0.01, 0.1, 0.3, 0.49):
        assert (margins < quantile_threshold(margins, q)).float().mean() < max(q, 0.1)


def test_response_guard_calibration_uses_the_lowest_running_mean_from_guard_tokens_on() -> None:
    from rewardmodel.calibrate import lowest_running_means

    margins = torch.tensor([-4.0, 2.0, 0.0, 1.0, -9.0, 3.0, 3.0, 3.0, 0.5])
    response = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2])
    lowest = lowest_running_means(margins, response, guard_tokens=2)
    # response 0: running means -4, -1, -2/3, -1/4; from the 2nd token on the lowest is -1.
    # response 1: -9, -3, -1, 0 -> -3 (the single-token -9 comes before the guard judges).
    # response 2 is shorter than the guard's first judgement: never judged, so absent.
    assert lowest == pytest.approx({0: -1.0, 1: -3.0})


def test_calibration_auc_by_hand() -> None:
    from rewardmodel.safety_head import auc

    assert auc([3.0, 2.0], [1.0, 2.0]) == 0.875  # 3>1, 3>2, 2>1 win; 2=2 counts half
    assert auc([0.0], [1.0]) == 0.0
