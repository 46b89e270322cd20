"""Run sources through the whole pipeline (read, decode, preprocess, tokenize) and count what comes
out: a dry run of a training or captioning job's data, with the bad-sample report at the end."""
from __future__ import annotations

import logging
import time

from .pipeline import DataConfig, DataReport, summarize
from .process import ProcessConfig

log = logging.getLogger(__name__)


def check(cfg: DataConfig, process: ProcessConfig | None = None, limit: int | None = None,
          log_every_s: float = 10.0) -> tuple[dict[str, dict], DataReport | None]:
    """Consume every source once. Returns per-source {samples, seconds, samples_per_s} and, when
    `cfg.errors` is set, the report folded from the units that finished (a `limit` leaves the last
    units of a source unfinished, and those are not in the report)."""
    results: dict[str, dict] = {}
    for name, ds in cfg.datasets(process).items():
        if limit:
            ds = ds.limit(limit)
        n, t0 = 0, time.perf_counter()
        last = t0
        for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
            n += len(batch["key"])
            now = time.perf_counter()
            if now - last >= log_every_s:
                log.info("%s: %d samples, %.1f samples/s", name, n, n / (now - t0))
                last = now
        dt = time.perf_counter() - t0
        results[name] = {"samples": n, "seconds": round(dt, 3), "samples_per_s": round(n / dt, 1) if dt else 0.0}
    return results, (summarize(cfg.errors, cfg.s3) if cfg.errors else None)
