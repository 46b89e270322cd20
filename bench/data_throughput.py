"""Data throughput: decoded + preprocessed images/s per CPU core, our Ray Data pipeline next to a
plain PIL loop over the same files, measured in the same run.

    python bench/data_throughput.py                       # 512 photos-sized JPEGs, all cores
    python bench/data_throughput.py --images 2000 --cpus 8 --size 224 --source-px 640x480
    python bench/data_throughput.py --s3                  # the same files served by a local S3 server

Rows of the table:
- `PIL loop (1 process)`: open, RGB, bicubic resize, CLIP normalize — the naive baseline, one core.
- `pipeline: images, caption task`: `build_dataset` over the raw image prefix (strict decode with
  bomb / aspect checks, EXIF, RGB conversion, same resize and normalization), consumed by the driver.
- `pipeline: ... fast_decode`: the same with JPEG DCT-domain downscaling (`ProcessConfig.fast_decode`).
- `pipeline: webdataset, stage1 task`: img2dataset shards of the same images with captions, adding
  caption cleaning and tokenization.

images/s/core divides by the CPUs Ray was given (the PIL loop uses one); the driver that consumes the
batches runs beside them. Each pipeline runs twice: the table shows the second (steady) run and, last,
the first, which also pays for starting worker processes and importing the tokenizer. Results also go to
`<out>/data_throughput.json` and `.md`.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np


def make_images(root: Path, n: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    """Photo-like JPEGs: a synthetic scene with texture noise (plain shapes would decode unrealistically fast)."""
    import random

    from PIL import Image

    from minigpt4 import synthetic

    rng = random.Random(seed)
    noise_rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        scene = synthetic.random_scene(rng)
        img = synthetic.render(scene, max(size)).resize(size)
        arr = np.asarray(img, dtype=np.int16) + noise_rng.integers(-25, 26, (size[1], size[0], 3), dtype=np.int16)
        p = root / "images" / f"{i:06d}.jpg"
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(p, quality=90)
        paths.append(p)
    return paths


def make_shards(root: Path, paths: list[Path], per_shard: int = 128) -> None:
    (root / "wds").mkdir(parents=True, exist_ok=True)
    for s in range(0, len(paths), per_shard):
        with tarfile.open(root / "wds" / f"{s // per_shard:05d}.tar", "w") as tf:
            for i, p in enumerate(paths[s:s + per_shard]):
                key = f"{s // per_shard:05d}{i:04d}"
                for ext, data in (("jpg", p.read_bytes()),
                                  ("json", json.dumps({"caption": f"A photo: number {s + i}!"}).encode())):
                    ti = tarfile.TarInfo(f"{key}.{ext}")
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))


def pil_loop(paths: list[Path], size: int) -> float:
    from PIL import Image

    from minigpt4.images import CLIP_MEAN, CLIP_STD

    mean, std = np.asarray(CLIP_MEAN, dtype=np.float32), np.asarray(CLIP_STD, dtype=np.float32)
    t = time.perf_counter()
    for p in paths:
        img = Image.open(p).convert("RGB").resize((size, size), Image.BICUBIC)
        arr = (np.asarray(img, dtype=np.float32) / 255.0 - mean) / std
        np.ascontiguousarray(arr.transpose(2, 0, 1))
    return len(paths) / (time.perf_counter() - t)


def pipeline(source, process, expected: int) -> tuple[float, float]:
    """(first run, second run) images/s: the first pays for worker start-up and imports (the tokenizer
    for the training tasks), the second is the steady state."""
    from minigpt4.data import build_dataset

    out = []
    for _ in range(2):
        ds = build_dataset(source, process)
        t = time.perf_counter()
        n = 0
        for batch in ds.iter_batches(batch_size=64, batch_format="numpy"):
            n += len(batch["key"])
        dt = time.perf_counter() - t
        if n != expected:
            raise RuntimeError(f"pipeline delivered {n} images, expected {expected}")
        out.append(n / dt)
    return out[0], out[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    ap.add_argument("--size", type=int, default=224, help="model input side")
    ap.add_argument("--source-px", default="640x480", help="WxH of the JPEGs")
    ap.add_argument("--s3", action="store_true", help="serve the files from a local S3 server")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    w, h = (int(v) for v in args.source_px.lower().split("x"))

    import ray

    from minigpt4.data import ProcessConfig, SourceConfig

    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    print(f"writing {args.images} {w}x{h} JPEGs to {work} ...", flush=True)
    paths = make_images(work, args.images, (w, h))
    make_shards(work, paths)
    root = str(work)
    server = None
    if args.s3:
        from minigpt4.data import io as uio
        from minigpt4.s3server import LocalS3

        server = LocalS3().start()
        server.apply_env()
        server.create_bucket("bench")
        for p in sorted(work.rglob("*")):
            if p.is_file():
                uio.write_bytes(f"s3://bench/{p.relative_to(work)}", p.read_bytes())
        root = "s3://bench"

    print("PIL loop ...", flush=True)
    pil_loop(paths[:16], args.size)  # warm-up
    base = pil_loop(paths, args.size)

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             object_store_memory=min(2 * 1024**3, 256 * 1024**2 * args.cpus))
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    imgs = SourceConfig(f"{root}/images/", format="images", unit_size=64)
    wds = SourceConfig(f"{root}/wds/", format="webdataset")
    cap = ProcessConfig(task="caption", image_size=args.size)
    runs = [("pipeline: images, caption task", imgs, cap),
            ("pipeline: images, caption task, fast_decode", imgs,
             ProcessConfig(task="caption", image_size=args.size, fast_decode=True)),
            ("pipeline: webdataset, stage1 task (+ clean + tokenize)", wds,
             ProcessConfig(task="stage1", image_size=args.size))]
    rows = [{"path": "PIL loop (1 process)", "cpus": 1, "images_per_s": base, "per_core": base, "first_run": base}]
    for name, src, proc in runs:
        print(f"{name} ...", flush=True)
        first, ips = pipeline(src, proc, args.images)
        rows.append({"path": name, "cpus": args.cpus, "images_per_s": ips, "per_core": ips / args.cpus,
                     "first_run": first})
    ray.shutdown()
    if server:
        server.stop()

    header = (f"data throughput: {args.images} JPEGs {w}x{h} -> {args.size}x{args.size}, "
              f"{'local S3' if args.s3 else 'local disk'}, {args.cpus} CPUs for Ray")
    lines = [header, "", "| path | CPUs | images/s | images/s/core | vs PIL/core | first run images/s |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['path']} | {r['cpus']} | {r['images_per_s']:.0f} | {r['per_core']:.0f} | "
                     f"{r['per_core'] / base:.2f}x | {r['first_run']:.0f} |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_throughput.md").write_text(table + "\n")
    (out / "data_throughput.json").write_text(json.dumps({"config": vars(args), "rows": rows}, indent=1))
    print(f"wrote {out / 'data_throughput.md'} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
