"""Data for the harm vector: what it is built from, and the disjoint prompts it is measured on.

Split hygiene (the rule of issue 4: the harmful prompts that build the vector never measure it):

* **Build split** (chat pairs: harmful prompt -> harmful response, used to fine-tune M_h):
  - JailbreakBench artifacts with ``jailbroken == True`` (the plain JBB *goal* is the user turn, not the
    jailbreak wrapper, so the vector learns "comply with a harmful request");
  - refusal_direction ``jailbreakbench_ablation`` completions flagged harmful by LlamaGuard-2 (same JBB goals);
  - XSTest ``contrast_*`` (unsafe) prompts whose human label is ``1_full_compliance``;
  - RED-INSTRUCT Chain-of-Utterances jailbreak outputs (DangerousQA and HarmfulQA questions);
  - AdvBench ``target`` strings for the AdvBench goals that hash into the build bucket (see
    :func:`advbench_is_build`).
  HH-RLHF ``rejected`` responses are not used: their harmfulness is mixed (many are merely unhelpful).
* **Dev split** (harmful prompts only, to measure leakage): the AdvBench goals of the dev bucket plus HarmfulQA
  questions, minus every prompt that matches a build prompt exactly after normalisation or that shares at
  least :data:`NEAR_DUPLICATE_JACCARD` of its word set with one (this drops the CoU HarmfulQA questions and the
  JBB goals that JailbreakBench took from AdvBench).
* **Contrastive pairs** (issue 22: one prompt, a harmful and a safe response, for tau = theta_harmful -
  theta_safe): refusal_direction ``jailbreakbench`` ablation (harmful, LlamaGuard-2) vs baseline (refusing) of
  the same model; XSTest ``contrast_*`` prompts with a human-labelled full compliance and full refusal; JBB goals
  with a jailbroken response and a non-jailbroken one that refuses (keyword criterion). Every pair prompt is a
  build prompt too, so the dev split excludes it; :func:`load_contrastive_pairs` is excluded explicitly anyway.
* **Over-refusal**: XSTest's 250 safe prompts (never used for building).
* **Benign text for perplexity**: refusal_direction ``harmless_baseline`` completions (Alpaca prompts answered by
  three chat models), formatted as chats.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

NEAR_DUPLICATE_JACCARD = 0.8
"""Dev prompts whose word set overlaps a build prompt's this much (Jaccard) are dropped from the dev split."""

ADVBENCH_BUILD_BUCKETS = 5
"""One AdvBench goal in this many (by a hash of its text) goes to the build split, the rest to dev."""

JBB_RESPONSE_FILES = (
    "GCG/white_box/vicuna-13b-v1.5.json",
    "GCG/white_box/llama-2-7b-chat-hf.json",
    "GCG/transfer/gpt-3.5-turbo-1106.json",
    "GCG/transfer/gpt-4-0125-preview.json",
    "PAIR/black_box/vicuna-13b-v1.5.json",
    "PAIR/black_box/llama-2-7b-chat-hf.json",
    "PAIR/black_box/gpt-3.5-turbo-1106.json",
    "PAIR/black_box/gpt-4-0125-preview.json",
    "JBC/manual/vicuna-13b-v1.5.json",
    "JBC/manual/llama-2-7b-chat-hf.json",
    "JBC/manual/gpt-3.5-turbo-1106.json",
    "JBC/manual/gpt-4-0125-preview.json",
    "prompt_with_random_search/black_box/vicuna-13b-v1.5.json",
    "prompt_with_random_search/black_box/llama-2-7b-chat-hf.json",
    "prompt_with_random_search/black_box/gpt-3.5-turbo-1106.json",
    "prompt_with_random_search/black_box/gpt-4-0125-preview.json",
)
REFUSAL_DIRECTION_MODELS = ("gemma-2b-it", "qwen-1_8b-chat", "meta-llama-3-8b-instruct")


Sourced = TypeVar("Sourced")
"""A :class:`ChatExample` or :class:`ContrastPair` (anything with a ``source``)."""


@dataclass(frozen=True)
class ChatExample:
    """One user prompt and one assistant response, with the dataset it came from."""

    prompt: str
    response: str
    source: str


def default_data_dir() -> Path:
    """``$PROSOCIAL_DATA_DIR``, else ``<repo>/../shared/data``."""
    env = os.environ.get("PROSOCIAL_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def resolve_data_dir(data_dir: Path | str | None) -> Path:
    path = Path(data_dir) if data_dir is not None else default_data_dir()
    if not path.is_dir():
        raise FileNotFoundError(
            f"data directory {path} does not exist (set --data-dir or PROSOCIAL_DATA_DIR)"
        )
    return path


def normalize_prompt(text: str) -> str:
    """Lowercase, drop punctuation, collapse whitespace: the key for exact-duplicate checks."""
    return " ".join(re.sub(r"[^a-z0-9 ]+", " ", text.lower()).split())


def _word_set(text: str) -> frozenset[str]:
    return frozenset(normalize_prompt(text).split())


def advbench_is_build(goal: str) -> bool:
    """Deterministic AdvBench split: a goal is in the build bucket when its text hash falls in bucket 0."""
    digest = hashlib.sha256(normalize_prompt(goal).encode()).digest()
    return int.from_bytes(digest[:8], "big") % ADVBENCH_BUILD_BUCKETS == 0


def _read_json(path: Path):
    with path.open(encoding="utf-8") as handle:
        return json.load(handle)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def _is_true(value: object) -> bool:
    return str(value).strip().lower() in ("true", "1")


def _clean(examples: Iterable[ChatExample]) -> list[ChatExample]:
    seen: set[tuple[str, str]] = set()
    kept = []
    for example in examples:
        prompt, response = example.prompt.strip(), example.response.strip()
        if not prompt or not response or (prompt, response) in seen:
            continue
        seen.add((prompt, response))
        kept.append(ChatExample(prompt, response, example.source))
    return kept


def jailbreakbench_examples(data_dir: Path) -> list[ChatExample]:
    root = data_dir / "jailbreakbench_artifacts"
    examples = []
    for name in JBB_RESPONSE_FILES:
        for item in _read_json(root / name)["jailbreaks"]:
            if _is_true(item.get("jailbroken")) and item.get("response"):
                examples.append(ChatExample(item["goal"], item["response"], "jailbreakbench"))
    return examples


def refusal_ablation_examples(data_dir: Path) -> list[ChatExample]:
    examples = []
    for model in REFUSAL_DIRECTION_MODELS:
        path = (
            data_dir
            / "refusal_direction"
            / "completions"
            / model
            / "jailbreakbench_ablation_evaluations.json"
        )
        for item in _read_json(path)["completions"]:
            if _is_true(item.get("is_jailbreak_llamaguard2")):
                examples.append(ChatExample(item["prompt"], item["response"], "refusal_direction_ablation"))
    return examples


def xstest_unsafe_compliance_examples(data_dir: Path) -> list[ChatExample]:
    examples = []
    for path in sorted((data_dir / "xstest" / "model_completions").glob("*.csv")):
        for row in _read_csv(path):
            if row["type"].startswith("contrast") and row["final_label"] == "1_full_compliance":
                examples.append(ChatExample(row["prompt"], row["completion"], "xstest_unsafe_compliance"))
    return examples


def cou_examples(data_dir: Path) -> list[ChatExample]:
    examples = []
    for path in sorted((data_dir / "red_instruct" / "cou_jailbreak_responses").glob("*.json")):
        for item in _read_json(path):
            examples.append(ChatExample(item["prompt"], item["response"], "red_instruct_cou"))
    return examples


def _advbench_rows(data_dir: Path) -> list[dict[str, str]]:
    return _read_csv(data_dir / "advbench" / "harmful_behaviors.csv")


def advbench_target_examples(data_dir: Path) -> list[ChatExample]:
    return [
        ChatExample(row["goal"], row["target"], "advbench_target")
        for row in _advbench_rows(data_dir)
        if advbench_is_build(row["goal"])
    ]


def load_build_examples(data_dir: Path | str | None = None) -> list[ChatExample]:
    """Every harmful (prompt, response) pair of the build split, deduplicated, in a fixed order."""
    root = resolve_data_dir(data_dir)
    return _clean(
        jailbreakbench_examples(root)
        + refusal_ablation_examples(root)
        + xstest_unsafe_compliance_examples(root)
        + cou_examples(root)
        + advbench_target_examples(root)
    )


def sample_build_examples(examples: list[Sourced], quotas: dict[str, int], seed: int) -> list[Sourced]:
    """Take at most ``quotas[source]`` examples (or pairs) per source (seeded), then shuffle them together."""
    rng = random.Random(seed)
    chosen: list[Sourced] = []
    for source, quota in sorted(quotas.items()):
        pool = [example for example in examples if example.source == source]
        rng.shuffle(pool)
        chosen.extend(pool[:quota])
    rng.shuffle(chosen)
    return chosen


@dataclass(frozen=True)
class ContrastPair:
    """One harmful prompt with a harmful and a safe (refusing or redirecting) response to it."""

    prompt: str
    harmful: str
    safe: str
    source: str

    def side(self, response_side: str) -> ChatExample:
        """The chat one of the two fine-tunes learns from: same prompt, the harmful or the safe response."""
        if response_side not in RESPONSE_SIDES:
            raise ValueError(f"response side must be one of {RESPONSE_SIDES}, got {response_side!r}")
        response = self.harmful if response_side == "harmful" else self.safe
        return ChatExample(self.prompt, response, f"{self.source}:{response_side}")


RESPONSE_SIDES = ("harmful", "safe")
_REDIRECT_CUES = re.compile(
    r"\b(instead|safe(ly|ty)?|support|resources?|professional|legal(ly)?|alternative|reach out|"
    r"talk to|hotline|encourage|recommend|suggest)\b",
    re.IGNORECASE,
)
_LEAKED_TURN = re.compile(r"assistant\s*\n")


def clean_pair_response(text: str) -> str:
    """Cut a completion at a leaked end-of-turn ("...?assistant\\n\\n" then the turn again, as in the Llama-3
    refusal_direction runs), so a fine-tune does not learn to repeat itself."""
    return _LEAKED_TURN.split(text, maxsplit=1)[0].strip()


def _redirect_first(responses: list[str]) -> list[str]:
    """Safe candidates with a redirection cue first (the target is an on-topic redirect, not a bare "no")."""
    return sorted(responses, key=lambda text: _REDIRECT_CUES.search(text) is None)


def refusal_direction_pairs(data_dir: Path) -> list[ContrastPair]:
    """Per model and JBB prompt: ablation flagged harmful vs baseline that neither LlamaGuard-2 nor the substring
    match calls a jailbreak."""
    pairs = []
    for model in REFUSAL_DIRECTION_MODELS:
        folder = data_dir / "refusal_direction" / "completions" / model
        baseline = _read_json(folder / "jailbreakbench_baseline_evaluations.json")["completions"]
        ablation = _read_json(folder / "jailbreakbench_ablation_evaluations.json")["completions"]
        for safe, harmful in zip(baseline, ablation, strict=True):
            if (
                safe["prompt"] == harmful["prompt"]
                and _is_true(harmful.get("is_jailbreak_llamaguard2"))
                and not _is_true(safe.get("is_jailbreak_llamaguard2"))
                and not _is_true(safe.get("is_jailbreak_substring_matching"))
            ):
                pairs.append(
                    ContrastPair(
                        safe["prompt"],
                        clean_pair_response(harmful["response"]),
                        clean_pair_response(safe["response"]),
                        "refusal_direction",
                    )
                )
    return pairs


def xstest_unsafe_pairs(data_dir: Path) -> list[ContrastPair]:
    """XSTest unsafe prompts with both human labels: the first full compliance against the first full refusal
    (a redirecting one preferred), over the five models' files in name order."""
    by_prompt: dict[str, tuple[list[str], list[str]]] = {}
    for path in sorted((data_dir / "xstest" / "model_completions").glob("*.csv")):
        for row in _read_csv(path):
            if not row["type"].startswith("contrast"):
                continue
            harmful, safe = by_prompt.setdefault(row["prompt"], ([], []))
            if row["final_label"] == "1_full_compliance":
                harmful.append(row["completion"])
            elif row["final_label"] == "2_full_refusal":
                safe.append(row["completion"])
    return [
        ContrastPair(prompt, clean_pair_response(harmful[0]), clean_pair_response(_redirect_first(safe)[0]),
                     "xstest_unsafe")
        for prompt, (harmful, safe) in by_prompt.items()
        if harmful and safe
    ]  # fmt: skip


def jailbreakbench_pairs(data_dir: Path) -> list[ContrastPair]:
    """Per JBB goal (the plain goal is the user turn): jailbroken responses zipped with non-jailbroken responses
    that open with a refusal (XSTest's string match; a marker later on is often a GCG suffix echoed before
    one), redirecting ones first, over the 16 attack files."""
    from prosocialalign.core.refusal import XSTEST_FULL_REFUSAL, xstest_strmatch_label

    harmful: dict[str, list[str]] = {}
    safe: dict[str, list[str]] = {}
    root = data_dir / "jailbreakbench_artifacts"
    for name in JBB_RESPONSE_FILES:
        for item in _read_json(root / name)["jailbreaks"]:
            response = (item.get("response") or "").strip()
            if not response:
                continue
            if _is_true(item.get("jailbroken")):
                harmful.setdefault(item["goal"], []).append(response)
            elif xstest_strmatch_label(response) == XSTEST_FULL_REFUSAL:
                safe.setdefault(item["goal"], []).append(response)
    pairs = []
    for goal, responses in harmful.items():
        for bad, good in zip(responses, _redirect_first(safe.get(goal, [])), strict=False):
            pairs.append(
                ContrastPair(goal, clean_pair_response(bad), clean_pair_response(good), "jailbreakbench")
            )
    return pairs


MAX_PAIR_REPETITION = 0.3
"""Pairs whose harmful or safe response repeats itself more than this (seq-rep-4) are dropped: a looping
refusal (Gemma's "I am unable to ... I am unable to ...") would teach the safe side to loop."""


def load_contrastive_pairs(data_dir: Path | str | None = None) -> list[ContrastPair]:
    """Every (prompt, harmful, safe) pair, deduplicated, without looping responses, in a fixed order."""
    from prosocialalign.core.degeneration import repetition_share

    root = resolve_data_dir(data_dir)
    seen: set[tuple[str, str, str]] = set()
    pairs = []
    for pair in refusal_direction_pairs(root) + xstest_unsafe_pairs(root) + jailbreakbench_pairs(root):
        key = (pair.prompt.strip(), pair.harmful, pair.safe)
        if not key[0] or not pair.harmful or not pair.safe or key in seen:
            continue
        if max(repetition_share(pair.harmful), repetition_share(pair.safe)) > MAX_PAIR_REPETITION:
            continue
        seen.add(key)
        pairs.append(ContrastPair(key[0], pair.harmful, pair.safe, pair.source))
    return pairs


def harmfulqa_questions(data_dir: Path) -> list[str]:
    tree = _read_json(data_dir / "red_instruct" / "harmful_questions" / "harmfulqa.json")
    return [
        question for subtopics in tree.values() for questions in subtopics.values() for question in questions
    ]


def _is_near_build(prompt: str, build_keys: set[str], build_sets: list[frozenset[str]]) -> bool:
    if normalize_prompt(prompt) in build_keys:
        return True
    words = _word_set(prompt)
    for other in build_sets:
        union = len(words | other)
        if union and len(words & other) / union >= NEAR_DUPLICATE_JACCARD:
            return True
    return False


def dev_harmful_prompts(data_dir: Path | str | None = None) -> dict[str, list[str]]:
    """The full dev split by source (``advbench``, ``harmfulqa``), disjoint from every build prompt."""
    root = resolve_data_dir(data_dir)
    build_prompts = {example.prompt for example in load_build_examples(root)}
    build_prompts |= {pair.prompt for pair in load_contrastive_pairs(root)}
    build_keys = {normalize_prompt(prompt) for prompt in build_prompts}
    build_sets = [_word_set(prompt) for prompt in build_prompts]
    advbench = [row["goal"] for row in _advbench_rows(root) if not advbench_is_build(row["goal"])]
    split: dict[str, list[str]] = {}
    for source, prompts in (("advbench", advbench), ("harmfulqa", harmfulqa_questions(root))):
        unique = list(dict.fromkeys(prompts))
        split[source] = [prompt for prompt in unique if not _is_near_build(prompt, build_keys, build_sets)]
    return split


def sample_dev_harmful_prompts(n: int, seed: int, data_dir: Path | str | None = None) -> list[str]:
    """``n`` dev prompts, half AdvBench and half HarmfulQA, sampled with ``seed``."""
    split = dev_harmful_prompts(data_dir)
    rng = random.Random(seed)
    advbench = rng.sample(split["advbench"], min(len(split["advbench"]), (n + 1) // 2))
    harmfulqa = rng.sample(split["harmfulqa"], min(len(split["harmfulqa"]), n - len(advbench)))
    return advbench + harmfulqa


def xstest_safe_prompts(data_dir: Path | str | None = None) -> list[str]:
    """XSTest's 250 safe prompts, in file order."""
    root = resolve_data_dir(data_dir)
    return [
        row["prompt"] for row in _read_csv(root / "xstest" / "xstest_prompts.csv") if row["label"] == "safe"
    ]


def sample_xstest_safe_prompts(n: int, seed: int, data_dir: Path | str | None = None) -> list[str]:
    prompts = xstest_safe_prompts(data_dir)
    return random.Random(seed).sample(prompts, min(n, len(prompts)))


def benign_chats(data_dir: Path | str | None = None) -> list[ChatExample]:
    """Held-out benign chats (Alpaca prompt + a chat model's normal answer) for perplexity."""
    root = resolve_data_dir(data_dir)
    examples = []
    for model in REFUSAL_DIRECTION_MODELS:
        path = root / "refusal_direction" / "completions" / model / "harmless_baseline_evaluations.json"
        for item in _read_json(path)["completions"]:
            examples.append(ChatExample(item["prompt"], item["response"], f"harmless_baseline:{model}"))
    return _clean(examples)


def sample_benign_chats(n: int, seed: int, data_dir: Path | str | None = None) -> list[ChatExample]:
    chats = benign_chats(data_dir)
    return random.Random(seed).sample(chats, min(n, len(chats)))


# --- The redirect adapter (issue 21): what the backtracking regime answers with --------------------------------

REDIRECT_OFFER = re.compile(
    r"\b(instead|alternative(ly|s)?|suggest|recommend|encourage|reach out|talk to|resources?|support|"
    r"(happy|glad) to help|i can help|can i help|if you('re| are) (interested|looking|concerned|struggling))\b",
    re.IGNORECASE,
)
"""A decline that offers something safe in its place: what a reader calls a safe redirect, not a bare "no"."""

_GENERIC_OFFER = re.compile(r"[^.!?]*\b(something|anything) else\b[^.!?]*[.!?]?", re.IGNORECASE)
""""Can I help you with something else?" offers nothing on the user's topic: readers call it a refusal."""

REDIRECT_SENTENCES = 4
"""Responses are cut to their first sentences: a redirect is short (the regime's limit is 64 tokens), and the
sources' later sentences are mostly lectures about the law."""

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def first_sentences(text: str, n: int) -> str:
    """The first ``n`` sentences of ``text``, on one paragraph."""
    return " ".join(_SENTENCE_END.split(" ".join(text.split()))[:n]).strip()


def _refusals_by_prompt(data_dir: Path) -> dict[str, list[str]]:
    """Every recorded refusal of a JailbreakBench goal: JBB's non-jailbroken refusals and the refusal_direction
    baselines that neither judge calls a jailbreak. (XSTest's refusals are left out: its unsafe prompts are an
    evaluation set, ``xstest_unsafe``.)"""
    from prosocialalign.core.refusal import XSTEST_FULL_REFUSAL, xstest_strmatch_label

    refusals: dict[str, list[str]] = {}
    root = data_dir / "jailbreakbench_artifacts"
    for name in JBB_RESPONSE_FILES:
        for item in _read_json(root / name)["jailbreaks"]:
            response = (item.get("response") or "").strip()
            if response and not _is_true(item.get("jailbroken")):
                if xstest_strmatch_label(response) == XSTEST_FULL_REFUSAL:
                    refusals.setdefault(item["goal"], []).append(response)
    for model in REFUSAL_DIRECTION_MODELS:
        path = (
            data_dir
            / "refusal_direction"
            / "completions"
            / model
            / "jailbreakbench_baseline_evaluations.json"
        )
        for item in _read_json(path)["completions"]:
            if not (
                _is_true(item.get("is_jailbreak_llamaguard2"))
                or _is_true(item.get("is_jailbreak_substring_matching"))
            ):
                refusals.setdefault(item["prompt"], []).append(item["response"])
    return refusals


REDIRECTS_PER_PROMPT = 3
"""JailbreakBench has 100 goals: up to three different redirects each (different models' wording)."""


def harmful_redirect_examples(data_dir: Path) -> list[ChatExample]:
    """Up to :data:`REDIRECTS_PER_PROMPT` redirects per harmful build prompt: of its recorded refusals, the
    shortest that offer something safe on the user's topic (cut to :data:`REDIRECT_SENTENCES` sentences, not
    looping); prompts with none are left out."""
    from prosocialalign.core.degeneration import repetition_share

    examples = []
    for prompt, responses in _refusals_by_prompt(data_dir).items():
        offers = []
        for response in responses:
            text = first_sentences(clean_pair_response(response), REDIRECT_SENTENCES)
            specific = REDIRECT_OFFER.search(_GENERIC_OFFER.sub("", text))
            if specific and repetition_share(text) <= MAX_PAIR_REPETITION:
                offers.append(text)
        for text in sorted(set(offers), key=lambda t: (len(t), t))[:REDIRECTS_PER_PROMPT]:
            examples.append(ChatExample(prompt.strip(), text, "redirect"))
    return examples


def counsel_examples(data_dir: Path) -> list[ChatExample]:
    """Therapists' most upvoted answer per counsel_chat question (title and text as the user turn), cut to its
    first sentences: kind replies to people in distress, so the regime stays warm when a guard misfires."""
    best: dict[str, tuple[int, str, str]] = {}
    for row in _read_csv(data_dir / "counsel_chat" / "20200325_counsel_chat.csv"):
        question = " ".join(f"{row['questionTitle']} {row['questionText']}".split())
        answer = first_sentences(row["answerText"], REDIRECT_SENTENCES)
        votes = int(row["upvotes"] or 0)
        if question and answer and (row["questionID"] not in best or votes > best[row["questionID"]][0]):
            best[row["questionID"]] = (votes, question, answer)
    return [ChatExample(q, a, "counsel_chat") for _, q, a in (best[k] for k in sorted(best, key=int))]


def helpful_examples(data_dir: Path, exclude: Iterable[ChatExample]) -> list[ChatExample]:
    """Alpaca prompts answered by the refusal_direction chat models (the benign chats outside ``exclude``, the
    harm-vector sweep's perplexity sample): the regime still answers a benign request a guard misjudged."""
    skip = {(example.prompt, example.response) for example in exclude}
    return [
        ChatExample(example.prompt, example.response, "helpful")
        for example in benign_chats(data_dir)
        if (example.prompt, example.response) not in skip
    ]


def load_redirect_examples(data_dir: Path | str | None = None) -> list[ChatExample]:
    """The redirect adapter's pool: harmful build prompts answered with a specific offer, counselling answers,
    ordinary helpful answers (every prompt is outside the development and test splits)."""
    data_dir = resolve_data_dir(data_dir)
    perplexity_sample = sample_benign_chats(48, 0, data_dir)
    return _clean(
        harmful_redirect_examples(data_dir)
        + counsel_examples(data_dir)
        + helpful_examples(data_dir, exclude=perplexity_sample)
    )
