"""Evaluation metrics: TextVQA accuracy and a paired bootstrap for base-vs-tuned lift.

Pure functions (numpy only, no torch) so they can run anywhere, including in tests.

Answer normalisation and the soft accuracy follow the TextVQA/M4C port of the EvalAI VQA
evaluator, i.e. ``EvalAIAnswerProcessor`` and ``TextVQAAccuracyEvaluator`` in
facebookresearch/mmf, ``mmf/utils/m4c_evaluators.py`` (the same file LLaVA and others vendor
as ``m4c_evaluator.py``). Its lists derive from the official VQA ``vqaEval.py``
(GT-Vision-Lab/VQA, ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``). Differences from
``vqaEval.py`` that the TextVQA evaluator has, and which are kept here on purpose:

* every answer (prediction and all ground-truth answers) is always normalised, not only when
  the annotators disagree;
* a ``word_tokenize`` step runs first: lower-case, delete every ``,`` and ``?``, and turn
  ``'s`` into `` 's``. Because commas are deleted there, ``"1,000"`` becomes ``"1000"`` and the
  comma-in-number test inside ``process_punctuation`` can never fire afterwards;
* the period strip is called as ``PERIOD_STRIP.sub("", text, re.UNICODE)``, which passes
  ``re.UNICODE`` (== 32) as the *count* argument: at most 32 periods are removed. Reproduced.

The quirks of the original lists (capitalised contraction keys such as ``"Im"`` that can
never match lower-cased text, ``"somebody'd" -> "somebodyd"``) are reproduced verbatim too,
so scores agree with the official numbers.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

__all__ = [
    "normalize_answer",
    "answer_scores",
    "vqa_accuracy",
    "mean_accuracy",
    "paired_bootstrap",
    "ci_excludes_zero",
]

# --- EvalAI / M4C answer processor -------------------------------------------------------

_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}

_NUMBER_MAP: dict[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}

_ARTICLES = ("a", "an", "the")
# `(?!<=\d)` is a (harmless) typo for a look-behind in the original: as written it is a
# negative look-ahead for the literal "<=" + digit, so effectively "a period not followed by
# a digit". Kept verbatim.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
_PUNCTUATIONS = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
    ",", "?", "!",
)
# The original passes re.UNICODE positionally as `count` to Pattern.sub.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def _word_tokenize(text: str) -> str:
    text = text.lower()
    text = text.replace(",", "").replace("?", "").replace("'s", " 's")
    return text.strip()


def _process_punctuation(in_text: str) -> str:
    out_text = in_text
    comma_in_number = _COMMA_STRIP.search(in_text) is not None
    for p in _PUNCTUATIONS:
        # The adjacency test looks at the *input* text, as in the original.
        if (p + " " in in_text or " " + p in in_text) or comma_in_number:
            out_text = out_text.replace(p, "")
        else:
            out_text = out_text.replace(p, " ")
    return _PERIOD_STRIP.sub("", out_text, _PERIOD_STRIP_COUNT)


def _process_digit_article(in_text: str) -> str:
    words = []
    for word in in_text.lower().split():
        word = _NUMBER_MAP.get(word, word)
        if word not in _ARTICLES:
            words.append(word)
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """Normalise one answer exactly as the TextVQA EvalAI answer processor does."""
    if text is None:
        return ""
    text = _word_tokenize(str(text))
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = _process_punctuation(text)
    return _process_digit_article(text)


# --- TextVQA soft accuracy ---------------------------------------------------------------


def answer_scores(answers: Sequence[str]) -> dict[str, float]:
    """Soft score of every unique normalised ground-truth answer.

    For each unique answer: the mean, over the leave-one-out subsets (drop annotator i), of
    ``min(1, #matches among the remaining answers / 3)``. Summation runs in annotator order,
    as in the original, so float results are bit-identical to it. The official evaluator
    asserts exactly 10 answers; any non-empty list is accepted here.
    """
    if isinstance(answers, str):
        raise TypeError("answers must be a list of strings, not a single string")
    normed = [normalize_answer(a) for a in answers]
    if not normed:
        raise ValueError("answers must contain at least one ground-truth answer")
    counts = Counter(normed)
    n = len(normed)
    scores: dict[str, float] = {}
    for unique in counts:
        total = 0.0
        for ans in normed:
            matches = counts[unique] - (1 if ans == unique else 0)
            total += min(1, float(matches) / 3)
        scores[unique] = total / n
    return scores


def vqa_accuracy(prediction: str | None, answers: Sequence[str]) -> float:
    """TextVQA accuracy of one prediction against its (ten) annotator answers.

    ``None`` (no prediction) scores 0. Otherwise the normalised prediction gets the soft
    score of the matching unique normalised answer, or 0 when none matches.
    """
    scores = answer_scores(answers)
    if prediction is None:
        return 0.0
    return float(scores.get(normalize_answer(prediction), 0.0))


def mean_accuracy(
    predictions: Sequence[str | None], answers_lists: Sequence[Sequence[str]]
) -> float:
    """Mean :func:`vqa_accuracy` over a dataset (the number EvalAI reports)."""
    if len(predictions) != len(answers_lists):
        raise ValueError(
            f"predictions and answers_lists differ in length: "
            f"{len(predictions)} != {len(answers_lists)}"
        )
    if not predictions:
        raise ValueError("mean_accuracy needs at least one prediction")
    scores = [vqa_accuracy(p, a) for p, a in zip(predictions, answers_lists)]
    return sum(scores) / len(scores)


# --- Paired bootstrap --------------------------------------------------------------------

_BOOTSTRAP_CHUNK_ELEMENTS = 4_000_000  # index-matrix cells drawn at once (~32 MB of int64)


def paired_bootstrap(
    base_scores: Sequence[float],
    tuned_scores: Sequence[float],
    resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
    """Paired (per-question) bootstrap of the mean lift ``tuned - base``.

    Question indices are resampled with replacement (``numpy.random.default_rng(seed)``),
    the same indices for both systems, vectorised in chunks whose size depends only on
    ``n`` so results are deterministic for a seed. The interval is the percentile interval of
    the resampled lifts at ``confidence``.

    ``p_value`` is **one-sided**: the fraction of resamples whose lift is ``<= 0`` (evidence
    against "tuned is better"). ``p_value_two_sided`` is ``min(1, 2 * min(P(lift<=0),
    P(lift>=0)))``.
    """
    base = np.asarray(base_scores, dtype=np.float64).reshape(-1)
    tuned = np.asarray(tuned_scores, dtype=np.float64).reshape(-1)
    if base.shape != tuned.shape:
        raise ValueError(
            f"base_scores and tuned_scores must have the same length "
            f"(got {base.shape[0]} and {tuned.shape[0]}); they are paired per question"
        )
    n = int(base.shape[0])
    if n < 1:
        raise ValueError("paired_bootstrap needs at least one paired score (n >= 1)")
    if not (np.all(np.isfinite(base)) and np.all(np.isfinite(tuned))):
        raise ValueError("scores must be finite numbers (no NaN or inf)")
    resamples = int(resamples)
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not (0.0 < confidence < 1.0):
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")

    diff = tuned - base
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // n)
    lifts = np.empty(resamples, dtype=np.float64)
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        lifts[start:stop] = diff[idx].mean(axis=1)

    alpha = 1.0 - confidence
    ci_low, ci_high = np.quantile(lifts, [alpha / 2.0, 1.0 - alpha / 2.0])
    p_le = float(np.mean(lifts <= 0.0))
    p_ge = float(np.mean(lifts >= 0.0))
    return {
        "n": n,
        "base": float(base.mean()),
        "tuned": float(tuned.mean()),
        "lift": float(diff.mean()),
        "ci_low": float(ci_low),
        "ci_high": float(ci_high),
        "p_value": p_le,
        "p_value_two_sided": min(1.0, 2.0 * min(p_le, p_ge)),
        "p_value_kind": "one-sided: fraction of resamples with lift <= 0",
        "resamples": resamples,
        "confidence": float(confidence),
        "seed": int(seed),
    }


def ci_excludes_zero(stats: dict) -> bool:
    """True when a bootstrap interval lies strictly on one side of zero."""
    lo, hi = stats.get("ci_low"), stats.get("ci_high")
    if lo is None or hi is None or any(math.isnan(float(v)) for v in (lo, hi)):
        return False
    return float(lo) > 0.0 or float(hi) < 0.0
