"""Stage-2 data curation (MiniGPT-4 §3.2, DESIGN.md §7): images -> detailed descriptions -> an optional
LLM fix -> rule filters -> a cc_sbu_align set that stage 2 reads as it is.

    python jobs/curate.py                                   # embedded default: tiny model, synthetic held-out images
    python jobs/curate.py --config jobs/configs/curate_vicuna7b.yaml input=s3://b/images/ output=s3://b/align/

Three phases; rerunning the same command resumes each of them (`overwrite` starts over):

1. **generate** — the caption job (`minigpt4.caption`, a Ray Data actor pool, committed per unit under
   `_generate/`) with the paper's prompt. A first answer of fewer than `min_tokens` generated tokens gets a
   second turn, `###Human: Continue ###Assistant: ` after it, and the description is both answers joined.
2. **fix** (optional, `fixer.url`) — each description goes to an OpenAI-compatible chat endpoint (any; our
   Serve app too) with the paper's fixing instruction, `fixer.concurrency` requests at a time, retried with
   backoff on connection errors, timeouts, 429 and 5xx. `_fix/<unit>.parquet` holds, per generate unit, each
   description with its fix; a rerun reuses every row fixed from the same description under the same fixer
   settings (`FixerConfig.pinned`) and asks the endpoint only for the rest, failed rows included.
   A description the endpoint could not fix is counted, and `fixer.on_failure` decides: `keep` (default:
   the fixer is optional, so a description goes on unfixed, and the rule filters still judge it) or `drop`
   (dropped with reason `fixer_failed`). After `fixer.give_up_after` failures in a row the endpoint is taken
   for down and the run's remaining descriptions fail without a request (`gave_up`).
3. **filter + write** — `filters.check` on every description (after the fix); the survivors' images are
   copied to `image/<image_id>.jpg` (JPEG bytes unchanged, other formats re-encoded as JPEG), then
   `filter_cap.json` is written, then `report.json`.

Phases 2 and 3 take every description phase 1 has written, including the cut-short units of a `limit`
run. Output layout (a local directory or an s3:// prefix):

    filter_cap.json          {"annotations": [{"image_id", "caption"}, ...]}: the stage-2 set
    image/<image_id>.jpg     image_id: the input key without its image extension, file-name safe
    report.json              counts per phase, drops per reason with example texts
    _generate/               the caption job's output (data/, _done/, _errors/, _job.json, _summary.json)
    _fix/<unit>.parquet      key, description, fixed, status (fixed | failed), error, fixer
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.client import HTTPException

from . import caption, filters
from .config import ConfigError, apply_overrides
from .data import io as uio
from .generate import SamplingParams
from .weights import WeightsConfig

log = logging.getLogger(__name__)

# MiniGPT-4 §3.2: the stage-1 model's prompt, the continuation turn, and the instruction ChatGPT got
DESCRIBE_PROMPT = "Describe this image in detail. Give as many details as possible. Say everything you see."
CONTINUE_PROMPT = "Continue"
FIX_INSTRUCTION = ("Fix the error in the given paragraph. Remove any repeating sentences, meaningless characters, "
                   "not English sentences, and so on. Remove unnecessary repetition. Rewrite any incomplete "
                   "sentences. Return directly the results without explanation. Return directly the input "
                   "paragraph if it is already correct without explanation.")
DESCRIPTION_MAX_NEW_TOKENS = 300
GENERATE_DIR, FIX_DIR, IMAGE_DIR = "_generate", "_fix", "image"
ANNOTATIONS, REPORT = "filter_cap.json", "report.json"
ON_FAILURE = ("keep", "drop")
FIXER_FAILED = "fixer_failed"
COPY_THREADS = 8  # image copies in flight in phase 3 (object storage latency, not CPU, is the limit)
EXAMPLE_CHARS = 500  # an example text in the report is cut to this length

_IMAGE_EXT = re.compile(r"\.(jpe?g|png|webp)$", re.IGNORECASE)
_NOT_ID = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class FixerConfig:
    url: str = ""
    """Base URL of an OpenAI-compatible server, `http://host:8000` or `http://host:8000/v1`; requests go to
    `.../v1/chat/completions`. Empty: no fixing."""
    model: str = ""
    """The `model` of each request (required with a url)."""
    api_key_env: str = ""
    """Name of the environment variable holding the API key, sent as a Bearer token and never logged or
    written. Empty: no Authorization header."""
    instruction: str = FIX_INSTRUCTION
    """Sent before the paragraph, in one user message (default: the paper's, verbatim)."""
    temperature: float = 0.0
    """0: greedy, the same fix on every run."""
    max_tokens: int | None = None
    """Tokens of one fix; None: the endpoint's default."""
    timeout: float = 120.0
    """Seconds per request."""
    max_retries: int = 3
    """Retries after a connection error, a timeout, an unreadable reply, 429 or 5xx (other 4xx: none)."""
    backoff: float = 1.0
    """Seconds before the first retry, doubled for each next one."""
    concurrency: int = 8
    """Requests in flight at once."""
    give_up_after: int = 32
    """Descriptions failed in a row after which the endpoint is taken for down: the run's remaining
    descriptions fail without a request (a rerun asks again)."""
    on_failure: str = "keep"
    """A description the endpoint could not fix: keep (to the rule filters unfixed) or drop (`fixer_failed`)."""

    def __post_init__(self):
        if self.on_failure not in ON_FAILURE:
            raise ValueError(f"fixer.on_failure must be one of {', '.join(ON_FAILURE)}, not {self.on_failure!r}")
        if self.url and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"fixer.url must be an http(s):// URL, got {self.url!r}")
        if self.url and not self.model:
            raise ValueError("fixer.model is required with fixer.url (the model the endpoint serves)")
        if self.max_retries < 0 or self.backoff < 0 or self.timeout <= 0:
            raise ValueError("fixer.max_retries and fixer.backoff must be >= 0, fixer.timeout > 0")
        if self.concurrency < 1 or self.give_up_after < 1:
            raise ValueError("fixer.concurrency and fixer.give_up_after must be >= 1")

    def endpoint(self) -> str:
        base = self.url.rstrip("/")
        return (base[:-3] if base.endswith("/v1") else base) + "/v1/chat/completions"

    def pinned(self) -> str:
        """What decides a fix (not where the endpoint lives): a row fixed under other settings is asked again."""
        return json.dumps({"model": self.model, "instruction": self.instruction, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}, sort_keys=True)


@dataclass
class FilterRules:
    """`filters.check`'s rules (see minigpt4/filters.py)."""

    min_words: int = 8
    """Fewer words: a fragment."""
    ngram: int = 6
    times: int = 3
    """An `ngram`-word phrase said `times` times anywhere, or a phrase of <= 8 words `times` times in a row:
    repetition."""


@dataclass
class CurateConfig:
    input: str = ""
    """Images: a prefix of .jpg/.png/.webp objects, webdataset shards, parquet files, or a cc_sbu_align
    directory; local or s3://."""
    output: str = ""
    """Where the cc_sbu_align set goes (local directory or s3:// prefix), with the work of each phase."""
    format: str = "auto"
    """auto, images, webdataset, parquet, cc_sbu_align (as the caption job)."""
    unit_size: int = 256
    """Images per unit for an image prefix or an annotation file (what phases 1 and 2 commit at once)."""
    image_column: str = "jpg"
    key_column: str = "key"
    prompt: str = DESCRIBE_PROMPT
    """The instruction, in the model's chat template after `<Img><ImageHere></Img>` (default: the paper's)."""
    min_tokens: int = 80
    """A first answer of fewer generated tokens is continued (`Continue`, a second turn); 0: never."""
    sampling: SamplingParams = field(
        default_factory=lambda: SamplingParams(max_new_tokens=DESCRIPTION_MAX_NEW_TOKENS))
    """Decoding of both turns (greedy by default)."""
    model: dict = field(default_factory=lambda: {"preset": "tiny"})
    """Preset + ModelConfig overrides: the stage-1 model, e.g. {preset: vicuna7b}."""
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    batch_size: int = 32
    """Images per generate call on one actor."""
    num_gpus: float | None = None
    """GPUs per actor; None: 1 when the cluster has GPUs, else 0."""
    cpus_per_actor: float = 1.0
    concurrency: list[int] = field(default_factory=lambda: [1, 1])
    """Generating actors: [min, max] or [n]."""
    preprocess_cpus: float = 1.0
    fixer: FixerConfig = field(default_factory=FixerConfig)
    rules: FilterRules = field(default_factory=FilterRules)
    limit: int | None = None
    """Describe at most this many images (a dry run; its cut-short units still go through phases 2 and 3)."""
    overwrite: bool = False
    """Delete everything a previous curation wrote under `output` first, instead of resuming."""
    s3: uio.S3Options = field(default_factory=uio.S3Options)
    log_every: float = 10.0
    """Seconds between progress lines."""

    def __post_init__(self):
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        self.caption_config()  # the generation settings are checked where they are used

    def caption_config(self) -> caption.CaptionConfig:
        """Phase 1 as a caption job writing under `<output>/_generate`."""
        return caption.CaptionConfig(
            input=self.input, output=uio.join(self.output, GENERATE_DIR), format=self.format,
            unit_size=self.unit_size, image_column=self.image_column, key_column=self.key_column,
            prompt=self.prompt, template="chat", sampling=self.sampling, model=dict(self.model),
            weights=self.weights, batch_size=self.batch_size, num_gpus=self.num_gpus,
            cpus_per_actor=self.cpus_per_actor, concurrency=list(self.concurrency),
            preprocess_cpus=self.preprocess_cpus, limit=self.limit, overwrite=self.overwrite, s3=self.s3,
            log_every=self.log_every, continue_below=self.min_tokens, continue_prompt=CONTINUE_PROMPT)


# -- phase 1: what generation wrote ----------------------------------------------------------------
def generated(output: str, s3: uio.S3Options | None = None) -> dict[str, list[dict]]:
    """{unit: rows} of every data file phase 1 wrote (committed units and a `limit` run's cut-short ones)."""
    import pyarrow.parquet as pq

    out = {}
    try:
        objs = list(uio.iter_objects(uio.join(output, GENERATE_DIR, caption.DATA_DIR) + "/", (".parquet",), s3))
    except uio.ObjectError:  # nothing generated yet
        return out
    for uri, _ in objs:
        out[uri.rsplit("/", 1)[-1][:-len(".parquet")]] = pq.read_table(io.BytesIO(uio.read_bytes(uri, s3))).to_pylist()
    return out


# -- phase 2: the fixer ----------------------------------------------------------------------------
class FixError(Exception):
    def __init__(self, kind: str, detail: str, retry: bool):
        super().__init__(f"{kind}: {detail}"[:300])  # the kind before the colon is what the report counts
        self.retry = retry


class Fixer:
    """One OpenAI-compatible chat endpoint: `fix(text)` -> (fixed, "") or ("", error). Thread-safe; the
    caller bounds the concurrency. Counts requests and gives up after `give_up_after` failures in a row."""

    def __init__(self, cfg: FixerConfig):
        self.cfg, self.url = cfg, cfg.endpoint()
        self.headers = {"Content-Type": "application/json"}
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env, "")
            if not key:
                raise ValueError(f"fixer.api_key_env names {cfg.api_key_env}, which is not set in the environment")
            self.headers["Authorization"] = f"Bearer {key}"
        self.requests = 0
        self._failed_in_a_row = 0
        self._lock = threading.Lock()

    @property
    def gave_up(self) -> bool:
        return self._failed_in_a_row >= self.cfg.give_up_after

    def fix(self, text: str) -> tuple[str, str]:
        if self.gave_up:
            return "", f"gave_up: {self.cfg.give_up_after} descriptions failed in a row"
        body = {"model": self.cfg.model, "temperature": self.cfg.temperature,
                "messages": [{"role": "user", "content": f"{self.cfg.instruction}\n\n{text}"}]}
        if self.cfg.max_tokens is not None:
            body["max_tokens"] = self.cfg.max_tokens
        data = json.dumps(body).encode()
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                time.sleep(self.cfg.backoff * 2 ** (attempt - 1))
            try:
                fixed = self._post(data)
            except FixError as e:
                error = str(e)
                if not e.retry:
                    break
                continue
            with self._lock:
                self._failed_in_a_row = 0
            return fixed, ""
        with self._lock:
            self._failed_in_a_row += 1
        return "", error

    def _post(self, data: bytes) -> str:
        with self._lock:
            self.requests += 1
        request = urllib.request.Request(self.url, data=data, headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.cfg.timeout) as response:
                reply = json.loads(response.read())
        except urllib.error.HTTPError as e:
            raise FixError(f"http_{e.code}", e.read(200).decode("utf-8", "replace"), e.code == 429 or e.code >= 500)
        except (urllib.error.URLError, TimeoutError, ConnectionError, HTTPException) as e:
            raise FixError("connection", str(getattr(e, "reason", e)), True)
        except ValueError as e:  # not JSON (a proxy's error page, a cut-off body)
            raise FixError("bad_response", f"reply is not JSON ({e})", True)
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise FixError("bad_response", f"no choices[0].message.content in {str(reply)[:200]}", False) from None
        if not isinstance(content, str):
            raise FixError("bad_response", f"content is a {type(content).__name__}, not text", False)
        return content.strip()


def _read_rows(uri: str, s3: uio.S3Options | None) -> list[dict]:
    """A parquet file's rows; none when it is missing or unreadable (then its work is simply redone)."""
    import pyarrow.parquet as pq

    try:
        return pq.read_table(io.BytesIO(uio.read_bytes(uri, s3))).to_pylist()
    except uio.ObjectError:
        return []
    except Exception as e:  # a damaged file: pyarrow raises ArrowInvalid / OSError
        log.warning("fix results %s unreadable (%s): asking the endpoint again", uri, e)
        return []


def _write_rows(uri: str, rows: list[dict], s3: uio.S3Options | None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([(c, pa.string()) for c in rows[0]])), buf)
    uio.write_bytes(uri, buf.getvalue(), s3)


def fix_all(cfg: CurateConfig, fixer: Fixer, units: dict[str, list[dict]], say=print) -> tuple[dict[str, dict], dict]:
    """Phase 2: {key: fix row} for every description, and the phase's counts. Each unit's rows are
    committed (one parquet file) as soon as its requests are answered."""
    pinned, s3 = cfg.fixer.pinned(), cfg.s3
    total = sum(len(rows) for rows in units.values())
    say(f"[curate] fix: {total:,} descriptions -> {fixer.url} (model {cfg.fixer.model}, "
        f"{cfg.fixer.concurrency} at a time)")
    fixes: dict[str, dict] = {}
    asked = reused = 0
    last = time.time()
    with ThreadPoolExecutor(cfg.fixer.concurrency) as pool:
        for unit, rows in sorted(units.items()):
            uri = uio.join(cfg.output, FIX_DIR, f"{unit}.parquet")
            before = {r["key"]: r for r in _read_rows(uri, s3)}
            todo = [r for r in rows if not _reusable(before.get(r["key"]), r["caption"], pinned)]
            answers = pool.map(lambda r: fixer.fix(r["caption"]), todo)
            fresh = {r["key"]: {"key": r["key"], "description": r["caption"], "fixed": fixed,
                                "status": "failed" if error else "fixed", "error": error, "fixer": pinned}
                     for r, (fixed, error) in zip(todo, answers)}
            unit_rows = [fresh.get(r["key"]) or before[r["key"]] for r in rows]
            if fresh:
                _write_rows(uri, unit_rows, s3)
            fixes.update((r["key"], r) for r in unit_rows)
            asked, reused = asked + len(fresh), reused + len(rows) - len(fresh)
            if time.time() - last >= cfg.log_every:
                last = time.time()
                failed = sum(r["status"] == "failed" for r in fixes.values())
                say(f"[curate] fix: {len(fixes):,}/{total:,} descriptions ({asked:,} asked, {reused:,} fixed before, "
                    f"{failed:,} failed)")
    failures = Counter(r["error"].split(":", 1)[0] for r in fixes.values() if r["status"] == "failed")
    counts = {"endpoint": fixer.url, "model": cfg.fixer.model, "descriptions": total, "asked": asked,
              "reused": reused, "requests": fixer.requests,
              "fixed": sum(r["status"] == "fixed" for r in fixes.values()), "failed": sum(failures.values()),
              "failed_by_error": dict(failures), "on_failure": cfg.fixer.on_failure}
    if fixer.gave_up:
        say(f"[curate] fix: gave up after {cfg.fixer.give_up_after} failures in a row: is {fixer.url} up? "
            "(a rerun asks again for every description not fixed)")
    return fixes, counts


def _reusable(before: dict | None, description: str, pinned: str) -> bool:
    return (before is not None and before["status"] == "fixed" and before["description"] == description
            and before["fixer"] == pinned)


# -- phase 3: filters and the cc_sbu_align set -----------------------------------------------------
def select(descriptions: dict[str, str], fixes: dict[str, dict] | None, on_failure: str,
           rules: FilterRules) -> tuple[dict[str, str], dict]:
    """The survivors {key: caption, `filters.clean`ed} and the filter counts: fixer failures (with `drop`) and
    each `filters.check` reason, with example texts per reason."""
    fixer_failed: list[str] = []
    texts: dict[str, str] = {}
    for key, text in descriptions.items():
        fix = fixes.get(key) if fixes is not None else None
        if fix is not None and fix["status"] == "fixed":
            text = fix["fixed"]
        elif fix is not None and on_failure == "drop":
            fixer_failed.append(key)
            continue
        texts[key] = text
    kept, report = filters.curate(texts, **dataclasses.asdict(rules))
    counts = report.to_dict()
    by_reason = ({FIXER_FAILED: len(fixer_failed)} if fixes is not None else {}) | counts["by_reason"]
    examples = {reason: [{"key": k, "text": texts[k][:EXAMPLE_CHARS]} for k in keys]
                for reason, keys in counts["examples"].items()}
    if fixer_failed:
        examples[FIXER_FAILED] = [{"key": k, "text": descriptions[k][:EXAMPLE_CHARS]}
                                  for k in fixer_failed[:report.max_examples]]
    return kept, {"total": len(descriptions), "kept": len(kept), "dropped": len(descriptions) - len(kept),
                  "by_reason": by_reason, "examples": examples}


def image_ids(keys) -> dict[str, str]:
    """A file-name-safe `image_id` per input key: the key without its image extension, runs of characters
    other than letters, digits, `.`, `_` and `-` as `_`; clashes (a.jpg, a.png) get -2, -3, ... in key order."""
    out, used = {}, set()
    for key in sorted(keys):
        base = _NOT_ID.sub("_", _IMAGE_EXT.sub("", key)).strip("._") or "image"
        image_id, n = base, 1
        while image_id in used:
            n += 1
            image_id = f"{base}-{n}"
        used.add(image_id)
        out[key] = image_id
    return out


def as_jpeg(data: bytes) -> bytes:
    """The image as JPEG: JPEG bytes unchanged, anything else decoded and re-encoded (quality 95)."""
    if data[:3] == b"\xff\xd8\xff":
        return data
    from PIL import Image

    buf = io.BytesIO()
    with Image.open(io.BytesIO(data)) as im:
        im.convert("RGB").save(buf, "JPEG", quality=95)
    return buf.getvalue()


def copy_images(cfg: CurateConfig, wanted: dict[str, dict[str, str]], say=print) -> dict:
    """Copy the survivors' images {unit: {key: image_id}} from the input to `image/`, reading each unit with
    the source reader phase 1 used (so every format works); images already there are left, images there
    that are no longer wanted are removed. Returns the counts."""
    from .data.pipeline import source_unit_hash
    from .data.sources import UnitStats, iter_units, read_unit

    s3, image_dir = cfg.s3, uio.join(cfg.output, IMAGE_DIR)
    try:
        present = {uri.rsplit("/", 1)[-1][:-len(".jpg")] for uri, _ in uio.iter_objects(image_dir + "/", (".jpg",), s3)}
    except uio.ObjectError:
        present = set()
    ids = {i for keys in wanted.values() for i in keys.values()}
    todo = {u: {k: i for k, i in keys.items() if i not in present} for u, keys in wanted.items()}
    todo = {u: keys for u, keys in todo.items() if keys}
    source = caption.source_config(cfg.caption_config())

    def copy(unit: dict, keys: dict[str, str]) -> set[str]:
        written = set()
        for raw in read_unit(source, unit, UnitStats(source.name, unit["id"]), s3, need_caption=False):
            if raw.key in keys:
                uio.write_bytes(uio.join(image_dir, f"{keys[raw.key]}.jpg"), as_jpeg(raw.image), s3)
                written.add(keys[raw.key])
        return written

    copied: set[str] = set()
    if todo:
        with ThreadPoolExecutor(COPY_THREADS) as pool:
            jobs = [pool.submit(copy, u, todo[h]) for u in iter_units(source, s3)
                    if (h := source_unit_hash(source.name, u["id"])) in todo]
            copied = set().union(*(j.result() for j in jobs))
    missing = {i for keys in todo.values() for i in keys.values()} - copied
    if missing:  # the input changed under the job: say so; the annotations leave those images out
        say(f"[curate] write: {len(missing):,} survivors' images could not be read from the input again")
    stale = present - ids
    for image_id in sorted(stale):
        uio.remove_prefix(uio.join(image_dir, f"{image_id}.jpg"), s3, exact=True)
    return {"copied": len(copied), "already_there": len(ids & present), "missing": sorted(missing),
            "removed_stale": len(stale)}


def write_align(cfg: CurateConfig, kept: dict[str, str], unit_of: dict[str, str], say=print) -> dict:
    """Phase 3's output: images first, then `filter_cap.json` (a reader never sees a caption without its image)."""
    ids = image_ids(kept)
    wanted: dict[str, dict[str, str]] = {}
    for key, image_id in ids.items():
        wanted.setdefault(unit_of[key], {})[key] = image_id
    images = copy_images(cfg, wanted, say)
    missing = set(images["missing"])
    annotations = [{"image_id": ids[k], "caption": kept[k]} for k in sorted(kept, key=ids.get)
                   if ids[k] not in missing]
    uio.write_bytes(uio.join(cfg.output, ANNOTATIONS), json.dumps({"annotations": annotations}, indent=1).encode(),
                    cfg.s3)
    return {"annotations": len(annotations), "images": images}


# -- the job ---------------------------------------------------------------------------------------
def clear_output(output: str, s3: uio.S3Options | None = None) -> int:
    """Delete what a curation wrote under `output` besides phase 1 (the caption job clears its own)."""
    n = sum(uio.remove_prefix(uio.join(output, sub) + "/", s3) for sub in (FIX_DIR, IMAGE_DIR))
    for name in (ANNOTATIONS, REPORT):
        n += uio.remove_prefix(uio.join(output, name), s3, exact=True)
    return n


def run(cfg: CurateConfig, say=print) -> dict:
    """Curate `cfg.input` into a cc_sbu_align set at `cfg.output` on the connected Ray cluster; returns
    the report (also written to `report.json`)."""
    if not cfg.output:
        raise ValueError("output is required (a local directory or an s3:// prefix)")
    fixer = Fixer(cfg.fixer) if cfg.fixer.url else None  # a missing API key fails here, before generating
    t0 = time.time()
    if cfg.overwrite:
        say(f"[curate] overwrite: removed {clear_output(cfg.output, cfg.s3):,} objects of a previous curation")
    gen = caption.run(cfg.caption_config(), say=lambda line: say(line.replace("[caption]", "[curate] generate:", 1)))
    units = generated(cfg.output, cfg.s3)
    rows = {r["key"]: r for unit_rows in units.values() for r in unit_rows}
    continued = sum(int(r.get(caption.CONTINUED) or 0) > 0 for r in rows.values())
    say(f"[curate] generate: {len(rows):,} descriptions in {len(units):,} units, {continued:,} continued "
        f"(first answer under {cfg.min_tokens} tokens)")

    fixes, fix_counts = fix_all(cfg, fixer, units, say) if fixer else (None, None)
    if fix_counts:
        say(f"[curate] fix: {fix_counts['fixed']:,} fixed ({fix_counts['asked']:,} asked this run, "
            f"{fix_counts['reused']:,} fixed before), {fix_counts['failed']:,} failed "
            f"({cfg.fixer.on_failure} those)")
    kept, filtered = select({k: r["caption"] for k, r in rows.items()}, fixes, cfg.fixer.on_failure, cfg.rules)
    say(f"[curate] filter: {filtered['kept']:,} of {filtered['total']:,} kept; dropped: "
        + (", ".join(f"{n:,} {r}" for r, n in filtered["by_reason"].items() if n) or "none"))
    unit_of = {r["key"]: u for u, unit_rows in units.items() for r in unit_rows}
    written = write_align(cfg, kept, unit_of, say)
    say(f"[curate] write: {written['annotations']:,} pairs in {uio.join(cfg.output, ANNOTATIONS)} "
        f"({written['images']['copied']:,} images copied)")
    report = {
        "input": cfg.input, "output": cfg.output, "model": gen["model"],
        "generate": {"descriptions": len(rows), "units": len(units), "continued": continued,
                     "min_tokens": cfg.min_tokens, "described_this_run": gen["images_captioned"],
                     "units_skipped_as_done": gen["units_skipped_as_done"], "bad_images": gen["errors"],
                     "generated_tokens_this_run": gen["generated_tokens"]},
        "fix": fix_counts, "filter": filtered, "written": written, "wall_seconds": round(time.time() - t0, 2)}
    uio.write_bytes(uio.join(cfg.output, REPORT), json.dumps(report, indent=1).encode(), cfg.s3)
    return report


def format_report(r: dict) -> str:
    g, f = r["generate"], r["filter"]
    lines = [f"[curate] done: {r['written']['annotations']:,} of {g['descriptions']:,} descriptions kept in "
             f"{r['output']} ({r['wall_seconds']:.1f}s)",
             f"  generate: {g['described_this_run']:,} images described this run, {g['continued']:,} continued, "
             f"{sum(g['bad_images'].values()):,} bad images skipped"]
    if r["fix"]:
        x = r["fix"]
        why = ", ".join(f"{n:,} {e}" for e, n in x["failed_by_error"].items())
        lines.append(f"  fix: {x['fixed']:,} fixed, {x['failed']:,} failed{f' ({why})' if why else ''}; "
                     f"{x['requests']:,} requests this run")
    lines.append("  dropped:" + "".join(f"\n    {n:>8,}  {reason}" for reason, n in f["by_reason"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .jobcli import JobCLI

    cli = JobCLI("curate", "Stage-2 data curation: describe, fix, filter -> cc_sbu_align", "curate_vicuna7b.yaml",
                 "min_tokens=80 fixer.concurrency=16")
    cli.flag("--input", help="images: prefix, webdataset shards, parquet, or cc_sbu_align dir (local or s3://)")
    cli.flag("--output", help="the cc_sbu_align set: local directory or s3:// prefix")
    cli.flag("--weights", action="append", help="MiniGPT-4 .pth (repeat to load several, in order)")
    cli.flag("--preset", help="model preset (tiny, tiny_demo, vicuna7b, vicuna13b, llama2_7b)")
    cli.flag("--fixer-url", help="OpenAI-compatible server that fixes the descriptions (optional)")
    cli.flag("--fixer-model", help="the model the fixer serves")
    cli.flag("--limit", type=int, help="describe at most N images (dry run)")
    cli.flag("--overwrite", action="store_true", help="start over instead of resuming")
    args = cli.parse(argv)

    try:
        data = cli.load(args, input=args.input, output=args.output, limit=args.limit)
        fixer = {"url": args.fixer_url, "model": args.fixer_model}
        data["fixer"] = {**data.get("fixer", {}), **{k: v for k, v in fixer.items() if v is not None}}
        data = apply_overrides(data, args.overrides)
        if not data.get("input"):
            cli.start_heldout(data, "outputs/curate", "tiny model, ")
            if not args.weights and not data.get("weights"):
                print("[curate] random tiny weights: the descriptions are noise and the filters drop them. Train "
                      "first (make demo) and pass --weights outputs/demo/pretrain/minigpt4_stage1.pth "
                      "--preset tiny_demo")
        cfg = cli.config(CurateConfig, data)
        caption_cfg = cfg.caption_config()
        caption_cfg.model_config()
        cfg.format = caption.source_config(caption_cfg).format  # an unreadable or unknown input fails here
    except (ConfigError, ValueError, OSError) as e:
        return cli.error(e)

    return cli.run(lambda: format_report(run(cfg)), args.address)
