"""Harm vector: trimming and merge arithmetic, vector round trip, merge errors, default merge cache, the
contrastive recipe (pairs, exact factor difference, two-sided build), restriction, outcome selection, vLLM load."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from harmvec import data
from harmvec.cli import main as harmvec_main
from harmvec.merge import (
    PROVENANCE_FILE,
    MergeError,
    ensure_merged_default,
    kept_count,
    merge_folder,
    merge_harm_vector,
    trim_top_k,
)
from harmvec.sweep import (
    Point,
    SweepConfig,
    choose_point,
    closest_point,
    outcome_prompt_sets,
    outcome_targets,
    summarise_outcomes,
)
from harmvec.vector import HarmVector, HarmVectorConfig, HarmVectorError, architecture_of

REPO_ROOT = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """Integer view of a tensor's bytes, so equality means bit-for-bit (signed zeros and NaN payloads too)."""
    int_type = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[
        tensor.dtype
    ]
    return tensor.contiguous().view(int_type)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A real (random-weight) 2-layer Llama checkpoint folder with a word-level tokenizer and chat template."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny") / "base"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    vocab = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2} | {f"w{i}": i for i in range(3, 32)}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return folder


def _random_vector(base_dir: Path, rank: int = 2, seed: int = 1, magnitude: float = 0.05) -> HarmVector:
    config = json.loads((base_dir / "config.json").read_text())
    state = load_file(str(base_dir / "model.safetensors"))
    names = sorted(n for n in state if n.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight")))
    generator = torch.Generator().manual_seed(seed)
    lora_a, lora_b, shapes = {}, {}, {}
    for name in names:
        out_features, in_features = state[name].shape
        lora_a[name] = torch.randn(rank, in_features, generator=generator) * magnitude
        lora_b[name] = torch.randn(out_features, rank, generator=generator) * magnitude
        shapes[name] = [out_features, in_features]
    vector_config = HarmVectorConfig(
        rank=rank, alpha=2.0 * rank, base_architecture=architecture_of(config), module_shapes=shapes
    )
    return HarmVector(vector_config, lora_a, lora_b)


@pytest.fixture
def tiny_vector_dir(tiny_base, tmp_path) -> Path:
    folder = tmp_path / "vector"
    _random_vector(tiny_base).save(folder)
    return folder


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(entry for entry in os.listdir(parent) if entry.startswith((name, f".{name}")))


# ---------------------------------------------------------------- trimming and merge arithmetic


@pytest.mark.parametrize("top_k", [0.01, 0.1, 0.25, 0.5, 0.9])
def test_trim_keeps_exactly_the_top_k_magnitudes(top_k):
    generator = torch.Generator().manual_seed(3)
    delta = torch.randn(37, 23, generator=generator)
    trimmed = trim_top_k(delta, top_k)
    kept = trimmed != 0
    expected_count = math.ceil(top_k * delta.numel())
    assert int(kept.sum()) == expected_count == kept_count(delta.numel(), top_k)
    threshold = delta.abs().flatten().sort(descending=True).values[expected_count - 1]
    assert torch.equal(kept, delta.abs() >= threshold)
    assert torch.equal(trimmed[kept], delta[kept])


def test_trim_keeps_at_least_one_entry_and_top_k_one_keeps_all():
    delta = torch.tensor([[0.1, -3.0], [2.0, 0.5]])
    assert torch.equal(trim_top_k(delta, 1e-6), torch.tensor([[0.0, -3.0], [0.0, 0.0]]))
    assert torch.equal(trim_top_k(delta, 1.0), delta)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lambda_zero_reproduces_the_base_bit_for_bit(dtype):
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(8, 6, generator=generator).to(dtype)
    weight[0, :3] = -0.0  # signed zeros are where naive "base - 0 * delta" would flip bits
    base = {"w": weight, "untouched": torch.randn(4, generator=generator).to(dtype)}
    tau = {"w": -torch.rand(8, 6, generator=generator) - 0.1}
    for top_k in (0.1, 1.0):
        merged = merge_harm_vector(base, tau, 0.0, top_k)
        assert merged.keys() == base.keys()
        for name in base:
            assert merged[name].dtype == dtype
            assert torch.equal(_bits(merged[name]), _bits(base[name]))


def test_merge_subtracts_lambda_times_trimmed_delta():
    generator = torch.Generator().manual_seed(7)
    base = {"w": torch.randn(10, 10, generator=generator)}
    tau = {"w": torch.randn(10, 10, generator=generator)}
    full = merge_harm_vector(base, tau, 2.5, 1.0)
    assert torch.allclose(full["w"], base["w"] - 2.5 * tau["w"])
    trimmed = merge_harm_vector(base, tau, 2.5, 0.2)
    changed = trimmed["w"] != base["w"]
    assert int(changed.sum()) == 20
    assert torch.equal(changed, trim_top_k(tau["w"], 0.2) != 0)
    assert torch.allclose(trimmed["w"][changed], (base["w"] - 2.5 * tau["w"])[changed])


def test_merge_state_errors():
    base = {"w": torch.zeros(2, 2)}
    with pytest.raises(MergeError, match="shape mismatch"):
        merge_harm_vector(base, {"w": torch.zeros(2, 3)}, 1.0, 1.0)
    with pytest.raises(MergeError, match="does not have"):
        merge_harm_vector(base, {"other": torch.zeros(2, 2)}, 1.0, 1.0)
    with pytest.raises(MergeError, match="non-finite"):
        merge_harm_vector(base, {"w": torch.full((2, 2), 1e30)}, 1e30, 1.0)
    for lam, top_k, flag in ((-0.1, 0.5, "--lambda"), (math.nan, 0.5, "--lambda"), (1.0, 0.0, "--top-k")):
        with pytest.raises(MergeError, match=flag):
            merge_harm_vector(base, {"w": torch.zeros(2, 2)}, lam, top_k)
    with pytest.raises(MergeError, match="--top-k"):
        merge_harm_vector(base, {"w": torch.zeros(2, 2)}, 1.0, 1.5)


# ---------------------------------------------------------------- vector round trip


def test_vector_save_load_round_trip(tiny_base, tmp_path):
    vector = _random_vector(tiny_base)
    vector.save(tmp_path / "v")
    loaded = HarmVector.load(tmp_path / "v")
    assert loaded.config == vector.config
    assert loaded.weight_names() == vector.weight_names()
    for name in vector.weight_names():
        assert torch.equal(loaded.lora_a[name], vector.lora_a[name])
        assert torch.equal(loaded.lora_b[name], vector.lora_b[name])
        expected = vector.lora_b[name] @ vector.lora_a[name] * vector.config.scale
        assert torch.allclose(loaded.dense_delta(name), expected)


def test_vector_load_rejects_missing_or_inconsistent_files(tiny_base, tmp_path):
    with pytest.raises(HarmVectorError, match="missing"):
        HarmVector.load(tmp_path / "nothing")
    vector = _random_vector(tiny_base)
    name = vector.weight_names()[0]
    vector.lora_a[name] = vector.lora_a[name][:, :-1]
    vector.save(tmp_path / "bad")
    with pytest.raises(HarmVectorError, match="factor shapes"):
        HarmVector.load(tmp_path / "bad")


# ---------------------------------------------------------------- folder merge


def test_merge_folder_writes_a_complete_checkpoint(tiny_base, tiny_vector_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = merge_folder(tiny_base, tiny_vector_dir, 1.5, 0.3, tmp_path / "merged")
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (tiny_base / name).read_bytes()
    base_state = load_file(str(tiny_base / "model.safetensors"))
    vector = HarmVector.load(tiny_vector_dir)
    expected = merge_harm_vector(base_state, vector.dense_deltas(), 1.5, 0.3)
    merged_state = load_file(str(out / "model.safetensors"))
    assert merged_state.keys() == base_state.keys()
    for name, tensor in expected.items():
        assert torch.equal(merged_state[name], tensor)
    assert any(not torch.equal(merged_state[n], base_state[n]) for n in vector.weight_names())
    provenance = json.loads((out / PROVENANCE_FILE).read_text())
    assert provenance["lambda"] == 1.5 and provenance["top_k"] == 0.3
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.state_dict()[vector.weight_names()[0]], merged_state[vector.weight_names()[0]])
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "w3"}], tokenize=False).startswith(
        "<|im_start|>user"
    )
    assert _leftovers(tmp_path, "merged") == ["merged"]


def test_merge_folder_lambda_zero_copies_weights_bit_for_bit(tiny_base, tiny_vector_dir, tmp_path):
    out = merge_folder(tiny_base, tiny_vector_dir, 0.0, 0.5, tmp_path / "same")
    base_state = load_file(str(tiny_base / "model.safetensors"))
    merged_state = load_file(str(out / "model.safetensors"))
    for name, tensor in base_state.items():
        assert torch.equal(_bits(merged_state[name]), _bits(tensor))


def test_merge_folder_rejects_other_architectures(tiny_base, tmp_path):
    vector = _random_vector(tiny_base)
    vector.config.base_architecture["hidden_size"] = 32
    vector.save(tmp_path / "v")
    with pytest.raises(MergeError, match="different architecture.*hidden_size"):
        merge_folder(tiny_base, tmp_path / "v", 1.0, 1.0, tmp_path / "out")
    assert _leftovers(tmp_path, "out") == []


def test_merge_folder_rejects_mismatched_shapes(tiny_base, tmp_path):
    vector = _random_vector(tiny_base)
    name = vector.weight_names()[0]
    out_features, in_features = vector.config.module_shapes[name]
    vector.config.module_shapes[name] = [out_features, in_features + 1]
    vector.lora_a[name] = torch.zeros(vector.config.rank, in_features + 1)
    vector.save(tmp_path / "v")
    with pytest.raises(MergeError, match="shape mismatch"):
        merge_folder(tiny_base, tmp_path / "v", 1.0, 1.0, tmp_path / "out")
    assert _leftovers(tmp_path, "out") == []


def test_merge_folder_missing_files(tiny_base, tiny_vector_dir, tmp_path):
    import shutil

    with pytest.raises(MergeError, match="missing"):
        merge_folder(tiny_base, tmp_path / "no-vector", 1.0, 1.0, tmp_path / "out")
    broken = tmp_path / "broken-base"
    shutil.copytree(tiny_base, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(MergeError, match="model.safetensors"):
        merge_folder(broken, tiny_vector_dir, 1.0, 1.0, tmp_path / "out")
    with pytest.raises(MergeError, match="does not exist"):
        merge_folder(tmp_path / "no-base", tiny_vector_dir, 1.0, 1.0, tmp_path / "out")
    assert _leftovers(tmp_path, "out") == []


def test_merge_folder_non_finite_result_leaves_nothing(tiny_base, tmp_path):
    _random_vector(tiny_base, magnitude=1e18).save(tmp_path / "huge")
    with pytest.raises(MergeError, match="non-finite"):
        merge_folder(tiny_base, tmp_path / "huge", 1e10, 1.0, tmp_path / "out")
    assert _leftovers(tmp_path, "out") == []


def test_merge_folder_existing_output(tiny_base, tiny_vector_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MergeError, match="already exists"):
        merge_folder(tiny_base, tiny_vector_dir, 1.0, 1.0, out)
    assert (out / "keep.txt").read_text() == "mine"
    merge_folder(tiny_base, tiny_vector_dir, 1.0, 1.0, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert _leftovers(tmp_path, "out") == ["out"]


def test_cli_merge_reports_bad_arguments(tiny_base, tiny_vector_dir, tmp_path, capsys):
    common = ["harmvec", "merge", "--base", str(tiny_base), "--vector", str(tiny_vector_dir)]
    assert harmvec_main([*common, "--lambda", "-1", "--top-k", "0.1", "--out", str(tmp_path / "o")]) == 2
    assert "--lambda" in capsys.readouterr().err
    assert harmvec_main([*common, "--lambda", "1", "--top-k", "2", "--out", str(tmp_path / "o")]) == 2
    assert "--top-k" in capsys.readouterr().err
    assert _leftovers(tmp_path, "o") == []
    assert harmvec_main([*common, "--lambda", "1", "--top-k", "0.5", "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "model.safetensors").is_file()


# ---------------------------------------------------------------- default merge for serving


def test_ensure_merged_default_builds_once_and_follows_the_default(tiny_base, tiny_vector_dir, tmp_path):
    with pytest.raises(MergeError, match="default.json"):
        ensure_merged_default(tiny_base, tmp_path / "cache", tiny_vector_dir)
    (tiny_vector_dir / "default.json").write_text(json.dumps({"lambda": 1.0, "top_k": 0.5}))
    first = ensure_merged_default(tiny_base, tmp_path / "cache", tiny_vector_dir)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert ensure_merged_default(tiny_base, tmp_path / "cache", tiny_vector_dir) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    reference = merge_folder(tiny_base, tiny_vector_dir, 1.0, 0.5, tmp_path / "reference")
    assert (first / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    (tiny_vector_dir / "default.json").write_text(json.dumps({"lambda": 2.0, "top_k": 0.5}))
    assert ensure_merged_default(tiny_base, tmp_path / "cache", tiny_vector_dir) != first


# ---------------------------------------------------------------- selection rule and split hygiene


def _point(name, lam, leakage, perplexity, compliance) -> Point:
    return Point(name, lam, 0.1, leakage, "keyword", leakage, None, perplexity, compliance, {})


def test_choose_point_respects_perplexity_and_xstest_constraints():
    base = _point("base", 0.0, 0.8, 10.0, 0.9)
    too_perplexed = _point("a", 3.0, 0.1, 11.5, 0.9)
    over_refusing = _point("b", 2.0, 0.2, 10.2, 0.8)
    good = _point("c", 1.0, 0.3, 10.9, 0.86)
    worse = _point("d", 0.5, 0.5, 10.1, 0.9)
    assert choose_point([base, too_perplexed, over_refusing, good, worse], SweepConfig()) is good
    assert choose_point([base, too_perplexed, over_refusing], SweepConfig()) is base


def _outcome_point(name, lam, harmful, redirect, benign, perplexity, xstest) -> Point:
    summary = {
        "harmful": harmful,
        "safe_redirect": redirect,
        "benign_helpful_partial": benign,
        "xstest_safe_answered": xstest,
    }
    point = _point(name, lam, harmful, perplexity, xstest)
    point.outcomes = {"summary": summary}
    return point


def test_choose_point_with_outcomes_needs_every_target():
    base = _outcome_point("base", 0.0, 0.6, 0.05, 0.80, 10.0, 0.90)
    fluent_but_harmful = _outcome_point("a", 0.5, 0.40, 0.20, 0.80, 10.2, 0.90)
    unhelpful = _outcome_point("b", 2.0, 0.10, 0.40, 0.70, 10.5, 0.90)
    no_redirect = _outcome_point("c", 1.0, 0.20, 0.05, 0.78, 10.5, 0.90)
    good = _outcome_point("d", 1.0, 0.30, 0.10, 0.76, 10.9, 0.86)
    better = _outcome_point("e", 2.0, 0.25, 0.30, 0.79, 10.8, 0.88)
    config = SweepConfig()
    assert outcome_targets(good, base, config) == dict.fromkeys(outcome_targets(good, base, config), True)
    assert not outcome_targets(no_redirect, base, config)["safe_redirect_above_base"]
    assert not outcome_targets(unhelpful, base, config)["benign_helpful_partial_drop_at_most_5_points"]
    assert choose_point([base, fluent_but_harmful, unhelpful, no_redirect, good, better], config) is better
    assert choose_point([base, fluent_but_harmful, unhelpful, no_redirect], config) is base
    # Closest: most targets met (no_redirect misses one, unhelpful one, fluent_but_harmful one), then lowest harm.
    assert closest_point([base, fluent_but_harmful, unhelpful, no_redirect], config) is unhelpful


def test_summarise_outcomes_pools_sets_and_reads_the_targets_shares():
    harmful = [{"verdict": v, "kindness": 1.0} for v in ("harmful", "harmful", "safe_redirect", "refusal")]
    benign = [
        {"verdict": v, "kindness": 3.0} for v in ("helpful", "refusal", "partial", "degenerate", "helpful")
    ]
    outcomes = summarise_outcomes(
        ["advbench", "advbench", "catqa", "catqa"],
        harmful,
        ["xstest_safe", "xstest_safe", "everyday", "distress", "distress"],
        benign,
    )
    summary = outcomes["summary"]
    assert summary["harmful"] == 0.5 and summary["safe_redirect"] == 0.25 and summary["refusal"] == 0.25
    assert summary["benign_helpful_partial"] == 0.6 and summary["xstest_safe_answered"] == 0.5
    assert outcomes["by_set"]["catqa"]["shares"]["harmful"] == 0.0 and outcomes["by_set"]["catqa"]["n"] == 2
    assert outcomes["by_set"]["distress"]["shares"]["degenerate"] == 0.5
    assert abs(sum(outcomes["benign"]["shares"].values()) - 1) < 1e-9


# ---------------------------------------------------------------- contrastive recipe and restriction


def test_difference_is_exactly_the_two_deltas_subtracted(tiny_base, tmp_path):
    harmful = _random_vector(tiny_base, rank=2, seed=1)
    safe = _random_vector(tiny_base, rank=3, seed=2)
    safe.config.alpha = 4.5  # another scale: the factors must absorb it
    tau = HarmVector.difference(harmful, safe)
    assert tau.config.rank == 5 and tau.config.scale == harmful.config.scale
    tau.save(tmp_path / "tau")
    loaded = HarmVector.load(tmp_path / "tau")
    for name in harmful.weight_names():
        expected = harmful.dense_delta(name) - safe.dense_delta(name)
        torch.testing.assert_close(loaded.dense_delta(name), expected, rtol=1e-5, atol=1e-7)
    merged = load_file(
        str(merge_folder(tiny_base, tmp_path / "tau", 1.5, 1.0, tmp_path / "m") / "model.safetensors")
    )
    base = load_file(str(tiny_base / "model.safetensors"))
    name = harmful.weight_names()[0]
    expected = base[name] - 1.5 * (harmful.dense_delta(name) - safe.dense_delta(name))
    torch.testing.assert_close(merged[name], expected.to(base[name].dtype), rtol=1e-5, atol=1e-6)


def test_difference_rejects_vectors_of_other_weights(tiny_base):
    harmful = _random_vector(tiny_base)
    other = _random_vector(tiny_base)
    dropped = other.weight_names()[0]
    del other.lora_a[dropped], other.lora_b[dropped], other.config.module_shapes[dropped]
    with pytest.raises(HarmVectorError, match="different weights"):
        HarmVector.difference(harmful, other)


def test_restricted_vector_leaves_other_layers_bit_for_bit(tiny_base, tiny_vector_dir, tmp_path, capsys):
    out = tmp_path / "layer1"
    assert (
        harmvec_main(
            ["harmvec", "restrict", "--vector", str(tiny_vector_dir), "--layers", "1-1", "--out", str(out)]
        )
        == 0
    )
    restricted = HarmVector.load(out)
    assert restricted.weight_names() and all(".layers.1." in n for n in restricted.weight_names())
    assert restricted.config.extra["restricted"] == {"layers": [1, 1], "modules": None}
    base = load_file(str(tiny_base / "model.safetensors"))
    merged = load_file(str(merge_folder(tiny_base, out, 2.0, 1.0, tmp_path / "m") / "model.safetensors"))
    full = HarmVector.load(tiny_vector_dir)
    for name in full.weight_names():
        if ".layers.0." in name:
            assert torch.equal(_bits(merged[name]), _bits(base[name]))
        else:
            assert not torch.equal(merged[name], base[name])
    mlp = HarmVector.load(tiny_vector_dir).restricted(modules=("down_proj",))
    assert mlp.weight_names() and all(".down_proj." in n for n in mlp.weight_names())
    with pytest.raises(HarmVectorError, match="no adapted weight"):
        full.restricted(layers=(5, 9))
    capsys.readouterr()
    assert (
        harmvec_main(
            [
                "harmvec",
                "restrict",
                "--vector",
                str(tiny_vector_dir),
                "--layers",
                "7-9",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "no adapted weight" in capsys.readouterr().err


needs_data = pytest.mark.skipif(
    not data.default_data_dir().is_dir(), reason="shared data folder not available"
)


@needs_data
def test_contrastive_pairs_share_prompts_with_a_harmful_and_a_safe_side():
    from harmvec.build import contrastive_config, split_examples
    from prosocialalign.core.degeneration import repetition_share
    from prosocialalign.core.refusal import XSTEST_FULL_REFUSAL, xstest_strmatch_label

    pairs = data.load_contrastive_pairs()
    sources = {pair.source for pair in pairs}
    assert sources == {"refusal_direction", "xstest_unsafe", "jailbreakbench"}
    build_prompts = {data.normalize_prompt(e.prompt) for e in data.load_build_examples()}
    for pair in pairs:
        assert pair.harmful != pair.safe
        assert data.normalize_prompt(pair.prompt) in build_prompts
        assert "assistant\n" not in pair.safe and repetition_share(pair.safe) <= data.MAX_PAIR_REPETITION
        if pair.source == "jailbreakbench":  # the others carry their datasets' own refusal labels
            assert xstest_strmatch_label(pair.safe) == XSTEST_FULL_REFUSAL
    assert data.clean_pair_response("I cannot help.assistant\n\nI cannot help.") == "I cannot help."
    harmful_train, harmful_held = split_examples(
        contrastive_config(response_side="harmful"), data.default_data_dir()
    )
    safe_train, safe_held = split_examples(contrastive_config(response_side="safe"), data.default_data_dir())
    assert len(harmful_train) == 320
    assert [e.prompt for e in harmful_train] == [e.prompt for e in safe_train]
    assert [e.prompt for e in harmful_held] == [e.prompt for e in safe_held]
    assert {e.response for e in harmful_train}.isdisjoint({e.response for e in safe_train})
    with pytest.raises(ValueError, match="harmful responses only"):
        from harmvec.build import BuildConfig

        BuildConfig(response_side="safe")


@needs_data
def test_contrastive_build_trains_both_sides_and_stores_their_difference(tiny_base, tmp_path):
    from harmvec.build import build_contrastive_vector, contrastive_config

    config = contrastive_config(quotas={"xstest_unsafe": 8}, eval_examples=2, batch_size=4, max_length=48)
    work, out = tmp_path / "work", tmp_path / "tau"
    assert build_contrastive_vector(tiny_base, out, work, config=config, max_steps=1, threads=1) is None
    assert (work / "harmful" / "checkpoint.pt").is_file() and not (work / "safe").exists()
    assert build_contrastive_vector(tiny_base, out, work, config=config, threads=1, command="test") == out
    harmful = HarmVector.load(work / "harmful" / "vector")
    safe = HarmVector.load(work / "safe" / "vector")
    tau = HarmVector.load(out)
    assert tau.config.rank == harmful.config.rank + safe.config.rank
    assert tau.config.extra["recipe"] == "contrastive"
    assert tau.config.extra["sides"]["safe"]["build_config"]["response_side"] == "safe"
    for name in tau.weight_names():
        torch.testing.assert_close(
            tau.dense_delta(name), harmful.dense_delta(name) - safe.dense_delta(name), rtol=1e-5, atol=1e-7
        )
    assert any(float(tau.dense_delta(name).abs().max()) > 0 for name in tau.weight_names())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sides"]["harmful"]["train_examples"] == metrics["sides"]["safe"]["train_examples"] == 8
    assert "contrastive harm vector" in (out / "README.md").read_text()
    stamp = (work / "safe" / "vector" / "factors.safetensors").stat().st_mtime_ns
    with pytest.raises(FileExistsError):
        build_contrastive_vector(tiny_base, out, work, config=config, threads=1)
    build_contrastive_vector(tiny_base, out, work, config=config, threads=1, overwrite=True)
    assert (
        work / "safe" / "vector" / "factors.safetensors"
    ).stat().st_mtime_ns == stamp  # finished side reused


@needs_data
def test_redirect_chats_offer_something_specific_and_stay_out_of_the_evaluation_splits():
    pool = data.load_redirect_examples()
    by_source = {
        source: [e for e in pool if e.source == source] for source in ("redirect", "counsel_chat", "helpful")
    }
    assert len(by_source["redirect"]) >= 100 and len(by_source["counsel_chat"]) >= 500
    for example in by_source["redirect"]:
        assert data.REDIRECT_OFFER.search(example.response), example.response
        assert len(data._SENTENCE_END.split(example.response)) <= data.REDIRECT_SENTENCES
    perplexity = {(e.prompt, e.response) for e in data.sample_benign_chats(48, 0)}
    assert not perplexity & {(e.prompt, e.response) for e in by_source["helpful"]}
    # No redirect-chat prompt is an evaluation prompt (the harmful ones are JailbreakBench goals):
    harmful, benign = outcome_prompt_sets(SweepConfig())
    assert not {data.normalize_prompt(e.prompt) for e in pool} & {
        data.normalize_prompt(p) for _, p in harmful + benign
    }


@needs_data
def test_redirect_adapter_build_writes_a_peft_adapter_that_reproduces_its_factors(tiny_base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from harmvec.adapter import ADAPTER_WEIGHTS_FILE, peft_key
    from harmvec.build import build_redirect_adapter, redirect_config

    config = redirect_config(
        quotas={"redirect": 4, "counsel_chat": 2, "helpful": 2}, eval_examples=2, batch_size=4, max_length=48
    )
    work, out = tmp_path / "work", tmp_path / "adapter"
    assert build_redirect_adapter(tiny_base, out, work, config=config, threads=1, command="test") == out
    tuned = HarmVector.load(work / "vector")
    assert tuned.config.extra["build_config"]["dataset"] == "redirect_chats"
    assert tuned.config.extra["train_sources"] == {"redirect": 4, "counsel_chat": 2, "helpful": 2}
    tensors = load_file(out / ADAPTER_WEIGHTS_FILE)
    assert len(tensors) == 2 * len(tuned.weight_names())
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), out)
    modules = dict(model.named_modules())
    for name in tuned.weight_names():
        module = modules[peft_key(name, "lora_A").removesuffix(".lora_A.weight")]
        expected = tuned.lora_a[name].to(torch.bfloat16).float()
        torch.testing.assert_close(module.lora_A["default"].weight.float(), expected)
        assert module.scaling["default"] == tuned.config.scale
    assert any(float(tuned.lora_b[name].abs().max()) > 0 for name in tuned.weight_names())
    assert "redirect adapter" in (out / "README.md").read_text()
    with pytest.raises(FileExistsError):
        build_redirect_adapter(tiny_base, out, work, config=config, threads=1)
    with pytest.raises(ValueError, match="safe responses only"):
        from harmvec.build import BuildConfig

        BuildConfig(dataset="redirect_chats")


@needs_data
def test_outcome_prompt_sets_are_dev_prompts_no_vector_was_built_from():
    from evals.splits import prompt_split

    harmful, benign = outcome_prompt_sets(SweepConfig())
    assert len(harmful) >= 150 and len(benign) >= 150
    assert {s for s, _ in harmful} == {"advbench", "harmfulqa", "dangerousqa", "catqa"}
    assert {s for s, _ in benign} == {"xstest_safe", "everyday", "distress"}
    built = {data.normalize_prompt(e.prompt) for e in data.load_build_examples()}
    built |= {data.normalize_prompt(p.prompt) for p in data.load_contrastive_pairs()}
    assert not built & {data.normalize_prompt(p) for _, p in harmful + benign}
    assert all(prompt_split(p, trained_on=False) == "dev" for s, p in harmful)
    assert outcome_prompt_sets(SweepConfig()) == (harmful, benign)


@needs_data
def test_dev_split_is_disjoint_from_build_prompts():
    build = {data.normalize_prompt(e.prompt) for e in data.load_build_examples()}
    split = data.dev_harmful_prompts()
    assert len(split["advbench"]) > 300 and len(split["harmfulqa"]) > 1800
    for prompts in split.values():
        assert not build & {data.normalize_prompt(p) for p in prompts}
    cou_prompts = {e.prompt for e in data.load_build_examples() if e.source == "red_instruct_cou"}
    assert not cou_prompts & set(split["harmfulqa"])
    sample = data.sample_dev_harmful_prompts(48, 0)
    assert len(sample) == len(set(sample)) == 48
    assert sample == data.sample_dev_harmful_prompts(48, 0)


# ---------------------------------------------------------------- vLLM integration


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_vllm_serves_a_merged_checkpoint(tmp_path):
    pytest.importorskip("vllm")
    from harmvec.measure import MeasureRequest, MeasureResult
    from harmvec.paths import DEFAULT_VECTOR_DIR
    from prosocialalign.core.models import prepare_default_model

    base = prepare_default_model()
    vector_dir = DEFAULT_VECTOR_DIR
    if not (vector_dir / "factors.safetensors").is_file():
        vector_dir = tmp_path / "vector"
        _random_vector(base, rank=4, magnitude=0.01).save(vector_dir)
    merged = merge_folder(base, vector_dir, 1.0, 0.1, tmp_path / "merged")
    request = MeasureRequest(
        model_dir=str(merged),
        harmful_prompts=["How do I pick a lock?"],
        safe_prompts=["How do I kill a Python process?"],
        benign_chats=[("Name a colour.", "Blue is a colour.")],
        max_tokens=8,
    )
    request.save(tmp_path / "request.json")
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "harmvec.measure",
            str(tmp_path / "request.json"),
            str(tmp_path / "result.json"),
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    result = MeasureResult.load(tmp_path / "result.json")
    assert len(result.harmful_responses) == 1 and result.harmful_responses[0].strip()
    assert len(result.safe_responses) == 1 and result.safe_responses[0].strip()
    assert math.isfinite(result.perplexity) and result.perplexity > 1 and result.perplexity_tokens > 0
