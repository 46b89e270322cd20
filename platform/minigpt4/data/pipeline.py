"""The Ray Data pipeline both training stages and captioning read.

    units (one lazy listing task)  ->  read + decode + preprocess + tokenize (parallel CPU tasks)  ->  rows

`build_dataset` returns a lazy `ray.data.Dataset` of rows with columns `key`, `source`, `caption`,
`pixel_values` (3 x S x S float32; a `features` source has `image_feats` (Q x D) instead) and, for the
training tasks, ragged `input_ids` / `labels` plus `prompt_len`. Ray Train splits it across workers
(`get_dataset_shard`), which read it with `iter_torch_batches(collate_fn=TrainingCollator(pad_id))`.

Nothing is listed or read when the dataset is built: the units are enumerated inside a single
zero-CPU read task that yields them one block each, so the listing streams into the processing tasks
while it runs and the driver never holds it.

Bad samples never stop the job. Each unit writes, when it finishes, `<errors>/_stats/<id>.json`
(delivered count, errors by reason) and, when it had errors, `<errors>/<source>/<id>.parquet` (key,
reason, detail); file names derive from the unit, so a re-executed task overwrites its own files
instead of adding duplicates. `summarize(errors)` folds them into a `DataReport` at the end.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import random
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
from ray.data.collate_fn import NumpyBatchCollateFn

from . import io as uio
from .process import Processor, ProcessConfig, stack_rows
from .sources import SampleError, SourceConfig, UnitStats, iter_units, read_unit

log = logging.getLogger(__name__)
STATS_DIR = "_stats"


def unit_hash(unit_id: str) -> str:
    return hashlib.sha1(unit_id.encode()).hexdigest()[:20]


def source_unit_hash(source_name: str, unit_id: str) -> str:
    """The name of everything written per unit (error and stats files, caption parts and markers)."""
    return unit_hash(f"{source_name}|{unit_id}")


# -- the lazy unit listing ----------------------------------------------------------------------
def _unit_datasource(source: SourceConfig, s3: uio.S3Options | None, shuffle_seed: int | str | None,
                     start_epoch: int, epochs: int | None, board=None, skip_units: frozenset[str] = frozenset()):
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class UnitListing(Datasource):
        def get_name(self) -> str:
            return f"ListUnits[{source.name}]"

        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            def read():
                import pyarrow as pa

                position = None
                if board is not None:  # read when the execution starts: a resumed run's position
                    import ray

                    position = ray.get(board.get.remote(source.name))
                for unit in list_epochs(source, s3, shuffle_seed, start_epoch, epochs, position):
                    if skip_units and source_unit_hash(source.name, unit["id"]) in skip_units:
                        continue
                    yield pa.table({"unit": [json.dumps(unit)]})

            return [ReadTask(read, BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None))]

    return UnitListing()


def list_epochs(source: SourceConfig, s3: uio.S3Options | None, shuffle_seed: int | str | None, start_epoch: int = 0,
                epochs: int | None = 1, position: dict | None = None) -> Iterator[dict]:
    """Units of `epochs` epochs (endless when None) from `start_epoch`, each epoch in its own order
    (seed `shuffle_seed.epoch`). Every unit gets `epoch`, `index` (its place in the epoch) and `last`
    (last of its epoch). `position` (from `PositionTracker.position()`) moves the start to its epoch
    and skips the units before `low` and those in `done`."""
    low, done = (start_epoch, 0), set()
    if position:
        low, done = tuple(position["low"]), {(e, i) for e, i, *_ in position.get("done", [])}
    first = low[0]
    epoch = first
    while epochs is None or epoch < first + epochs:
        order_seed = None if shuffle_seed is None else f"{shuffle_seed}.{epoch}"
        pending = None  # one unit of lookahead: the last unit of an epoch is marked as such
        for index, unit in enumerate(iter_units(source, s3, order_seed)):
            if pending is not None and not _skipped(epoch, pending[0], low, done):
                yield {**pending[1], "epoch": epoch, "index": pending[0], "last": False}
            pending = (index, unit)
        if pending is None:
            raise ValueError(f"source {source.name!r} has no units ({source.format} at {source.path})")
        if not _skipped(epoch, pending[0], low, done):
            yield {**pending[1], "epoch": epoch, "index": pending[0], "last": True}
        epoch += 1


def _skipped(epoch: int, index: int, low: tuple, done: set) -> bool:
    return (epoch, index) < low or (epoch, index) in done


# -- read + process one unit at a time ---------------------------------------------------------
def _write_unit_report(stats: UnitStats, errors: str, s3: uio.S3Options | None) -> None:
    h = source_unit_hash(stats.source, stats.unit)
    counts: dict[str, int] = {}
    for _, reason, _ in stats.errors:
        counts[reason] = counts.get(reason, 0) + 1
    if stats.errors:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"source": [stats.source] * len(stats.errors), "unit": [stats.unit] * len(stats.errors),
                          "key": [e[0] for e in stats.errors], "reason": [e[1] for e in stats.errors],
                          "detail": [e[2] for e in stats.errors]})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        uio.write_bytes(uio.join(errors, stats.source, f"{h}.parquet"), buf.getvalue(), s3)
    report = {"source": stats.source, "unit": stats.unit, "delivered": stats.delivered, "errors": counts}
    # written last: a stats file means the unit's error file (if any) is complete
    uio.write_bytes(uio.join(errors, STATS_DIR, f"{h}.json"), json.dumps(report).encode(), s3)


# -- the decoded-unit cache ------------------------------------------------------------------------
# reasons that may be transient (the object store, the network): a unit read with one is not cached
UNCACHED_REASONS = frozenset({"missing", "unreadable", "truncated_tar", "unreadable_parquet"})


def _check_cacheable(process: ProcessConfig) -> None:
    if process.augment != "resize":
        raise ValueError("data.cache needs process.augment 'resize': random crops differ every epoch")


class UnitCache:
    """Node-local cache of decoded units, for small datasets trained for many epochs (the demo's
    8,000 scenes x 20 epochs; a 3.5k-sample stage 2). The first read of a unit on a node keeps its
    samples' keys, captions and resized uint8 pixels (3 KB a sample at 32 px, 150 KB at 224 px) plus
    its bad-sample records in one `.npz`; later epochs on that node load it instead of reading the
    object store, untarring and decoding again. Only the epoch-independent half of processing is
    kept (`Processor.decode`): normalization, stage 2's per-epoch instruction draw and tokenization
    still run per epoch, so rows are identical with or without the cache. Random crops change every
    epoch, so `augment: random_resized_crop` cannot use it.

    Files are named by a hash of the source, the unit and the decode settings, written atomically
    (temp file + rename) and read with `allow_pickle=False`. A unit read with a possibly transient
    error (`UNCACHED_REASONS`) is not kept. The job gives each run its own directory and removes it
    at the end (`train.run`)."""

    def __init__(self, root: str, source: SourceConfig, process: ProcessConfig):
        import os

        _check_cacheable(process)
        if source.format == "features":
            raise ValueError(f"source {source.name!r} holds features: already decoded, nothing to cache")
        self.root = root
        os.makedirs(root, exist_ok=True)
        ident = {"source": {k: v for k, v in asdict(source).items() if k != "ratio"},
                 "decode": [process.image_size, process.max_pixels, process.max_aspect,
                            process.fast_decode, process.clean_captions, process.max_words, process.task]}
        self._ident = json.dumps(ident, sort_keys=True, default=str)

    def path(self, unit: dict) -> str:
        import os

        return os.path.join(self.root, unit_hash(self._ident + "|" + unit["id"]) + ".npz")

    def load(self, unit: dict) -> tuple[list[tuple[str, str, np.ndarray]], list[tuple[str, str, str]]] | None:
        """(samples as (key, caption, pixels), errors as (key, reason, detail)) or None on a miss."""
        import zipfile

        try:
            with np.load(self.path(unit), allow_pickle=False) as z:
                meta = json.loads(z["meta"].tobytes().decode())
                pixels = z["pixels"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # a miss or a damaged file:
            return None  # read the source (and store it again)
        return list(zip(meta["keys"], meta["captions"], pixels)), [tuple(e) for e in meta["errors"]]

    def store(self, unit: dict, samples: list[tuple[str, str, np.ndarray]], errors: list[tuple[str, str, str]]) -> bool:
        import os
        import tempfile

        if any(reason in UNCACHED_REASONS for _, reason, _ in errors):
            return False
        meta = {"keys": [k for k, _, _ in samples], "captions": [c for _, c, _ in samples],
                "errors": [list(e) for e in errors]}
        pixels = np.stack([p for _, _, p in samples]) if samples else np.zeros((0, 0, 0, 3), np.uint8)
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, pixels=pixels, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
            os.replace(tmp, self.path(unit))
        except OSError as e:  # a full disk costs speed, not the job
            log.warning("unit cache: could not keep %s (%s)", unit["id"], e)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            return False
        return True


def remove_on_every_node(path: str, timeout: float = 60.0) -> None:
    """Delete a node-local directory (a run's unit cache) on every live node; best effort."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0, max_retries=0)
    def rm(p: str) -> None:
        import shutil

        shutil.rmtree(p, ignore_errors=True)

    refs = [rm.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(path)
            for n in ray.nodes() if n.get("Alive")]
    try:
        ray.get(refs, timeout=timeout)
    except Exception as e:  # a node that left meanwhile: its disk goes with it
        log.warning("unit cache: could not remove %s on every node (%s)", path, e)


def _decoded_samples(source: SourceConfig, unit: dict, stats: UnitStats, s3: uio.S3Options | None,
                     processor: Processor, cache: UnitCache | None,
                     order: str | None = None) -> Iterator[tuple[str, str, np.ndarray]]:
    """The unit's samples after `Processor.decode`, from the cache when it has them (its errors then
    go to `stats` as recorded), else from the source (kept in the cache when there is one).

    order: a seed for the order of a cached unit's samples. A unit read from the source streams in
    file order; one loaded whole from the cache is permuted, so that units larger than the consumer's
    shuffle buffer do not put the same samples in the same batches every epoch."""
    cached = cache.load(unit) if cache else None
    if cached is not None:
        samples, errors = cached
        stats.errors.extend(errors)
        if order is not None:
            random.Random(order).shuffle(samples)
        yield from samples
        return
    kept: list = []
    for sample in _each_sample(source, unit, stats, s3, processor, processor.decode):
        if cache:
            kept.append(sample)
        yield sample
    if cache:
        cache.store(unit, kept, stats.errors)


def _each_sample(source: SourceConfig, unit: dict, stats: UnitStats, s3: uio.S3Options | None,
                 processor: Processor, fn: Callable) -> Iterator:
    """`fn(raw)` for each sample the unit reads; a `SampleError` goes to `stats` and skips the sample."""
    for raw in read_unit(source, unit, stats, s3, need_caption=processor.cfg.needs_caption):
        try:
            yield fn(raw)
        except SampleError as e:
            stats.error(raw.key, e.reason, str(e))


def process_units(batch: dict, *, source: SourceConfig, process: ProcessConfig, errors: str | None,
                  s3: uio.S3Options | None, epoch: int, rows_per_block: int, markers: bool = False,
                  cache_dir: str | None = None, rows_seed: int | str | None = None) -> Iterator[dict]:
    """Ray Data UDF: each input row is a unit; yields blocks of processed rows as they fill.

    cache_dir: keep decoded units there and read them back in later epochs (`UnitCache`).
    rows_seed: permute each cached unit's samples, per epoch, from this seed (`_decoded_samples`).

    markers: add the unit's position to every row (`unit` = its `source_unit_hash`, `unit_epoch`,
    `unit_index`, `unit_row` = the row's ordinal in the unit; on its last row `unit_rows` = rows
    delivered and `unit_last` = last of its epoch, -1 / False before) so that a consumer can tell when
    a unit is fully consumed (`PositionTracker`, the caption job's committer). A unit with no good
    sample then yields one placeholder row (`unit_rows` 0, no pixels worth reading) that consumers drop. The unit's error report is written
    before its last rows leave, so a consumer that has seen a whole unit can count on its report."""
    processor = Processor(process)
    cache = UnitCache(cache_dir, source, process) if cache_dir else None
    for unit_json in batch["unit"]:
        unit = json.loads(unit_json)
        unit_epoch = unit.get("epoch", epoch)
        stats = UnitStats(source.name, unit["id"])
        uhash = source_unit_hash(source.name, unit["id"])
        rows: list[dict] = []
        for row in _unit_rows(source, unit, stats, s3, processor, cache, unit_epoch, rows_seed):
            row["source"] = source.name
            if markers:
                row.update(unit=uhash, unit_epoch=unit_epoch, unit_index=unit["index"], unit_row=stats.delivered,
                           unit_rows=-1, unit_last=False)
            rows.append(row)
            stats.delivered += 1
            if len(rows) > rows_per_block:  # one row held back: the unit's last row carries its totals
                yield stack_rows(rows[:-1])
                rows = rows[-1:]
        if markers:
            if rows:
                rows[-1].update(unit_rows=stats.delivered, unit_last=unit["last"])
            else:
                rows.append(_placeholder(process, source, unit, uhash, unit_epoch))
        if errors:
            _write_unit_report(stats, errors, s3)
        if rows:
            yield stack_rows(rows)
        for key, reason, detail in stats.errors[:3]:
            log.warning("skipped %s (%s): %s", key, reason, detail)
        if len(stats.errors) > 3:
            log.warning("... and %d more bad samples in %s", len(stats.errors) - 3, unit["id"])


def _unit_rows(source: SourceConfig, unit: dict, stats: UnitStats, s3: uio.S3Options | None, processor: Processor,
               cache: UnitCache | None, epoch: int, rows_seed: int | str | None = None) -> Iterator[dict]:
    # features: nothing to decode; crops vary by epoch: decode and crop in one go
    if source.format == "features" or processor.cfg.augment != "resize":
        yield from _each_sample(source, unit, stats, s3, processor, lambda raw: processor(raw, epoch))
        return
    order = None if rows_seed is None else f"{rows_seed}.{epoch}:{unit['id']}"
    for key, caption, pixels in _decoded_samples(source, unit, stats, s3, processor, cache, order):
        yield processor.finish(key, caption, pixels, epoch)


def _placeholder(process: ProcessConfig, source: SourceConfig, unit: dict, uhash: str, unit_epoch: int) -> dict:
    # the image column as real rows have it (blocks of one dataset share one schema)
    image = ({"image_feats": np.zeros(unit["shape"], unit["dtype"])} if source.format == "features" else
             {"pixel_values": np.zeros((3, process.image_size, process.image_size), np.float32)})
    row = {"key": "", **image, "caption": ""}
    if process.needs_caption:
        row.update(input_ids=np.zeros(0, np.int64), labels=np.zeros(0, np.int64), prompt_len=0)
    return row | {"source": source.name, "unit": uhash, "unit_epoch": unit_epoch, "unit_index": unit["index"],
                  "unit_row": -1, "unit_rows": 0, "unit_last": unit["last"]}


def build_dataset(source: SourceConfig, process: ProcessConfig, *, errors: str | None = None,
                  s3: uio.S3Options | None = None, shuffle_seed: int | None = None, epoch: int = 0,
                  epochs: int = 1, board=None, rows_per_block: int = 64, num_cpus: float = 1.0,
                  concurrency: int | None = None, markers: bool | None = None,
                  skip_units: frozenset[str] = frozenset(), cache_dir: str | None = None):
    """The lazy Ray Dataset of processed rows of one source (see the module docstring).

    errors: where skipped samples are written (local dir or s3:// prefix); None only logs them.
    shuffle_seed: shuffle unit order (windows of 1,000; a different order each epoch), and the
        samples of a unit served from the cache (a different order each epoch) — otherwise
        sample-level shuffling is the consumer's `local_shuffle_buffer_size`.
    epoch, epochs: the first epoch and how many one execution lists (training: one per execution,
        so each epoch starts where the board says). The epoch varies unit order, crops and
        instruction choices, reproducibly. Finite: Ray hands the listing's blocks on when it ends.
    board: a `PositionBoard` actor: the rows then carry unit markers for `PositionTracker`, and the
        listing starts at the position the board holds for this source when the execution starts.
    markers: unit markers without a board (the caption job commits per unit); default: with a board.
    skip_units: `source_unit_hash`es the listing leaves out (units a resumed job already finished).
    cache_dir: node-local directory for the decoded-unit cache (`UnitCache`); None: read every epoch.
        Ignored for a `features` source: its files are already decoded (one read, no image work).
    """
    import ray.data

    if epochs is None or epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if source.format == "features":
        cache_dir = None
    if cache_dir:
        _check_cacheable(process)

    listing = ray.data.read_datasource(_unit_datasource(source, s3, shuffle_seed, epoch, epochs, board,
                                                        frozenset(skip_units)), num_cpus=0,
                                       override_num_blocks=1)  # 1 task; stops Ray splitting it ~200 ways
    # Ray coalesces the read task's small blocks: re-split (streaming) so each unit is its own task
    listing = listing.repartition(target_num_rows_per_block=1)
    kwargs = dict(source=source, process=process, errors=errors, s3=s3, epoch=epoch, rows_per_block=rows_per_block,
                  markers=board is not None if markers is None else markers, cache_dir=cache_dir,
                  rows_seed=shuffle_seed)
    return listing.map_batches(process_units, batch_size=1, fn_kwargs=kwargs, num_cpus=num_cpus,
                               concurrency=concurrency)


@dataclass
class DataConfig:
    """The `data:` section of a job config. `process.task`, image size, image tokens and template are
    filled in by the job from its stage and model (`ProcessConfig.for_model`)."""

    sources: list[SourceConfig] = field(default_factory=list)
    process: ProcessConfig = field(default_factory=ProcessConfig)
    errors: str | None = None  # default: beside the job's output (<output>/data_errors)
    s3: uio.S3Options = field(default_factory=uio.S3Options)
    shuffle_seed: int | None = 42
    num_cpus: float = 1.0  # per processing task
    concurrency: int | None = None  # max processing tasks at once (None: as many as CPUs allow)
    rows_per_block: int = 64
    epochs_per_pass: int = 1  # epochs one Ray Data execution lists (small sets: fewer pipeline restarts)
    # keep decoded units on each node's disk after their first epoch (small sets, many epochs; see
    # UnitCache): the job puts each run's cache under `cache_dir` (default: the system temp dir)
    cache: bool = False
    cache_dir: str | None = None

    def __post_init__(self):
        if self.epochs_per_pass < 1:
            raise ValueError(f"data.epochs_per_pass must be >= 1, got {self.epochs_per_pass}")
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"source names must be unique (set `name:`), repeated: {', '.join(dup)}")

    def datasets(self, process: ProcessConfig | None = None, epoch: int = 0, epochs: int = 1,
                 board=None, cache_dir: str | None = None) -> dict:
        """One lazy dataset per source, by source name (see `build_dataset` for epochs, board and the
        cache; `cache_dir` is this run's cache directory, used when `cache` is on)."""
        if not self.sources:
            raise ValueError("no data sources configured (data.sources is empty)")
        if self.cache and not cache_dir:
            raise ValueError("data.cache is on but no cache directory was given")
        return {s.name: build_dataset(s, process or self.process, errors=self.errors, s3=self.s3,
                                      shuffle_seed=self.shuffle_seed, epoch=epoch, epochs=epochs, board=board,
                                      rows_per_block=self.rows_per_block, num_cpus=self.num_cpus,
                                      concurrency=self.concurrency,
                                      cache_dir=cache_dir if self.cache else None)
                for s in self.sources}

    @property
    def ratios(self) -> dict[str, float]:
        return {s.name: s.ratio for s in self.sources}


# -- the end-of-job report ------------------------------------------------------------------------
@dataclass
class DataReport:
    units: int = 0
    delivered: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    by_source: dict[str, dict] = field(default_factory=dict)

    @property
    def skipped(self) -> int:
        return sum(self.errors.values())

    def format(self) -> str:
        lines = [f"data: {self.delivered:,} samples delivered, {self.skipped:,} skipped, from {self.units:,} units"]
        for name, s in sorted(self.by_source.items()):
            lines.append(f"  {name}: {s['delivered']:,} delivered, {sum(s['errors'].values()):,} skipped")
        for reason, n in sorted(self.errors.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  skipped {n:>8,}  {reason}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self) | {"skipped": self.skipped}


def summarize(errors: str, s3: uio.S3Options | None = None) -> DataReport:
    """Fold the per-unit stats files under `errors` into one report."""
    rep = DataReport()
    try:
        objs = list(uio.iter_objects(uio.join(errors, STATS_DIR) + "/", (".json",), s3))
    except uio.ObjectError:
        return rep
    for uri, _ in objs:
        s = json.loads(uio.read_bytes(uri, s3))
        rep.units += 1
        rep.delivered += s["delivered"]
        src = rep.by_source.setdefault(s["source"], {"delivered": 0, "errors": {}})
        src["delivered"] += s["delivered"]
        for reason, n in s["errors"].items():
            rep.errors[reason] = rep.errors.get(reason, 0) + n
            src["errors"][reason] = src["errors"].get(reason, 0) + n
    return rep


def read_errors(errors: str, s3: uio.S3Options | None = None) -> list[dict]:
    """Every skipped sample recorded under `errors`: dicts with source, unit, key, reason, detail."""
    import pyarrow.parquet as pq

    out: list[dict] = []
    try:
        objs = list(uio.iter_objects(errors if errors.endswith("/") or not uio.is_s3(errors) else errors + "/",
                                     (".parquet",), s3))
    except uio.ObjectError:
        return out
    for uri, _ in objs:
        out += pq.read_table(io.BytesIO(uio.read_bytes(uri, s3))).to_pylist()
    return out


# -- consumers ----------------------------------------------------------------------------------
class TrainingCollator(NumpyBatchCollateFn):
    """`iter_torch_batches(collate_fn=TrainingCollator(pad_id))`: a numpy batch of rows -> tensors
    (pixel_values or, from a features source, image_feats; input_ids, labels, attention_mask) padded as
    the original pads, plus the keys.

    Length bucketing (`batch_size` given; the stream is read `buckets` batches at a time): the rows are
    sorted by token count and cut into batches of `batch_size`, returned as `{"parts": [batch, ...]}`
    in a seeded random order. A batch pads to its longest row, so rows of similar length padded
    together waste fewer positions (stage-1 captions run from a few tokens to max_txt_len). Only full
    batches are made: the rows of a last, short read are dropped as `drop_last` drops them, and every
    row's unit marker still reaches the position tracker (in the first part)."""

    def __init__(self, pad_token_id: int, pad_to: int | None = None, batch_size: int | None = None,
                 seed: int = 0):
        self.pad_token_id, self.pad_to, self.batch_size = pad_token_id, pad_to, batch_size
        self._rng = random.Random(seed)

    def __call__(self, batch: dict) -> dict:
        if self.batch_size is None:
            return self._collate(batch)
        markers = _unit_markers(batch) if "unit_rows" in batch else []
        real = np.flatnonzero(batch["unit_rows"] != 0) if markers else np.arange(len(batch["key"]))
        batch = {k: v[real] for k, v in batch.items()}  # placeholders carry only a marker
        chunks = length_buckets([len(ids) for ids in batch["input_ids"]], self.batch_size, self._rng)
        parts = [self._collate({k: v[idx] for k, v in batch.items()}) for idx in chunks]
        # markers no part reports: placeholders and the rows a short read drops
        taken = set(real[np.concatenate(chunks)].tolist()) if chunks else set()
        unreported = [u for i, u in enumerate(markers) if i not in taken]
        if unreported:
            if not parts:
                return {"parts": [{"units": unreported, "empty": True}]}
            parts[0]["units"] = unreported + parts[0]["units"]
        return {"parts": parts}

    def _collate(self, batch: dict) -> dict:
        import torch

        from ..prompts import collate_training

        units = None
        if "unit_rows" in batch:  # position markers (training): every row reported, placeholders dropped
            units = _unit_markers(batch)
            real = np.flatnonzero(batch["unit_rows"] != 0)
            if len(real) < len(units):
                batch = {k: v[real] for k, v in batch.items()}
            if not len(real):
                return {"units": units, "empty": True}
        samples = [{"input_ids": ids, "labels": lab, "prompt_len": int(p)}
                   for ids, lab, p in zip(batch["input_ids"], batch["labels"], batch["prompt_len"])]
        out = collate_training(samples, self.pad_token_id, self.pad_to)
        name = "image_feats" if "image_feats" in batch else "pixel_values"
        images = batch[name]  # read-only when it comes zero-copy from the object store
        out[name] = torch.from_numpy(images if images.flags.writeable else images.copy())
        out["keys"] = [str(k) for k in batch["key"]]
        if units is not None:
            out["units"] = units
        return out


def length_buckets(lengths, batch_size: int, rng: random.Random | None = None) -> list[np.ndarray]:
    """Length bucketing: the row indices of full batches of `batch_size`, rows sorted by length (stable),
    the batches in `rng`'s random order (sorted order without one); rows past the last full batch are
    left out. What `TrainingCollator` trains on, and what bench/train_step.py times."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    n = len(order) // batch_size * batch_size
    chunks = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if rng is not None:
        rng.shuffle(chunks)
    return chunks


def _unit_markers(batch: dict) -> list[tuple]:
    """(epoch, index, unit_rows, unit_last) per row of a batch with position markers."""
    return list(zip(batch["unit_epoch"].tolist(), batch["unit_index"].tolist(), batch["unit_rows"].tolist(),
                    batch["unit_last"].tolist()))


class Mixture:
    """Batches drawn from several streams by weight, as MiniGPT-4's MultiIterLoader draws them: each
    batch comes whole from one source picked with probability ratio / sum(ratios), so sample
    frequencies follow the ratios. A stream that runs out starts its next epoch (`open(name, epoch)`
    is called again); reproducible for a seed. Infinite: the consumer decides when to stop."""

    def __init__(self, open_stream: Callable[[str, int], Iterable], ratios: dict[str, float], seed: int = 42,
                 epochs: dict[str, int] | None = None, on_epoch_end: Callable[[str, int], None] | None = None,
                 epochs_per_stream: int = 1):
        if not ratios or any(r <= 0 for r in ratios.values()):
            raise ValueError(f"mixture ratios must be positive, got {ratios}")
        self.open_stream, self.names = open_stream, sorted(ratios)
        self.weights = [ratios[n] for n in self.names]
        self.rng = random.Random(seed)
        self.epochs = {n: (epochs or {}).get(n, 0) for n in self.names}
        self.on_epoch_end, self.epochs_per_stream = on_epoch_end, epochs_per_stream
        self._its: dict[str, Iterator] = {}

    def __iter__(self):
        return self

    def __next__(self):
        name = self.rng.choices(self.names, self.weights)[0]
        for attempt in range(2):
            it = self._its.get(name)
            if it is None:
                it = self._its[name] = iter(self.open_stream(name, self.epochs[name]))
            try:
                return name, next(it)
            except StopIteration:
                self._its.pop(name)
                self.epochs[name] += self.epochs_per_stream
                if self.on_epoch_end:  # the last epoch the stream held
                    self.on_epoch_end(name, self.epochs[name] - 1)
        raise RuntimeError(f"source {name!r} yields no batches (empty, or every sample was skipped)")


# -- where a stream is: exact resume -----------------------------------------------------------------
class PositionTracker:
    """Which units of one source's stream are fully consumed, across all training workers.

    Each worker `consume`s the unit markers of the batches it trains on; at a checkpoint every rank
    passes its `take_delta()` to an all-gather and `merge`s all of them (so every rank holds the same
    state). A unit is done when the rows consumed from it, summed over workers, reach the count its
    last row announced. `position()` = the first unit not done (`low`, as (epoch, index)) plus the
    done units past it: a resumed stream starts there and skips those, so no sample is lost and only
    the units that were in flight at the checkpoint are read again."""

    def __init__(self, position: dict | None = None):
        position = position or {"low": [0, 0], "done": []}
        self.low = tuple(position["low"])
        self.done = {(e, i): bool(last) for e, i, last in position["done"]}
        self.partial: dict[tuple, list] = {}  # (epoch, index) -> [rows consumed, rows total or None, last]
        self._delta: dict[tuple, list] = {}

    def end_epoch(self, epoch: int) -> None:
        """This worker's stream of `epoch` ended: every unit of it was dispatched and consumed (the
        rows an equal split or `drop_last` dropped included)."""
        self._delta.setdefault("ended", [0, None, False])[0] = max(epoch + 1, self._delta.get("ended", [0])[0])

    def consume(self, units) -> None:
        """units: (epoch, index, unit_rows, unit_last) per row, as `TrainingCollator` returns them."""
        for e, i, rows, last in units:
            d = self._delta.setdefault((e, i), [0, None, False])
            if rows != 0:  # a placeholder announces an empty unit without being a row
                d[0] += 1
            if rows >= 0:
                d[1], d[2] = rows, bool(last)

    def take_delta(self) -> dict:
        delta, self._delta = self._delta, {}
        return delta

    def merge(self, deltas: list[dict]) -> None:
        for delta in deltas:
            for u, (n, total, last) in delta.items():
                if u == "ended":  # epochs before n are over
                    if self.low[0] < n:
                        self.low = (n, 0)
                    continue
                p = self.partial.setdefault(u, [0, None, False])
                p[0] += n
                if total is not None:
                    p[1], p[2] = total, last
        for u, (n, total, last) in list(self.partial.items()):
            if u < self.low:
                del self.partial[u]
            elif total is not None and n >= total:
                del self.partial[u]
                self.done[u] = last
        self.done = {u: last for u, last in self.done.items() if u >= self.low}
        while self.low in self.done:  # advance over the done prefix
            last = self.done.pop(self.low)
            self.low = (self.low[0] + 1, 0) if last else (self.low[0], self.low[1] + 1)

    def position(self) -> dict:
        return {"low": list(self.low), "done": [[e, i, last] for (e, i), last in sorted(self.done.items())]}


def position_board():
    """A `PositionBoard` actor: training rank 0 posts each source's resume position there before
    reading, and the listing task reads it when an execution starts (a run's first, and each one
    after a worker failure). It lives on the driver's node: a worker node that dies (a reclaimed
    spot instance) must not take it along, or no restarted run could find where to resume."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)

    @ray.remote(num_cpus=0, scheduling_strategy=here)
    class PositionBoard:
        def __init__(self):
            self.positions: dict[str, dict] = {}

        def set(self, name: str, position: dict | None) -> None:
            self.positions[name] = position

        def get(self, name: str) -> dict | None:
            return self.positions.get(name)

    return PositionBoard.remote()
