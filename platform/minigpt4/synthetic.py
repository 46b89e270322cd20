"""Procedural scenes with exact captions: coloured shapes on a background.

The ground truth (which shapes, colours and places) is known exactly, so captions can be checked
word for word and hallucination metrics computed for real. Deterministic for a given seed.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
           "purple": (140, 60, 180), "orange": (245, 140, 30)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (250, 250, 250), "gray": (150, 150, 150), "black": (15, 15, 15)}


@dataclass(frozen=True)
class Shape:
    colour: str
    kind: str
    cx: float  # centre, fraction of the image width
    cy: float  # centre, fraction of the image height
    size: float  # half-extent, fraction of the image side


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: str = "white"

    def caption(self) -> str:
        """Short exact caption: 'a red circle above a blue square' (two shapes, one relation)."""
        if len(self.shapes) == 1:
            s = self.shapes[0]
            return f"a {s.colour} {s.kind} on a {self.background} background"
        a, b = self.shapes[:2]
        dx, dy = b.cx - a.cx, b.cy - a.cy
        if abs(dy) >= abs(dx):
            rel = "above" if dy > 0 else "below"
        else:
            rel = "left of" if dx > 0 else "right of"
        return f"a {a.colour} {a.kind} {rel} a {b.colour} {b.kind}"

    def description(self) -> str:
        """Detailed multi-sentence description (stage-2 style)."""
        parts = [f"The image shows {len(self.shapes)} shape{'s' if len(self.shapes) > 1 else ''} "
                 f"on a plain {self.background} background."]
        for s in self.shapes:
            h = "left" if s.cx < 0.4 else "right" if s.cx > 0.6 else "center"
            v = "top" if s.cy < 0.4 else "bottom" if s.cy > 0.6 else "middle"
            size = "large" if s.size > 0.2 else "small"
            parts.append(f"There is a {size} {s.colour} {s.kind} at the {v} {h} of the picture.")
        return " ".join(parts)


def random_scene(rng: random.Random, n_shapes: int = 2) -> Scene:
    colours = rng.sample(sorted(COLOURS), n_shapes)
    shapes = []
    for i, c in enumerate(colours):
        # keep shapes apart vertically or horizontally so the relation in the caption is unambiguous
        size = rng.uniform(0.12, 0.22)
        if n_shapes == 2 and i == 1:
            a = shapes[0]
            if rng.random() < 0.5:
                cx, cy = rng.uniform(0.25, 0.75), (0.75 if a.cy < 0.5 else 0.25)
            else:
                cx, cy = (0.75 if a.cx < 0.5 else 0.25), rng.uniform(0.25, 0.75)
        else:
            cx, cy = rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.75)
        shapes.append(Shape(c, rng.choice(SHAPES), cx, cy, size))
    return Scene(tuple(shapes), rng.choice(sorted(BACKGROUNDS)))


def render(scene: Scene, size: int = 224):
    """The scene as an RGB PIL image of size x size."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        cx, cy, r = s.cx * size, s.cy * size, s.size * size
        box = (cx - r, cy - r, cx + r, cy + r)
        if s.kind == "circle":
            draw.ellipse(box, fill=COLOURS[s.colour])
        elif s.kind == "square":
            draw.rectangle(box, fill=COLOURS[s.colour])
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[s.colour])
    return img
