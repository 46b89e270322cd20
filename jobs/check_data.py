"""Dry-run a job's data: every source through Ray Data (read, decode, preprocess, tokenize), counted,
with the bad-sample report at the end. Nothing is trained or generated.

    python jobs/check_data.py                                   # embedded default: synthetic data on a local S3 server
    python jobs/check_data.py --source 's3://bucket/laion/{00000..10488}.tar' --task stage1 --limit 100000
    python jobs/check_data.py --source s3://bucket/cc_sbu_align --format cc_sbu_align --task stage2
    python jobs/check_data.py --config my_data.yaml data.process.fast_decode=true
    ray job submit --working-dir . -- python jobs/check_data.py --source ... # on a cluster

A config file holds a `data:` mapping (sources, process, errors, s3, ...; see README "Data");
`key=value` arguments override it. Skipped samples are written under --errors (default
./data_check/<time>/errors) and summarized at the end.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import yaml


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--config", help="YAML file with a `data:` section")
    ap.add_argument("--source", action="append", default=[], help="a source path (repeatable)")
    ap.add_argument("--format", default="webdataset", help="format of --source: webdataset, parquet, cc_sbu_align, images")
    ap.add_argument("--task", default=None, choices=["stage1", "stage2", "caption"],
                    help="processing to apply (default: stage1, or caption for --format images)")
    ap.add_argument("--image-size", type=int, default=None, help="model input side (default 224; 32 embedded)")
    ap.add_argument("--limit", type=int, default=None, help="stop each source after N samples")
    ap.add_argument("--errors", default=None, help="where skipped samples are written (local dir or s3://)")
    ap.add_argument("--address", default=None, help="Ray address (default: a running cluster, else a local one)")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray cluster")
    ap.add_argument("overrides", nargs="*", help="data.key=value overrides")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    from minigpt4.config import ConfigError, apply_overrides, from_dict
    from minigpt4.data import DataConfig
    from minigpt4.data.check import check

    embedded = None
    runtime_env: dict = {}
    data: dict = {}
    try:
        if args.config:
            loaded = yaml.safe_load(open(args.config)) or {}
            data = dict(loaded.get("data") or {})
        if args.source:
            data["sources"] = [{"path": p, "format": args.format, "name": f"{args.format}{i if i else ''}"}
                               for i, p in enumerate(args.source)]
        if not data.get("sources"):
            from minigpt4.embedded import BUCKET, start_embedded

            print("[check_data] no sources given: the embedded default (synthetic data on a local S3 server)")
            embedded = start_embedded()
            runtime_env = {"env_vars": embedded.env}
            data["sources"] = [{"path": embedded.pretrain, "name": "synthetic_pretrain"}]
            data.setdefault("process", {}).setdefault("image_size", 32)
            data["process"].setdefault("num_image_tokens", 4)
            data.setdefault("errors", f"s3://{BUCKET}/data_errors")
        process = data.setdefault("process", {})
        if args.image_size:
            process["image_size"] = args.image_size
        if args.task or "task" not in process:
            formats = {s.get("format", "webdataset") for s in data["sources"]}
            process["task"] = args.task or ("caption" if formats == {"images"} else "stage1")
        if args.errors:
            data["errors"] = args.errors
        data.setdefault("errors", f"data_check/{time.strftime('%Y%m%d-%H%M%S')}/errors")
        data = apply_overrides({"data": data}, args.overrides)["data"]
        cfg = from_dict(DataConfig, data, "data")
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import ray

    ray.init(address=args.address, num_cpus=args.num_cpus, runtime_env=runtime_env or None,
             include_dashboard=False)
    t0 = time.time()
    try:
        results, report = check(cfg, limit=args.limit)
    finally:
        ray.shutdown()
        if embedded:
            embedded.stop()
    print(f"[check_data] task {cfg.process.task}, {time.time() - t0:.1f}s")
    for name, r in results.items():
        print(f"  {name}: {r['samples']:,} samples in {r['seconds']:.1f}s ({r['samples_per_s']:,.1f}/s)")
    if report:
        print(report.format())
        print(f"  skipped samples: {cfg.errors}")
    print(json.dumps({"sources": results, "report": report.to_dict() if report else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
