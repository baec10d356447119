"""The reward-model data recipe, run on the real shared data."""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from prosocialalign.core.paths import BUILD_DIR, default_data_dir
from rewardmodel import cli, data
from rewardmodel.attributes import ALL_ATTRIBUTES

DATA_DIR = default_data_dir()

pytestmark = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"shared data not found at {DATA_DIR}")

# (attribute, source) -> (low, high) pair counts. Each range starts from what SOURCES.md says the file offers,
# then applies this recipe's rule and cap (see the loaders' docstrings in rewardmodel/data.py).
EXPECTED_SOURCE_COUNTS = {
    # 318 prompts x (2 hq > mq + 5 mq > lq) = 2,226, capped at 1,500
    ("empathy", "pair_reflections"): (1480, 1500),
    # 3,234 strictly ordered rating pairs, capped at 1,700
    ("empathy", "llm_empathy_evaluation:ratings"): (1680, 1700),
    # 2,523 within-question pairs, at most 6 per question (372 questions), capped at 800
    ("empathy", "counsel_chat:upvotes"): (400, 800),
    # 2,402 within-context pairs, at most 8 per context, Unauthorized Expertise capped at 1,100
    ("sensitivity", "diasafety"): (1700, 2100),
    # 1,290 "stereo" minimal pairs, capped at 600
    ("sensitivity", "crows_pairs"): (590, 600),
    # 318 prompts x 2 hq x 5 lq = 3,180, capped at 2,400
    ("non_judgmental", "pair_reflections"): (2380, 2400),
    # 839 situations with exactly one MI-non-adherent response; the other must be MI-adherent
    ("non_judgmental", "llm_empathy_evaluation:miti"): (650, 839),
    # 240 templated rephrasing pairs (the 104 retrieved ones are left out)
    ("non_judgmental", "mi_rephrasing_pp:template"): (220, 240),
    # 790 best-answer vs best-incorrect pairs
    ("truthfulness", "truthfulqa:best"): (780, 790),
    # 12,087 correct x incorrect pairs, 3 per question, capped at 2,000
    ("truthfulness", "truthfulqa:correct_x_incorrect"): (1950, 2000),
    # of the 481 edit pairs, those fixing a marked factual error
    ("truthfulness", "finegrained_rlhf_qa_feedback:factual_correction"): (150, 210),
    # 2,616 non-tie pairwise judgements
    ("helpfulness", "finegrained_rlhf_qa_feedback:preference"): (2550, 2616),
    # the other edit pairs of the 481
    ("helpfulness", "finegrained_rlhf_qa_feedback:other_correction"): (250, 300),
    # 456 full-compliance x full-refusal pairs on safe prompts
    ("helpfulness", "xstest:over_refusal"): (445, 456),
    # 294 baseline answer vs induced refusal pairs
    ("helpfulness", "refusal_direction:harmless_actadd"): (290, 294),
    # 2,312 chosen/rejected transcripts, minus those with no common prompt or an empty reply
    ("safety", data.HH_RLHF_SOURCE): (2280, 2312),
    # 4,700 same-goal pairs, 16 per goal, capped at 1,600
    ("safety", "jailbreakbench_artifacts"): (1400, 1600),
}


@pytest.fixture(scope="module")
def pairs() -> list[data.PreferencePair]:
    return data.build_pairs(DATA_DIR, seed=0)


def test_two_builds_are_equal(pairs: list[data.PreferencePair]) -> None:
    assert data.build_pairs(DATA_DIR, seed=0) == pairs


def test_no_prompt_in_two_splits_across_attributes(pairs: list[data.PreferencePair]) -> None:
    splits_by_prompt: dict[str, set[str]] = defaultdict(set)
    for pair in pairs:
        splits_by_prompt[data.normalise_text(pair.prompt)].add(pair.split)
    leaked = {prompt: splits for prompt, splits in splits_by_prompt.items() if len(splits) > 1}
    assert not leaked
    # the same prompt really is shared across attributes (e.g. PAIR prompts in empathy and non_judgmental)
    attributes_by_prompt: dict[str, set[str]] = defaultdict(set)
    for pair in pairs:
        attributes_by_prompt[pair.prompt].add(pair.attribute)
    assert any(len(attributes) > 1 for attributes in attributes_by_prompt.values())


def test_every_attribute_has_pairs_in_every_split(pairs: list[data.PreferencePair]) -> None:
    counts = data.count_pairs(pairs)
    assert set(counts) == set(ALL_ATTRIBUTES)
    for attribute, cells in counts.items():
        assert cells["total"] <= data.MAX_PAIRS_PER_ATTRIBUTE, attribute
        assert cells["total"] >= 2000, attribute
        for split in data.SPLITS:
            assert cells[split] >= 0.05 * cells["total"], (attribute, split, cells)
    total = sum(cells["total"] for cells in counts.values())
    train = sum(cells["train"] for cells in counts.values())
    assert 0.75 <= train / total <= 0.85


def test_no_empty_or_identical_pairs_and_lengths_are_bounded(pairs: list[data.PreferencePair]) -> None:
    for pair in pairs:
        assert pair.prompt.strip() and pair.chosen.strip() and pair.rejected.strip(), pair
        assert data.normalise_text(pair.chosen) != data.normalise_text(pair.rejected), pair
        assert len(pair.prompt) <= data.MAX_PROMPT_CHARS, pair
        assert (
            len(pair.chosen) <= data.MAX_RESPONSE_CHARS and len(pair.rejected) <= data.MAX_RESPONSE_CHARS
        ), pair
        assert pair.split in data.SPLITS
    keys = [(p.attribute, p.prompt, p.chosen, p.rejected) for p in pairs]
    assert len(keys) == len(set(keys))


def test_counts_per_source_match_the_sources(pairs: list[data.PreferencePair]) -> None:
    counts = Counter((pair.attribute, pair.source) for pair in pairs)
    assert set(counts) == set(EXPECTED_SOURCE_COUNTS)
    for key, (low, high) in EXPECTED_SOURCE_COUNTS.items():
        assert low <= counts[key] <= high, (key, counts[key])
    # the FineGrainedRLHF edits are split between truthfulness and helpfulness, not duplicated (481 in all)
    edits = counts[("truthfulness", "finegrained_rlhf_qa_feedback:factual_correction")]
    edits += counts[("helpfulness", "finegrained_rlhf_qa_feedback:other_correction")]
    assert 460 <= edits <= 481


def test_safety_uses_only_hh_rlhf_and_jailbreakbench(pairs: list[data.PreferencePair]) -> None:
    sources = {pair.source for pair in pairs if pair.attribute == "safety"}
    assert sources == {data.HH_RLHF_SOURCE, "jailbreakbench_artifacts"}
    hh_test = [p for p in pairs if p.source == data.HH_RLHF_SOURCE and p.split == "test"]
    assert len(hh_test) >= 150


def test_synthetic_prompts_are_a_marked_minority(pairs: list[data.PreferencePair]) -> None:
    synthetic_sources = {pair.source for pair in pairs if pair.synthetic}
    assert synthetic_sources == {"crows_pairs", "mi_rephrasing_pp:template"}
    for attribute in ALL_ATTRIBUTES:
        own = [pair for pair in pairs if pair.attribute == attribute]
        assert sum(pair.synthetic for pair in own) < 0.3 * len(own), attribute


def test_hh_prompts_are_flattened_conversations_ending_on_the_user(pairs: list[data.PreferencePair]) -> None:
    hh = [pair for pair in pairs if pair.source == data.HH_RLHF_SOURCE]
    multi_turn = [pair for pair in hh if "\nAssistant: " in pair.prompt]
    assert len(multi_turn) > len(hh) // 2
    for pair in multi_turn:
        last_user = pair.prompt.rfind("User: ")
        assert last_user > pair.prompt.rfind("Assistant: "), pair.prompt
        assert not any(line.startswith("Human:") for line in pair.prompt.splitlines()), pair.prompt


def test_long_prompts_keep_their_end() -> None:
    # the cut falls inside the long assistant turn: its role label is kept
    turns = [
        ("User", "first question " * 40),
        ("Assistant", "long answer " * 100),
        ("User", "the last question?"),
    ]
    pair = data._make_pair("safety", "unit", data.flatten_turns(turns), "yes", "no")
    assert pair is not None and len(pair.prompt) <= data.MAX_PROMPT_CHARS
    assert pair.prompt.endswith("User: the last question?")
    assert pair.prompt.startswith("Assistant: ... long answer")
    # the cut falls near a turn boundary: the prompt starts at that turn
    turns = [
        ("User", "first question " * 40),
        ("Assistant", "short answer " * 30),
        ("User", "the last question?"),
    ]
    pair = data._make_pair("safety", "unit", data.flatten_turns(turns), "yes", "no")
    assert pair is not None and pair.prompt.startswith("...\nAssistant: short answer")
    # plain text keeps its end and starts on a word
    text = "word " * 300 + "The end."
    pair = data._make_pair("empathy", "unit", text, "a reply", "another reply")
    assert pair is not None and pair.prompt.startswith("... word") and pair.prompt.endswith("The end.")


def test_another_seed_resamples_but_keeps_each_prompts_split(pairs: list[data.PreferencePair]) -> None:
    other = data.build_pairs(DATA_DIR, seed=1)
    assert other != pairs
    split_of = {pair.prompt: pair.split for pair in pairs}
    assert all(split_of.get(pair.prompt, pair.split) == pair.split for pair in other)


def test_write_and_load_round_trip(pairs: list[data.PreferencePair], tmp_path: Path) -> None:
    counts = data.write_splits(pairs, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.jsonl", "train.jsonl", "validation.jsonl"]
    loaded = [pair for split in data.SPLITS for pair in data.load_pairs(tmp_path, split)]
    assert sorted(loaded, key=data._sort_key) == sorted(pairs, key=data._sort_key)
    assert counts == data.count_pairs(pairs)
    empathy_test = data.load_pairs(tmp_path, "test", ["empathy"])
    assert empathy_test and {p.attribute for p in empathy_test} == {"empathy"}
    assert len(empathy_test) == counts["empathy"]["test"]
    first = json.loads((tmp_path / "train.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert set(first) == {"attribute", "prompt", "chosen", "rejected", "source", "synthetic", "split"}
    with pytest.raises(ValueError, match="unknown split"):
        data.load_pairs(tmp_path, "dev")
    with pytest.raises(ValueError, match="unknown attributes"):
        data.load_pairs(tmp_path, "train", ["kindness"])


def test_counts_table_lists_every_attribute_and_split(pairs: list[data.PreferencePair]) -> None:
    table = data.format_counts_table(data.count_pairs(pairs))
    lines = table.splitlines()
    assert lines[0].split() == ["attribute", *data.SPLITS, "total"]
    for attribute in ALL_ATTRIBUTES:
        assert any(line.startswith(attribute + " ") for line in lines)
    assert lines[-1].split()[-1] == str(len(pairs))


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="prosocial")
    cli.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_data_writes_files_and_prints_the_table(
    pairs: list[data.PreferencePair], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "splits"
    args = _parse(["rewardmodel", "data", "--data-dir", str(DATA_DIR), "--out", str(out), "--seed", "0"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    for attribute in ALL_ATTRIBUTES:
        assert attribute in printed
    assert f"wrote {len(pairs)} pairs" in printed
    written = sum(len(data.load_pairs(out, split)) for split in data.SPLITS)
    assert written == len(pairs)


def test_cli_data_defaults() -> None:
    args = _parse(["rewardmodel", "data"])
    assert args.out == BUILD_DIR / "rewardmodel_data" and args.seed == 0 and args.data_dir is None


def test_cli_missing_data_dir_names_the_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _parse(
        ["rewardmodel", "data", "--data-dir", str(tmp_path / "absent"), "--out", str(tmp_path / "o")]
    )
    assert args.func(args) == 2
    assert "--data-dir" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_rejects_a_bad_seed(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parse(["rewardmodel", "data", "--seed", "abc"])
    assert "--seed" in capsys.readouterr().err
