"""Caption evaluation: a labelled image set captioned under the paper's two prompts, scored with
BLEU-1..4, CIDEr-D and CHAIR-i / CHAIR-s.

    python jobs/evaluate.py                                          # embedded default: synthetic held-out scenes
    python jobs/evaluate.py --config jobs/configs/evaluate_vicuna7b.yaml [key=value ...]

The MiniGPT-4 paper measures hallucination (CHAIR) under a long prompt ("Please describe this image as
detailed as possible") and a short one ("Please describe the image shortly and precisely, in less than
20 words"): longer answers name more objects that are not there. This job runs one caption job
(`minigpt4.caption`) per prompt into `<output>/<name>/`, so it resumes exactly as captioning does
(committed units are skipped), then scores every caption the prompt's output holds against the
annotations. The metrics live in `minigpt4.metrics` (pure Python, no Java).

Annotations (local or s3://):
- COCO captions format: `images` [{id, file_name}] (file_name optional) and `annotations`
  [{image_id, caption}]; with `instances` (a COCO instances file: `annotations` [{image_id, category_id}],
  `categories` [{id, name}]) CHAIR is computed too, its ground truth being an image's instance
  categories plus the objects its reference captions name (Rohrbach et al. 2018).
- The synthetic held-out `annotations.json` (`jobs/make_synthetic.py`): the same, plus `objects` that
  name each scene's shapes exactly, so CHAIR needs nothing else.

A caption's key (the image's path under the input prefix) is matched to an annotated image by its
id, its file name, its stem, or the number a COCO file name ends in (`COCO_val2014_000000000042.jpg`
-> 42). Captioned images with no annotation, and annotated images with no caption (an image the
caption job skipped as bad, a `limit` run) are counted in the report, never dropped quietly.

Output (a local directory or an s3:// prefix):

    <name>/            the caption job's output for that prompt (data/, _done/, _errors/, _summary.json)
    report.json        annotations, model, and per prompt: metrics, matching counts, the caption job's summary
    report.md          the prompts side by side
    report.png         CHAIR-i / CHAIR-s and words per caption per prompt
    per_image.jsonl    one row per prompt and scored image: key, caption, CIDEr-D, objects named / hallucinated
"""
from __future__ import annotations

import copy
import dataclasses
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import caption
from .config import ConfigError, apply_overrides
from .data import io as uio
from .generate import SamplingParams
from .metrics import (Vocabulary, bleu, chair, cider_d, coco_vocabulary, synthetic_objects, synthetic_vocabulary,
                      tokenize)
from .weights import WeightsConfig

# the two prompts of the paper's hallucination comparison
PAPER_PROMPTS = {"long": "Please describe this image as detailed as possible",
                 "short": "Please describe the image shortly and precisely, in less than 20 words"}
VOCABULARIES = ("auto", "coco", "synthetic")
# settings every prompt's caption job shares, passed through as they are
CAPTION_FIELDS = ("format", "unit_size", "template", "sampling", "model", "weights", "batch_size", "num_gpus",
                  "cpus_per_actor", "concurrency", "preprocess_cpus", "limit", "overwrite", "s3", "log_every")
REPORT_JSON, REPORT_MD, REPORT_PNG, PER_IMAGE = "report.json", "report.md", "report.png", "per_image.jsonl"
# the demo's trained tiny model (`python -m minigpt4 demo`): the embedded default uses it when present
DEMO_WEIGHTS = ("outputs/demo/pretrain/minigpt4_stage1.pth", "outputs/demo/finetune/minigpt4_stage2.pth")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_COCO_NUMBER = re.compile(r"(?:^|_)(\d+)$")  # COCO_val2014_000000000042 / 000000000042 -> 42


@dataclass
class EvaluateConfig:
    input: str = ""
    """Images to caption (anything `caption` reads: an image prefix, shards, parquet; local or s3://)."""
    annotations: str = ""
    """Reference captions: COCO captions JSON, or the synthetic held-out annotations.json (local or s3://)."""
    instances: str | None = None
    """COCO instances JSON giving each image's objects for CHAIR (not needed for the synthetic set)."""
    output: str = ""
    """Where the captions (one subdirectory per prompt) and the report go (local directory or s3:// prefix)."""
    prompts: dict = field(default_factory=lambda: dict(PAPER_PROMPTS))
    """{name: instruction}: one caption job each, in `<output>/<name>/`. Default: the paper's long and short."""
    vocabulary: str = "auto"
    """Object names for CHAIR: coco (the 80 categories), synthetic (the scenes' shapes), a JSON file in the
    format of assets/coco_synonyms.json, or auto (synthetic for the synthetic set, else coco)."""
    # the caption settings below mean what they do in CaptionConfig, which checks them (one per prompt)
    format: str = "auto"
    unit_size: int = 256
    template: str = "chat"
    sampling: SamplingParams = field(
        default_factory=lambda: SamplingParams(max_new_tokens=caption.CAPTION_MAX_NEW_TOKENS))
    model: dict = field(default_factory=lambda: {"preset": "tiny"})
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    batch_size: int = 32
    num_gpus: float | None = None
    cpus_per_actor: float = 1.0
    concurrency: list[int] = field(default_factory=lambda: [1, 1])
    preprocess_cpus: float = 1.0
    limit: int | None = None
    """Caption at most this many images per prompt (a dry run; the rest count as uncaptioned)."""
    overwrite: bool = False
    """Caption again from scratch instead of resuming each prompt's caption job."""
    s3: uio.S3Options = field(default_factory=uio.S3Options)
    log_every: float = 10.0

    def __post_init__(self):
        if not self.prompts:
            raise ValueError("prompts must name at least one prompt")
        for name, prompt in self.prompts.items():
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                raise ValueError(f"prompt name {name!r} must be letters, digits, _ or - (it names a subdirectory)")
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"prompt {name!r} is empty")
            self.caption_config(name)
        if self.vocabulary not in VOCABULARIES and not self.vocabulary.lower().endswith(".json"):
            raise ValueError(f"vocabulary must be one of {', '.join(VOCABULARIES)} or a .json synonyms file, "
                             f"not {self.vocabulary!r}")

    def caption_config(self, name: str) -> caption.CaptionConfig:
        """The caption job of one prompt: this job's input and settings, `<output>/<name>/`."""
        shared = {f: copy.deepcopy(getattr(self, f)) for f in CAPTION_FIELDS}
        return caption.CaptionConfig(input=self.input, output=uio.join(self.output, name), prompt=self.prompts[name],
                                     **shared)


# -- annotations -----------------------------------------------------------------------------------
@dataclass
class Annotations:
    """A labelled image set: reference captions per image, and each image's objects where known."""

    kind: str
    """coco or synthetic."""
    references: dict[str, list[str]]
    """image id -> reference captions (every image has at least one)."""
    files: dict[str, str]
    """image id -> file name, where the annotations give one."""
    objects: dict[str, set[str]] | None
    """image id -> objects annotated in it (canonical names); None without object annotations."""


def _read_json(path: str, what: str, s3: uio.S3Options | None) -> dict:
    try:
        data = json.loads(uio.read_bytes(path, s3))
    except uio.ObjectError as e:
        raise ValueError(f"{what}: {e}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{what}: {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what}: {path} holds a JSON {type(data).__name__}, not an object")
    return data


def _entries(data: dict, name: str, fields: tuple[str, ...], path: str) -> list[dict]:
    """`data[name]` as a list of objects that each have `fields`; else a ValueError naming the file."""
    items = data.get(name)
    if not isinstance(items, list):
        raise ValueError(f"{path}: no {name!r} list (expected COCO format, {name} entries with {', '.join(fields)})")
    for i, item in enumerate(items):
        if not isinstance(item, dict) or any(item.get(f) is None for f in fields):
            raise ValueError(f"{path}: {name}[{i}] needs {', '.join(fields)}, got {json.dumps(item)[:200]}")
    return items


def load_annotations(path: str, instances: str | None = None, s3: uio.S3Options | None = None) -> Annotations:
    """Read COCO-format or synthetic held-out annotations (and a COCO instances file for the objects)."""
    data = _read_json(path, "annotations", s3)
    images = _entries(data, "images", ("id",), path)
    references: dict[str, list[str]] = {str(im["id"]): [] for im in images}
    files = {str(im["id"]): str(im["file_name"]) for im in images if im.get("file_name")}
    for i, ann in enumerate(_entries(data, "annotations", ("image_id", "caption"), path)):
        image_id = str(ann["image_id"])
        if image_id not in references:
            raise ValueError(f"{path}: annotations[{i}] is about image_id {image_id!r}, which `images` does not list")
        if not isinstance(ann["caption"], str):
            raise ValueError(f"{path}: annotations[{i}] caption is not text: {ann['caption']!r}")
        references[image_id].append(ann["caption"])
    bare = sorted(k for k, refs in references.items() if not refs)
    if bare:
        raise ValueError(f"{path}: {len(bare)} images have no reference caption, e.g. {bare[:3]}")
    if "objects" in data:  # the synthetic held-out split
        _entries(data, "objects", ("image_id", "shape"), path)
        objects = {k: v for k, v in synthetic_objects(data).items() if k in references}
        if instances:
            raise ValueError(f"{path} holds the synthetic scenes' objects: leave instances unset")
        return Annotations("synthetic", references, files, objects)
    return Annotations("coco", references, files, _instances(instances, references, s3) if instances else None)


def _instances(path: str, references: dict, s3: uio.S3Options | None) -> dict[str, set[str]]:
    """Each annotated image's instance categories (by name); images the captions file lacks are ignored
    (an instances file may cover a whole split, the captions a subset such as the Karpathy test)."""
    data = _read_json(path, "instances", s3)
    names = {c["id"]: str(c["name"]) for c in _entries(data, "categories", ("id", "name"), path)}
    objects: dict[str, set[str]] = {k: set() for k in references}
    for i, ann in enumerate(_entries(data, "annotations", ("image_id", "category_id"), path)):
        if ann["category_id"] not in names:
            raise ValueError(f"{path}: annotations[{i}] has category_id {ann['category_id']!r}, not in `categories`")
        if str(ann["image_id"]) in objects:
            objects[str(ann["image_id"])].add(names[ann["category_id"]])
    return objects


def load_vocabulary(spec: str, kind: str, s3: uio.S3Options | None = None) -> tuple[str, Vocabulary]:
    """(name, Vocabulary) for the `vocabulary` setting; auto picks the one matching the annotations."""
    if spec == "auto":
        spec = "synthetic" if kind == "synthetic" else "coco"
    if spec == "coco":
        return spec, coco_vocabulary()
    if spec == "synthetic":
        return spec, synthetic_vocabulary()
    data = _read_json(spec, "vocabulary", s3)
    if not isinstance(data.get("categories"), dict):
        raise ValueError(f"vocabulary: {spec} has no 'categories' mapping (object -> [synonyms]), "
                         "see minigpt4/assets/coco_synonyms.json")
    try:
        return spec, Vocabulary(data["categories"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"vocabulary: {spec}: {e}") from None


def ground_truth(ann: Annotations, vocab: Vocabulary) -> dict[str, set[str]] | None:
    """CHAIR's objects per image. Synthetic: the shapes drawn. COCO: the instance categories plus every
    object a reference caption names, as Rohrbach et al. do (segmentations miss objects people mention)."""
    if ann.objects is None:
        return None
    truth = ann.objects if ann.kind == "synthetic" else {
        k: objs | {o for ref in ann.references[k] for o in vocab.mentioned(ref)} for k, objs in ann.objects.items()}
    unknown = sorted({o for objs in truth.values() for o in objs} - set(vocab.objects))
    if unknown:  # checked before captioning: CHAIR would refuse them after hours of it
        raise ValueError(f"annotated objects the vocabulary does not name: {unknown[:5]} (set vocabulary=)")
    return truth


# -- captions to annotated images ------------------------------------------------------------------
def _names(name: str) -> list[str]:
    """The names an image may go by, most specific first: 'val/COCO_val2014_000000000042.jpg' -> itself,
    'val/COCO_val2014_000000000042', 'COCO_val2014_000000000042', '42'."""
    path = name.replace("\\", "/")
    stem = path.rsplit(".", 1)[0] if "." in path.rsplit("/", 1)[-1] else path
    base = stem.rsplit("/", 1)[-1]
    out = [path, stem, base]
    number = _COCO_NUMBER.search(base)
    if number:
        out.append(str(int(number.group(1))))
    return list(dict.fromkeys(out))


def match_keys(keys: list[str], ann: Annotations) -> tuple[dict[str, str], list[str], list[str]]:
    """({image id: caption key}, keys with no annotated image, keys naming an image another key took).

    A key matches through the first of its names that one image alone answers to (its id, file name,
    or their stems and COCO numbers); when two keys name one image (a.jpg and a.png), the first sorted wins."""
    index: dict[str, set[str]] = {}
    for image_id in ann.references:
        for name in [image_id] + (_names(ann.files[image_id]) if image_id in ann.files else []):
            index.setdefault(name, set()).add(image_id)
    matched, unannotated, repeated = {}, [], []
    for key in sorted(keys):
        image_id = next((next(iter(ids)) for ids in map(index.get, _names(key)) if ids and len(ids) == 1), None)
        if image_id is None:
            unannotated.append(key)
        elif image_id in matched:
            repeated.append(key)
        else:
            matched[image_id] = key
    return matched, unannotated, repeated


def read_rows(output: str, s3: uio.S3Options | None = None) -> list[dict]:
    """Every caption under a caption job's output: each data file holds whole, consistent rows (a file
    without its commit marker is a `limit` run's cut-short unit, or a crash before the marker), so all
    are scored; `caption.read_captions` reads committed units only."""
    import pyarrow.parquet as pq

    try:
        uris = [uri for uri, _ in uio.iter_objects(uio.join(output, caption.DATA_DIR) + "/", (".parquet",), s3)]
    except uio.ObjectError:
        return []
    return [row for uri in uris for row in pq.read_table(io.BytesIO(uio.read_bytes(uri, s3))).to_pylist()]


# -- scoring ---------------------------------------------------------------------------------------
def score(captions: dict[str, str], ann: Annotations, vocab: Vocabulary,
          truth: dict[str, set[str]] | None) -> tuple[dict, dict]:
    """(metrics, per image) of captions {image id: text}: BLEU-1..4 and CIDEr-D against the references,
    CHAIR-i / CHAIR-s / recall against `truth` (None without object annotations), words and object
    mentions per caption."""
    refs = {k: ann.references[k] for k in captions}
    cider = cider_d(captions, refs)
    n = len(captions)
    words = sum(len(tokenize(t)) for t in captions.values())
    named = {k: vocab.mentioned(t) for k, t in captions.items()}
    metrics = {"images": n, **bleu(captions, refs), "cider_d": cider["cider_d"],
               "words_per_caption": words / n if n else 0.0,
               "objects_per_caption": sum(map(len, named.values())) / n if n else 0.0,
               "chair_i": None, "chair_s": None, "chair_recall": None, "chair_counts": None}
    per_image = {k: {"cider_d": cider["per_image"][k], "mentioned": named[k], "hallucinated": None} for k in captions}
    if truth is not None:
        c = chair(captions, truth, vocab)
        metrics.update(chair_i=c["chair_i"], chair_s=c["chair_s"], chair_recall=c["recall"],
                       chair_counts={k: c[k] for k in ("captions", "hallucinated_captions", "mentions",
                                                       "hallucinated_mentions", "objects", "recalled_objects")})
        for k, row in c["per_image"].items():
            per_image[k]["hallucinated"] = row["hallucinated"]
    return metrics, per_image


def _bad_keys(output: str, s3: uio.S3Options | None) -> set[str]:
    """Keys the caption job skipped as bad inputs (see its `_errors/`)."""
    from .data.pipeline import read_errors

    return {str(e["key"]) for e in read_errors(uio.join(output, caption.ERRORS_DIR), s3)}


def evaluate_prompt(output: str, ann: Annotations, vocab: Vocabulary, truth: dict[str, set[str]] | None,
                    s3: uio.S3Options | None = None) -> tuple[dict, list[dict]]:
    """Score one prompt's caption output: (its report entry without the caption job, per-image rows)."""
    rows = {str(r["key"]): str(r["caption"]) for r in read_rows(output, s3)}
    matched, unannotated, repeated = match_keys(list(rows), ann)
    uncaptioned = sorted(set(ann.references) - set(matched))
    bad, _, _ = match_keys(sorted(_bad_keys(output, s3)), ann)
    metrics, per_image = score({k: rows[key] for k, key in matched.items()}, ann, vocab, truth)
    metrics["matching"] = {
        "captions": len(rows), "scored": len(matched),
        "unannotated": len(unannotated), "unannotated_examples": unannotated[:5],
        "repeated_image": len(repeated), "repeated_image_examples": repeated[:5],
        "uncaptioned": len(uncaptioned), "uncaptioned_examples": uncaptioned[:5],
        "uncaptioned_bad_images": len(set(bad) & set(uncaptioned))}
    rows_out = [{"image_id": k, "key": key, "caption": rows[key], **per_image[k]} for k, key in sorted(matched.items())]
    metrics["examples"] = [{k: r[k] for k in ("image_id", "caption", "mentioned", "hallucinated")}
                           for r in rows_out[:3]]
    return metrics, rows_out


# -- the job ---------------------------------------------------------------------------------------
def run(cfg: EvaluateConfig, say=print, annotations: Annotations | None = None) -> dict:
    """Caption `cfg.input` under every prompt on the connected Ray cluster, score, write the report;
    returns it. `annotations`: already loaded (the CLI reads them before starting Ray)."""
    if not (cfg.input and cfg.annotations and cfg.output):
        raise ValueError("input, annotations and output are required")
    s3 = cfg.s3
    ann = annotations or load_annotations(cfg.annotations, cfg.instances, s3)
    vocab_name, vocab = load_vocabulary(cfg.vocabulary, ann.kind, s3)
    truth = ground_truth(ann, vocab)
    chair_source = _chair_source(ann, vocab_name)
    say(f"[evaluate] {cfg.annotations}: {len(ann.references):,} images, "
        f"{sum(map(len, ann.references.values())):,} reference captions; CHAIR: {chair_source or 'not computed'}")
    report = {"annotations": cfg.annotations, "instances": cfg.instances, "kind": ann.kind,
              "images_annotated": len(ann.references), "chair_ground_truth": chair_source,
              "vocabulary": vocab_name, "input": cfg.input, "output": cfg.output,
              "model": cfg.caption_config(next(iter(cfg.prompts))).model_config().name,
              "weights": caption._weights_id(cfg.weights), "template": cfg.template,
              "sampling": dataclasses.asdict(cfg.sampling), "prompts": {}}
    per_image = []
    for i, name in enumerate(cfg.prompts, 1):
        ccfg = cfg.caption_config(name)
        say(f"[evaluate] prompt {i}/{len(cfg.prompts)} {name!r}: {ccfg.prompt!r} -> {ccfg.output}")
        summary = caption.run(ccfg, say=say)
        say(caption.format_summary(summary))
        say(f"[evaluate] scoring {name!r}")
        entry, rows = evaluate_prompt(ccfg.output, ann, vocab, truth, s3)
        report["prompts"][name] = {"prompt": ccfg.prompt, "output": ccfg.output, **entry, "caption_job": summary}
        per_image += [{"prompt": name, **r} for r in rows]
    report["verdict"] = verdict(report)
    write_report(report, per_image, cfg.output, s3)
    say(f"[evaluate] report: {uio.join(cfg.output, REPORT_JSON)} (+ {REPORT_MD}, {REPORT_PNG}, {PER_IMAGE})")
    return report


def _chair_source(ann: Annotations, vocab_name: str) -> str | None:
    if ann.objects is None:
        return None
    what = "the scenes' shapes" if ann.kind == "synthetic" else "instance categories + objects named by references"
    return f"{what} ({vocab_name} vocabulary)"


def verdict(report: dict) -> str | None:
    """The paper's comparison in one sentence, when the job ran both of its prompts with CHAIR."""
    p = report["prompts"]
    if not {"long", "short"} <= set(p) or p["long"]["chair_i"] is None:
        return None
    silent = [n for n in ("long", "short") if not p[n]["chair_counts"]["mentions"]]
    if silent:
        return (f"The {' and '.join(silent)} prompt's captions name no object, so CHAIR-i has nothing to compare "
                "(reported as 0%); the paper's finding cannot be checked here.")
    long_i, short_i = p["long"]["chair_i"], p["short"]["chair_i"]
    lower = "lower than" if short_i < long_i else "equal to" if short_i == long_i else "higher than"
    return (f"CHAIR-i is {100 * short_i:.1f}% under the short prompt, {lower} {100 * long_i:.1f}% under the long "
            f"prompt ({p['short']['words_per_caption']:.1f} vs {p['long']['words_per_caption']:.1f} words per "
            f"caption); the paper's finding (shorter answers hallucinate less) "
            f"{'holds' if short_i < long_i else 'does not hold'} here.")


# -- the report ------------------------------------------------------------------------------------
def write_report(report: dict, per_image: list[dict], output: str, s3: uio.S3Options | None = None) -> None:
    uio.write_bytes(uio.join(output, REPORT_JSON), json.dumps(report, indent=1).encode(), s3)
    uio.write_bytes(uio.join(output, REPORT_MD), markdown(report).encode(), s3)
    uio.write_bytes(uio.join(output, REPORT_PNG), chart(report), s3)
    uio.write_bytes(uio.join(output, PER_IMAGE), "".join(json.dumps(r) + "\n" for r in per_image).encode(), s3)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def markdown(report: dict) -> str:
    """The report as a short markdown page: settings, one table row per prompt, the verdict."""
    weights = report["weights"]
    lines = [f"# Caption evaluation: {report['model']}", "",
             f"- images: `{report['input']}`; annotations: `{report['annotations']}` "
             f"({report['images_annotated']:,} images)",
             f"- weights: {'**random** (the captions are noise)' if weights == 'random' else '`' + weights + '`'}",
             f"- CHAIR ground truth: {report['chair_ground_truth'] or 'none (no object annotations: set instances)'}",
             "", "| prompt | images | words/caption | objects/caption | CHAIR-i | CHAIR-s | recall | BLEU-1 | BLEU-4 "
             "| CIDEr-D | not annotated | not captioned |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, p in report["prompts"].items():
        m = p["matching"]
        lines.append(f"| {name} | {p['images']:,} | {p['words_per_caption']:.1f} | {p['objects_per_caption']:.2f} | "
                     f"{_pct(p['chair_i'])} | {_pct(p['chair_s'])} | {_pct(p['chair_recall'])} | "
                     f"{p['bleu_1']:.3f} | {p['bleu_4']:.3f} | {p['cider_d']:.3f} | {m['unannotated']:,} | "
                     f"{m['uncaptioned']:,} ({m['uncaptioned_bad_images']:,} bad images) |")
    lines += [""] + [f"- **{name}**: \"{p['prompt']}\"" for name, p in report["prompts"].items()]
    if report["verdict"]:
        lines += ["", report["verdict"]]
    return "\n".join(lines) + "\n"


_SERIES = (("chair_i", "CHAIR-i %", (214, 39, 40)), ("chair_s", "CHAIR-s %", (255, 127, 14)))


def chart(report: dict) -> bytes:
    """PNG bytes: CHAIR-i and CHAIR-s (%) per prompt, and words per caption per prompt (Pillow, as
    minigpt4.plots: no plotting library in the runtime image)."""
    from PIL import Image, ImageDraw

    names = list(report["prompts"])
    img = Image.new("RGB", (760, 320), "white")
    draw = ImageDraw.Draw(img)
    draw.text((16, 8), f"{report['model']} ({report['weights'][:80]})", fill="black")
    chair_bars = [(label, colour, [100 * (report["prompts"][n][key] or 0.0) for n in names])
                  for key, label, colour in _SERIES]
    words = [("words / caption", (31, 119, 180), [report["prompts"][n]["words_per_caption"] for n in names])]
    _bars(draw, (40, 40, 380, 280), names, chair_bars)
    _bars(draw, (420, 40, 740, 280), names, words)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _bars(draw, box: tuple[int, int, int, int], groups: list[str], series: list[tuple[str, tuple, list[float]]]):
    """Grouped bars in `box`: one group per prompt, one bar per series, value on top, legend above."""
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline="black")
    top = max([v for _, _, values in series for v in values] + [1e-9]) * 1.15
    slot = (x1 - x0) / len(groups)
    width = slot * 0.7 / len(series)
    for s, (label, colour, values) in enumerate(series):
        draw.rectangle((x0 + 6 + 90 * s, y0 + 6, x0 + 16 + 90 * s, y0 + 16), fill=colour)
        draw.text((x0 + 20 + 90 * s, y0 + 5), label, fill="black")
        for g, v in enumerate(values):
            left = x0 + g * slot + slot * 0.15 + s * width
            height = (y1 - y0 - 30) * v / top
            draw.rectangle((left, y1 - height, left + width - 2, y1), fill=colour)
            draw.text((left, y1 - height - 12), f"{v:.1f}", fill="black")
    for g, name in enumerate(groups):
        draw.text((x0 + g * slot + slot * 0.4, y1 + 6), name, fill="black")


# -- command line ----------------------------------------------------------------------------------
def _embedded_weights(data: dict, say=print) -> None:
    """The embedded default's model: the demo's trained tiny model when its .pth files exist, else the
    random tiny one (said here and in the report's weights)."""
    if data.get("weights"):
        return
    found = [Path(p).resolve() for p in DEMO_WEIGHTS]
    if all(p.exists() for p in found):
        say(f"[evaluate] the demo's trained model: {', '.join(map(str, found))} (model.preset=tiny_demo)")
        data["weights"] = {"minigpt4": [str(p) for p in found]}
        data["model"] = {**data.get("model", {}), "preset": "tiny_demo"}
    else:
        say("[evaluate] random tiny weights: the captions are noise. Train first (make demo) or pass "
            "--weights <stage-1 .pth> --weights <stage-2 .pth> model.preset=tiny_demo")


def main(argv: list[str] | None = None) -> int:
    from .jobcli import JobCLI

    cli = JobCLI("evaluate", "Caption a labelled set under several prompts; BLEU, CIDEr-D, CHAIR",
                 "evaluate_vicuna7b.yaml", "vocabulary=coco batch_size=64")
    cli.flag("--input", help="images: prefix, webdataset shards, parquet (local or s3://)")
    cli.flag("--annotations", help="COCO captions JSON or the synthetic held-out annotations.json")
    cli.flag("--instances", help="COCO instances JSON (objects for CHAIR)")
    cli.flag("--output", help="captions and report: local directory or s3:// prefix")
    cli.flag("--weights", action="append", help="MiniGPT-4 .pth (repeat to load several, in order)")
    cli.flag("--preset", help="model preset (tiny, tiny_demo, vicuna7b, vicuna13b, llama2_7b)")
    cli.flag("--max-new-tokens", type=int)
    cli.flag("--limit", type=int, help="caption at most N images per prompt (dry run)")
    cli.flag("--overwrite", action="store_true", help="caption again instead of resuming")
    args = cli.parse(argv)

    try:
        data = cli.load(args, input=args.input, annotations=args.annotations, instances=args.instances,
                        output=args.output, limit=args.limit)
        if args.max_new_tokens:
            data["sampling"] = {**data.get("sampling", {}), "max_new_tokens": args.max_new_tokens}
        data = apply_overrides(data, args.overrides)
        if not data.get("input"):
            cli.start_heldout(data, "outputs/evaluate")
            data["annotations"] = cli.embedded.heldout_annotations
            _embedded_weights(data)
        cfg = cli.config(EvaluateConfig, data)
        if not (cfg.annotations and cfg.output):
            raise ValueError("--annotations and --output are required with --input")
        annotations = load_annotations(cfg.annotations, cfg.instances, cfg.s3)  # bad files fail before Ray starts
        ground_truth(annotations, load_vocabulary(cfg.vocabulary, annotations.kind, cfg.s3)[1])
        first = cfg.caption_config(next(iter(cfg.prompts)))
        first.model_config()
        cfg.format = caption.source_config(first).format
    except (ConfigError, ValueError, OSError) as e:
        return cli.error(e)

    return cli.run(lambda: markdown(run(cfg, annotations=annotations)), args.address)
