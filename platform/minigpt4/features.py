"""The frozen-feature cache: the encoder's output per image, computed once, read by stage 1 instead of pixels.

    python jobs/features.py                                   # embedded default: tiny preset, synthetic shards
    ray job submit --working-dir . -- python jobs/features.py \\
        --config jobs/configs/features_vicuna7b.yaml input=s3://b/laion/ output=s3://b/features/laion/

MiniGPT-4 keeps the EVA ViT-g (~1B parameters) and the Q-Former frozen in stage 1, so what they make of
an image — the Q-Former's last_hidden_state, (32, 768), before `llama_proj` — never changes. This job
computes it once per image; a stage-1 job that reads the output as a `features` source
(`data.sources: [{format: features, path: <output>}]`) skips the ViT and Q-Former entirely, in every
epoch (`MiniGPT4.forward(image_feats=...)`): no JPEG decoding, no ViT forward, 48 KB per image to read.

The pipeline is the caption job's (minigpt4.caption), with the encoder as the actor:

    unit listing -> read + decode + preprocess (CPU tasks) -> FeatureEncoder actors (`image_features`,
    the model's own encoder path, bf16 autocast on GPUs) -> the driver writes one feature file per unit

**Resumable, exactly once per unit**, as captioning: every row carries its unit's markers, the driver
gathers rows per unit and writes `data/<index>-<unit>.npz`, then `_done/<unit>.json`; a rerun skips
units with a marker (with all of them done it starts no actor). Bad images are skipped and counted
(`_errors/`, the pipeline's per-unit reports; `summarize`). `_manifest.json` pins what made the
features; a rerun with other settings is refused (`overwrite` replaces the output), and training
refuses features whose encoder differs from its model's (`check_sources`).

Output layout (a local directory or an s3:// prefix):

    _manifest.json             kind, model preset, encoder architecture, encoder weights ids (random init:
                               seed + device type), image size, num_query_tokens, hidden size, dtype,
                               compute dtype, source and processing settings
    data/<index>-<unit>.npz    one source unit: `feats` (n, num_query_tokens, hidden) in `dtype`, `meta`
                               (JSON bytes: unit, keys, captions as the source holds them); np.load
                               with allow_pickle=False. <index> (the unit's place in the input listing)
                               keeps the input's order
    _done/<unit>.json          commit marker; _errors/ bad inputs; _summary.json the last run's summary

Size: 32 x 768 fp16 = 48 KB per image (float32: 96 KB), whatever the image's resolution.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .caption import (ERRORS_DIR, SUMMARY_FILE, Committer, _nothing_left, check_pinned, clear_output, done_units,
                      source_config)
from .config import ConfigError, apply_overrides, from_dict, to_dict
from .data import io as uio
from .data.process import ProcessConfig
from .data.sources import (FEATURES_DATA, FEATURES_KIND, FEATURES_MANIFEST, FORMATS, SourceConfig, features_file,
                           read_features_manifest)
from .weights import WeightsConfig

log = logging.getLogger(__name__)
FEATURE_DTYPES = ("float16", "float32")
# the weights files that can hold encoder parts (a MiniGPT-4 .pth may: the tiny demo's stage-1 file does)
ENCODER_WEIGHTS = ("eva_vit", "blip2", "hf_blip2", "minigpt4")


@dataclass
class FeaturesConfig:
    input: str = ""
    """Images, read as the caption job reads them: webdataset shards (prefix, .tar or brace pattern), parquet
    files, an image prefix or a cc_sbu_align directory; local or s3://."""
    output: str = ""
    """Where the feature files go (local directory or s3:// prefix): a stage-1 `features` source's path."""
    format: str = "auto"
    """auto (detected as for captioning), webdataset, parquet, images, cc_sbu_align."""
    unit_size: int = 256
    """Images per unit (= per feature file) of an image prefix or an annotation file."""
    image_column: str = "jpg"
    caption_column: str = "caption"
    """Parquet column of the captions stored beside the features."""
    key_column: str = "key"
    dtype: str = "float16"
    """Stored feature dtype: float16 (48 KB per image at 32 x 768) or float32 (exact, twice the bytes)."""
    model: dict = field(default_factory=lambda: {"preset": "tiny"})
    """Preset + ModelConfig overrides. Only the encoder matters: the LLM is never loaded, and on GPUs the
    encoder runs under bf16 autocast (as training runs it) unless `vision_dtype` is set here."""
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    """eva_vit + blip2 (or hf_blip2). `llm` is ignored; `minigpt4` only for a file that holds encoder parts
    (the tiny demo's stage-1 .pth): training must then load the same file."""
    seed: int = 42
    """Random init of encoder parts without weights; a training job with this `train.seed` on the same
    device type (CPU/GPU) builds the same encoder, which training checks."""
    batch_size: int = 64
    """Images per encoder call on one actor."""
    num_gpus: float | None = None
    """GPUs per actor; None: 1 when the cluster has GPUs, else 0 (CPU actors)."""
    cpus_per_actor: float = 1.0
    concurrency: list[int] = field(default_factory=lambda: [1, 1])
    """Actors: [min, max] (the pool grows to max while inputs wait) or [n]."""
    preprocess_cpus: float = 1.0
    """CPUs per read/decode/preprocess task."""
    overwrite: bool = False
    """Delete the output's previous features, markers and errors first, instead of resuming."""
    s3: uio.S3Options = field(default_factory=uio.S3Options)
    log_every: float = 10.0
    """Seconds between progress lines."""

    def __post_init__(self):
        if self.dtype not in FEATURE_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(FEATURE_DTYPES)}, not {self.dtype!r}")
        if self.format != "auto" and self.format not in set(FORMATS) - {"features"}:
            images = ", ".join(f for f in FORMATS if f != "features")
            raise ValueError(f"format must be auto or an image format ({images}), not {self.format!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 1 <= len(self.concurrency) <= 2 or not 1 <= self.concurrency[0] <= self.concurrency[-1]:
            raise ValueError(f"concurrency must be [n] or [min, max] with 1 <= min <= max, got {self.concurrency}")

    def model_config(self, gpu: bool = False):
        """The job's ModelConfig; refused (ValueError) when its features could not stand in for pixels."""
        from .model import preset

        spec = dict(self.model)
        name = spec.pop("preset", "tiny")
        if gpu and name != "tiny":
            spec.setdefault("vision_dtype", "bf16")
        cfg = preset(name, **spec)
        cfg.check_cached_features()
        return cfg

    def source(self) -> SourceConfig:
        """The input as a SourceConfig, read exactly as the caption job reads it (plus the caption column)."""
        return dataclasses.replace(source_config(self), caption_column=self.caption_column)


# -- what made the features ------------------------------------------------------------------------
def _uri_id(value: str | list[str] | None) -> str | None:
    """A weights file (or several, '+'-joined) as an id: s3:// URIs as given, local paths resolved."""
    if not value:
        return None
    uris = [value] if isinstance(value, str) else list(value)
    return "+".join(u if uio.is_s3(u) else str(Path(u).resolve()) for u in uris)


def encoder_identity(cfg, weights: WeightsConfig, seed: int, device: str) -> dict:
    """What decides an image's features: the encoder's architecture, the weights files it was loaded from
    and, unless the ViT and Q-Former both come from files, the random init (seed; device type, as CPU and
    CUDA draw different numbers). The LLM is not part of it: vicuna7b and vicuna13b share one encoder.
    The feature job writes this into its manifest; training computes it from its own job and compares."""
    covered = bool(weights.hf_blip2) or bool(weights.eva_vit and weights.blip2)
    identity = {"encoder": {"vision": cfg.vision, "ln_vision_eps": cfg.ln_vision_eps, "qformer": cfg.qformer,
                            "num_query_tokens": cfg.num_query_tokens},
                "weights": {part: _uri_id(getattr(weights, part)) for part in ENCODER_WEIGHTS},
                "random_init": None if covered else {"seed": seed, "device": device}}
    return json.loads(json.dumps(identity))  # as read back from the manifest (lists, not tuples)


def manifest(cfg: FeaturesConfig, source: SourceConfig, model_cfg, device: str) -> dict:
    """The `_manifest.json` of a job: everything that decides the files' contents."""
    from . import images

    process = ProcessConfig.for_model(model_cfg, "caption")
    out = {"kind": FEATURES_KIND, "version": 1, "model": model_cfg.name,
           **encoder_identity(model_cfg, cfg.weights, cfg.seed, device),
           "image_size": model_cfg.image_size, "num_query_tokens": model_cfg.num_query_tokens,
           "hidden_size": model_cfg.proj_in_features, "dtype": cfg.dtype, "compute_dtype": model_cfg.vision_dtype,
           "source": {"input": cfg.input, "format": source.format, "unit_size": source.unit_size,
                      "image_column": source.image_column, "caption_column": source.caption_column,
                      "key_column": source.key_column},
           "process": {"image_size": process.image_size, "augment": process.augment, "max_pixels": process.max_pixels,
                       "max_aspect": process.max_aspect, "fast_decode": process.fast_decode,
                       "mean": images.CLIP_MEAN, "std": images.CLIP_STD}}
    return json.loads(json.dumps(out))


def check_sources(sources: list[SourceConfig], s3: uio.S3Options | None, cfg, weights: WeightsConfig, seed: int,
                  device: str, augment: str = "resize") -> dict[str, dict]:
    """Before training: every `features` source must hold features of this job's encoder (architecture,
    weights files, random init) and the model must take features (frozen Q-Former encoder). ValueError
    naming each difference otherwise. Returns the manifests by source name."""
    found = {}
    want = encoder_identity(cfg, weights, seed, device)
    for s in sources:
        if s.format != "features":
            continue
        cfg.check_cached_features()
        m = read_features_manifest(s.path, s3)
        diffs = []
        if m.get("encoder") != want["encoder"]:
            diffs.append(f"encoder architecture (features: preset {m.get('model')} with "
                         f"{m.get('num_query_tokens')} x {m.get('hidden_size')} features; this job: preset {cfg.name} "
                         f"with {cfg.num_query_tokens} x {cfg.proj_in_features})")
        for part in ENCODER_WEIGHTS:
            have = (m.get("weights") or {}).get(part)
            if have != want["weights"][part]:
                mine = want["weights"][part]
                diffs.append(f"weights.{part} (features: {have or 'none'}; this job: {mine or 'none'})")
        if m.get("random_init") != want["random_init"]:
            diffs.append(f"random init of the encoder parts without weights (features: {m.get('random_init')}; "
                         f"this job: {want['random_init']}, from train.seed and train.use_gpu)")
        if diffs:
            raise ValueError(f"features source {s.name!r} ({s.path}) was made by another encoder than this job's "
                             f"model: {'; '.join(diffs)}. Recompute it with jobs/features.py and this job's model and "
                             "weights, or train from the images")
        if augment != "resize":
            log.warning("features source %r: its features come from resized images; process.augment=%s applies "
                        "to the image sources only", s.name, augment)
        found[s.name] = m
    return found


# -- the actor -------------------------------------------------------------------------------------
def encoder_model(model_cfg, weights: WeightsConfig):
    """(ModelConfig, WeightsConfig) the actors build: the configured encoder and no LLM to load. Features
    stop before llama_proj, so the LLM is a stub (a 7B one would cost 13 GB and minutes for nothing);
    with a `minigpt4` file the LLM keeps its configured shape so that the file's other keys fit. The
    encoder is built first, so its random init does not depend on the LLM."""
    from .model import PRESETS

    weights = dataclasses.replace(weights, llm=None, tokenizer=None)
    if weights.minigpt4:
        return dataclasses.replace(model_cfg, quantize_llm="none"), weights
    return dataclasses.replace(model_cfg, llm=PRESETS["tiny"]["llm"], llm_dtype="fp32", quantize_llm="none",
                               train_llm="none"), weights


class FeatureEncoder:
    """One replica of the frozen encoder (Ray Data actor pool member): numpy batches of preprocessed rows
    -> the rows with `image_feats` (num_query_tokens, hidden) in the stored dtype instead of pixels.
    Placeholder rows (units with no good image) pass through as markers, with zero features."""

    def __init__(self, cfg: dict):
        import torch

        from .weights import load_pretrained

        self.cfg = cfg = from_dict(FeaturesConfig, cfg)
        gpu = torch.cuda.is_available() and (cfg.num_gpus or 0) > 0
        t = time.time()
        model_cfg, weights = encoder_model(cfg.model_config(gpu), cfg.weights)
        torch.manual_seed(cfg.seed)  # the random init training builds from the same seed (see encoder_identity)
        self.model, _, _ = load_pretrained(model_cfg, weights, device="cuda" if gpu else "cpu")
        self.model.eval()
        self.shape = (model_cfg.num_query_tokens, model_cfg.proj_in_features)
        log.info("feature encoder ready on %s in %.1fs", self.model.device, time.time() - t)

    def __call__(self, batch: dict) -> dict:
        import torch

        feats = np.zeros((len(batch["key"]), *self.shape), self.cfg.dtype)
        real = np.flatnonzero(batch["unit_rows"] != 0)
        if len(real):
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixel_values"][real])).to(self.model.device)
            with torch.inference_mode():
                feats[real] = self.model.image_features(pixels).float().cpu().numpy()  # (n, 32, 768)
            if not np.isfinite(feats[real]).all():  # float16 tops out at 65504: never store an inf silently
                raise ValueError(f"non-finite image features in dtype {self.cfg.dtype} (keys "
                                 f"{list(batch['key'][real][:3])}...): use dtype=float32, or check the weights")
        keep = ("key", "caption", "unit", "unit_index", "unit_row", "unit_rows")
        return {k: batch[k] for k in keep} | {"image_feats": feats}


# -- committing ------------------------------------------------------------------------------------
class FeatureCommitter(Committer):
    """Gathers feature rows per unit as the caption job's Committer gathers captions (rows a retried task
    delivers twice count once; a key the input holds twice keeps its first row) and writes each complete
    unit as one feature file, rows in the input's order, then its marker."""

    row_columns = ("key", "caption", "image_feats", "unit_index")

    def __init__(self, output: str, s3: uio.S3Options | None):
        super().__init__(output, s3, {})
        self.bytes = 0

    def commit(self, unit: str, p: dict, marker: bool = True) -> None:
        rows = list(self.first_per_key(p).values())
        if rows:
            meta = {"unit": unit, "keys": [str(r["key"]) for r in rows],
                    "captions": [str(r["caption"]) or None for r in rows]}  # None: the source had no caption
            data = features_file(np.stack([r["image_feats"] for r in rows]), meta)
            name = f"{int(rows[0]['unit_index']):08d}-{unit}.npz"
            uio.write_bytes(uio.join(self.output, FEATURES_DATA, name), data, self.s3)
            self.bytes += len(data)
        if marker:
            self.mark(unit, len(rows))
        self.rows += len(rows)


# -- the job ---------------------------------------------------------------------------------------
def run(cfg: FeaturesConfig, say=print) -> dict:
    """Encode `cfg.input` into feature files under `cfg.output` on the connected Ray cluster; returns the
    summary (also written to `_summary.json`)."""
    import ray

    from .data.pipeline import summarize

    s3 = cfg.s3
    if not cfg.output:
        raise ValueError("output is required (a local directory or an s3:// prefix)")
    for part in ENCODER_WEIGHTS:
        value = getattr(cfg.weights, part)
        for uri in [value] if isinstance(value, str) else value or []:
            if not uio.is_s3(uri) and not Path(uri).exists():
                raise ValueError(f"weights.{part}: {uri} does not exist")
    source = cfg.source()
    cfg = dataclasses.replace(cfg, format=source.format)
    num_gpus = cfg.num_gpus if cfg.num_gpus is not None else (1 if ray.cluster_resources().get("GPU", 0) else 0)
    cfg = dataclasses.replace(cfg, num_gpus=num_gpus)
    model_cfg = cfg.model_config(gpu=num_gpus > 0)
    if cfg.overwrite:
        n = clear_output(cfg.output, s3, files=(FEATURES_MANIFEST, SUMMARY_FILE))
        say(f"[features] overwrite: removed {n:,} objects of a previous job under {cfg.output}")
    check_pinned(cfg.output, FEATURES_MANIFEST, manifest(cfg, source, model_cfg, "cuda" if num_gpus else "cpu"), {},
                 s3, "features")
    skip = done_units(cfg.output, s3)
    if skip:
        say(f"[features] resuming: {len(skip):,} units already written in {cfg.output} are skipped")
    errors = uio.join(cfg.output, ERRORS_DIR)
    if skip and _nothing_left(source, skip, s3):  # no actor started, no model loaded, for nothing
        say("[features] every unit of the input is written: nothing to encode")
        committer, wall = FeatureCommitter(cfg.output, s3), 0.0
    else:
        committer, wall = _encode(cfg, source, model_cfg, skip, errors, say)
    report = summarize(errors, s3)
    summary = {
        "input": cfg.input, "output": cfg.output, "format": source.format, "model": model_cfg.name,
        "feature_shape": [model_cfg.num_query_tokens, model_cfg.proj_in_features], "dtype": cfg.dtype,
        "images_encoded": committer.rows, "units_written": committer.units, "units_skipped_as_done": len(skip),
        "units_done_total": len(skip) + committer.units, "errors": report.errors, "errors_total": report.skipped,
        "duplicates_dropped": committer.duplicates, "duplicate_input_keys": committer.duplicate_keys,
        "bytes_written": committer.bytes,
        "bytes_per_image": round(committer.bytes / committer.rows) if committer.rows else 0,
        "wall_seconds": round(wall, 2), "images_per_second": round(committer.rows / wall, 2) if wall else 0.0,
    }
    uio.write_bytes(uio.join(cfg.output, SUMMARY_FILE), json.dumps(summary, indent=1).encode(), s3)
    return summary


def _encode(cfg: FeaturesConfig, source: SourceConfig, model_cfg, skip: set[str], errors: str, say):
    """The pipeline: units not in `skip` -> FeatureEncoder actors -> the driver's FeatureCommitter.
    Returns (committer, wall seconds)."""
    from ray.data import ActorPoolStrategy

    from .data.pipeline import build_dataset

    process = ProcessConfig.for_model(model_cfg, "caption")  # pixels only; captions pass through as read
    ds = build_dataset(source, process, errors=errors, s3=cfg.s3, shuffle_seed=None, markers=True, skip_units=skip,
                       num_cpus=cfg.preprocess_cpus, rows_per_block=cfg.batch_size)
    lo, hi = cfg.concurrency[0], cfg.concurrency[-1]
    # as for the Captioner: the actors' own runtime_env keeps Ray from fusing decoding into them
    ds = ds.map_batches(FeatureEncoder, fn_constructor_kwargs={"cfg": to_dict(cfg)}, batch_size=cfg.batch_size,
                        compute=ActorPoolStrategy(min_size=lo, max_size=hi), num_gpus=cfg.num_gpus,
                        runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
                        num_cpus=cfg.cpus_per_actor, batch_format="numpy")
    committer = FeatureCommitter(cfg.output, cfg.s3)
    say(f"[features] {source.format} input {cfg.input} -> {cfg.output}: encoder of {model_cfg.name} "
        f"({model_cfg.num_query_tokens} x {model_cfg.proj_in_features} {cfg.dtype} per image), "
        f"{lo}{'-' + str(hi) if hi > lo else ''} actor(s) x {cfg.num_gpus:g} GPU, batch {cfg.batch_size}")
    t0 = last = time.time()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        committer.add(batch)
        if time.time() - last >= cfg.log_every:
            last = time.time()
            say(f"[features] {committer.rows:,} images in {committer.units:,} units written, "
                f"{committer.rows / (last - t0):.1f} images/s, {committer.bytes / 2**20:,.0f} MiB")
    wall = time.time() - t0
    if committer.pending:  # cannot happen unless a unit lost rows: say so rather than drop them quietly
        raise RuntimeError(f"{len(committer.pending)} units ended incomplete: {sorted(committer.pending)[:3]}")
    return committer, wall


def format_summary(s: dict) -> str:
    lines = [f"[features] done: {s['images_encoded']:,} images encoded into {s['units_written']:,} files "
             f"({s['feature_shape'][0]} x {s['feature_shape'][1]} {s['dtype']}, {s['bytes_per_image'] / 1024:.1f} KB "
             f"per image; {s['wall_seconds']:.1f}s wall, {s['images_per_second']:.2f} images/s)"]
    if s["units_skipped_as_done"]:
        lines.append(f"  {s['units_skipped_as_done']:,} units were already written; the output now holds "
                     f"{s['units_done_total']:,} units")
    if s["duplicate_input_keys"]:
        lines.append(f"  {s['duplicate_input_keys']:,} rows repeated a key already in their unit: the first was kept")
    lines.append(f"  errors: {s['errors_total']:,}" + "".join(f"\n    {n:>8,}  {r}" for r, n in
                                                          sorted(s["errors"].items(), key=lambda kv: -kv[1])))
    lines.append(f"  stage 1 reads it with data.sources: [{{format: features, path: {s['output']}}}]")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .jobcli import JobCLI

    cli = JobCLI("features", "Frozen-feature cache: the encoder's output per image, on a Ray Data actor pool "
                             "(resumable)", "features_vicuna7b.yaml", "weights.blip2=s3://... batch_size=128")
    cli.flag("--input", help="images: webdataset shards, parquet, image prefix or cc_sbu_align (local or s3://)")
    cli.flag("--output", help="feature files: local directory or s3:// prefix")
    cli.flag("--preset", help="model preset (tiny, vicuna7b, vicuna13b)")
    cli.flag("--dtype", choices=FEATURE_DTYPES, help="stored feature dtype (default float16)")
    cli.flag("--overwrite", action="store_true", help="replace the output's features instead of resuming")
    args = cli.parse(argv)

    try:
        data = apply_overrides(cli.load(args, input=args.input, output=args.output, dtype=args.dtype), args.overrides)
        if not data.get("input"):
            embedded = cli.start_embedded("no --input: the embedded default (tiny preset, random weights, the "
                                          "synthetic stage-1 shards on a local S3 server)", train_shards=4,
                                          samples_per_shard=64, align_samples=8, heldout_samples=8)
            data["input"] = embedded.pretrain
            data.setdefault("output", "outputs/features")
        cfg = cli.config(FeaturesConfig, data)
        cfg.model_config()
        cfg.format = cfg.source().format  # an unreadable or unknown input fails here, before Ray starts
    except (ConfigError, ValueError, OSError) as e:
        return cli.error(e)

    def job() -> str:
        text = format_summary(run(cfg))
        if cli.embedded:
            text += ("\n  e.g. python jobs/pretrain.py 'model={preset: tiny}' "
                     f"'data.sources=[{{format: features, path: {cfg.output}, name: features}}]'")
        return text

    return cli.run(job, args.address)
