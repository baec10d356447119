"""Preference pairs (prompt, chosen, rejected) for the six reward-model attributes.

Every pair comes from a real file under the shared data directory (see ``SOURCES.md`` there); each loader's
docstring states the rule that turns the file's ratings, votes or labels into pairs, and the module constants
below state the caps. Sources that offer thousands of pairs are capped so that the attributes stay roughly
balanced; no attribute has more than ``MAX_PAIRS_PER_ATTRIBUTE`` pairs.

Text handling:

- Prompts are plain user text; the trainer applies the chat template. A multi-turn context is flattened into
  one text ("User: ...\\nAssistant: ...\\nUser: ..."); a single user turn stays as it is.
- Prompts keep their END (the last turn matters most) within ``MAX_PROMPT_CHARS``; responses keep their START
  within ``MAX_RESPONSE_CHARS``. Both are cut at a turn, sentence or word boundary. The trainer truncates
  tokens again.
- Pairs whose chosen or rejected text is empty, or whose two responses are equal up to case, spacing and
  punctuation, are dropped. Exact duplicate pairs are kept once; a pair that also appears reversed (same
  prompt, chosen and rejected swapped) within an attribute is dropped in both directions.

Splits: one global train / validation / test split (80/10/10) made by hashing the normalised prompt text
(``split_for_prompt``), so the same prompt lands in the same split in every attribute and every source. The
split does not depend on the seed: changing the seed resamples the capped sources but never moves a prompt
between training and held-out data. The original files' own splits (e.g. DiaSafety train/val/test, or the
HH-RLHF file being the "test" file) are ignored in favour of this single split.

Safety: the ``safety`` attribute is built ONLY from HH-RLHF harmless-base and the JailbreakBench artifacts.
The evaluation harness trains a separate harm judge on the refusal_direction LlamaGuard labels, the XSTest
human labels and DiaSafety, so those must not supervise the safety reward. (XSTest safe-prompt pairs feed
``helpfulness`` as over-refusal contrasts and DiaSafety feeds ``sensitivity``; neither touches ``safety``.)
HH-RLHF pairs carry ``source == HH_RLHF_SOURCE`` so that their test-split pairs can be reported separately as
"HH-RLHF harmless test pairs".

Synthetic prompts: CrowS-Pairs and the MI rephrasing pairs have no prompt in their files; their loaders build
one from the pair itself (recipe in their docstrings) and mark those pairs ``synthetic=True``. They are a
minority of their attributes.
"""

from __future__ import annotations

import ast
import csv
import functools
import gzip
import hashlib
import json
import os
import random
import re
import tempfile
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from itertools import combinations, product
from pathlib import Path

from rewardmodel.attributes import ALL_ATTRIBUTES

SPLITS: tuple[str, ...] = ("train", "validation", "test")
VALIDATION_FRACTION = 0.1
TEST_FRACTION = 0.1

MAX_PROMPT_CHARS = 800
MAX_RESPONSE_CHARS = 600
MAX_PAIRS_PER_ATTRIBUTE = 4000

# Caps (pairs kept after cleaning; sampled with the seed). They are set so that each attribute ends near
# 3,000-4,000 pairs and no single combinatorial source swamps the others.
PAIR_EMPATHY_CAP = 1500  # of 2,226 hq>mq and mq>lq pairs
LLM_EMPATHY_RATINGS_CAP = 1700  # of 3,234 strictly ordered rating pairs (all 724 two-point gaps kept first)
COUNSEL_CHAT_PER_QUESTION = 6  # the largest upvote gaps per question; big threads would otherwise dominate
COUNSEL_CHAT_CAP = 800  # upvotes are a noisy signal, so this source is kept small
PAIR_NON_JUDGMENTAL_CAP = 2400  # of 3,180 hq>lq pairs
DIASAFETY_PER_CONTEXT = 8  # a handful of contexts have 20-56 safe x unsafe combinations
DIASAFETY_UNAUTHORIZED_EXPERTISE_CAP = 1100  # 1,561 available; the other four categories are kept whole
CROWS_PAIRS_CAP = 600  # synthetic prompts: kept a minority of sensitivity
TRUTHFULQA_EXTRA_PER_QUESTION = 3  # correct x incorrect pairs besides the best-answer pair
TRUTHFULQA_EXTRA_CAP = 2000  # of about 11,000 informative correct x incorrect pairs
JAILBREAKBENCH_PER_GOAL = 16
JAILBREAKBENCH_CAP = 1600  # of 4,700 same-goal pairs

HH_RLHF_SOURCE = "hh_rlhf:harmless_base"
"""Source name of the HH-RLHF harmless-base pairs (their test split is reported on its own)."""


@dataclass(frozen=True)
class PreferencePair:
    """One preference: ``chosen`` is better than ``rejected`` for ``attribute`` given ``prompt``."""

    attribute: str
    prompt: str
    chosen: str
    rejected: str
    source: str
    synthetic: bool = False
    split: str | None = None


# ---------------------------------------------------------------------------------------------- text helpers


_BLANKS = re.compile(r"[ \t\u00a0]+")
_BLANKS_AROUND_NEWLINE = re.compile(r" *\n *")
_BLANK_LINES = re.compile(r"\n{3,}")
_NON_WORD = re.compile(r"[\W_]+")


def _clean(text: object) -> str:
    """Normalise line endings and runs of blanks; keep single newlines (lists, turns)."""
    if text is None:
        return ""
    return _clean_str(str(text))


@functools.cache
def _clean_str(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _BLANKS_AROUND_NEWLINE.sub("\n", _BLANKS.sub(" ", text))
    return _BLANK_LINES.sub("\n\n", text).strip()


@functools.cache
def normalise_text(text: str) -> str:
    """Case-, spacing- and punctuation-insensitive form used for split hashing and identity checks."""
    return _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def _truncate_head(text: str, limit: int) -> str:
    """Keep the start of ``text`` within ``limit`` chars, ending on a sentence or word boundary."""
    if len(text) <= limit:
        return text
    window = text[:limit]
    sentence_end = max(window.rfind(mark) for mark in (". ", "! ", "? ", ".\n", "\n"))
    if sentence_end >= limit // 2:
        return window[: sentence_end + 1].rstrip()
    space = window.rfind(" ")
    if space >= limit // 2:
        return window[:space].rstrip()
    return window.rstrip()


_TURN_START = re.compile(r"\n(?:User|Assistant): ")
_LAST_ROLE = re.compile(r"(?:^|\n)(User|Assistant): ")
_SENTENCE_START = re.compile(r"(?:[.!?]\s+|\n)")
_TRUNCATION_MARK = "..."


def _truncate_tail(text: str, limit: int) -> str:
    """Keep the end of ``text`` within ``limit`` chars, starting on a turn, sentence or word boundary.

    A cut inside a turn of a flattened conversation keeps that turn's role label ("Assistant: ... text").
    """
    if len(text) <= limit:
        return text
    budget = limit - len(_TRUNCATION_MARK) - len("Assistant: ") - 1
    cut = len(text) - budget
    window = text[cut:]
    half = len(window) // 2
    turn = _TURN_START.search(window)
    if turn and turn.start() <= half:
        return f"{_TRUNCATION_MARK}\n{window[turn.start() + 1 :]}"
    sentence = _SENTENCE_START.search(window)
    if sentence and sentence.end() <= half:
        start = sentence.end()
    else:
        space = window.find(" ")
        start = space + 1 if 0 <= space <= half else 0
    kept = window[start:].lstrip()
    roles = _LAST_ROLE.findall(text[: cut + start])
    if text.startswith("User: ") and roles:
        return f"{roles[-1]}: {_TRUNCATION_MARK} {kept}"
    return f"{_TRUNCATION_MARK} {kept}"


def flatten_turns(turns: Sequence[tuple[str, str]]) -> str:
    """Flatten (role, text) turns into one prompt; a lone user turn stays plain text."""
    if len(turns) == 1 and turns[0][0] == "User":
        return turns[0][1]
    return "\n".join(f"{role}: {text}" for role, text in turns)


def _make_pair(
    attribute: str, source: str, prompt: str, chosen: str, rejected: str, synthetic: bool = False
) -> PreferencePair | None:
    """Clean and truncate one pair; ``None`` when it carries no preference (empty or identical sides)."""
    prompt = _truncate_tail(_clean(prompt), MAX_PROMPT_CHARS)
    chosen = _truncate_head(_clean(chosen), MAX_RESPONSE_CHARS)
    rejected = _truncate_head(_clean(rejected), MAX_RESPONSE_CHARS)
    chosen_key, rejected_key = normalise_text(chosen), normalise_text(rejected)
    if not prompt or not chosen_key or not rejected_key or chosen_key == rejected_key:
        return None
    return PreferencePair(attribute, prompt, chosen, rejected, source, synthetic)


def _keep(pairs: Iterable[PreferencePair | None]) -> list[PreferencePair]:
    return [pair for pair in pairs if pair is not None]


def _sample(items: list, cap: int, rng: random.Random) -> list:
    """At most ``cap`` items chosen at random, in their original order."""
    if len(items) <= cap:
        return list(items)
    chosen_indices = sorted(rng.sample(range(len(items)), cap))
    return [items[i] for i in chosen_indices]


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _read_json(path: Path) -> object:
    with path.open(encoding="utf-8") as handle:
        return json.load(handle)


# ------------------------------------------------------------------------------------------------ empathy

_PAIR_HIGH = ("hq1", "hq2")
_PAIR_MEDIUM = ("mq1",)
_PAIR_LOW = ("lq1", "lq2", "lq3", "lq4", "lq5")


def _pair_reflection_pairs(
    data_dir: Path, attribute: str, better: Sequence[str], worse: Sequence[str]
) -> list[PreferencePair]:
    rows = _read_csv(data_dir / "pair_reflections" / "pair_data.csv")
    return _keep(
        _make_pair(attribute, "pair_reflections", row["prompt"], row[good], row[bad])
        for row in rows
        for good, bad in product(better, worse)
    )


def load_pair_empathy(data_dir: Path, rng: random.Random) -> list[PreferencePair]:
    """PAIR counsellor reflections, graded ordering: expert (hq) > medium (mq) > low quality (lq).

    Pairs: each hq reflection > the mq reflection, and the mq reflection > each lq response, on the same
    client prompt (2,226 pairs). hq > lq is left to ``non_judgmental`` so the two attributes do not learn the
    same comparisons. Capped at ``PAIR_EMPATHY_CAP`` by random sampling.
    """
    pairs = _pair_reflection_pairs(data_dir, "empathy", _PAIR_HIGH, _PAIR_MEDIUM)
    pairs += _pair_reflection_pairs(data_dir, "empathy", _PAIR_MEDIUM, _PAIR_LOW)
    return _sample(pairs, PAIR_EMPATHY_CAP, rng)


_LLM_EMPATHY_RESPONSES = ("human", "chatgpt", "chatgpt_empathy")


def load_llm_empathy_ratings(data_dir: Path, rng: random.Random) -> list[PreferencePair]:
    """ "Is ChatGPT more empathetic than humans?": three responses per situation with crowd ratings 1-3.

    Pairs: for each of the 3 response pairs of a speaker utterance, the response with the strictly higher
    empathy rating is chosen; ties give no pair (3,234 pairs). Prompt: the speaker's utterance. All pairs
    with a two-point gap (3 vs 1) are kept first, then one-point gaps are sampled up to
    ``LLM_EMPATHY_RATINGS_CAP``.
    """
    rows = _read_csv(data_dir / "llm_empathy_evaluation" / "dataset_and_ratings.csv")
    by_gap: dict[int, list[PreferencePair]] = defaultdict(list)
    for row in rows:
        for first, second in combinations(_LLM_EMPATHY_RESPONSES, 2):
            gap = int(row[f"rating_{first}"]) - int(row[f"rating_{second}"])
            if gap == 0:
                continue
            good, bad = (first, second) if gap > 0 else (second, first)
            pair = _make_pair(
                "empathy",
                "llm_empathy_evaluation:ratings",
                row["speaker_uttr"],
                row[f"response_{good}"],
                row[f"response_{bad}"],
            )
            if pair is not None:
                by_gap[abs(gap)].append(pair)
    kept = by_gap[2][:LLM_EMPATHY_RATINGS_CAP]
    return kept + _sample(by_gap[1], LLM_EMPATHY_RATINGS_CAP - len(kept), rng)


def load_counsel_chat_upvotes(data_dir: Path, rng: random.Random) -> list[PreferencePair]:
    """CounselChat therapist answers: within one question, the answer with more upvotes is chosen.

    Pairs: every two answers to the same question whose upvote counts differ (2,523 pairs); equal upvotes
    give no pair. Prompt: question title and text. Upvotes are noisy (they also track how long an answer has
    been online), so per question only the ``COUNSEL_CHAT_PER_QUESTION`` pairs with the largest upvote gap are
    kept (ties broken at random), and the source is capped at ``COUNSEL_CHAT_CAP``.
    """
    answers: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in _read_csv(data_dir / "counsel_chat" / "20200325_counsel_chat.csv"):
        answers[row["questionID"]].append(row)
    pairs: list[PreferencePair] = []
    for question_id in sorted(answers, key=int):
        rows = answers[question_id]
        title, text = _clean(rows[0]["questionTitle"]), _clean(rows[0]["questionText"])
        prompt = text if normalise_text(title) in normalise_text(text) else f"{title}\n\n{text}"
        scored = []
        for first, second in combinations(rows, 2):
            gap = int(first["upvotes"]) - int(second["upvotes"])
            if gap == 0:
                continue
            good, bad = (first, second) if gap > 0 else (second, first)
            pair = _make_pair(
                "empathy", "counsel_chat:upvotes", prompt, good["answerText"], bad["answerText"]
            )
            if pair is not None:
                scored.append((abs(gap), rng.random(), pair))
        scored.sort(key=lambda item: (-item[0], item[1]))
        pairs += [pair for _, _, pair in scored[:COUNSEL_CHAT_PER_QUESTION]]
    return _sample(pairs, COUNSEL_CHAT_CAP, rng)


# -------------------------------------------------------------------------------------------- non-judgmental


def load_pair_non_judgmental(data_dir: Path, rng: random.Random) -> list[PreferencePair]:
    """PAIR: each expert reflection (hq) > each low-quality response (lq) on the same client prompt.

    The low-quality responses are mostly unsolicited advice, judgment or dismissal, so hq > lq is the
    non-judgmental contrast (3,180 pairs); ``empathy`` uses the hq > mq and mq > lq comparisons instead.
    Capped at ``PAIR_NON_JUDGMENTAL_CAP`` by random sampling.
    """
    pairs = _pair_reflection_pairs(data_dir, "non_judgmental", _PAIR_HIGH, _PAIR_LOW)
    return _sample(pairs, PAIR_NON_JUDGMENTAL_CAP, rng)


_MI_NON_ADHERENT = frozenset({"Confront", "Direct", "Warn", "Advise without Permission"})
_MI_ADHERENT = frozenset(
    {
        "Affirm",
        "Support",
        "Emphasize Autonomy",
        "Advise with Permission",
        "Simple Reflection",
        "Complex Reflection",
        "Open Question",
    }
)


def load_llm_empathy_miti(data_dir: Path, rng: random.Random) -> list[PreferencePair]:
    """MITI behaviour codes of the human and ChatGPT responses in llm_empathy_evaluation.

    Pairs: when exactly one of ``response_human`` / ``response_chatgpt`` carries an MI-non-adherent code
    (Confront, Direct, Warn, Advise without Permission; 839 situations), the other one is chosen if it
    carries at least one MI-adherent code (Affirm, Support, Emphasize Autonomy, Advise with Permission,
    Simple/Complex Reflection, Open Question), about 700 pairs. The empathy-prompted ChatGPT response is not
    used: its MITI codes are a copy of the plain ChatGPT response's codes in this file. Not capped.
    """
    del rng  # every qualifying pair is kept
    pairs = []
    for row in _read_csv(data_dir / "llm_empathy_evaluation" / "dataset_and_ratings.csv"):
        codes = {name: set(ast.literal_eval(row[f"miti_{name}"])) for name in ("human", "chatgpt")}
        non_adherent = {name for name, found in codes.items() if found & _MI_NON_ADHERENT}
        if len(non_adherent) != 1:
            continue
        (bad,) = non_adherent
        good = "chatgpt" if bad == "human" else "human"
        if codes[good] & _MI_ADHERENT:
            pairs.append(
                _make_pair(
                    "non_judgmental",
                    "llm_empathy_evaluation:miti",
                    row["speaker_uttr"],
                    row[f"response_{good}"],
                    row[f"response_{bad}"],
                )
            )
    return _keep(pairs)


def _common_suffix_words(first: str, second: str) -> list[str]:
    first_words, second_words = first.split(), second.split()
    shared: list[str] = []
    while (
        len(shared) < min(len(first_words), len(second_words))
        and first_words[-1 - len(shared)].casefold() == second_words[-1 - len(shared)].casefold()
    ):
        shared.append(first_words[-1 - len(shared)])
    return shared[::-1]


def load_mi_rephrasing(data_dir: Path, rng: random.Random) -> list[PreferencePair]:
    """MI rephrasing pseudo-parallel pairs: autonomy-respecting rephrase > directive advice.

    Only the 240 ``template`` pairs are used: there the rephrase wraps the same advice in an autonomy-
    respecting frame ("You should be careful." -> "I would encourage you to be careful."). The 104
    ``retrieve`` pairs match a directive sentence with a different, retrieved sentence, so content and stance
    are confounded; they are left out.

    The files have no prompt, so one is synthesised (``synthetic=True``): the advice both responses share
    (their longest common word suffix, at least two words) is put in the fixed request
    'In one sentence, suggest this to a friend who is going through a hard time: "<advice>"'. The prompt
    differs per pair, so these pairs spread over the splits. Pairs sharing less than two words of advice are
    dropped (234 of the 240 remain).
    """
    del rng  # every template pair is kept
    pairs = []
    for name in ("advise_train.txt", "advise_valid.txt", "advise_test.txt"):
        for line in (
            (data_dir / "mi_rephrasing_pp" / "template" / name).read_text(encoding="utf-8").splitlines()
        ):
            fields_by_key = dict(part.split(":", 1) for part in line.split("\t") if ":" in part)
            directive, rephrase = fields_by_key.get("text", ""), fields_by_key.get("labels", "")
            advice = _common_suffix_words(directive, rephrase)
            if len(advice) < 2:
                continue
            prompt = (
                "In one sentence, suggest this to a friend who is going through a hard time: "
                f'"{" ".join(advice)}"'
            )
            pairs.append(
                _make_pair("non_judgmental", "mi_rephrasing_pp:template", prompt, rephrase, directive, True)
            )
    return _keep(pairs)


# ----------------------------------------------------------------------------------------------- sensitivity


def load_diasafety(data_dir: Path, rng: random.Random) -> list[PreferencePair]:
    """DiaSafety: within one dialogue context, a response labelled Safe > a response labelled Unsafe.

    Pairs: every Safe x Unsafe combination of responses to the same context (2,404 pairs over 767 contexts,
    the train, val and test files pooled). At most ``DIASAFETY_PER_CONTEXT`` pairs per context, and pairs
    whose unsafe response is "Unauthorized Expertise" (the largest and least sensitivity-specific category)
    are capped at ``DIASAFETY_UNAUTHORIZED_EXPERTISE_CAP``; the other four categories (Risk Ignorance,
    Offending User, Biased Opinion, Toxicity Agreement) are kept whole.
    """
    responses: dict[str, dict[str, dict[str, str]]] = defaultdict(lambda: {"Safe": {}, "Unsafe": {}})
    for name in ("train.json", "val.json", "test.json"):
        for item in _read_json(data_dir / "diasafety" / name):
            context = _clean(item["context"])
            responses[context][item["label"]].setdefault(_clean(item["response"]), item["category"])
    by_category: dict[str, list[PreferencePair]] = defaultdict(list)
    for context in sorted(responses):
        safe, unsafe = responses[context]["Safe"], responses[context]["Unsafe"]
        combos = [(good, bad) for good in sorted(safe) for bad in sorted(unsafe)]
        for good, bad in _sample(combos, DIASAFETY_PER_CONTEXT, rng):
            pair = _make_pair("sensitivity", "diasafety", context, good, bad)
            if pair is not None:
                by_category[unsafe[bad]].append(pair)
    pairs = []
    for category in sorted(by_category):
        cap = DIASAFETY_UNAUTHORIZED_EXPERTISE_CAP if category == "Unauthorized Expertise" else None
        pairs += by_category[category] if cap is None else _sample(by_category[category], cap, rng)
    return pairs


def _blank_out_difference(first: str, second: str) -> str | None:
    """``first`` with the words it does not share with ``second`` (prefix/suffix-wise) replaced by ___."""
    first_words, second_words = first.split(), second.split()
    prefix = 0
    while (
        prefix < min(len(first_words), len(second_words))
        and first_words[prefix].casefold() == second_words[prefix].casefold()
    ):
        prefix += 1
    suffix = 0
    while (
        suffix < min(len(first_words), len(second_words)) - prefix
        and first_words[-1 - suffix].casefold() == second_words[-1 - suffix].casefold()
    ):
        suffix += 1
    if prefix + suffix == 0:
        return None
    middle_end = len(first_words) - suffix
    return " ".join(first_words[:prefix] + ["___"] + first_words[middle_end:])


def load_crows_pairs(data_dir: Path, rng: random.Random) -> list[PreferencePair]:
    """CrowS-Pairs minimal pairs: the less stereotyping sentence > the more stereotyping one.

    Only rows with direction "stereo" are used (sent_more states a stereotype about a disadvantaged group,
    sent_less the same about another group). "antistereo" rows would prefer e.g. "she" over "he" in a
    neutral sentence, which is not a sensitivity objective.

    The file has no prompt, so one is synthesised (``synthetic=True``): the more stereotyping sentence with
    the words where the two differ blanked out, in the request 'Fill in the blank and write out the whole
    sentence: "<sentence with ___>"'. The responses are the two full sentences. Capped at
    ``CROWS_PAIRS_CAP`` so these synthetic pairs stay a minority of ``sensitivity``.
    """
    pairs = []
    for row in _read_csv(data_dir / "crows_pairs" / "crows_pairs_anonymized.csv"):
        if row["stereo_antistereo"] != "stereo":
            continue
        more, less = _clean(row["sent_more"]), _clean(row["sent_less"])
        blanked = _blank_out_difference(more, less)
        if blanked is None:
            continue
        prompt = f'Fill in the blank and write out the whole sentence: "{blanked}"'
        pairs.append(_make_pair("sensitivity", "crows_pairs", prompt, less, more, True))
    return _sample(_keep(pairs), CROWS_PAIRS_CAP, rng)


# ---------------------------------------------------------------------------------------------- truthfulness


def _split_answers(text: str) -> list[str]:
    return [answer.strip() for answer in text.split(";") if answer.strip()]


def load_truthfulqa_best(data_dir: Path, rng: random.Random) -> list[PreferencePair]:
    """TruthfulQA: the "Best Answer" > the "Best Incorrect Answer" for each question (790 pairs)."""
    del rng
    rows = _read_csv(data_dir / "truthfulqa" / "TruthfulQA.csv")
    return _keep(
        _make_pair(
            "truthfulness",
            "truthfulqa:best",
            row["Question"],
            row["Best Answer"],
            row["Best Incorrect Answer"],
        )
        for row in rows
    )


def load_truthfulqa_correct_x_incorrect(data_dir: Path, rng: random.Random) -> list[PreferencePair]:
    """TruthfulQA: any listed correct answer > any listed incorrect answer to the same question.

    The best-answer pair is left out (``load_truthfulqa_best`` has it), and so are correct answers that are
    refusals ("I have no comment"): they are truthful but would teach this attribute to reward evasion. Of
    the remaining pairs, ``TRUTHFULQA_EXTRA_PER_QUESTION`` per question are sampled, then the source is capped
    at ``TRUTHFULQA_EXTRA_CAP``.
    """
    pairs = []
    for row in _read_csv(data_dir / "truthfulqa" / "TruthfulQA.csv"):
        best = (normalise_text(row["Best Answer"]), normalise_text(row["Best Incorrect Answer"]))
        correct = [
            answer for answer in _split_answers(row["Correct Answers"]) if "no comment" not in answer.lower()
        ]
        combos = [
            (good, bad)
            for good, bad in product(correct, _split_answers(row["Incorrect Answers"]))
            if (normalise_text(good), normalise_text(bad)) != best
        ]
        for good, bad in _sample(combos, TRUTHFULQA_EXTRA_PER_QUESTION, rng):
            pairs.append(
                _make_pair("truthfulness", "truthfulqa:correct_x_incorrect", row["Question"], good, bad)
            )
    return _sample(_keep(pairs), TRUTHFULQA_EXTRA_CAP, rng)


_FACTUAL_ERRORS = frozenset({"Unverifiable", "Wrong-Grounding"})


def _finegrained_items(data_dir: Path) -> list[dict]:
    return _read_json(data_dir / "finegrained_rlhf_qa_feedback" / "dev_feedback.json")


def _has_factual_error(item: dict) -> bool:
    return any(error["error type"] in _FACTUAL_ERRORS for error in item["feedback"]["errors"])


def load_finegrained_factual_corrections(data_dir: Path, rng: random.Random) -> list[PreferencePair]:
    """FineGrainedRLHF qa-feedback: human-corrected answer > original answer, when a factual error was marked.

    Only items whose feedback marks at least one factual error span (Unverifiable or Wrong-Grounding) are
    used here (about 200 of the 481 edits); edits that only remove irrelevant or redundant text or add
    missing information go to ``helpfulness`` (``load_finegrained_other_corrections``). Prompt: the question
    (the Wikipedia passages are left out to fit the prompt budget).
    """
    del rng
    return _keep(
        _make_pair(
            "truthfulness",
            "finegrained_rlhf_qa_feedback:factual_correction",
            item["question"],
            item["feedback"]["corrected-prediction"],
            item["prediction 1"],
        )
        for item in _finegrained_items(data_dir)
        if _has_factual_error(item)
    )


# ----------------------------------------------------------------------------------------------- helpfulness

_FINEGRAINED_PREFERENCE_ORDER = ((1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4))


def load_finegrained_preferences(data_dir: Path, rng: random.Random) -> list[PreferencePair]:
    """FineGrainedRLHF qa-feedback pairwise judgements between the 4 sampled answers to a question.

    ``preference`` lists 6 judgements in the order 1v2, 1v3, 1v4, 2v3, 2v4, 3v4: 1 means the first answer is
    preferred, 2 the second, 0 a tie (no pair). 2,616 non-tie pairs. Not capped.
    """
    del rng
    pairs = []
    for item in _finegrained_items(data_dir):
        for (first, second), verdict in zip(_FINEGRAINED_PREFERENCE_ORDER, item["preference"], strict=True):
            if verdict not in (1, 2):
                continue
            good, bad = (first, second) if verdict == 1 else (second, first)
            pairs.append(
                _make_pair(
                    "helpfulness",
                    "finegrained_rlhf_qa_feedback:preference",
                    item["question"],
                    item[f"prediction {good}"],
                    item[f"prediction {bad}"],
                )
            )
    return _keep(pairs)


def load_finegrained_other_corrections(data_dir: Path, rng: random.Random) -> list[PreferencePair]:
    """FineGrainedRLHF qa-feedback: corrected answer > original when no factual error was marked.

    These edits remove irrelevant, redundant or incoherent text or add missing information, which is a
    helpfulness (not truthfulness) improvement. About 280 pairs. Not capped.
    """
    del rng
    return _keep(
        _make_pair(
            "helpfulness",
            "finegrained_rlhf_qa_feedback:other_correction",
            item["question"],
            item["feedback"]["corrected-prediction"],
            item["prediction 1"],
        )
        for item in _finegrained_items(data_dir)
        if not _has_factual_error(item)
    )


def load_xstest_over_refusal(data_dir: Path, rng: random.Random) -> list[PreferencePair]:
    """XSTest safe prompts: a fully compliant completion > a fully refusing one (over-refusal contrast).

    Uses the human ``final_label`` of the 5 models' completions on the 250 safe prompts (types not starting
    with "contrast_"): every 1_full_compliance x 2_full_refusal combination on the same prompt (456 pairs).
    Partial refusals give no pair. The unsafe "contrast_" prompts are not used at all (they belong to the
    harm judge's data, see the module docstring).
    """
    del rng
    by_prompt: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted((data_dir / "xstest" / "model_completions").glob("*.csv")):
        for row in _read_csv(path):
            if row["type"].startswith("contrast_"):
                continue
            by_prompt[_clean(row["prompt"])][row["final_label"]].append(row["completion"])
    return _keep(
        _make_pair("helpfulness", "xstest:over_refusal", prompt, good, bad)
        for prompt in sorted(by_prompt)
        for good, bad in product(by_prompt[prompt]["1_full_compliance"], by_prompt[prompt]["2_full_refusal"])
    )


_REFUSAL_DIRECTION_MODELS = ("gemma-2b-it", "meta-llama-3-8b-instruct", "qwen-1_8b-chat")


def load_refusal_direction_harmless(data_dir: Path, rng: random.Random) -> list[PreferencePair]:
    """refusal_direction harmless Alpaca prompts: the model's normal answer > its activation-added refusal.

    Per model and prompt, the ``harmless_baseline`` response is chosen and the ``harmless_actadd`` response
    (refusal induced by adding the refusal direction) rejected, when the baseline shows no refusal phrase
    (``is_jailbreak_substring_matching == 1``) and the actadd response does (``== 0``): 294 pairs. Only the
    harmless completions are used; the LlamaGuard-labelled jailbreakbench completions are the harm judge's.
    """
    del rng
    pairs = []
    for model in _REFUSAL_DIRECTION_MODELS:
        folder = data_dir / "refusal_direction" / "completions" / model
        baseline = {
            c["prompt"]: c for c in _read_json(folder / "harmless_baseline_evaluations.json")["completions"]
        }
        actadd = {
            c["prompt"]: c for c in _read_json(folder / "harmless_actadd_evaluations.json")["completions"]
        }
        for prompt in sorted(baseline.keys() & actadd.keys()):
            answered = baseline[prompt]["is_jailbreak_substring_matching"] == 1
            refused = actadd[prompt]["is_jailbreak_substring_matching"] == 0
            if answered and refused:
                pairs.append(
                    _make_pair(
                        "helpfulness",
                        "refusal_direction:harmless_actadd",
                        prompt,
                        baseline[prompt]["response"],
                        actadd[prompt]["response"],
                    )
                )
    return _keep(pairs)


# ---------------------------------------------------------------------------------------------------- safety

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def _split_hh_dialogue(text: str) -> tuple[list[tuple[str, str]], str] | None:
    """HH-RLHF transcript -> (context turns, last Assistant reply); ``None`` if it does not end on one."""
    parts = _HH_TURN.split("\n\n" + text.lstrip("\n"))
    turns = [
        ("User" if role == "Human" else "Assistant", _clean(body))
        for role, body in zip(parts[1::2], parts[2::2], strict=True)
    ]
    if not turns or turns[-1][0] != "Assistant":
        return None
    return turns[:-1], turns[-1][1]


def load_hh_rlhf_harmless(data_dir: Path, rng: random.Random) -> list[PreferencePair]:
    """Anthropic HH-RLHF harmless-base (test file): the human-preferred transcript's last reply is chosen.

    Prompt: the conversation up to the last Assistant turn, flattened ("User: ...\\nAssistant: ...").
    Chosen / rejected: the last Assistant reply of the ``chosen`` / ``rejected`` transcript. The 5 rows whose
    two transcripts differ before the last reply are dropped (no common prompt), as are 4 with an empty
    reply: 2,303 pairs (2,295 after duplicate and contradictory pairs are removed). Not capped.
    """
    del rng
    pairs = []
    with gzip.open(
        data_dir / "hh_rlhf" / "harmless-base" / "test.jsonl.gz", "rt", encoding="utf-8"
    ) as handle:
        for line in handle:
            row = json.loads(line)
            chosen, rejected = _split_hh_dialogue(row["chosen"]), _split_hh_dialogue(row["rejected"])
            if chosen is None or rejected is None or chosen[0] != rejected[0] or not chosen[0]:
                continue
            pairs.append(
                _make_pair("safety", HH_RLHF_SOURCE, flatten_turns(chosen[0]), chosen[1], rejected[1])
            )
    return _keep(pairs)


def load_jailbreakbench(data_dir: Path, rng: random.Random) -> list[PreferencePair]:
    """JailbreakBench artifacts: for the same behaviour, a non-jailbroken response > a jailbroken one.

    Each of the 16 artifact files (4 attacks x 4 target models) holds one response per JBB behaviour with the
    JBB judge's ``jailbroken`` flag. Pairs: every non-jailbroken x jailbroken combination of responses to the
    same behaviour across files (4,700 pairs). Prompt: the behaviour's plain goal (the attack prompts differ
    per file, and the goal is what the responses are judged against); where files spell a goal in more than
    one way, the most frequent (then the longest) spelling is used. Responses that are missing are skipped.
    ``JAILBREAKBENCH_PER_GOAL`` pairs per behaviour are sampled, then the source is capped at
    ``JAILBREAKBENCH_CAP``.
    """
    goals: dict[str, Counter] = defaultdict(Counter)
    responses: dict[str, dict[bool, list[str]]] = defaultdict(lambda: {True: [], False: []})
    for path in sorted((data_dir / "jailbreakbench_artifacts").glob("*/*/*.json")):
        for item in _read_json(path)["jailbreaks"]:
            goals[item["index"]][_clean(item["goal"])] += 1
            if item["response"]:
                responses[item["index"]][bool(item["jailbroken"])].append(item["response"])
    pairs = []
    for index in sorted(responses, key=int):
        goal = max(goals[index], key=lambda text: (goals[index][text], len(text), text))
        combos = list(product(responses[index][False], responses[index][True]))
        for good, bad in _sample(combos, JAILBREAKBENCH_PER_GOAL, rng):
            pairs.append(_make_pair("safety", "jailbreakbench_artifacts", goal, good, bad))
    return _sample(_keep(pairs), JAILBREAKBENCH_CAP, rng)


# ------------------------------------------------------------------------------------------------- assembly

Loader = Callable[[Path, random.Random], list[PreferencePair]]

LOADERS_BY_ATTRIBUTE: dict[str, tuple[Loader, ...]] = {
    "empathy": (load_pair_empathy, load_llm_empathy_ratings, load_counsel_chat_upvotes),
    "sensitivity": (load_diasafety, load_crows_pairs),
    "non_judgmental": (load_pair_non_judgmental, load_llm_empathy_miti, load_mi_rephrasing),
    "truthfulness": (
        load_truthfulqa_best,
        load_truthfulqa_correct_x_incorrect,
        load_finegrained_factual_corrections,
    ),
    "helpfulness": (
        load_finegrained_preferences,
        load_finegrained_other_corrections,
        load_xstest_over_refusal,
        load_refusal_direction_harmless,
    ),
    "safety": (load_hh_rlhf_harmless, load_jailbreakbench),
}
"""Which loaders feed each attribute (``safety`` uses only HH-RLHF and JailbreakBench, see above)."""


def split_for_prompt(prompt: str) -> str:
    """The split of a prompt: a fixed hash of its normalised text, 80% train, 10% validation, 10% test."""
    digest = hashlib.sha256(normalise_text(prompt).encode("utf-8")).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    if position < 1.0 - VALIDATION_FRACTION - TEST_FRACTION:
        return "train"
    if position < 1.0 - TEST_FRACTION:
        return "validation"
    return "test"


def _sort_key(pair: PreferencePair) -> tuple:
    return (ALL_ATTRIBUTES.index(pair.attribute), pair.source, pair.prompt, pair.chosen, pair.rejected)


def _deduplicate(pairs: list[PreferencePair]) -> list[PreferencePair]:
    """Keep each (attribute, prompt, chosen, rejected) once; drop preferences that also appear reversed."""
    keys = [
        (
            pair.attribute,
            normalise_text(pair.prompt),
            normalise_text(pair.chosen),
            normalise_text(pair.rejected),
        )
        for pair in pairs
    ]
    present = set(keys)
    seen: set[tuple[str, str, str, str]] = set()
    kept = []
    for pair, key in zip(pairs, keys, strict=True):
        reversed_key = (key[0], key[1], key[3], key[2])
        if key in seen or reversed_key in present:
            continue
        seen.add(key)
        kept.append(pair)
    return kept


def build_pairs(data_dir: Path, seed: int = 0) -> list[PreferencePair]:
    """All attributes' pairs with their split assigned, in a deterministic order.

    ``seed`` drives only the sampling of capped sources (one independent generator per loader); the split of
    a pair depends on its prompt alone.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data directory not found: {data_dir}")
    pairs: list[PreferencePair] = []
    for attribute in ALL_ATTRIBUTES:
        for loader in LOADERS_BY_ATTRIBUTE[attribute]:
            pairs += loader(data_dir, random.Random(f"{seed}:{loader.__name__}"))
    pairs = _deduplicate(pairs)
    return sorted((replace(pair, split=split_for_prompt(pair.prompt)) for pair in pairs), key=_sort_key)


# ------------------------------------------------------------------------------------------------ files


def count_pairs(pairs: Iterable[PreferencePair], by_source: bool = False) -> dict[str, dict[str, int]]:
    """Counts per row (attribute, or "attribute / source") and split, with a "total" column."""
    counts: dict[str, dict[str, int]] = {}
    for pair in sorted(pairs, key=_sort_key):
        row = f"{pair.attribute} / {pair.source}" if by_source else pair.attribute
        cells = counts.setdefault(row, {split: 0 for split in (*SPLITS, "total")})
        if pair.split in SPLITS:
            cells[pair.split] += 1
        cells["total"] += 1
    return counts


def format_counts_table(counts: dict[str, dict[str, int]], row_label: str = "attribute") -> str:
    """A plain-text table of ``counts`` (as returned by ``count_pairs``/``write_splits``) with a TOTAL row."""
    columns = (*SPLITS, "total")
    totals = {column: sum(cells.get(column, 0) for cells in counts.values()) for column in columns}
    rows = [(name, cells) for name, cells in counts.items()] + [("TOTAL", totals)]
    name_width = max(len(row_label), *(len(name) for name, _ in rows))
    widths = [max(len(column), *(len(str(cells.get(column, 0))) for _, cells in rows)) for column in columns]
    header = row_label.ljust(name_width) + "".join(
        f"  {c.rjust(w)}" for c, w in zip(columns, widths, strict=True)
    )
    lines = [header, "-" * len(header)]
    for name, cells in rows:
        lines.append(
            name.ljust(name_width)
            + "".join(f"  {str(cells.get(c, 0)).rjust(w)}" for c, w in zip(columns, widths, strict=True))
        )
    return "\n".join(lines)


def _write_atomically(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and rename, so readers never see a partial file."""
    handle = tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    )
    try:
        with handle:
            handle.write(text)
        os.chmod(handle.name, 0o644)  # NamedTemporaryFile creates 0600; the splits are ordinary data files
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def write_splits(pairs: Sequence[PreferencePair], out_dir: Path) -> dict[str, dict[str, int]]:
    """Write ``train.jsonl``, ``validation.jsonl`` and ``test.jsonl`` under ``out_dir``; return the counts.

    One JSON object per line with every field, sorted by attribute, source, prompt, chosen, rejected.
    """
    unassigned = [pair for pair in pairs if pair.split not in SPLITS]
    if unassigned:
        raise ValueError(f"{len(unassigned)} pairs have no valid split; build them with build_pairs()")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        lines = [
            json.dumps(asdict(pair), ensure_ascii=False)
            for pair in sorted((p for p in pairs if p.split == split), key=_sort_key)
        ]
        _write_atomically(out_dir / f"{split}.jsonl", "".join(line + "\n" for line in lines))
    return count_pairs(pairs)


_FIELD_NAMES = frozenset(field.name for field in fields(PreferencePair))


def load_pairs(out_dir: Path, split: str, attributes: Sequence[str] | None = None) -> list[PreferencePair]:
    """Read one split written by ``write_splits``, optionally only some attributes."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    wanted = set(ALL_ATTRIBUTES if attributes is None else attributes)
    unknown = wanted - set(ALL_ATTRIBUTES)
    if unknown:
        raise ValueError(
            f"unknown attributes {sorted(unknown)}; expected some of {', '.join(ALL_ATTRIBUTES)}"
        )
    path = Path(out_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; build it with `prosocial rewardmodel data --out {out_dir}`"
        )
    pairs = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            if set(record) != _FIELD_NAMES:
                raise ValueError(f"{path}:{line_number}: fields {sorted(record)} do not match PreferencePair")
            if record["attribute"] in wanted:
                pairs.append(PreferencePair(**record))
    return pairs
