"""Raw samples -> model-ready rows, on Ray Data CPU workers.

A `Processor` decodes and preprocesses the image (strict decoding from `images.py`: every failure has
a reason) and, for the training tasks, cleans and tokenizes the caption:

- `stage1`: BLIP caption cleaning (lowercase, `.!"()*#:;~` -> space, <= 50 words), then
  `[BOS][img][caption + "\\n"]` with labels on the caption only (MiniGPT-4's alignment stage);
- `stage2`: the caption as written, behind a random alignment instruction in the chat template
  (`###Human: <Img><ImageHere></Img> {instruction} ###Assistant: ` ... `###`);
- `caption`: pixels only (the prompt is the generation engine's business).

A sample of a `features` source (minigpt4.features) brings the frozen encoder's output instead of an
image: its row holds `image_feats` in place of `pixel_values`; the caption half is processed the same.

Randomness (crops, instruction choice) is drawn from `random.Random(f"{seed}:{epoch}:{key}")`, so a
sample is processed the same way wherever and however often it is processed within an epoch.
"""
from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass

import numpy as np

from .. import images, prompts
from .sources import RawSample, SampleError, decode_caption

TASKS = ("stage1", "stage2", "caption")
AUGMENTS = ("resize", "random_resized_crop")
_PUNCT = re.compile(r'([.!"()*#:;~])')
_SPACES = re.compile(r"\s{2,}")


def clean_caption(caption: str, max_words: int = 50) -> str:
    """LAVIS's BlipCaptionProcessor.pre_caption: lowercase, punctuation to spaces, <= max_words words."""
    caption = _PUNCT.sub(" ", caption.lower())
    caption = _SPACES.sub(" ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


@dataclass
class ProcessConfig:
    task: str = "caption"
    image_size: int = 224
    augment: str = "resize"  # or random_resized_crop (MiniGPT-4's blip2_image_train)
    crop_scale: tuple[float, float] = (0.5, 1.0)
    max_pixels: int = images.MAX_PIXELS
    max_aspect: float = images.MAX_ASPECT
    fast_decode: bool = False  # JPEG DCT-domain downscaling to >= 2x image_size (see images.load_image)
    clean_captions: bool | None = None  # default: stage1 only, as the original
    max_words: int = 50
    template: str = "vicuna_v0"
    end_sym: str | None = None  # default: "\n" for stage1, the template's ("###") for stage2
    max_txt_len: int | None = None  # answer tokens; default 32 (stage1) / 160 (stage2)
    num_image_tokens: int = 32
    tokenizer: str | None = None  # local path or s3:// of a HF tokenizer; None = the tiny one
    seed: int = 42

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, not {self.task!r}")
        if self.augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}, not {self.augment!r}")
        if self.template not in prompts.INSTRUCTION_TEMPLATES:
            raise ValueError(f"unknown template {self.template!r}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")

    def resolved(self) -> "ProcessConfig":
        """A copy with the task-dependent defaults filled in. Fields left None stay None in the config
        itself, so `replace(cfg, task=...)` re-derives them for the new task."""
        import dataclasses

        return dataclasses.replace(
            self,
            clean_captions=self.task == "stage1" if self.clean_captions is None else self.clean_captions,
            end_sym=(prompts.STAGE1_END_SYM if self.task == "stage1" else prompts.END_SYMS[self.template])
            if self.end_sym is None else self.end_sym,
            max_txt_len=(32 if self.task == "stage1" else 160) if self.max_txt_len is None else self.max_txt_len)

    @classmethod
    def for_model(cls, cfg, task: str, **overrides) -> "ProcessConfig":
        """The processing a `ModelConfig` expects (image size, image tokens, template)."""
        return cls(task=task, image_size=cfg.image_size, num_image_tokens=cfg.num_image_tokens,
                   template=cfg.template, **overrides)

    @property
    def needs_caption(self) -> bool:
        return self.task != "caption"


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str | None):
    """The tokenizer at a local directory or an s3:// prefix (an LLM directory is fine: only the
    tokenizer files are fetched, not the weights)."""
    from ..tokenizer import load_tokenizer

    if path and path.startswith("s3://"):
        from ..storage import resolve
        from .io import ObjectError, exists

        local = None
        for name in TOKENIZER_FILES:
            uri = path.rstrip("/") + "/" + name
            try:
                if exists(uri):
                    local = resolve(uri).parent
            except ObjectError:
                continue
        if local is None:
            raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) under {path}")
        path = str(local)
    return load_tokenizer(path)


class Processor:
    """One sample at a time: `__call__(raw, epoch)` -> row dict, or `SampleError` with a reason."""

    def __init__(self, cfg: ProcessConfig):
        self.cfg = cfg = cfg.resolved()
        self.tokenizer = _tokenizer(cfg.tokenizer) if cfg.task != "caption" else None

    def __call__(self, raw: RawSample, epoch: int = 0) -> dict:
        cfg = self.cfg
        if raw.image_feats is not None:  # a features source: the image half was done by the feature job
            rng = random.Random(f"{cfg.seed}:{epoch}:{raw.key}")
            return self._row(raw.key, self._caption(raw), raw.image_feats, rng, image_column="image_feats")
        if cfg.augment == "random_resized_crop":  # the crop depends on the epoch: decode and crop here
            caption = self._caption(raw)
            img = self._load(raw)
            rng = random.Random(f"{cfg.seed}:{epoch}:{raw.key}")
            pixels = images.preprocess_train(img, cfg.image_size, rng, tuple(cfg.crop_scale))
            return self._row(raw.key, caption, pixels, rng)
        return self.finish(*self.decode(raw), epoch)

    def decode(self, raw: RawSample) -> tuple[str, str, np.ndarray]:
        """The epoch-independent half (augment `resize` only): caption checks, image decode and resize
        -> (key, caption, (S, S, 3) uint8). `finish` turns it into the row; the unit cache keeps it."""
        if self.cfg.augment != "resize":
            raise ValueError(f"decode() needs augment 'resize', not {self.cfg.augment!r} (crops vary by epoch)")
        caption = self._caption(raw)  # cheap checks first: a bad caption skips the decode
        return raw.key, caption, images.resize(self._load(raw), self.cfg.image_size)

    def finish(self, key: str, caption: str, pixels: np.ndarray, epoch: int = 0) -> dict:
        """`decode`'s output -> the row: normalized pixels, tokens (instruction drawn for this epoch)."""
        rng = random.Random(f"{self.cfg.seed}:{epoch}:{key}")
        return self._row(key, caption, images.normalize(pixels), rng)

    def _caption(self, raw: RawSample) -> str:
        cfg = self.cfg
        if not cfg.needs_caption:
            return raw.caption or ""
        caption = decode_caption(raw.caption)
        if cfg.clean_captions:
            caption = clean_caption(caption, cfg.max_words)
            if not caption:
                raise SampleError("empty_caption", "caption is empty after cleaning")
        return caption

    def _load(self, raw: RawSample):
        cfg = self.cfg
        try:
            return images.load_image(raw.image or b"", name=raw.key, max_pixels=cfg.max_pixels,
                                     max_aspect=cfg.max_aspect, draft=2 * cfg.image_size if cfg.fast_decode else None)
        except images.ImageError as e:
            raise SampleError(e.reason, str(e)) from None

    def _row(self, key: str, caption: str, pixels: np.ndarray, rng: random.Random,
             image_column: str = "pixel_values") -> dict:
        """The row: the image (`pixel_values`, or cached `image_feats`), the caption and, for the training
        tasks, its tokens; only the image column differs between pixel and feature rows."""
        cfg = self.cfg
        row = {"key": key, image_column: pixels, "caption": caption}
        if cfg.task == "caption":
            return row
        prompt = None if cfg.task == "stage1" else prompts.stage2_prompt(cfg.template, rng)
        enc = prompts.encode_training_sample(self.tokenizer, prompt, caption, cfg.end_sym, cfg.max_txt_len,
                                             cfg.num_image_tokens)
        row["input_ids"] = np.asarray(enc["input_ids"], dtype=np.int64)
        row["labels"] = np.asarray(enc["labels"], dtype=np.int64)
        row["prompt_len"] = enc["prompt_len"]
        return row


def stack_rows(rows: list[dict]) -> dict[str, np.ndarray]:
    """Rows -> a columnar batch; token columns stay ragged (one int64 array per row)."""
    out: dict[str, np.ndarray] = {}
    for name in rows[0]:
        values = [r[name] for r in rows]
        if name in ("input_ids", "labels"):
            col = np.empty(len(values), dtype=object)
            col[:] = values
            out[name] = col
        elif name == "pixel_values":
            out[name] = np.stack(values)
        else:
            out[name] = np.asarray(values)
    return out
