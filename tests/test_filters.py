"""minigpt4.filters: planted failures are dropped for the right reason, good descriptions are kept."""
from __future__ import annotations

import random

import pytest

from minigpt4.filters import REASONS, FilterReport, check, clean, curate
from minigpt4.synthetic import random_scene

GOOD = [
    "The image shows a busy city street at dusk. Several cars wait at a red traffic light while people cross "
    "the road, and the lit windows of tall buildings line both sides of the street.",
    "A brown dog is lying on a wooden porch next to a pair of muddy boots. Its head rests on its paws and it "
    "looks towards the camera with a calm expression.",
    "In this picture, a woman in a yellow raincoat holds an umbrella over a small child. Behind them, a café "
    "sign reads \"Crème Brûlée\" and rain streaks the glass of the shop window.",
    "There is a plate of pasta with tomato sauce, basil leaves and grated cheese on a white table. A glass of "
    "red wine stands to the left of the plate!",
    "Is this a painting or a photograph? The colours are soft and the edges blurred, which gives the scene "
    "of boats in a harbour a dreamy quality.",
]

PLANTED = {
    "apology": [
        "I'm sorry, I made a mistake. The image shows a red circle on a plain white background.",
        "I apologize for the confusion earlier; the picture contains a blue square in the middle of the frame.",
        "As an AI language model, I cannot see images, but this is probably a picture of a dog in a park.",
        "I can’t see the image you provided. Could you please upload it again so that I can describe it?",
        "Sorry, there is no image provided in your message, so there is nothing for me to describe here.",
    ],
    "repetition": [
        "The image shows a red circle on a white background. It is large and bright. "
        "The image shows a red circle on a white background.",
        "The image shows a red circle in the the the middle of a plain white background picture.",
        "There is a red circle on the left side of the picture, a blue circle on the left side of the picture "
        "and a green circle on the left side of the picture.",
        "The picture shows a red circle a red circle a red circle a red circle a red circle a red",
    ],
    "fragment": [
        "The image shows a large red circle at the top left of the",
        "A red circle.",
        "The image shows a red circle and a blue square and a green triangle and then...",
        "The image shows a red circle next to a blue square on a white background and",
    ],
    "non_english": [
        "La imagen muestra un círculo rojo grande sobre un fondo blanco, con un cuadrado azul a la derecha.",
        "Das Bild zeigt einen großen roten Kreis auf weißem Hintergrund und ein blaues Quadrat.",
        "L'image montre un grand cercle rouge sur un fond blanc, avec un carré bleu à droite.",
        "图片显示白色背景上有一个大的红色圆圈，右边有一个蓝色的正方形。",
        "На изображении большой красный круг на белом фоне и синий квадрат справа.",
    ],
    "empty": ["", "   \n ", "###Human: Describe this image in detail. ###Assistant:", "... !!"],
}


@pytest.mark.parametrize("reason,text", [(r, t) for r, texts in PLANTED.items() for t in texts])
def test_planted_failures_are_dropped_with_their_reason(reason, text):
    assert check(text) == reason


def test_good_descriptions_are_kept():
    for text in GOOD:
        assert check(text) is None, text
    for seed in range(100):  # the synthetic stage-2 descriptions, one and two shapes
        text = random_scene(random.Random(seed), n_shapes=1 + seed % 2).description()
        assert check(text) is None, text


def test_rules_are_parameters():
    short = "A red circle on white."
    assert check(short) == "fragment" and check(short, min_words=5) is None
    twice = "The cat sat on the mat and then the cat sat on the mat again, quietly."
    assert check(twice) is None and check(twice, ngram=4, times=2) == "repetition"


def test_clean_drops_template_remnants_and_whitespace():
    assert clean("  The image shows\n a red   circle.###Human: what else?###") == "The image shows a red circle."
    assert clean("A red circle on a white background.###") == "A red circle on a white background."
    assert clean("Assistant: A red circle.</s> <s>###Human") == "A red circle."
    # judged after cleaning: the template's trailing ### does not make a fragment
    assert check("The image shows a large red circle in the middle of a white background.###Assistant:") is None


def test_curate_and_report():
    texts = {"good": GOOD[0] + "###", "sorry": PLANTED["apology"][0], "loop": PLANTED["repetition"][1],
             "cut1": PLANTED["fragment"][0], "cut2": PLANTED["fragment"][1], "blank": ""}
    kept, report = curate(texts)
    assert kept == {"good": GOOD[0]}
    assert report.to_dict() == {
        "total": 6, "kept": 1, "dropped": 5,
        "by_reason": {"empty": 1, "non_english": 0, "apology": 1, "repetition": 1, "fragment": 2},
        "examples": {"apology": ["sorry"], "repetition": ["loop"], "fragment": ["cut1", "cut2"], "empty": ["blank"]}}
    assert list(report.dropped) == list(REASONS)
    with pytest.raises(ValueError, match="unknown reason"):
        FilterReport().add("rude")
