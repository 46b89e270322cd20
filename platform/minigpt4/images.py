"""Image decoding and the eval-time processor (bicubic resize to S x S, CLIP normalization).

Decoding is strict about what it accepts and says why it refuses: every failure is an
`ImageError` with a short machine-readable `reason` (the data pipeline counts by it).
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold
MAX_ASPECT = 50.0


class ImageError(ValueError):
    """An input that is not a usable image. `reason` is one of: missing, empty, not_image,
    corrupt, too_large, bad_aspect."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def load_image(source: str | os.PathLike | bytes, name: str | None = None, max_pixels: int = MAX_PIXELS,
               max_aspect: float = MAX_ASPECT, draft: int | None = None):
    """Decode a path or bytes to an RGB PIL image: EXIF orientation applied, alpha composited on
    white, palette / CMYK / 16-bit / grayscale converted.

    draft: for JPEGs, let the decoder downscale by 1/2, 1/4 or 1/8 while decoding (DCT scaling) as
    long as both sides stay >= draft pixels; several times faster on large photos, and with draft at
    twice the model's size the bicubic resize that follows gives nearly the same pixels."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    name = name or (str(source) if not isinstance(source, (bytes, bytearray)) else "<bytes>")
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ImageError("missing", f"image not found: {name}")
        data = path.read_bytes()
    if not data:
        raise ImageError("empty", f"image file is empty: {name}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError("too_large", f"{name}: {w}x{h} exceeds the {max_pixels:,}-pixel limit")
            if min(w, h) < 1 or max(w, h) / min(w, h) > max_aspect:
                raise ImageError("bad_aspect", f"{name}: aspect ratio of {w}x{h} exceeds {max_aspect:g}")
            if draft and img.format == "JPEG":
                img.draft("RGB", (draft, draft))
            img.load()
    except ImageError:
        raise
    except UnidentifiedImageError as e:
        raise ImageError("not_image", f"{name}: not a recognised image format") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError("too_large", f"{name}: {e}") from e
    except (OSError, SyntaxError, ValueError) as e:  # truncated / corrupt streams
        raise ImageError("corrupt", f"{name}: corrupt or truncated image ({e})") from e
    if img.getexif().get(0x0112, 1) != 1:  # EXIF orientation; exif_transpose copies even when upright
        img = ImageOps.exif_transpose(img)
    return to_rgb(img)


def to_rgb(img):
    """RGB without surprises: transparency over white, 16-bit scaled to 8-bit."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float32)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / peak), 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def preprocess(img, size: int) -> np.ndarray:
    """MiniGPT-4's eval processor: bicubic resize to (size, size), [0, 1], CLIP mean/std -> (3, S, S) float32."""
    return normalize(resize(img, size))


def resize(img, size: int) -> np.ndarray:
    """The first half of `preprocess`: bicubic resize to (size, size) -> (S, S, 3) uint8 (12x smaller
    than the normalized floats at 224 px: what the data pipeline's unit cache keeps)."""
    from PIL import Image

    return np.asarray(img.resize((size, size), Image.BICUBIC), dtype=np.uint8)


def normalize(arr: np.ndarray) -> np.ndarray:
    """The second half of `preprocess`: (S, S, 3) uint8 -> [0, 1], CLIP mean/std -> (3, S, S) float32."""
    arr = arr.astype(np.float32) / 255.0
    arr = (arr - np.asarray(CLIP_MEAN, dtype=np.float32)) / np.asarray(CLIP_STD, dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def load_pixels(sources, size: int):
    """Paths/bytes -> (B, 3, S, S) torch tensor (raises ImageError on the first bad one)."""
    import torch

    return torch.from_numpy(np.stack([preprocess(load_image(s), size) for s in sources]))


def random_resized_crop_box(width: int, height: int, rng, scale: tuple[float, float] = (0.5, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (left, top, right, bottom): a random area fraction in
    `scale` with a log-uniform aspect ratio in `ratio`, 10 tries, then a centre crop clamped to `ratio`."""
    import math

    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def preprocess_train(img, size: int, rng, scale: tuple[float, float] = (0.5, 1.0)) -> np.ndarray:
    """MiniGPT-4's train processor: RandomResizedCrop(size, scale) with bicubic resampling, then CLIP
    normalization. `rng` (a `random.Random`) makes the crop reproducible."""
    return preprocess(img.crop(random_resized_crop_box(img.width, img.height, rng, scale)), size)
