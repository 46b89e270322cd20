"""Rule filters for generated stage-2 descriptions (MiniGPT-4 §3.2, data post-processing).

MiniGPT-4 curated its ~3,500 stage-2 pairs from 5,000 descriptions written by its stage-1 model:
ChatGPT fixed them ("remove any repeating sentences, meaningless characters, not English sentences ...
rewrite any incomplete sentences"), hard-coded rules dropped the frequent failures ("I'm sorry I made a
mistake ...", "I apologize for that ..."), and the rest was checked by hand. These rules are the
mechanical part of that check. `check` judges `clean(text)` and gives the first reason that applies:

    empty        nothing left after `clean`
    non_english  over 20% of the letters outside the Latin script, or more foreign than English
                 function words (at least 2: "la", "und", "est", ... against "the", "of", "is", ...)
    apology      the writer talking about itself: "I'm sorry", "I apologize", "As an AI", "I cannot see"
    repetition   a sentence of >= 3 words said twice, a phrase of <= 8 words said `times` times back to
                 back ("the the the"), or an `ngram`-word phrase said `times` times anywhere
    fragment     fewer than `min_words` words, or not ending in . ! ? (cut off mid-sentence, or "...")

The order puts the most telling reason first: a looping description usually runs into the length limit
and ends mid-sentence too, and is reported as repetition. `curate` filters a set and counts reasons.
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

from .metrics import tokenize

REASONS = ("empty", "non_english", "apology", "repetition", "fragment")
MAX_NON_LATIN = 0.2  # share of letters outside the Latin script
MAX_LOOP = 8  # longest phrase checked for back-to-back repeats

_TEMPLATE_END = re.compile(r"###|</s>")  # Vicuna's separator (###Human / ###Assistant), LLaMA's EOS as text
_ROLE = re.compile(r"^(?:assistant|gpt)\s*:\s*", re.IGNORECASE)
_SPACES = re.compile(r"\s+")
_SENTENCE_END = re.compile(r"[.!?]+")
_ENDS_SENTENCE = re.compile(r"[.!?][\"')\]]*$")
_APOLOGY = re.compile("|".join([
    r"\bI(?:'m| am) (?:so |very |really |terribly )?sorry\b",
    r"^sorry\b",
    r"\bI (?:sincerely |do )?apologi[sz]e\b",
    r"\bapologies\b",
    r"\bI (?:have )?made (?:a |an )?(?:mistake|error)\b",
    r"\bas an? (?:AI|artificial intelligence|(?:large )?language model)\b",
    # a description speaks of the image, never of "I": these are refusals or excuses
    r"\bI (?:cannot|can ?not|can't|am unable to|am not able to|don't have the ability|do not have the ability)\b",
    r"\bI'm (?:unable|not able) to\b",
    r"\bI (?:don't|do not) see (?:an?|the|any) (?:image|picture|photo)\b",
    r"\bno (?:image|picture|photo) (?:was |has been |is )?(?:provided|uploaded|attached|shown)\b",
]), re.IGNORECASE)
_ENGLISH = frozenset("the a an and of in on at is are was were with to there this that it its by for from as be "
                     "has have which while".split())
# frequent function words of French, Spanish, German, Italian and Dutch that are not also English words
_FOREIGN = frozenset("le la les des du une est sont et avec dans sur pour qui que il elle el los las una y con "
                     "por para del es muy der das und ist ein eine einen mit auf von zu nicht sich dem di della "
                     "che sono gli het een niet zijn".split())


def clean(text: str) -> str:
    """Strip, collapse whitespace, and drop chat-template remnants: everything from the first `###`
    ("###", "###Human: ...", "###Assistant") or a literal `</s>` on, and a leading "Assistant:" tag."""
    text = _TEMPLATE_END.split(text, maxsplit=1)[0]
    text = _SPACES.sub(" ", text).strip()
    return _ROLE.sub("", text).strip()


def _non_english(text: str, words: list[str]) -> bool:
    letters = [c for c in text if c.isalpha()]
    non_latin = sum(not unicodedata.name(c, "").startswith("LATIN") for c in letters)
    if letters and non_latin / len(letters) > MAX_NON_LATIN:
        return True
    foreign = sum(w in _FOREIGN for w in words)
    return foreign >= 2 and foreign > sum(w in _ENGLISH for w in words)


def _repetition(text: str, words: list[str], ngram: int, times: int) -> bool:
    seen = set()
    for sentence in _SENTENCE_END.split(text):
        key = tuple(tokenize(sentence))
        if len(key) >= 3:
            if key in seen:
                return True
            seen.add(key)
    for size in range(1, MAX_LOOP + 1):
        for i in range(len(words) - times * size + 1):
            phrase = words[i:i + size]
            if all(words[i + j * size:i + (j + 1) * size] == phrase for j in range(1, times)):
                return True
    counts = Counter(tuple(words[i:i + ngram]) for i in range(len(words) - ngram + 1))
    return any(c >= times for c in counts.values())


def check(text: str, *, min_words: int = 8, ngram: int = 6, times: int = 3) -> str | None:
    """Why a generated description should be dropped (one of REASONS), or None to keep it."""
    text = clean(text).replace("\u2019", "'")
    words = tokenize(text)
    if not words:
        return "empty"
    if _non_english(text, words):
        return "non_english"
    if _APOLOGY.search(text):
        return "apology"
    if _repetition(text, words, ngram, times):
        return "repetition"
    if len(words) < min_words or not _ENDS_SENTENCE.search(text) or text.rstrip("\"')]").endswith(".."):
        return "fragment"
    return None


@dataclass
class FilterReport:
    """Counts of a curation pass: kept, dropped by reason (every reason, zeros included), and up to
    `max_examples` ids dropped for each reason, to look at."""

    kept: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 3

    def add(self, reason: str | None, key: str | None = None) -> None:
        if reason is None:
            self.kept += 1
            return
        if reason not in self.dropped:
            raise ValueError(f"unknown reason {reason!r}; expected one of {', '.join(REASONS)}")
        self.dropped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if key is not None and len(shown) < self.max_examples:
            shown.append(key)

    @property
    def total(self) -> int:
        return self.kept + sum(self.dropped.values())

    def to_dict(self) -> dict:
        return {"total": self.total, "kept": self.kept, "dropped": sum(self.dropped.values()),
                "by_reason": dict(self.dropped), "examples": {k: list(v) for k, v in self.examples.items()}}


def curate(texts: dict[str, str], **rules) -> tuple[dict[str, str], FilterReport]:
    """Filter {id: description}: the kept ones, cleaned, and the report. `rules`: check's keywords."""
    kept, report = {}, FilterReport()
    for key, text in texts.items():
        reason = check(text, **rules)
        report.add(reason, key)
        if reason is None:
            kept[key] = clean(text)
    return kept, report
