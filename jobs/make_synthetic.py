"""Write the synthetic pretrain / align / held-out dataset (minigpt4.synthetic.write_dataset).

    python jobs/make_synthetic.py                                   # ./data/synthetic, default sizes
    python jobs/make_synthetic.py --out /data/synthetic --train-shards 16 --samples-per-shard 256 \\
        --align 512 --heldout 256 --parquet-shards 2
    python jobs/make_synthetic.py --out s3://my-bucket/synthetic    # the bucket must exist; AWS_* chain
    python jobs/make_synthetic.py --local-s3                        # into a local S3 server, kept serving

`--local-s3` starts a loopback S3 server (minigpt4.s3server), writes to s3://synthetic (or the --out
bucket there), prints the `export AWS_...` lines that point other shells at it, and serves until Ctrl-C.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading

from minigpt4.data.io import ObjectError, S3Options, is_s3, split_s3
from minigpt4.s3server import LocalS3, export_lines
from minigpt4.synthetic import write_dataset

DEFAULT_OUT = os.path.join("data", "synthetic")
LOCAL_S3_OUT = "s3://synthetic"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help=f"local directory or s3://bucket/prefix (default: ./{DEFAULT_OUT}; "
                                 f"with --local-s3: {LOCAL_S3_OUT})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-shards", type=int, default=4)
    p.add_argument("--samples-per-shard", type=int, default=64)
    p.add_argument("--align", type=int, default=64, help="stage-2 (cc_sbu_align) samples")
    p.add_argument("--heldout", type=int, default=64, help="held-out evaluation samples")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--parquet-shards", type=int, default=0, help="extra stage-1 shards as key/jpg/caption parquet")
    p.add_argument("--local-s3", action="store_true", help="write into a local S3 server and keep serving it")
    p.add_argument("--local-s3-port", type=int, default=0, help="its port (default: a free one)")
    p.add_argument("--shapes", type=int, choices=[1, 2], default=None,
                   help="shapes per scene (default: mixed, a fifth with one)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    out = args.out or (LOCAL_S3_OUT if args.local_s3 else DEFAULT_OUT)
    if args.local_s3 and not is_s3(out):
        p.error(f"--local-s3 writes to S3: --out must be an s3:// URI, got {out!r}")
    if not is_s3(out):
        out = os.path.abspath(out)
    server, serving = None, False
    try:
        options = None
        if args.local_s3:
            server = LocalS3(port=args.local_s3_port).start()
            server.apply_env()
            server.create_bucket(split_s3(out)[0])
            options = S3Options(endpoint_url=server.endpoint)
        print(f"writing synthetic dataset to {out}", flush=True)
        summary = write_dataset(out, seed=args.seed, train_shards=args.train_shards,
                                samples_per_shard=args.samples_per_shard, align_samples=args.align,
                                heldout_samples=args.heldout, image_size=args.image_size,
                                parquet_shards=args.parquet_shards, s3=options, progress=not args.no_progress,
                                shapes=args.shapes)
        c = summary["counts"]
        print(f"wrote {summary['files']} files ({summary['bytes'] / 1e6:.1f} MB) to {out}: {c['pretrain']} pretrain "
              f"(tar) + {c['pretrain_parquet']} pretrain (parquet), {c['align']} align, {c['heldout']} held-out "
              "samples", flush=True)
        if server is not None:
            print(f"local S3 serving at {server.endpoint}; in another shell:\n{export_lines(server.env())}\n"
                  f"Ctrl-C to stop (the data lives in memory and goes with it)", flush=True)
            serving = True
            threading.Event().wait()
    except (ObjectError, ValueError, OSError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0 if serving else 130
    except Exception as err:  # botocore's errors (credentials, access denied) are not OSErrors
        if type(err).__module__.split(".")[0] != "botocore":
            raise
        print(f"error: {out}: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
