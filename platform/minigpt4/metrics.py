"""Caption metrics: BLEU and CIDEr-D as the COCO caption toolkit computes them, and CHAIR.

- `bleu`: corpus BLEU-1..4 (Papineni et al. 2002) as in the COCO toolkit: clipped n-gram matches and
  n-gram counts summed over the corpus before dividing, brevity penalty against the sum over images of
  the reference length closest to the candidate's (ties: the shorter).
- `cider_d`: CIDEr-D (Vedantam et al. 2015) as in the COCO toolkit: tf-idf n-gram vectors, idf from
  the reference sets of the images evaluated, candidate weights clipped to the reference's, a gaussian
  length penalty (sigma 6), n = 1..4 averaged, references averaged, times 10.
- `chair`: CHAIR-i / CHAIR-s (Rohrbach et al. 2018, "Object Hallucination in Image Captioning"): the
  share of object mentions, and of captions, naming an object the image does not contain.
  `coco_vocabulary()` names the 80 COCO categories (`assets/coco_synonyms.json`),
  `synthetic_vocabulary()` the shapes of `minigpt4.synthetic`.

All three read text through `tokenize`: lowercase, words are runs of letters and digits, an
apostrophe inside a word stays ("don't", "dog's"), everything else separates words and is dropped.
It stands in for the Stanford PTB tokenizer the COCO toolkit runs (which also drops punctuation),
so scores can differ from the toolkit's where the PTB tokenizer splits clitics ("do n't") or
hyphenated words differently; on plain captions the tokens are the same. Pure Python, no
dependencies.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

COCO_SYNONYMS = Path(__file__).parent / "assets" / "coco_synonyms.json"
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


def tokenize(text: str) -> list[str]:
    """'A dog's toy, on-the-go!' -> ['a', "dog's", 'toy', 'on', 'the', 'go']."""
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def _check_corpus(candidates: dict[str, str], references: dict[str, list[str]]) -> list[str]:
    """The image ids in a fixed order; as the toolkit, every image needs a candidate and >= 1 reference."""
    if set(candidates) != set(references):
        only_c, only_r = sorted(set(candidates) - set(references)), sorted(set(references) - set(candidates))
        raise ValueError(f"candidates and references must have the same image ids: {len(only_c)} only in "
                         f"candidates (e.g. {only_c[:3]}), {len(only_r)} only in references (e.g. {only_r[:3]})")
    empty = sorted(k for k, refs in references.items() if not refs)
    if empty:
        raise ValueError(f"{len(empty)} images have no reference caption, e.g. {empty[:3]}")
    return sorted(candidates)


# -- BLEU ----------------------------------------------------------------------------------------------
def bleu(candidates: dict[str, str], references: dict[str, list[str]], n: int = 4) -> dict[str, float]:
    """Corpus BLEU-1..n: {"bleu_1": ..., "bleu_n": ...}, each in [0, 1].

    BLEU-k = BP * (p_1 * ... * p_k) ** (1/k), p_i = (clipped i-gram matches summed over the corpus) /
    (candidate i-grams summed over the corpus); BP = exp(1 - r/c) when the candidates' total length c
    is below r, the sum of each image's closest reference length. The toolkit adds 1e-15 / 1e-9 to
    each ratio: where not a single k-gram matches in the whole corpus it gives a tiny positive BLEU-k
    and this gives exactly 0; elsewhere the two agree to rounding.
    """
    keys = _check_corpus(candidates, references)
    correct, total = [0] * n, [0] * n
    cand_len = ref_len = 0
    for key in keys:
        words = tokenize(candidates[key])
        refs = [tokenize(r) for r in references[key]]
        cand_len += len(words)
        ref_len += min((abs(len(r) - len(words)), len(r)) for r in refs)[1]
        for k in range(1, n + 1):
            most = Counter()
            for r in refs:
                most |= _ngrams(r, k)  # | keeps the larger count: an n-gram is clipped to its most in any one reference
            correct[k - 1] += sum(min(c, most[g]) for g, c in _ngrams(words, k).items())
            total[k - 1] += max(len(words) - k + 1, 0)
    bp = 1.0 if cand_len >= ref_len else math.exp(1 - ref_len / cand_len) if cand_len else 0.0
    scores, product = {}, 1.0
    for k in range(1, n + 1):
        product *= correct[k - 1] / total[k - 1] if total[k - 1] else 0.0
        scores[f"bleu_{k}"] = bp * product ** (1 / k)
    return scores


# -- CIDEr-D -------------------------------------------------------------------------------------------
def cider_d(candidates: dict[str, str], references: dict[str, list[str]], n: int = 4,
            sigma: float = 6.0) -> dict:
    """CIDEr-D: {"cider_d": the mean over images, "per_image": {image_id: score}}; 10 for a candidate
    equal to every reference of its image (given >= n words), 0 when it shares no informative n-gram.

    For each image, candidate c and reference r become per-order vectors g_k(s)[w] = tf_s(w) * idf(w),
    tf the n-gram's count in the sentence, idf(w) = log(N) - log(max(1, df(w))), N the number of
    images evaluated and df(w) the number of them whose references contain w. Then

        score(c, refs) = 10 / |refs| * sum_r  exp(-(l_c - l_r)^2 / (2 sigma^2))
                         * 1/n * sum_k  sum_w min(g_k(c)[w], g_k(r)[w]) * g_k(r)[w] / (|g_k(c)| |g_k(r)|)

    with l the sentence length in words (the toolkit counts bigrams, which gives the same difference
    except against an empty sentence, whose similarity is 0 either way). idf comes from the corpus
    being scored, so a single image scores 0 (log 1) and scores depend on which images are evaluated
    together, as in the toolkit.
    """
    keys = _check_corpus(candidates, references)

    def counts(text: str) -> tuple[Counter, int]:
        words = tokenize(text)
        grams = Counter()
        for k in range(1, n + 1):
            grams.update(_ngrams(words, k))
        return grams, len(words)

    cands = {key: counts(candidates[key]) for key in keys}
    refs = {key: [counts(r) for r in references[key]] for key in keys}
    df = Counter()
    for key in keys:
        df.update(set().union(*(grams for grams, _ in refs[key])))  # an image counts once per n-gram
    log_n = math.log(len(keys)) if keys else 0.0

    def vector(grams: Counter) -> tuple[dict, list[float]]:
        vec = {g: c * (log_n - math.log(max(1.0, df[g]))) for g, c in grams.items()}
        norms = [0.0] * n
        for g, w in vec.items():
            norms[len(g) - 1] += w * w
        return vec, [math.sqrt(x) for x in norms]

    per_image = {}
    for key in keys:
        (vec_c, norm_c), len_c = vector(cands[key][0]), cands[key][1]
        total = 0.0
        for grams, len_r in refs[key]:
            vec_r, norm_r = vector(grams)
            sims = [0.0] * n
            for g, w in vec_c.items():
                if g in vec_r:
                    sims[len(g) - 1] += min(w, vec_r[g]) * vec_r[g]  # CIDEr-D's clipping: no credit for repeating
            sims = [s / (norm_c[k] * norm_r[k]) if norm_c[k] and norm_r[k] else 0.0 for k, s in enumerate(sims)]
            total += math.exp(-(len_c - len_r) ** 2 / (2 * sigma ** 2)) * sum(sims) / n
        per_image[key] = 10.0 * total / len(refs[key])
    return {"cider_d": sum(per_image.values()) / len(per_image) if per_image else 0.0, "per_image": per_image}


# -- CHAIR ---------------------------------------------------------------------------------------------
def _plural(word: str) -> str | None:
    """The regular plural, or None for words ending in s (bus, skis, scissors: their vocabulary lists
    plurals by hand, as it does irregular ones: people, men, mice, knives, geese)."""
    if word.endswith("s"):
        return None
    if word.endswith(("x", "z", "ch", "sh")):
        return word + "es"
    if len(word) > 1 and word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _object_words(text: str) -> list[str]:
    """Tokens with the possessive 's dropped: "the dog's bowl" names a dog."""
    return [w[:-2] if w.endswith("'s") else w for w in tokenize(text)]


class Vocabulary:
    """Object names: each canonical object with the words and phrases that name it.

    Every synonym also matches in its regular plural (the last word pluralised: "hot dogs", "buses"
    must be listed). A caption is read left to right and at each word the longest phrase that names an
    object wins and consumes its words, so "hot dog" is one hot dog and no dog, and "baby elephant"
    is an elephant, not a person. A word or phrase naming two objects is an error.
    """

    def __init__(self, synonyms: dict[str, list[str]]):
        self.objects: tuple[str, ...] = tuple(synonyms)
        self._names: dict[tuple[str, ...], str] = {}
        for canonical, words in synonyms.items():
            for name in (canonical, *words):
                toks = tuple(_object_words(name))
                if not toks:
                    raise ValueError(f"{canonical}: synonym {name!r} has no words")
                plural = _plural(toks[-1])
                for form in (toks, toks[:-1] + (plural,)) if plural else (toks,):
                    other = self._names.setdefault(form, canonical)
                    if other != canonical:
                        raise ValueError(f"{' '.join(form)!r} names both {other!r} and {canonical!r}")
        self._longest = max((len(f) for f in self._names), default=1)

    def mentions(self, caption: str) -> list[tuple[str, str]]:
        """(words as matched, canonical object) for each mention, in caption order."""
        words, found, i = _object_words(caption), [], 0
        while i < len(words):
            for size in range(min(self._longest, len(words) - i), 0, -1):
                canonical = self._names.get(tuple(words[i:i + size]))
                if canonical:
                    found.append((" ".join(words[i:i + size]), canonical))
                    i += size
                    break
            else:
                i += 1
        return found

    def mentioned(self, caption: str) -> list[str]:
        """The canonical objects a caption mentions, once per mention: 'two dogs and a puppy' -> [dog, dog]."""
        return [canonical for _, canonical in self.mentions(caption)]


def chair(captions: dict[str, str], objects: dict[str, set[str]], vocab: Vocabulary, *,
          unique: bool = False) -> dict:
    """CHAIR over a set of captions; `objects`: each image's ground-truth objects (canonical names).

    CHAIR-i = hallucinated mentions / all mentions; CHAIR-s = captions with >= 1 hallucinated mention /
    captions; recall = ground-truth objects mentioned / ground-truth objects (of the captioned images).
    Mentions are counted per occurrence, as the released CHAIR code does (its denominator adds up every
    object word found, so "a dog chasing a dog" is two dog mentions); the paper writes the ratio over
    sets. `unique=True` counts each object once per caption instead. For COCO the paper's ground truth
    is an image's segmentation labels plus the objects its reference captions mention
    (`vocab.mentioned(ref)`); build `objects` that way to compare with published numbers.

    Returns chair_i, chair_s, recall, the counts behind them, and per_image:
    {image_id: {"mentioned", "hallucinated" (canonical names, in caption order), "recalled" (sorted)}}.
    """
    missing = sorted(set(captions) - set(objects))
    if missing:
        raise ValueError(f"{len(missing)} captioned images have no ground-truth objects, e.g. {missing[:3]}")
    unknown = sorted({o for key in captions for o in objects[key]} - set(vocab.objects))
    if unknown:
        raise ValueError(f"ground-truth objects not in the vocabulary (never mentionable): {unknown[:5]}")
    mentions = hallucinated = bad_captions = truth_total = recalled_total = 0
    per_image = {}
    for key in sorted(captions):
        truth = objects[key]
        said = vocab.mentioned(captions[key])
        if unique:
            said = list(dict.fromkeys(said))
        wrong = [o for o in said if o not in truth]
        recalled = sorted(truth & set(said))
        mentions += len(said)
        hallucinated += len(wrong)
        bad_captions += bool(wrong)
        truth_total += len(truth)
        recalled_total += len(recalled)
        per_image[key] = {"mentioned": said, "hallucinated": wrong, "recalled": recalled}
    n = len(per_image)
    return {"chair_i": hallucinated / mentions if mentions else 0.0,
            "chair_s": bad_captions / n if n else 0.0,
            "recall": recalled_total / truth_total if truth_total else 0.0,
            "captions": n, "hallucinated_captions": bad_captions, "mentions": mentions,
            "hallucinated_mentions": hallucinated, "objects": truth_total, "recalled_objects": recalled_total,
            "per_image": per_image}


def coco_vocabulary() -> Vocabulary:
    """The 80 COCO categories with their synonyms (`assets/coco_synonyms.json`, our own list)."""
    return Vocabulary(json.loads(COCO_SYNONYMS.read_text())["categories"])


# The synthetic scenes hold filled circles, squares and triangles (synthetic.SHAPES). A square is a
# rectangle, so "rectangle" names it; "ring" (an outline) and "box" (a solid, or a frame) do not.
SYNTHETIC_SYNONYMS = {"circle": ["circle", "disc", "disk", "dot"], "square": ["square", "rectangle"],
                      "triangle": ["triangle"]}


def synthetic_vocabulary() -> Vocabulary:
    """The shapes of the synthetic scenes; colour is not part of the object (see synthetic.score_captions)."""
    return Vocabulary(SYNTHETIC_SYNONYMS)


def synthetic_objects(annotations: dict) -> dict[str, set[str]]:
    """{image_id: the shapes in it} from the held-out `annotations.json` (every listed image, even empty)."""
    objects: dict[str, set[str]] = {img["id"]: set() for img in annotations.get("images", [])}
    for o in annotations["objects"]:
        objects.setdefault(o["image_id"], set()).add(o["shape"])
    return objects
