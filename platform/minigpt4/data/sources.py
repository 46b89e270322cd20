"""Where image-text pairs come from: four formats, each split into *units* that one task reads.

| format         | path                                                   | a unit is            | key                 |
|----------------|--------------------------------------------------------|----------------------|---------------------|
| `webdataset`   | `s3://b/laion/{00000..10488}.tar`, a prefix, or a .tar | one shard            | the tar's sample key |
| `parquet`      | a prefix, a file, or a brace pattern                   | one file             | `key_column`, else `file:row` |
| `cc_sbu_align` | the directory holding `filter_cap.json` and `image/`   | `unit_size` annotations | `image_id`       |
| `images`       | a prefix of .jpg/.jpeg/.png/.webp objects              | `unit_size` objects  | the path below the prefix |
| `features`     | the output prefix of the feature job (`_manifest.json`) | one `data/*.npz` file | the image's source key |

A `features` source holds the frozen encoder's output per image instead of the image (minigpt4.features
writes it): its samples carry `image_feats` (num_query_tokens x hidden) and no image bytes, and its
units carry the manifest's feature shape and dtype.

Units are enumerated lazily (`iter_units`): brace patterns are expanded one name at a time, prefixes are
listed page by page and `filter_cap.json` is parsed one annotation at a time, so no process ever holds
a whole listing or a whole annotation file. A unit is read by `read_unit`, which yields `RawSample`s and
reports every sample it cannot deliver to a `UnitStats` (key + reason) instead of raising.
"""
from __future__ import annotations

import io
import json
import random
import re
import tarfile
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from . import io as uio

FORMATS = ("webdataset", "parquet", "cc_sbu_align", "images", "features")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# the feature job's output layout (minigpt4.features): what produced it, and one file per source unit
# under data/ (the caption job's data directory: both jobs share their output machinery)
FEATURES_MANIFEST, FEATURES_DATA = "_manifest.json", "data"
FEATURES_KIND = "minigpt4-image-features"


@dataclass
class SourceConfig:
    """One dataset. `ratio` weighs it in a mixture (MiniGPT-4 stage 1: laion 115, cc_sbu 14)."""

    path: str
    format: str = "webdataset"
    name: str = ""
    ratio: float = 1.0
    # parquet columns
    image_column: str = "jpg"
    caption_column: str = "caption"
    key_column: str = "key"
    # cc_sbu_align / images: samples per unit (one task's work)
    unit_size: int = 256
    annotations: str = "filter_cap.json"  # cc_sbu_align: relative to path

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"source format must be one of {', '.join(FORMATS)}, not {self.format!r}")
        if not self.path:
            raise ValueError("a source needs a path (local or s3://)")
        if self.ratio <= 0:
            raise ValueError(f"source ratio must be > 0, got {self.ratio}")
        if self.unit_size < 1:
            raise ValueError(f"unit_size must be >= 1, got {self.unit_size}")
        self.name = self.name or self.format


@dataclass
class RawSample:
    key: str
    image: bytes | None
    caption: str | None = None
    image_feats: np.ndarray | None = None  # a features source: the encoder output in place of the image


@dataclass
class UnitStats:
    """What one unit delivered and what it could not (key, reason, detail)."""

    source: str
    unit: str
    delivered: int = 0
    errors: list[tuple[str, str, str]] = field(default_factory=list)

    def error(self, key: str, reason: str, detail: str = "") -> None:
        self.errors.append((key, reason, detail[:500]))


class SampleError(ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# -- brace patterns ------------------------------------------------------------------------------
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> Iterator[str]:
    """`a/{00000..00002}.tar` -> a/00000.tar, a/00001.tar, a/00002.tar (zero padding kept);
    `{x,y}` alternatives; several groups multiply; lazily, in order."""
    m = _BRACE.search(pattern)
    if not m:
        yield pattern
        return
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        step = 1 if int(hi) >= int(lo) else -1
        choices = (str(i).zfill(width) for i in range(int(lo), int(hi) + step, step))
    elif "," in body:
        choices = iter(body.split(","))
    else:
        raise ValueError(f"cannot expand {{{body}}} in {pattern!r}: use {{a..b}} or {{x,y}}")
    for c in choices:
        yield from expand_braces(head + c + tail)


def _files(path: str, suffixes: tuple[str, ...], s3: uio.S3Options | None) -> Iterator[str]:
    """Brace pattern, single file, or prefix -> object URIs, lazily."""
    if _BRACE.search(path):
        yield from expand_braces(path)
    elif path.lower().endswith(suffixes):
        yield path
    else:
        for uri, _ in uio.iter_objects(path, suffixes, s3):
            yield uri


# -- annotations, one at a time -----------------------------------------------------------------
def iter_json_array(stream, field_name: str = "annotations", chunk: int = 1 << 16) -> Iterator[dict]:
    """The objects of `{"<field_name>": [ {...}, ... ]}` (or of a top-level array), parsed one at a
    time from a binary stream, so a large annotation file is never held whole."""
    decoder = json.JSONDecoder()
    buf, pos, eof = "", 0, False
    reader = io.TextIOWrapper(stream, encoding="utf-8")

    def fill() -> bool:
        nonlocal buf, pos, eof
        if eof:
            return False
        data = reader.read(chunk)
        if not data:
            eof = True
            return False
        buf, pos = buf[pos:] + data, 0
        return True

    def skip_ws() -> None:
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf) or not fill():
                return

    fill()
    skip_ws()
    if buf[pos:pos + 1] == "{":  # find "<field_name>": [
        marker = re.compile(r'"%s"\s*:\s*\[' % re.escape(field_name))
        while True:
            m = marker.search(buf, pos)
            if m:
                pos = m.end()
                break
            keep = max(pos, len(buf) - len(field_name) - 64)
            pos = keep
            if not fill():
                raise ValueError(f'no "{field_name}" array in the annotation file')
    elif buf[pos:pos + 1] == "[":
        pos += 1
    else:
        raise ValueError("annotation file is not a JSON object or array")
    while True:
        skip_ws()
        if buf[pos:pos + 1] == "]":
            return
        if buf[pos:pos + 1] == ",":
            pos += 1
            skip_ws()
        while True:
            try:
                obj, end = decoder.raw_decode(buf, pos)
                break
            except json.JSONDecodeError:
                if not fill():
                    raise ValueError("annotation file ends inside an entry (truncated JSON)") from None
        pos = end
        yield obj


# -- units -------------------------------------------------------------------------------------
def iter_units(source: SourceConfig, s3: uio.S3Options | None = None, shuffle_seed: int | str | None = None,
               window: int = 1000) -> Iterator[dict]:
    """The units of a source, lazily. With `shuffle_seed`, shuffled within windows of `window` units
    (memory stays bounded; the same seed gives the same order)."""
    units = _units(source, s3)
    if shuffle_seed is None:
        yield from units
        return
    rng = random.Random(f"{shuffle_seed}:{source.name}")
    buf: list[dict] = []
    for u in units:
        buf.append(u)
        if len(buf) >= window:
            rng.shuffle(buf)
            yield from buf
            buf = []
    rng.shuffle(buf)
    yield from buf


def _units(source: SourceConfig, s3: uio.S3Options | None) -> Iterator[dict]:
    if source.format == "webdataset":
        for uri in _files(source.path, (".tar",), s3):
            yield {"id": uri, "uri": uri}
    elif source.format == "parquet":
        for uri in _files(source.path, (".parquet",), s3):
            yield {"id": uri, "uri": uri}
    elif source.format == "images":
        prefix = source.path.rstrip("/") + "/"  # keys are relative to it, local dirs and s3 alike
        page: list[str] = []
        for uri, _ in uio.iter_objects(prefix, IMAGE_EXTENSIONS, s3):
            page.append(uri)
            if len(page) == source.unit_size:
                yield {"id": f"{prefix}@{page[0]}", "prefix": prefix, "uris": page}
                page = []
        if page:
            yield {"id": f"{prefix}@{page[0]}", "prefix": prefix, "uris": page}
    elif source.format == "features":
        manifest = read_features_manifest(source.path, s3)
        shape, dtype = [manifest["num_query_tokens"], manifest["hidden_size"]], manifest["dtype"]
        for uri in _files(uio.join(source.path, FEATURES_DATA) + "/", (".npz",), s3):
            yield {"id": uri, "uri": uri, "shape": shape, "dtype": dtype}
    else:  # cc_sbu_align
        ann_uri = uio.join(source.path, source.annotations)
        page_ann: list[dict] = []
        n = 0
        with uio.open_stream(ann_uri, s3) as stream:
            for ann in iter_json_array(stream, "annotations"):
                page_ann.append(ann)
                n += 1
                if len(page_ann) == source.unit_size:
                    yield {"id": f"{ann_uri}#{n - len(page_ann)}", "root": source.path, "annotations": page_ann}
                    page_ann = []
        if page_ann:
            yield {"id": f"{ann_uri}#{n - len(page_ann)}", "root": source.path, "annotations": page_ann}


# -- reading a unit ----------------------------------------------------------------------------
def read_unit(source: SourceConfig, unit: dict, stats: UnitStats, s3: uio.S3Options | None = None,
              need_caption: bool = True) -> Iterator[RawSample]:
    """The samples of one unit. Unreadable objects, truncated tars and bad rows go to `stats`."""
    readers = {"webdataset": _read_tar, "parquet": _read_parquet, "images": _read_images,
               "cc_sbu_align": _read_align, "features": _read_features}
    yield from readers[source.format](source, unit, stats, s3, need_caption)


def decode_caption(data: bytes | str | None) -> str:
    if data is None:
        raise SampleError("missing_caption", "no caption")
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SampleError("bad_caption_encoding", f"caption is not UTF-8 ({e.reason} at byte {e.start})") from None
    if not isinstance(data, str):
        raise SampleError("missing_caption", f"caption is a {type(data).__name__}, not text")
    if not data.strip():
        raise SampleError("empty_caption", "caption is empty")
    return data


def _wds_sample(key: str, members: dict[str, bytes], need_caption: bool) -> RawSample:
    image = next((members[e] for e in WDS_IMAGE_EXTENSIONS if e in members), None)
    if image is None:
        raise SampleError("missing_image", f"no image member ({', '.join(WDS_IMAGE_EXTENSIONS)}) in the sample")
    caption = None
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except (ValueError, UnicodeDecodeError) as e:
            raise SampleError("bad_json", f"{key}.json is not valid JSON ({e})") from None
        if isinstance(meta, dict) and meta.get("caption") is not None:
            caption = meta["caption"]
    if caption is None and "txt" in members:
        caption = members["txt"]
    if need_caption:
        caption = decode_caption(caption)
    elif caption is not None:
        try:
            caption = decode_caption(caption)
        except SampleError:
            caption = None
    return RawSample(key, image, caption)


def _read_tar(source, unit, stats, s3, need_caption) -> Iterator[RawSample]:
    uri = unit["uri"]
    try:
        stream = uio.open_stream(uri, s3)
    except uio.ObjectError as e:
        stats.error(uri, e.reason, str(e))
        return
    key, members = None, {}

    def finish() -> Iterator[RawSample]:
        try:
            yield _wds_sample(key, members, need_caption)
        except SampleError as e:
            stats.error(key, e.reason, str(e))

    try:
        with stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                name = info.name
                base = name.rsplit("/", 1)[-1]
                if base.startswith(".") or "." not in base:
                    continue
                dirname = name[:len(name) - len(base)]
                k, ext = dirname + base.split(".", 1)[0], base.split(".", 1)[1].lower()
                if k != key:
                    if key is not None:
                        yield from finish()
                    key, members = k, {}
                f = tar.extractfile(info)
                members[ext] = f.read() if f else b""
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        what = "truncated or corrupt tar" if not isinstance(e, OSError) or "end of data" in str(e) else "read error"
        stats.error(key or uri, "truncated_tar" if what != "read error" else "unreadable",
                    f"{uri}: {what} ({type(e).__name__}: {e})")
        return
    if key is not None:
        yield from finish()


def _read_parquet(source, unit, stats, s3, need_caption) -> Iterator[RawSample]:
    import pyarrow.parquet as pq

    uri = unit["uri"]
    base = uri.rsplit("/", 1)[-1]
    try:
        data = uio.read_bytes(uri, s3)
        pf = pq.ParquetFile(io.BytesIO(data))
        names = set(pf.schema_arrow.names)
    except uio.ObjectError as e:
        stats.error(uri, e.reason, str(e))
        return
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for non-parquet bytes
        stats.error(uri, "unreadable_parquet", f"{uri}: {type(e).__name__}: {e}")
        return
    missing = [c for c in (source.image_column,) + ((source.caption_column,) if need_caption else ())
               if c not in names]
    if missing:
        stats.error(uri, "bad_schema", f"{uri}: no column {', '.join(missing)} (has {', '.join(sorted(names))})")
        return
    columns = [c for c in (source.image_column, source.caption_column, source.key_column) if c in names]
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=256, columns=columns):
            cols = batch.to_pydict()
            for i in range(batch.num_rows):
                key = cols.get(source.key_column, [None] * batch.num_rows)[i]
                key = str(key) if key not in (None, "") else f"{base}:{row}"
                row += 1
                image = cols[source.image_column][i]
                if isinstance(image, dict):  # HF datasets' {"bytes": ..., "path": ...} image struct
                    image = image.get("bytes")
                if image is not None and not isinstance(image, bytes):
                    stats.error(key, "bad_row", f"image column holds {type(image).__name__}, not bytes")
                    continue
                caption = _column_caption(key, cols[source.caption_column][i] if source.caption_column in cols
                                          else None, stats, need_caption)
                if caption is not _SKIP:
                    yield RawSample(key, image or b"", caption)
    except Exception as e:
        stats.error(f"{base}:{row}", "unreadable_parquet", f"{uri}: {type(e).__name__}: {e}")


_SKIP = object()  # _column_caption: the sample is skipped (its error recorded)


def _column_caption(key: str, value, stats: "UnitStats", need_caption: bool):
    """A caption stored beside the sample (a parquet column, a feature file): decoded; when it is bad, the
    sample is skipped and recorded (`_SKIP`) if the task needs captions, else it goes on without one."""
    try:
        return decode_caption(value) if need_caption or value is not None else None
    except SampleError as e:
        if need_caption:
            stats.error(key, e.reason, str(e))
            return _SKIP
        return None


def _read_images(source, unit, stats, s3, need_caption) -> Iterator[RawSample]:
    prefix = unit["prefix"]
    for uri in unit["uris"]:
        key = uri[len(prefix):] if uri.startswith(prefix) else uri
        try:
            yield RawSample(key, uio.read_bytes(uri, s3), None)
        except uio.ObjectError as e:
            stats.error(key, e.reason, str(e))


def _read_align(source, unit, stats, s3, need_caption) -> Iterator[RawSample]:
    for ann in unit["annotations"]:
        if not isinstance(ann, dict) or ann.get("image_id") in (None, ""):
            stats.error(str(ann)[:80], "bad_row", "annotation without image_id")
            continue
        key = str(ann["image_id"])
        try:
            caption = decode_caption(ann.get("caption"))
        except SampleError as e:
            if need_caption:
                stats.error(key, e.reason, str(e))
                continue
            caption = None
        try:
            image = uio.read_bytes(uio.join(unit["root"], "image", f"{key}.jpg"), s3)
        except uio.ObjectError as e:
            stats.error(key, e.reason, str(e))
            continue
        yield RawSample(key, image, caption)


# -- features (the feature job's output) --------------------------------------------------------
def read_features_manifest(path: str, s3: uio.S3Options | None = None) -> dict:
    """The `_manifest.json` of a feature job's output prefix: what produced the features (model, weights,
    feature shape and dtype). ValueError when `path` holds none (not a feature job's output)."""
    uri = uio.join(path, FEATURES_MANIFEST)
    try:
        manifest = json.loads(uio.read_bytes(uri, s3))
    except uio.ObjectError as e:
        raise ValueError(f"features source {path}: no readable {FEATURES_MANIFEST} ({e}); point it at the output "
                         "of jobs/features.py") from None
    except ValueError as e:
        raise ValueError(f"features source {path}: {FEATURES_MANIFEST} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != FEATURES_KIND:
        raise ValueError(f"features source {path}: {FEATURES_MANIFEST} is not a feature job's manifest")
    return manifest


def features_file(feats: np.ndarray, meta: dict) -> bytes:
    """One unit's feature file: `feats` (n, Q, D) and `meta` (JSON: `keys`, `captions`, ...) in an
    uncompressed .npz (fp16 features barely compress), readable without pickle."""
    buf = io.BytesIO()
    np.savez(buf, feats=feats, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    return buf.getvalue()


def load_features_file(data: bytes) -> tuple[np.ndarray, dict]:
    """One feature file -> (features (n, Q, D), meta with `keys` and `captions`); read without pickle.
    ValueError when the file is damaged or inconsistent."""
    import zipfile

    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            feats, meta = z["feats"], json.loads(z["meta"].tobytes().decode())
    except (OSError, KeyError, EOFError, zipfile.BadZipFile, UnicodeDecodeError) as e:
        raise ValueError(f"unreadable feature file ({type(e).__name__}: {e})") from None
    n = len(meta.get("keys", ()))
    if feats.ndim != 3 or len(feats) != n or len(meta.get("captions", ())) != n:
        raise ValueError(f"feature file holds features {feats.shape} for {n} keys and "
                         f"{len(meta.get('captions', ()))} captions")
    return feats, meta


def _read_features(source, unit, stats, s3, need_caption) -> Iterator[RawSample]:
    uri = unit["uri"]
    try:
        feats, meta = load_features_file(uio.read_bytes(uri, s3))
    except uio.ObjectError as e:
        stats.error(uri, e.reason, str(e))
        return
    except ValueError as e:
        stats.error(uri, "bad_features", f"{uri}: {e}")
        return
    if list(feats.shape[1:]) != list(unit["shape"]) or str(feats.dtype) != unit["dtype"]:
        stats.error(uri, "bad_features", f"{uri}: features {feats.dtype}{list(feats.shape[1:])}, the manifest says "
                                         f"{unit['dtype']}{unit['shape']}")
        return
    for key, caption, x in zip(meta["keys"], meta["captions"], feats):
        caption = _column_caption(key, caption, stats, need_caption)
        if caption is not _SKIP:
            yield RawSample(key, None, caption, image_feats=x)
