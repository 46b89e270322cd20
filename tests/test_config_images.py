"""Typed config parsing and image decoding."""
from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import pytest
from PIL import Image

from minigpt4.config import ConfigError, apply_overrides, from_dict, load
from minigpt4.images import CLIP_MEAN, CLIP_STD, ImageError, load_image, preprocess
from minigpt4.model import ModelConfig, PRESETS


@dataclass
class _Train:
    lr: float = 1e-4
    steps: int = 10
    stages: tuple[int, ...] = (1,)


@dataclass
class _Job:
    name: str = "x"
    out: str | None = None
    train: _Train = field(default_factory=_Train)


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("name: pretrain\ntrain:\n  lr: 3.0e-5\n  steps: 5\n")
    job = load(_Job, path, ["train.steps=20", "out=s3://b/ckpt", "train.stages=[1, 2]"])
    assert job == _Job(name="pretrain", out="s3://b/ckpt", train=_Train(lr=3e-5, steps=20, stages=(1, 2)))
    assert apply_overrides({"a": {"b": 1}}, ["a.c=true"]) == {"a": {"b": 1, "c": True}}


@pytest.mark.parametrize("override, message", [
    (["train.stpes=3"], r"unknown config key\(s\) \['train.stpes'\]"),
    (["train.steps=many"], r"train.steps: expected int, got 'many'"),
    (["name"], "not of the form key=value"),
    (["train=5"], "train: expected a mapping"),
])
def test_bad_overrides_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load(_Job, None, override)


def test_model_config_from_preset_dict_validates():
    cfg = from_dict(ModelConfig, apply_overrides(dict(PRESETS["tiny"]), ["llm_dtype=bf16"]))
    assert cfg.llm_dtype == "bf16" and cfg.num_image_tokens == 4
    with pytest.raises(ConfigError, match="llm_dtype"):
        from_dict(ModelConfig, apply_overrides(dict(PRESETS["tiny"]), ["llm_dtype=int3"]))


# -- images ---------------------------------------------------------------------------------------
def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_modes_become_rgb():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red -> white
    assert load_image(_encode(rgba, "PNG")).getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (8, 8), 3)
    pal.putpalette([0, 0, 0] * 3 + [10, 200, 30] + [0, 0, 0] * 252)
    assert load_image(_encode(pal, "PNG")).getpixel((1, 1)) == (10, 200, 30)
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red in CMYK
    r, g, b = load_image(_encode(cmyk, "JPEG")).getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60
    deep = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    assert load_image(_encode(deep, "PNG")).getpixel((0, 0)) == (255, 255, 255)


def test_exif_rotation_is_applied():
    img = Image.new("RGB", (20, 10), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    assert load_image(_encode(img, "JPEG", exif=exif)).size == (10, 20)


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"definitely not an image", "not_image"),
    (_encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")[:300], "corrupt"),
    (_encode(Image.new("RGB", (500, 5)), "PNG"), "bad_aspect"),
])
def test_bad_images_say_why(data, reason):
    with pytest.raises(ImageError) as e:
        load_image(data)
    assert e.value.reason == reason


def test_pixel_limit_and_missing_file(tmp_path):
    with pytest.raises(ImageError) as e:
        load_image(_encode(Image.new("L", (300, 300)), "PNG"), max_pixels=10_000)
    assert e.value.reason == "too_large"
    with pytest.raises(ImageError, match="image not found: .*nope.jpg") as e:
        load_image(tmp_path / "nope.jpg")
    assert e.value.reason == "missing"


def test_preprocess_is_clip_normalised_bicubic():
    img = Image.new("RGB", (50, 30), (255, 0, 128))
    x = preprocess(img, 32)
    assert x.shape == (3, 32, 32) and x.dtype == np.float32
    want = [(v / 255 - m) / s for v, m, s in zip((255, 0, 128), CLIP_MEAN, CLIP_STD)]
    np.testing.assert_allclose(x[:, 16, 16], want, rtol=1e-5)
