"""Batch captioning: images in object storage -> the model on an actor pool -> parquet captions.

    python jobs/caption.py                                      # embedded default: tiny model, held-out scenes
    ray job submit -- python jobs/caption.py --input s3://b/images/ --output s3://b/captions/ [key=value ...]

The pipeline is the training data pipeline with the caption task, then the model:

    unit listing -> read + decode + preprocess (CPU tasks) -> Captioner actors (the same MiniGPT-4 graph,
    batched generation with per-sample stop strings) -> the driver commits finished units

**Exactly once.** A *unit* (one webdataset shard, one parquet file, or `unit_size` images of a prefix)
is what gets committed. Every row carries its unit's id; the unit's last row carries how many rows the
unit delivered. The driver gathers captions per unit and, once a unit is complete, writes
`data/<unit>.parquet` and then `_done/<unit>.json`. A rerun lists `_done/` and leaves those units out
(with all of them done it starts no actor at all).
A crash between the two writes only means the unit is captioned again and its data file (same name)
overwritten, so every good key is in the output once. Rows a retried actor task delivers twice are
deduplicated by key. Bad images go to `_errors/` (per-unit parquet: key, reason, detail), written
before the unit's rows leave the CPU stage, so they are complete when the unit is committed.

The input must not change between a run and its resumption: units are cut from the listing order.
`_job.json` pins what the captions came from (input, prompt, decoding, model, weights); resuming
with anything different is refused (use `overwrite` or another output).

Output layout (a local directory or an s3:// prefix):

    _job.json                      the job's settings
    data/<unit>.parquet            key, caption, finish_reason, tokens, timing, prompt, params, model, weights
                                   (+ continued_tokens: the second turn's, with continue_below)
    _done/<unit>.json              commit marker: rows in the data file
    _errors/<source>/<unit>.parquet, _errors/_stats/<unit>.json     bad inputs, per-unit delivery counts
    _summary.json                  the last run's summary
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np

from .config import ConfigError, apply_overrides, from_dict, to_dict
from .data import io as uio
from .data.process import ProcessConfig
from .data.sources import FORMATS, IMAGE_EXTENSIONS, SourceConfig
from .generate import SamplingParams
from .weights import WeightsConfig

log = logging.getLogger(__name__)
TEMPLATES = ("chat", "raw")
DATA_DIR, DONE_DIR, ERRORS_DIR = "data", "_done", "_errors"
JOB_FILE, SUMMARY_FILE = "_job.json", "_summary.json"
# what a resumed run must agree on with the run that started the output
PINNED = ("input", "format", "unit_size", "image_column", "key_column", "prompt", "template", "sampling", "model",
          "weights", "continue_below", "continue_prompt")
FAIL_AFTER_ENV = "MINIGPT4_CAPTION_FAIL_AFTER"  # tests: "<batches>:<flag file>" kills one actor once
CAPTION_MAX_NEW_TOKENS = 128  # a caption's default length (SamplingParams' own default, 300, suits chat)
ROW_COLUMNS = ("key", "caption", "finish_reason", "prompt_tokens", "generated_tokens", "seconds")
CONTINUED = "continued_tokens"  # a row column of jobs that continue short answers (0: not continued)


@dataclass
class CaptionConfig:
    input: str = ""
    """Images: a prefix of .jpg/.png/.webp objects, webdataset shards (.tar prefix or brace pattern),
    parquet files, or a cc_sbu_align directory; local or s3://."""
    output: str = ""
    """Where captions go (local directory or s3:// prefix)."""
    format: str = "auto"
    """auto (from the path or the first objects under it), images, webdataset, parquet, cc_sbu_align."""
    unit_size: int = 256
    """Images per unit for an image prefix or an annotation file (the unit is what gets committed)."""
    image_column: str = "jpg"
    key_column: str = "key"
    prompt: str = "Describe this image in detail."
    """Instruction; `<ImageHere>` marks where the image goes (default: `<Img><ImageHere></Img>` first)."""
    template: str = "chat"
    """chat: the prompt inside the model's conversation template (MiniGPT-4's); raw: the prompt as is,
    generation stopping at a newline (stage-1 style captions)."""
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_new_tokens=CAPTION_MAX_NEW_TOKENS))
    """Decoding of every caption (greedy by default: reproducible captions); `stop` adds to the
    template's stop string."""
    model: dict = field(default_factory=lambda: {"preset": "tiny"})
    """Preset + ModelConfig overrides, e.g. {preset: vicuna7b, quantize_llm: 8bit}."""
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    batch_size: int = 32
    """Images per generate call on one actor."""
    num_gpus: float | None = None
    """GPUs per actor; None: 1 when the cluster has GPUs, else 0 (CPU actors)."""
    cpus_per_actor: float = 1.0
    concurrency: list[int] = field(default_factory=lambda: [1, 1])
    """Actors: [min, max] (the pool grows to max while inputs wait) or [n]."""
    preprocess_cpus: float = 1.0
    """CPUs per read/decode/preprocess task."""
    limit: int | None = None
    """Caption at most this many images (a dry run: units it cuts short are not committed)."""
    overwrite: bool = False
    """Delete the output's previous captions, markers and errors first, instead of resuming."""
    s3: uio.S3Options = field(default_factory=uio.S3Options)
    log_every: float = 10.0
    """Seconds between progress lines."""
    continue_below: int = 0
    """Answers of fewer generated tokens get a second turn, `continue_prompt` asked after the first answer
    in the model's template, and the caption is both answers joined (MiniGPT-4's stage-2 data generation
    continued answers under 80 tokens); 0: one turn. The rows then carry `continued_tokens`."""
    continue_prompt: str = "Continue"

    def __post_init__(self):
        if self.template not in TEMPLATES:
            raise ValueError(f"template must be one of {', '.join(TEMPLATES)}, not {self.template!r}")
        if self.continue_below < 0:
            raise ValueError(f"continue_below must be >= 0, got {self.continue_below}")
        if self.continue_below and self.template != "chat":
            raise ValueError("continue_below needs template=chat (a second turn is a conversation)")
        if self.format != "auto" and self.format not in FORMATS:
            raise ValueError(f"format must be auto or one of {', '.join(FORMATS)}, not {self.format!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 1 <= len(self.concurrency) <= 2 or not 1 <= self.concurrency[0] <= self.concurrency[-1]:
            raise ValueError(f"concurrency must be [n] or [min, max] with 1 <= min <= max, got {self.concurrency}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        w = self.weights.minigpt4
        if isinstance(w, list) and len(w) == 1:  # one file, however it was given: the same job
            self.weights.minigpt4 = w[0]

    def sampling_params(self, stop: tuple[str, ...]) -> SamplingParams:
        """The decoding parameters with the template's stop strings first."""
        return self.sampling.replace(stop=tuple(stop) + self.sampling.stop)

    def model_config(self):
        from .model import preset

        spec = dict(self.model)
        return preset(spec.pop("preset", "tiny"), **spec)

    def pinned(self) -> dict:
        d = to_dict(self)
        return {k: d[k] for k in PINNED}


# -- prompts ---------------------------------------------------------------------------------------
def caption_prompt(prompt: str, template: str, model_template: str) -> tuple[str, tuple[str, ...]]:
    """(prompt text with the image placeholder, stop strings) for one caption request."""
    from .prompts import END_SYMS, INSTRUCTION_TEMPLATES, STAGE1_END_SYM

    if template == "raw":
        text = prompt if "<ImageHere>" in prompt else f"<ImageHere>{prompt}"
        return text, (STAGE1_END_SYM,)
    text = prompt if "<ImageHere>" in prompt else f"<Img><ImageHere></Img> {prompt}"
    return INSTRUCTION_TEMPLATES[model_template].format(text), (END_SYMS[model_template],)


def detect_format(path: str, s3: uio.S3Options | None = None) -> str:
    """The input format from the path, else from the first objects under it."""
    p = path.lower().rstrip("/")
    if p.endswith(".tar"):
        return "webdataset"
    if p.endswith(".parquet"):
        return "parquet"
    if p.endswith(".json"):
        return "cc_sbu_align"
    prefix = path.rstrip("/") + "/"
    kinds = set()
    for i, (uri, _) in enumerate(uio.iter_objects(prefix, None, s3)):
        name = uri.rsplit("/", 1)[-1].lower()
        kinds.add("cc_sbu_align" if name == "filter_cap.json" else "webdataset" if name.endswith(".tar") else
                  "images" if name.endswith(IMAGE_EXTENSIONS) else "parquet" if name.endswith(".parquet") else None)
        if i >= 100:
            break
    # img2dataset writes a .parquet of metadata beside each .tar: shards win over parquet, and so do images
    for fmt in ("cc_sbu_align", "webdataset", "images", "parquet"):
        if fmt in kinds:
            return fmt
    raise ValueError(f"cannot tell the format of {path} (no images, .tar or .parquet under it): set format=")


def source_config(cfg: CaptionConfig) -> SourceConfig:
    fmt = cfg.format if cfg.format != "auto" else detect_format(cfg.input, cfg.s3)
    path = cfg.input
    if fmt == "cc_sbu_align" and path.rstrip("/").lower().endswith(".json"):
        path = path.rstrip("/").rsplit("/", 1)[0]
    return SourceConfig(path=path, format=fmt, name="input", unit_size=cfg.unit_size,
                        image_column=cfg.image_column, key_column=cfg.key_column)


# -- the actor -------------------------------------------------------------------------------------
class Captioner:
    """One replica of the model (Ray Data actor pool member): numpy batches of preprocessed rows ->
    caption rows. Placeholder rows (units with no good image) pass through as markers."""

    def __init__(self, cfg: dict):
        import torch

        from .weights import load_pretrained

        self.cfg = cfg = from_dict(CaptionConfig, cfg)
        device = "cuda" if torch.cuda.is_available() and (cfg.num_gpus or 0) > 0 else "cpu"
        t = time.time()
        torch.manual_seed(0)  # parts without weights get the same random init in every actor
        self.model, self.tokenizer, _ = load_pretrained(cfg.model_config(), cfg.weights, device=device)
        self.model.eval()
        self.prompt, stop = caption_prompt(cfg.prompt, cfg.template, self.model.cfg.template)
        self.params = cfg.sampling_params(stop)
        self.batches = 0
        self._fail_after = _fail_after()
        log.info("captioner ready on %s in %.1fs", device, time.time() - t)

    def __call__(self, batch: dict) -> dict:
        import torch

        n = len(batch["key"])
        real = np.flatnonzero(batch["unit_rows"] != 0)
        captions, reasons = [""] * n, [""] * n
        prompt_tokens, new_tokens, seconds = np.zeros(n, np.int32), np.zeros(n, np.int32), np.zeros(n, np.float32)
        continued = np.zeros(n, np.int32)
        for start in range(0, len(real), self.cfg.batch_size):
            idx = real[start:start + self.cfg.batch_size]
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixel_values"][idx])).to(self.model.device)
            t = time.perf_counter()
            comps = self.model.generate(self.tokenizer, [self.prompt] * len(idx), pixels, self.params)
            for i, c in zip(idx, comps):
                captions[i], reasons[i] = c.text.strip(), c.finish_reason
                prompt_tokens[i], new_tokens[i] = c.prompt_tokens, len(c.token_ids)
            short = [j for j, c in enumerate(comps) if len(c.token_ids) < self.cfg.continue_below]
            if short:
                for i, c in zip(idx[short], self._continue(pixels[short], [captions[i] for i in idx[short]])):
                    captions[i] = " ".join(t for t in (captions[i], c.text.strip()) if t)
                    reasons[i], continued[i] = c.finish_reason, len(c.token_ids)
                    new_tokens[i] += len(c.token_ids)
            seconds[idx] = (time.perf_counter() - t) / len(idx)
        self.batches += 1
        if self._fail_after and self.batches >= self._fail_after[0]:
            _fire(self._fail_after[1])
        out = {"key": batch["key"], "unit": batch["unit"], "unit_row": batch["unit_row"],
               "unit_rows": batch["unit_rows"],
               "caption": np.array(captions, dtype=object), "finish_reason": np.array(reasons, dtype=object),
               "prompt_tokens": prompt_tokens, "generated_tokens": new_tokens, "seconds": seconds}
        return out | ({CONTINUED: continued} if self.cfg.continue_below else {})

    def _continue(self, pixels, answers: list[str]) -> list:
        """The second turn of the rows whose first answer was short, in one batched call: the conversation
        so far (prompt, answer) and `continue_prompt` in the model's template."""
        from .prompts import follow_up

        prompts = [follow_up(self.prompt, a, self.cfg.continue_prompt, self.model.cfg.template) for a in answers]
        return self.model.generate(self.tokenizer, prompts, pixels, self.params)


def _fail_after():
    spec = os.environ.get(FAIL_AFTER_ENV)
    if not spec:
        return None
    n, flag = spec.split(":", 1)
    return int(n), flag


def _fire(flag: str) -> None:
    """Fault injection: the first actor to get here dies (once per flag file)."""
    try:
        fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    log.warning("fault injection: captioner exiting (%s)", flag)
    os._exit(1)


# -- committing ------------------------------------------------------------------------------------
class Committer:
    """Gathers caption rows per unit and commits each complete unit: data file, then marker.
    (features.FeatureCommitter gathers feature rows the same way and writes its own data file.)"""

    row_columns = ROW_COLUMNS + (CONTINUED,)  # what is kept of each row until its unit commits

    def __init__(self, output: str, s3: uio.S3Options | None, columns: dict):
        self.output, self.s3, self.columns = output, s3, columns  # constant columns (prompt, params, ...)
        self.pending: dict[str, dict] = {}
        self.committed: set[str] = set()
        self.units = self.rows = self.tokens = self.duplicates = self.duplicate_keys = self.continued = 0

    def add(self, batch: dict) -> None:
        for j in range(len(batch["key"])):
            u = str(batch["unit"][j])
            if u in self.committed:  # a retried task's copy of a row already committed
                self.duplicates += 1
                continue
            p = self.pending.setdefault(u, {"rows": {}, "total": None})
            total = int(batch["unit_rows"][j])
            if total >= 0:
                p["total"] = total
            if total != 0:  # a placeholder carries no caption
                ordinal = int(batch["unit_row"][j])
                if ordinal in p["rows"]:  # the same row again, from a retried task
                    self.duplicates += 1
                p["rows"][ordinal] = {c: batch[c][j] for c in self.row_columns if c in batch}
            if p["total"] is not None and len(p["rows"]) >= p["total"]:
                self.commit(u, self.pending.pop(u))
                self.committed.add(u)

    def first_per_key(self, p: dict) -> dict[str, dict]:
        """A pending unit's rows by key, in row order; a key the input holds twice: its first row wins."""
        by_key: dict[str, dict] = {}
        for _, r in sorted(p["rows"].items()):
            if str(r["key"]) in by_key:
                self.duplicate_keys += 1
                continue
            by_key[str(r["key"])] = r
        return by_key

    def mark(self, unit: str, rows: int) -> None:
        """The unit's commit marker, written after its data file: a marker means the data file is complete."""
        uio.write_bytes(uio.join(self.output, DONE_DIR, f"{unit}.json"),
                        json.dumps({"unit": unit, "rows": rows}).encode(), self.s3)
        self.units += 1

    def commit(self, unit: str, p: dict, marker: bool = True) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        by_key = self.first_per_key(p)
        keys = sorted(by_key)
        if keys:
            rows = [by_key[k] for k in keys]
            n = len(keys)
            table = pa.table({
                "key": pa.array(keys, pa.string()),
                "caption": pa.array([str(r["caption"]) for r in rows], pa.string()),
                "finish_reason": pa.array([str(r["finish_reason"]) for r in rows], pa.string()),
                "prompt_tokens": pa.array([int(r["prompt_tokens"]) for r in rows], pa.int32()),
                "generated_tokens": pa.array([int(r["generated_tokens"]) for r in rows], pa.int32()),
                "seconds": pa.array([float(r["seconds"]) for r in rows], pa.float32()),
                **{c: pa.array([v] * n, pa.string()) for c, v in self.columns.items()},
                "unit": pa.array([unit] * n, pa.string()),
                **({CONTINUED: pa.array([int(r[CONTINUED]) for r in rows], pa.int32())} if CONTINUED in rows[0]
                   else {}),
            })
            buf = io.BytesIO()
            pq.write_table(table, buf)
            uio.write_bytes(uio.join(self.output, DATA_DIR, f"{unit}.parquet"), buf.getvalue(), self.s3)
            self.tokens += sum(int(r["generated_tokens"]) for r in rows)
            self.continued += sum(int(r.get(CONTINUED, 0)) > 0 for r in rows)
        if marker:
            self.mark(unit, len(keys))
        self.rows += len(keys)

    def flush_partial(self) -> int:
        """A `limit` run's cut-short units: their captions are written, without markers (a later full
        run captions those units again and replaces the files)."""
        n = len(self.pending)
        for u, p in list(self.pending.items()):
            self.commit(u, p, marker=False)
        self.pending.clear()
        return n


# -- the output directory --------------------------------------------------------------------------
def done_units(output: str, s3: uio.S3Options | None = None) -> set[str]:
    try:
        return {uri.rsplit("/", 1)[-1][:-5] for uri, _ in uio.iter_objects(uio.join(output, DONE_DIR) + "/",
                                                                            (".json",), s3)}
    except uio.ObjectError:
        return set()


def clear_output(output: str, s3: uio.S3Options | None = None,
                 files: tuple[str, ...] = (JOB_FILE, SUMMARY_FILE)) -> int:
    """Delete what a caption job (or the feature job, whose top-level `files` differ) wrote under
    `output` (nothing else). Returns objects deleted."""
    n = 0
    for sub in (DATA_DIR, DONE_DIR, ERRORS_DIR):
        n += uio.remove_prefix(uio.join(output, sub) + "/", s3)
    for name in files:
        n += uio.remove_prefix(uio.join(output, name), s3, exact=True)
    return n


def read_captions(output: str, s3: uio.S3Options | None = None) -> list[dict]:
    """Every committed caption row (data files with a marker)."""
    import pyarrow.parquet as pq

    out: list[dict] = []
    for unit in sorted(done_units(output, s3)):
        data = uio.join(output, DATA_DIR, f"{unit}.parquet")
        if uio.exists(data, s3):
            out += pq.read_table(io.BytesIO(uio.read_bytes(data, s3))).to_pylist()
    return out


def _check_job_file(cfg: CaptionConfig, s3) -> None:
    # defaults: settings added since an older job file was written
    check_pinned(cfg.output, JOB_FILE, cfg.pinned(), CaptionConfig().pinned(), s3, "captions")


def check_pinned(output: str, name: str, pinned: dict, defaults: dict, s3, what: str) -> None:
    """A resumable job's settings file `output/name`: written on the first run; a later run whose
    settings differ from it (a missing key counts as its value in `defaults`) is refused."""
    uri = uio.join(output, name)
    if uio.exists(uri, s3):
        before = json.loads(uio.read_bytes(uri, s3))
        diff = sorted(k for k in pinned if before.get(k, defaults.get(k)) != pinned[k])
        if diff:
            raise ValueError(f"{output} holds {what} of a different job ({', '.join(diff)} differ); "
                             f"rerun with overwrite=true (--overwrite) to replace them, or pick another output")
        return
    uio.write_bytes(uri, json.dumps(pinned, indent=1).encode(), s3)


# -- the job ---------------------------------------------------------------------------------------
def run(cfg: CaptionConfig, say=print) -> dict:
    """Caption `cfg.input` into `cfg.output` on the connected Ray cluster; returns the summary."""
    from .data.pipeline import summarize

    s3 = cfg.s3
    if not cfg.output:
        raise ValueError("output is required (a local directory or an s3:// prefix)")
    source = source_config(cfg)
    cfg = dataclasses.replace(cfg, format=source.format)  # pinned as detected: a resume must read it the same way
    model_cfg = cfg.model_config()
    if cfg.overwrite:
        n = clear_output(cfg.output, s3)
        say(f"[caption] overwrite: removed {n:,} objects of a previous job under {cfg.output}")
    _check_job_file(cfg, s3)
    skip = done_units(cfg.output, s3)
    if skip:
        say(f"[caption] resuming: {len(skip):,} units already committed in {cfg.output} are skipped")
    errors = uio.join(cfg.output, ERRORS_DIR)
    if skip and _nothing_left(source, skip, s3):  # no actors started, no model loaded, for nothing
        say("[caption] every unit of the input is committed: nothing to caption")
        committer, wall, first, steady, partial = Committer(cfg.output, s3, {}), 0.0, None, None, 0
    else:
        committer, wall, first, steady, partial = _caption(cfg, source, model_cfg, skip, errors, say)
    report = summarize(errors, s3)
    summary = {
        "input": cfg.input, "output": cfg.output, "format": source.format, "model": model_cfg.name,
        "images_captioned": committer.rows, "units_committed": committer.units, "units_cut_short": partial,
        "units_skipped_as_done": len(skip), "units_done_total": len(skip) + committer.units,
        "errors": report.errors, "errors_total": report.skipped,
        "generated_tokens": committer.tokens, "captions_continued": committer.continued,
        "duplicates_dropped": committer.duplicates,
        "duplicate_input_keys": committer.duplicate_keys,
        "wall_seconds": round(wall, 2), "first_captions_seconds": round(first or 0.0, 2),
        "images_per_second": round(committer.rows / wall, 3) if wall else 0.0,
        "generated_tokens_per_second": round(committer.tokens / wall, 2) if wall else 0.0,
        # what a long job sustains: start-up, model load and the first batch (a compile on a GPU) left out
        "generated_tokens_per_second_after_first": round(steady, 2) if steady else None,
    }
    uio.write_bytes(uio.join(cfg.output, SUMMARY_FILE), json.dumps(summary, indent=1).encode(), s3)
    return summary


def _nothing_left(source: SourceConfig, done: set[str], s3: uio.S3Options | None) -> bool:
    """Whether every unit of the input is committed (the listing stops at the first one that is not)."""
    from .data.pipeline import source_unit_hash
    from .data.sources import iter_units

    return all(source_unit_hash(source.name, u["id"]) in done for u in iter_units(source, s3))


def _caption(cfg: CaptionConfig, source: SourceConfig, model_cfg, skip: set[str], errors: str, say):
    """The pipeline: units not in `skip` -> Captioner actors -> the driver's Committer.
    Returns (committer, wall seconds, seconds to the first captions, generated tok/s after the first
    captions (None when the rest came within a second), units cut short by `limit`)."""
    import ray
    from ray.data import ActorPoolStrategy

    from .data.pipeline import build_dataset

    s3 = cfg.s3
    num_gpus = cfg.num_gpus if cfg.num_gpus is not None else (1 if ray.cluster_resources().get("GPU", 0) else 0)
    cfg = dataclasses.replace(cfg, num_gpus=num_gpus)
    process = ProcessConfig.for_model(model_cfg, "caption")
    ds = build_dataset(source, process, errors=errors, s3=s3, shuffle_seed=None, markers=True, skip_units=skip,
                       num_cpus=cfg.preprocess_cpus, rows_per_block=cfg.batch_size)
    if cfg.limit:
        ds = ds.limit(cfg.limit)
    lo, hi = cfg.concurrency[0], cfg.concurrency[-1]
    # Ray Data restarts a dead actor and retries its batch (max_restarts / max_task_retries -1 for actor
    # pools). The actors' own runtime_env also keeps their remote args apart from the CPU stage's, so
    # Ray does not fuse decoding into the model's actors.
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if os.environ.get(FAIL_AFTER_ENV):
        env[FAIL_AFTER_ENV] = os.environ[FAIL_AFTER_ENV]
    ds = ds.map_batches(Captioner, fn_constructor_kwargs={"cfg": to_dict(cfg)}, batch_size=cfg.batch_size,
                        compute=ActorPoolStrategy(min_size=lo, max_size=hi), num_gpus=num_gpus,
                        runtime_env={"env_vars": env},
                        num_cpus=cfg.cpus_per_actor, batch_format="numpy")
    columns = {"prompt": caption_prompt(cfg.prompt, cfg.template, model_cfg.template)[0],
               "params": json.dumps(dataclasses.asdict(cfg.sampling), sort_keys=True),
               "model": model_cfg.name, "weights": _weights_id(cfg.weights)}
    committer = Committer(cfg.output, s3, columns)
    say(f"[caption] {source.format} input {cfg.input} -> {cfg.output}: model {model_cfg.name}, "
        f"{lo}{'-' + str(hi) if hi > lo else ''} actor(s) x {num_gpus:g} GPU, batch {cfg.batch_size}")
    t0 = last = time.time()
    first = None  # seconds until the first captions arrive: listing, actor start-up, model load
    first_tokens = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        arrived = time.time()
        committer.add(batch)
        if first is None:
            first, first_tokens = arrived - t0, committer.tokens
        if time.time() - last >= cfg.log_every:
            last = time.time()
            dt = last - t0
            say(f"[caption] {committer.rows:,} images in {committer.units:,} units committed, "
                f"{committer.rows / dt:.1f} images/s, {committer.tokens / dt:.0f} generated tok/s")
    wall = time.time() - t0
    after = committer.tokens - first_tokens  # a rate over less than a second would be a burst, not a rate
    steady = after / (wall - first) if first is not None and after and wall - first >= 1.0 else None
    partial = committer.flush_partial() if cfg.limit else 0
    if committer.pending:  # cannot happen unless a unit lost rows: say so rather than drop them quietly
        raise RuntimeError(f"{len(committer.pending)} units ended incomplete: {sorted(committer.pending)[:3]}")
    return committer, wall, first, steady, partial


def _weights_id(weights: WeightsConfig) -> str:
    """The weights as one readable string for the output rows and reports: `part=uri`, several files of
    one part joined with `+` (loaded in that order)."""
    parts = [f"{k}={'+'.join(v) if isinstance(v, (list, tuple)) else v}"
             for k, v in dataclasses.asdict(weights).items() if v and k not in ("strict",)]
    return ";".join(parts) or "random"


def format_summary(s: dict) -> str:
    steady = s.get("generated_tokens_per_second_after_first")
    lines = [f"[caption] done: {s['images_captioned']:,} images captioned in {s['units_committed']:,} units "
             f"({s['wall_seconds']:.1f}s wall, first captions after {s['first_captions_seconds']:.1f}s; "
             f"{s['images_per_second']:.2f} images/s, {s['generated_tokens_per_second']:.1f} generated tok/s"
             f"{f', {steady:.1f} after the first captions' if steady else ''})"]
    if s["units_skipped_as_done"]:
        lines.append(f"  {s['units_skipped_as_done']:,} units were already done; the output now holds "
                     f"{s['units_done_total']:,} committed units")
    if s["captions_continued"]:
        lines.append(f"  {s['captions_continued']:,} short answers were continued with a second turn")
    if s["duplicate_input_keys"]:
        lines.append(f"  {s['duplicate_input_keys']:,} rows repeated a key already in their unit: the first row of "
                     "each key was kept")
    if s["units_cut_short"]:
        lines.append(f"  limit: {s['units_cut_short']} units cut short were written without commit markers")
    lines.append(f"  errors: {s['errors_total']:,}" + "".join(f"\n    {n:>8,}  {r}" for r, n in
                                                          sorted(s["errors"].items(), key=lambda kv: -kv[1])))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .jobcli import JobCLI

    cli = JobCLI("caption", "Batch captioning on a Ray Data actor pool (resumable, exactly once)",
                 "caption_vicuna7b.yaml", "concurrency=[1,8] batch_size=64")
    cli.flag("--input", help="images: prefix, webdataset shards, parquet, or cc_sbu_align dir (local or s3://)")
    cli.flag("--output", help="captions: local directory or s3:// prefix")
    cli.flag("--prompt", help="instruction (default: 'Describe this image in detail.')")
    cli.flag("--template", choices=TEMPLATES, help="chat (the model's template) or raw")
    cli.flag("--weights", action="append", help="MiniGPT-4 .pth (repeat to load several, in order)")
    cli.flag("--preset", help="model preset (tiny, vicuna7b, vicuna13b, llama2_7b)")
    cli.flag("--quantize", choices=("none", "int8wo", "8bit", "4bit"),
             help="LLM quantization: int8wo (weight-only int8, ours), 8bit / 4bit (bitsandbytes)")
    cli.flag("--max-new-tokens", type=int)
    cli.flag("--temperature", type=float, help="> 0 turns sampling on")
    cli.flag("--top-p", type=float)
    cli.flag("--num-beams", type=int)
    cli.flag("--limit", type=int, help="caption at most N images (dry run)")
    cli.flag("--overwrite", action="store_true", help="replace the output's captions instead of resuming")
    args = cli.parse(argv)

    try:
        data = cli.load(args, input=args.input, output=args.output, prompt=args.prompt, template=args.template,
                        limit=args.limit)
        if args.quantize:
            data["model"] = {**data.get("model", {"preset": "tiny"}), "quantize_llm": args.quantize}
        sampling = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                    "num_beams": args.num_beams}
        if args.temperature is not None:
            sampling["do_sample"] = True
        data["sampling"] = {"max_new_tokens": CAPTION_MAX_NEW_TOKENS, **data.get("sampling", {}),
                            **{k: v for k, v in sampling.items() if v is not None}}
        data = apply_overrides(data, args.overrides)
        if not data.get("input"):
            cli.start_heldout(data, "outputs/captions", "tiny model, ")
            if not args.weights and not data.get("weights"):
                print("[caption] random tiny weights: the captions are noise. Train first (make demo) and pass "
                      "--weights outputs/demo/pretrain/minigpt4_stage1.pth --weights "
                      "outputs/demo/finetune/minigpt4_stage2.pth model.preset=tiny_demo")
        cfg = cli.config(CaptionConfig, data)
        cfg.model_config()
        cfg.format = source_config(cfg).format  # an unreadable or unknown input fails here, before Ray starts
    except (ConfigError, ValueError, OSError) as e:
        return cli.error(e)

    return cli.run(lambda: format_summary(run(cfg)), args.address)
