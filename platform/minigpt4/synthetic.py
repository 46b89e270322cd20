"""Procedural scenes with exact captions: coloured shapes on a background.

The ground truth (which shapes, colours and places) is known exactly, so captions can be checked
word for word and hallucination metrics computed for real. Deterministic for a given seed.

`write_dataset` lays such scenes out as the three datasets MiniGPT-4 trains and is evaluated on, in
their public formats, so the real pipeline runs end to end without downloading anything:

    pretrain/{shard:05d}.tar (+ .parquet, _stats.json)   img2dataset webdataset shards (stage 1, LAION/CC)
    pretrain_parquet/part-{i:05d}.parquet               key / jpg / caption rows (optional, stage 1)
    align/filter_cap.json, align/image/{id}.jpg          cc_sbu_align layout (stage 2)
    heldout/annotations.json, heldout/images/{key}.jpg   COCO-like captions plus exact object ground truth
    manifest.json                                        seed, counts and every file written
"""
from __future__ import annotations

import io
import json
import random
import re
import tarfile
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from minigpt4.data.io import S3Options

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
           "purple": (140, 60, 180), "orange": (245, 140, 30)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (250, 250, 250), "gray": (150, 150, 150), "black": (15, 15, 15)}


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


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
            return f"{_a(s.colour)} {s.colour} {s.kind} on a {self.background} background"
        a, b = self.shapes[:2]
        dx, dy = b.cx - a.cx, b.cy - a.cy
        if abs(dy) >= abs(dx):
            rel = "above" if dy > 0 else "below"
        else:
            rel = "left of" if dx > 0 else "right of"
        return f"{_a(a.colour)} {a.colour} {a.kind} {rel} {_a(b.colour)} {b.colour} {b.kind}"

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
        size = rng.uniform(0.12, 0.22) if n_shapes > 1 else rng.uniform(0.22, 0.32)  # one shape: a large subject
        if n_shapes == 2 and i == 1:
            a = shapes[0]
            if rng.random() < 0.5:
                cx, cy = rng.uniform(0.25, 0.75), (0.75 if a.cy < 0.5 else 0.25)
            else:
                cx, cy = (0.75 if a.cx < 0.5 else 0.25), rng.uniform(0.25, 0.75)
        elif n_shapes == 1:
            cx, cy = rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65)
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


JPEG_QUALITY = 90
STATS_TIME = 0.0  # img2dataset's start/end_time, fixed so that the same seed gives the same bytes
_ONE_SHAPE_P = 0.2  # share of scenes with a single shape; the rest have two and a spatial relation


def _draw(rng: random.Random, shapes: int | None = None) -> Scene:
    """shapes: 1 or 2 shapes in every scene; None mixes them (a fifth with one shape)."""
    n = 1 if rng.random() < _ONE_SHAPE_P else 2
    return random_scene(rng, shapes or n)


def _jpeg(scene: Scene, size: int) -> bytes:
    buf = io.BytesIO()
    render(scene, size).save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _json(obj, indent: int | None = None) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=indent, ensure_ascii=False) + ("\n" if indent else "")).encode()


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    """An uncompressed tar with normalised headers (mtime 0, root, 0644), so equal input gives equal bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _parquet(columns: dict[str, list], types: dict[str, str]) -> bytes:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("write_dataset writes parquet and needs pyarrow: pip install 'minigpt4-ray[ray]'") from None
    kinds = {"string": pa.string(), "binary": pa.binary(), "int64": pa.int64()}
    table = pa.table({k: pa.array(v, type=kinds[types[k]]) for k, v in columns.items()})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _check_bucket(out: str, s3: S3Options | None) -> None:
    """Fail before rendering anything when the target bucket does not exist (a clear error, not a boto trace)."""
    from botocore.exceptions import ClientError

    from minigpt4.data.io import ObjectError, client, split_s3

    bucket, _ = split_s3(out)
    try:
        client(s3).head_bucket(Bucket=bucket)
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise ObjectError("missing", f"s3://{bucket}: no such bucket (create it first)") from None
        # 403 and the like: the credentials may still be allowed to put objects; let the writes decide


class _Output:
    """Writes files under one root (local dir or s3:// prefix) and records what was written."""

    def __init__(self, root: str, s3: S3Options | None):
        self.root, self.s3 = root, s3
        self.files: list[str] = []
        self.bytes = 0

    def put(self, rel: str, data: bytes) -> None:
        from minigpt4.data.io import join, write_bytes

        write_bytes(join(self.root, rel), data, self.s3)
        self.files.append(rel)
        self.bytes += len(data)


def write_dataset(out: str, *, seed: int = 0, train_shards: int = 4, samples_per_shard: int = 64,
                  align_samples: int = 64, heldout_samples: int = 64, image_size: int = 224,
                  parquet_shards: int = 0, s3: S3Options | None = None, progress: bool = True,
                  shapes: int | None = None) -> dict:
    """Write a synthetic pretrain / align / held-out dataset to a local dir or an s3:// prefix.

    Every sample draws from its own RNG, seeded from (seed, split, index), so a seed always gives
    byte-identical files, and changing one split's size leaves the other splits' samples as they were.
    Stage-1 scenes are numbered across the tar shards, so the shard layout only regroups them: 25
    shards of 320 hold the same 8,000 scenes as 125 shards of 64 (under other keys).
    Held-out scenes are redrawn if they equal any training scene. Returns a summary: out, counts,
    files and bytes written.
    """
    for name, value in (("train_shards", train_shards), ("align_samples", align_samples),
                        ("heldout_samples", heldout_samples), ("parquet_shards", parquet_shards)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if not 1 <= samples_per_shard <= 9999:  # keys are {shard:05d}{index:04d}
        raise ValueError(f"samples_per_shard must be 1..9999, got {samples_per_shard}")
    if train_shards + parquet_shards > 99999:
        raise ValueError(f"at most 99999 shards in all, got {train_shards} + {parquet_shards}")
    if heldout_samples > 999999:
        raise ValueError(f"heldout_samples must be <= 999999, got {heldout_samples}")
    if shapes not in (None, 1, 2):
        raise ValueError(f"shapes must be 1, 2 or None (mixed), got {shapes}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    # imported here: scenes and render() stay usable without the data package's dependencies
    from tqdm.auto import tqdm

    from minigpt4.data.io import is_s3

    out = str(out)
    if is_s3(out):
        _check_bucket(out, s3)

    dst = _Output(out, s3)
    total = (train_shards + parquet_shards) * samples_per_shard + align_samples + heldout_samples
    bar = tqdm(total=total, desc=f"synthetic -> {out}", unit="img", disable=not progress)
    seen: set[Scene] = set()

    for shard in range(train_shards):
        members, rows = [], {"key": [], "caption": [], "status": [], "width": [], "height": []}
        for i in range(samples_per_shard):
            key, n = f"{shard:05d}{i:04d}", shard * samples_per_shard + i
            # the seed names scene n as the key it has in shards of 64 (the layout the seeds began with)
            scene = _draw(random.Random(f"{seed}:pretrain:{n // 64:05d}{n % 64:04d}"), shapes)
            seen.add(scene)
            caption = scene.caption()
            meta = {"key": key, "caption": caption, "status": "success", "width": image_size, "height": image_size,
                    "error_message": None, "url": f"synthetic://{key}"}
            members += [(f"{key}.jpg", _jpeg(scene, image_size)), (f"{key}.json", _json(meta)),
                        (f"{key}.txt", caption.encode())]
            for col, v in (("key", key), ("caption", caption), ("status", "success"), ("width", image_size),
                           ("height", image_size)):
                rows[col].append(v)
            bar.update()
        n = samples_per_shard
        dst.put(f"pretrain/{shard:05d}.tar", _tar(members))
        dst.put(f"pretrain/{shard:05d}.parquet", _parquet(rows, {"key": "string", "caption": "string",
                                                                 "status": "string", "width": "int64",
                                                                 "height": "int64"}))
        dst.put(f"pretrain/{shard:05d}_stats.json", _json(
            {"count": n, "successes": n, "failed_to_download": 0, "failed_to_resize": 0,
             "start_time": STATS_TIME, "end_time": STATS_TIME, "status_dict": {"success": n}}, indent=2))

    for part in range(parquet_shards):
        rows = {"key": [], "jpg": [], "caption": []}
        for i in range(samples_per_shard):
            # keys continue the tar shards' numbering so the two stage-1 sources can be mixed
            key = f"{train_shards + part:05d}{i:04d}"
            scene = _draw(random.Random(f"{seed}:pretrain_parquet:{part}:{i}"), shapes)
            seen.add(scene)
            rows["key"].append(key)
            rows["jpg"].append(_jpeg(scene, image_size))
            rows["caption"].append(scene.caption())
            bar.update()
        dst.put(f"pretrain_parquet/part-{part:05d}.parquet",
                _parquet(rows, {"key": "string", "jpg": "binary", "caption": "string"}))

    annotations = []
    for i in range(align_samples):
        image_id = str(i)
        scene = _draw(random.Random(f"{seed}:align:{i}"), shapes)
        seen.add(scene)
        dst.put(f"align/image/{image_id}.jpg", _jpeg(scene, image_size))
        annotations.append({"image_id": image_id, "caption": scene.description()})
        bar.update()
    if align_samples:
        dst.put("align/filter_cap.json", _json({"annotations": annotations}, indent=1))

    held: dict = {"images": [], "annotations": [], "objects": [], "background": {}}
    for i in range(heldout_samples):
        key = f"h{i:06d}"
        rng = random.Random(f"{seed}:heldout:{i}")
        scene = _draw(rng, shapes)
        while scene in seen:  # never evaluate on a training image
            scene = _draw(rng, shapes)
        dst.put(f"heldout/images/{key}.jpg", _jpeg(scene, image_size))
        held["images"].append({"id": key, "file_name": f"images/{key}.jpg", "width": image_size,
                               "height": image_size})
        held["annotations"] += [{"image_id": key, "caption": scene.caption()},
                                {"image_id": key, "caption": scene.description()}]
        held["objects"] += [{"image_id": key, "colour": s.colour, "shape": s.kind, "cx": s.cx, "cy": s.cy,
                             "size": s.size} for s in scene.shapes]
        held["background"][key] = scene.background
        bar.update()
    if heldout_samples:
        dst.put("heldout/annotations.json", _json(held, indent=1))
    bar.close()

    counts = {"pretrain": train_shards * samples_per_shard, "pretrain_parquet": parquet_shards * samples_per_shard,
              "align": align_samples, "heldout": heldout_samples}
    manifest = {"generator": "minigpt4.synthetic.write_dataset", "seed": seed, "image_size": image_size,
                "shapes": shapes,
                "samples_per_shard": samples_per_shard,
                "shards": {"pretrain": train_shards, "pretrain_parquet": parquet_shards},
                "counts": counts, "files": sorted(dst.files)}
    dst.put("manifest.json", _json(manifest, indent=2))
    return {"out": out, "counts": counts, "files": len(dst.files), "bytes": dst.bytes}


# -- scoring captions against the ground truth ------------------------------------------------------
_OBJECT_RE = re.compile(r"\b(%s)\s+(%s)s?\b" % ("|".join(COLOURS), "|".join(SHAPES)))


def mentioned_objects(text: str) -> set[tuple[str, str]]:
    """The (colour, shape) pairs a caption names, e.g. 'a large red circle' -> {('red', 'circle')}."""
    return set(_OBJECT_RE.findall(text.lower()))


def score_captions(captions: dict[str, str], annotations: dict) -> dict:
    """Held-out accuracy: a caption is right when the (colour, shape) pairs it names are exactly the
    scene's objects (each named, nothing invented). `annotations`: the held-out `annotations.json`.
    Also reports colour-only and shape-only accuracy of the objects, and examples of misses."""
    truth: dict[str, set[tuple[str, str]]] = {}
    for o in annotations["objects"]:
        truth.setdefault(o["image_id"], set()).add((o["colour"], o["shape"]))
    missing = sorted(set(truth) - set(captions))
    if missing:
        raise ValueError(f"{len(missing)} held-out images have no caption, e.g. {missing[:3]}")
    correct, colours, shapes, objects, misses = 0, 0, 0, 0, []
    for key, objs in sorted(truth.items()):
        said = mentioned_objects(captions[key])
        correct += said == objs
        said_colours, said_shapes = {c for c, _ in said}, {s for _, s in said}
        for c, s in objs:
            objects += 1
            colours += c in said_colours
            shapes += s in said_shapes
        if said != objs and len(misses) < 3:
            misses.append({"key": key, "caption": captions[key], "truth": sorted(" ".join(o) for o in objs)})
    n = len(truth)
    return {"accuracy": correct / n if n else 0.0, "correct": correct, "images": n,
            "colour_accuracy": colours / objects if objects else 0.0,
            "shape_accuracy": shapes / objects if objects else 0.0, "misses": misses}
