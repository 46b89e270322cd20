"""minigpt4.metrics: BLEU and CIDEr-D against hand computations, CHAIR on hand-built captions, the
COCO synonym list, and the synthetic scenes' vocabulary."""
from __future__ import annotations

import json
import math
import random

import pytest

from minigpt4.metrics import (COCO_SYNONYMS, SYNTHETIC_SYNONYMS, Vocabulary, bleu, chair, cider_d,
                              coco_vocabulary, synthetic_objects, synthetic_vocabulary, tokenize)
from minigpt4.synthetic import SHAPES, random_scene, write_dataset

# The 80 COCO 2017 category names, by category id (1..90 with gaps); "_" joins two-word names.
COCO_80 = [n.replace("_", " ") for n in """person bicycle car motorcycle airplane bus train truck boat traffic_light
fire_hydrant stop_sign parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack
umbrella handbag tie suitcase frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard
surfboard tennis_racket bottle wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli
carrot hot_dog pizza donut cake chair couch potted_plant bed dining_table toilet tv laptop mouse remote
keyboard cell_phone microwave oven toaster sink refrigerator book clock vase scissors teddy_bear hair_drier
toothbrush""".split()]


def test_tokenize_lowercases_and_drops_punctuation_but_keeps_inner_apostrophes():
    assert tokenize("A dog's toy, on-the-go! It’s 2 CATS.") == ["a", "dog's", "toy", "on", "the", "go", "it's", "2",
                                                              "cats"]
    assert tokenize("  ...!? ") == []


# -- BLEU ----------------------------------------------------------------------------------------------
def test_bleu_perfect_match_is_one():
    refs = {"a": ["a man riding a wave on a surfboard", "someone surfing"], "b": ["two dogs play in the snow"]}
    cands = {"a": "A man riding a wave on a surfboard.", "b": "Two dogs play in the snow"}
    assert bleu(cands, refs) == pytest.approx({"bleu_1": 1.0, "bleu_2": 1.0, "bleu_3": 1.0, "bleu_4": 1.0})


def test_bleu_hand_computed():
    refs = ["the cat is on the mat", "there is a cat on the mat"]
    # candidate "the cat sat on the mat" (6 words); references have 6 and 7 words -> r = 6, BP = 1
    #   1-grams: the x2 (a reference has 2), cat, on, mat match; sat does not     -> p1 = 5/6
    #   2-grams: the cat, cat sat, sat on, on the, the mat -> 3 match            -> p2 = 3/5
    #   3-grams: the cat sat, cat sat on, sat on the, on the mat -> 1 matches     -> p3 = 1/4
    #   4-grams: none of the 3 match                                             -> p4 = 0
    got = bleu({"x": "the cat sat on the mat"}, {"x": refs})
    assert got["bleu_1"] == pytest.approx(5 / 6)
    assert got["bleu_2"] == pytest.approx(math.sqrt(5 / 6 * 3 / 5))
    assert got["bleu_3"] == pytest.approx((5 / 6 * 3 / 5 * 1 / 4) ** (1 / 3))  # = 0.5
    assert got["bleu_4"] == 0.0

    # corpus level: counts are summed over images before dividing, not averaged per image.
    # Adding "the cat" (all 2 unigrams and 1 bigram match, closest reference 6 words):
    #   p1 = (5 + 2) / (6 + 2) = 7/8, p2 = (3 + 1) / (5 + 1) = 4/6, c = 8, r = 6 + 6 = 12 -> BP = exp(1 - 12/8)
    got = bleu({"x": "the cat sat on the mat", "y": "the cat"}, {"x": refs, "y": ["the cat sat on the mat"]}, n=2)
    bp = math.exp(1 - 12 / 8)
    assert got == pytest.approx({"bleu_1": 7 / 8 * bp, "bleu_2": math.sqrt(7 / 8 * 4 / 6) * bp})


def test_bleu_closest_reference_length_breaks_ties_towards_the_shorter():
    # 5 words; references of 4 and 6 are equally close -> r = 4 (the toolkit's rule), so no brevity penalty
    got = bleu({"x": "a b c d e"}, {"x": ["a b c d", "a b c d e f"]}, n=1)
    assert got["bleu_1"] == pytest.approx(1.0)
    # a 7-word reference alone gives r = 7 > c = 5: BP = exp(1 - 7/5)
    got = bleu({"x": "a b c d e"}, {"x": ["a b c d e f g"]}, n=1)
    assert got["bleu_1"] == pytest.approx(math.exp(1 - 7 / 5))


def test_metrics_require_the_same_images_and_a_reference_each():
    with pytest.raises(ValueError, match="same image ids"):
        bleu({"a": "x"}, {"b": ["x"]})
    with pytest.raises(ValueError, match="no reference"):
        cider_d({"a": "x"}, {"a": []})


# -- CIDEr-D -------------------------------------------------------------------------------------------
def test_cider_d_hand_computed():
    refs = {"1": ["a red circle", "a red ball"], "2": ["a blue square"], "3": ["a red square"]}
    cands = {"1": "red red circle", "2": "a blue square on a table", "3": "a dog"}
    # N = 3 images. Document frequency over each image's reference n-grams:
    #   "a" in all 3 images; "red", "square", "a red" in 2; every other reference n-gram in 1.
    # idf = log(N) - log(max(1, df)):
    w3 = 0.0                          # df 3
    w2 = math.log(3) - math.log(2)    # df 2
    w1 = math.log(3)                  # df 1, and df 0 (n-grams no reference has: max(1, 0) = 1)

    # image 1, "red red circle" (3 words; both references 3 words -> length penalty 1)
    #   1-grams: cand {red: 2*w2, circle: w1}
    norm_c1 = math.sqrt((2 * w2) ** 2 + w1 ** 2)
    #   vs "a red circle" {a: w3 = 0, red: w2, circle: w1}: clipping, min(2*w2, w2) * w2 + w1 * w1
    s_a1 = (min(2 * w2, w2) * w2 + w1 * w1) / (norm_c1 * math.sqrt(w3 ** 2 + w2 ** 2 + w1 ** 2))
    #   2-grams: cand {red red: w1, red circle: w1} vs {a red: w2, red circle: w1}: only "red circle"
    s_a2 = (w1 * w1) / (math.sqrt(2) * w1 * math.sqrt(w2 ** 2 + w1 ** 2))
    #   3-grams: "red red circle" vs "a red circle": no match; 4-grams: none -> 0, 0
    s_a = (s_a1 + s_a2 + 0 + 0) / 4
    #   vs "a red ball" {a: 0, red: w2, ball: w1}: 1-grams share only "red"; higher orders nothing
    s_b = (min(2 * w2, w2) * w2 / (norm_c1 * math.sqrt(w2 ** 2 + w1 ** 2))) / 4
    score1 = 10 * (s_a + s_b) / 2

    # image 2, "a blue square on a table" (6 words) vs "a blue square" (3): penalty exp(-3^2 / (2 * 6^2))
    #   1-grams: cand {a: 2*w3 = 0, blue: w1, square: w2, on: w1, table: w1}; ref {a: 0, blue: w1, square: w2}
    s1 = (w1 * w1 + w2 * w2) / (math.sqrt(3 * w1 ** 2 + w2 ** 2) * math.sqrt(w1 ** 2 + w2 ** 2))
    #   2-grams: 5 in cand, each weight w1 (df 1 or 0); ref {a blue, blue square}: both match
    s2 = (2 * w1 * w1) / (math.sqrt(5) * w1 * math.sqrt(2) * w1)
    #   3-grams: 4 in cand; ref {a blue square} matches one
    s3 = (w1 * w1) / (2 * w1 * w1)
    #   4-grams: the reference has none -> 0
    score2 = 10 * math.exp(-9 / 72) * (s1 + s2 + s3 + 0) / 4

    # image 3, "a dog" vs "a red square": "a" is in every image (idf 0), "dog" in none of its n-grams
    score3 = 0.0

    got = cider_d(cands, refs)
    assert got["per_image"] == pytest.approx({"1": score1, "2": score2, "3": score3})
    assert got["cider_d"] == pytest.approx((score1 + score2 + score3) / 3)
    # the same numbers worked on paper (w1 = 1.098612, w2 = 0.405465):
    #   image 1: s_a1 = 0.857601, s_a2 = 0.663366, s_b1 = 0.102812 -> 10 * (0.380242 + 0.025703) / 2
    #   image 2: s1 = 0.601910, s2 = 2 / sqrt(10) = 0.632456, s3 = 0.5, penalty 0.882497
    assert score1 == pytest.approx(2.0297, abs=1e-4) and score2 == pytest.approx(3.8264, abs=1e-4)


def test_cider_d_identical_candidate_scores_ten_and_unrelated_zero():
    refs = {"1": ["a man riding a wave on a surfboard"], "2": ["two dogs play in the snow"],
            "3": ["a plate of food with broccoli and rice"]}
    same = cider_d({k: v[0] for k, v in refs.items()}, refs)
    assert same["cider_d"] == pytest.approx(10.0)
    unrelated = cider_d({"1": "purple elephants juggle", "2": "quantum physics lecture notes",
                         "3": "an empty parking garage"}, refs)
    assert unrelated["per_image"] == {"1": 0.0, "2": 0.0, "3": 0.0}
    # repeating a matching word earns nothing more (CIDEr-D's clipping) and the length costs
    padded = cider_d({"1": "a man riding a wave on a surfboard surfboard surfboard", "2": refs["2"][0],
                      "3": refs["3"][0]}, refs)
    assert padded["per_image"]["1"] < same["per_image"]["1"]
    # idf over one image is log(1) = 0: a single image always scores 0, as in the toolkit
    assert cider_d({"1": refs["1"][0]}, {"1": refs["1"]})["cider_d"] == 0.0


# -- CHAIR ---------------------------------------------------------------------------------------------
def test_vocabulary_synonyms_plurals_and_multiword_phrases():
    vocab = coco_vocabulary()
    assert vocab.mentioned("Two hot dogs on a plate") == ["hot dog"]  # not also a dog
    assert vocab.mentioned("A teddy bear next to a bear") == ["teddy bear", "bear"]
    assert vocab.mentioned("a baby elephant and a baby") == ["elephant", "person"]
    assert vocab.mentioned("People, men, women and children with knives and mice") == \
        ["person"] * 4 + ["knife", "mouse"]
    assert vocab.mentioned("Buses, benches, ladies, puppies, cell phones") == \
        ["bus", "bench", "person", "dog", "cell phone"]
    assert vocab.mentioned("the dog's frisbee near a dirt bike and a bike") == \
        ["dog", "frisbee", "motorcycle", "bicycle"]
    assert vocab.mentions("A microwave oven above the oven") == [("microwave oven", "microwave"), ("oven", "oven")]
    assert vocab.mentioned("an empty street at night") == []


def test_vocabulary_rejects_a_word_naming_two_objects():
    with pytest.raises(ValueError, match="'cup' names both"):
        Vocabulary({"cup": ["cup", "mug"], "bowl": ["bowl", "cup"]})
    with pytest.raises(ValueError, match="'pups' names both"):  # regular plurals count too
        Vocabulary({"dog": ["pup"], "pups": ["pups"]})


def test_chair_hand_computed():
    vocab = coco_vocabulary()
    captions = {
        "1": "A man and two women walking their dogs past a hot dog stand.",  # person, person, dog, hot dog*
        "2": "A baby elephant next to a teddy bear on a couch.",             # elephant, teddy bear*, couch
        "3": "Children riding bikes and a motor bike near the buses.",       # person, bicycle, motorcycle, bus
        "4": "A blurry photo of something.",                                 # no object mentioned
        "5": "A kitten sleeps on a sofa while a kitten watches the tv.",     # cat, couch*, cat, tv
    }
    objects = {"1": {"person", "dog"}, "2": {"elephant", "couch"},
               "3": {"person", "bicycle", "motorcycle", "bus"}, "4": {"cat"}, "5": {"cat", "tv"}, "6": {"dog"}}
    got = chair(captions, objects, vocab)
    # mentions 4 + 3 + 4 + 0 + 4 = 15, hallucinated 1 + 1 + 0 + 0 + 1 = 3 (* above)
    assert (got["mentions"], got["hallucinated_mentions"]) == (15, 3)
    assert got["chair_i"] == pytest.approx(3 / 15)
    assert (got["captions"], got["hallucinated_captions"], got["chair_s"]) == (5, 3, pytest.approx(3 / 5))
    # ground truth of the captioned images: 2 + 2 + 4 + 1 + 2 = 11 objects; all but image 4's cat named
    assert (got["objects"], got["recalled_objects"], got["recall"]) == (11, 10, pytest.approx(10 / 11))
    assert got["per_image"]["1"] == {"mentioned": ["person", "person", "dog", "hot dog"],
                                     "hallucinated": ["hot dog"], "recalled": ["dog", "person"]}
    assert got["per_image"]["4"] == {"mentioned": [], "hallucinated": [], "recalled": []}

    # once per object per caption: 3 + 3 + 4 + 0 + 3 = 13 mentions, still 3 hallucinated
    once = chair(captions, objects, vocab, unique=True)
    assert (once["mentions"], once["chair_i"], once["chair_s"]) == (13, pytest.approx(3 / 13), pytest.approx(3 / 5))
    assert once["per_image"]["5"]["mentioned"] == ["cat", "couch", "tv"]


def test_chair_checks_its_inputs():
    vocab = coco_vocabulary()
    with pytest.raises(ValueError, match="no ground-truth"):
        chair({"1": "a dog"}, {}, vocab)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        chair({"1": "a dog"}, {"1": {"dogs"}}, vocab)
    assert chair({}, {}, vocab)["chair_i"] == 0.0


def test_coco_synonyms_cover_exactly_the_80_categories_without_overlap():
    categories = json.loads(COCO_SYNONYMS.read_text())["categories"]
    assert len(COCO_80) == 80 and list(categories) == COCO_80
    seen: dict[str, str] = {}
    for name, words in categories.items():
        assert words[0] == name and len(set(words)) == len(words)
        for w in words:
            assert w == w.lower().strip() and seen.setdefault(w, name) == name, (w, seen[w], name)
    vocab = coco_vocabulary()  # also checks the generated plurals for collisions
    assert vocab.objects == tuple(COCO_80)
    for name in COCO_80:  # every category name is one of its own synonyms
        assert vocab.mentioned(f"a {name}") == [name]


def test_synthetic_vocabulary():
    vocab = synthetic_vocabulary()
    assert set(SYNTHETIC_SYNONYMS) == set(SHAPES)
    assert vocab.mentioned("a large red circle") == ["circle"]
    assert vocab.mentioned("two blue squares") == ["square"]
    assert vocab.mentioned("a yellow disc and a green rectangle above three triangles.") == \
        ["circle", "square", "triangle"]
    assert vocab.mentioned("a red ring in a box") == []


def test_chair_on_synthetic_scenes(tmp_path):
    write_dataset(str(tmp_path), train_shards=0, align_samples=0, heldout_samples=6, image_size=16, progress=False)
    annotations = json.loads((tmp_path / "heldout" / "annotations.json").read_text())
    objects = synthetic_objects(annotations)
    assert set(objects) == {img["id"] for img in annotations["images"]}
    assert all(o["shape"] in objects[o["image_id"]] for o in annotations["objects"])

    vocab = synthetic_vocabulary()
    exact = {a["image_id"]: a["caption"] for a in annotations["annotations"]}  # the description (listed last)
    got = chair(exact, objects, vocab)
    assert (got["chair_i"], got["chair_s"], got["recall"]) == (0.0, 0.0, 1.0)

    # name a shape each scene lacks, if any: each such caption hallucinates exactly one object
    wrong = {k: f"a red {next(s for s in SHAPES if s not in objs)}" for k, objs in objects.items() if len(objs) < 3}
    got = chair(wrong, objects, vocab)
    assert got["chair_s"] == 1.0 and got["hallucinated_mentions"] == len(wrong)


def test_scene_descriptions_mention_exactly_their_shapes():
    vocab = synthetic_vocabulary()
    for seed in range(30):
        scene = random_scene(random.Random(seed), n_shapes=1 + seed % 2)
        assert vocab.mentioned(scene.description()) == [s.kind for s in scene.shapes]
