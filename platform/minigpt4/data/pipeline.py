"""The Ray Data pipeline both training stages and captioning read.

    units (one lazy listing task)  ->  read + decode + preprocess + tokenize (parallel CPU tasks)  ->  rows

`build_dataset` returns a lazy `ray.data.Dataset` of rows with columns `key`, `source`, `caption`,
`pixel_values` (3 x S x S float32) and, for the training tasks, ragged `input_ids` / `labels` plus
`prompt_len`. Ray Train splits it across workers (`get_dataset_shard`), which read it with
`iter_torch_batches(collate_fn=TrainingCollator(pad_id))`.

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


# -- the lazy unit listing ----------------------------------------------------------------------
def _unit_datasource(source: SourceConfig, s3: uio.S3Options | None, shuffle_seed: int | str | None):
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

                for unit in iter_units(source, s3, shuffle_seed):
                    yield pa.table({"unit": [json.dumps(unit)]})

            return [ReadTask(read, BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None))]

    return UnitListing()


# -- read + process one unit at a time ---------------------------------------------------------
def _write_unit_report(stats: UnitStats, errors: str, s3: uio.S3Options | None) -> None:
    h = unit_hash(f"{stats.source}|{stats.unit}")
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


def process_units(batch: dict, *, source: SourceConfig, process: ProcessConfig, errors: str | None,
                  s3: uio.S3Options | None, epoch: int, rows_per_block: int) -> Iterator[dict]:
    """Ray Data UDF: each input row is a unit; yields blocks of processed rows as they fill."""
    processor = Processor(process)
    for unit_json in batch["unit"]:
        unit = json.loads(unit_json)
        stats = UnitStats(source.name, unit["id"])
        rows: list[dict] = []
        for raw in read_unit(source, unit, stats, s3, need_caption=process.needs_caption):
            try:
                row = processor(raw, epoch)
            except SampleError as e:
                stats.error(raw.key, e.reason, str(e))
                continue
            row["source"] = source.name
            rows.append(row)
            stats.delivered += 1
            if len(rows) >= rows_per_block:
                yield stack_rows(rows)
                rows = []
        if rows:
            yield stack_rows(rows)
        if errors:
            _write_unit_report(stats, errors, s3)
        for key, reason, detail in stats.errors[:3]:
            log.warning("skipped %s (%s): %s", key, reason, detail)
        if len(stats.errors) > 3:
            log.warning("... and %d more bad samples in %s", len(stats.errors) - 3, unit["id"])


def build_dataset(source: SourceConfig, process: ProcessConfig, *, errors: str | None = None,
                  s3: uio.S3Options | None = None, shuffle_seed: int | None = None, epoch: int = 0,
                  rows_per_block: int = 64, num_cpus: float = 1.0, concurrency: int | None = None):
    """The lazy Ray Dataset of processed rows of one source (see the module docstring).

    errors: where skipped samples are written (local dir or s3:// prefix); None only logs them.
    shuffle_seed: shuffle unit order (windows of 1,000; a different order each epoch) — sample-level
        shuffling is the consumer's `local_shuffle_buffer_size`.
    epoch: varies crops and instruction choices between epochs, reproducibly.
    """
    import ray.data

    # one read task; override_num_blocks=1 also stops Ray splitting its output into ~200 mostly empty blocks
    order_seed = None if shuffle_seed is None else f"{shuffle_seed}.{epoch}"  # a new unit order each epoch
    listing = ray.data.read_datasource(_unit_datasource(source, s3, order_seed), num_cpus=0, override_num_blocks=1)
    # Ray coalesces the read task's small blocks: re-split (streaming) so each unit is its own task
    listing = listing.repartition(target_num_rows_per_block=1)
    kwargs = dict(source=source, process=process, errors=errors, s3=s3, epoch=epoch, rows_per_block=rows_per_block)
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

    def __post_init__(self):
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"source names must be unique (set `name:`), repeated: {', '.join(dup)}")

    def datasets(self, process: ProcessConfig | None = None, epoch: int = 0) -> dict:
        """One lazy dataset per source, by source name."""
        if not self.sources:
            raise ValueError("no data sources configured (data.sources is empty)")
        return {s.name: build_dataset(s, process or self.process, errors=self.errors, s3=self.s3,
                                      shuffle_seed=self.shuffle_seed, epoch=epoch, rows_per_block=self.rows_per_block,
                                      num_cpus=self.num_cpus, concurrency=self.concurrency)
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
    (pixel_values, input_ids, labels, attention_mask) padded as the original pads, plus the keys."""

    def __init__(self, pad_token_id: int, pad_to: int | None = None):
        self.pad_token_id, self.pad_to = pad_token_id, pad_to

    def __call__(self, batch: dict) -> dict:
        import torch

        from ..prompts import collate_training

        samples = [{"input_ids": ids, "labels": lab, "prompt_len": int(p)}
                   for ids, lab, p in zip(batch["input_ids"], batch["labels"], batch["prompt_len"])]
        out = collate_training(samples, self.pad_token_id, self.pad_to)
        pixels = batch["pixel_values"]  # read-only when it comes zero-copy from the object store
        out["pixel_values"] = torch.from_numpy(pixels if pixels.flags.writeable else pixels.copy())
        out["keys"] = [str(k) for k in batch["key"]]
        return out


class Mixture:
    """Batches drawn from several streams by weight, as MiniGPT-4's MultiIterLoader draws them: each
    batch comes whole from one source picked with probability ratio / sum(ratios), so sample
    frequencies follow the ratios. A stream that runs out starts its next epoch (`open(name, epoch)`
    is called again); reproducible for a seed. Infinite: the consumer decides when to stop."""

    def __init__(self, open_stream: Callable[[str, int], Iterable], ratios: dict[str, float], seed: int = 42):
        if not ratios or any(r <= 0 for r in ratios.values()):
            raise ValueError(f"mixture ratios must be positive, got {ratios}")
        self.open_stream, self.names = open_stream, sorted(ratios)
        self.weights = [ratios[n] for n in self.names]
        self.rng = random.Random(seed)
        self.epochs = {n: 0 for n in self.names}
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
                self.epochs[name] += 1
        raise RuntimeError(f"source {name!r} yields no batches (empty, or every sample was skipped)")
