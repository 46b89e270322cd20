"""The embedded default: a loopback S3 server holding the synthetic dataset.

Every job run with no arguments (and `make demo`) uses it: the data really travels over HTTP from an
S3-compatible server to Ray's workers, as it would from S3, with nothing to download or configure.
The server lives in the driver process and dies with it; `env` holds the AWS_* variables that point
clients at it (pass them to Ray's `runtime_env` so workers on a running cluster get them too).
"""
from __future__ import annotations

from dataclasses import dataclass

BUCKET = "minigpt4-demo"


@dataclass
class EmbeddedData:
    server: object  # minigpt4.s3server.LocalS3
    root: str
    train_shards: int
    summary: dict

    @property
    def pretrain(self) -> str:
        return f"{self.root}/pretrain/{{00000..{self.train_shards - 1:05d}}}.tar"

    @property
    def align(self) -> str:
        return f"{self.root}/align"

    @property
    def heldout_images(self) -> str:
        return f"{self.root}/heldout/images/"

    @property
    def heldout_annotations(self) -> str:
        return f"{self.root}/heldout/annotations.json"

    @property
    def env(self) -> dict[str, str]:
        return self.server.env()

    def stop(self) -> None:
        self.server.stop()


def start_embedded(*, seed: int = 0, train_shards: int = 25, samples_per_shard: int = 320, align_samples: int = 1024,
                   heldout_samples: int = 100, image_size: int = 64, shapes: int | None = 1,
                   progress: bool = True) -> EmbeddedData:
    """Start a local S3 server, point this process's AWS_* variables at it, and write the synthetic
    dataset to `s3://minigpt4-demo/synthetic`. Call before `ray.init` so local workers inherit the env.

    The defaults are what the tiny model learns from scratch in minutes on 2 cores (the demo's
    learning proof): 8,000 single-shape stage-1 scenes in 25 shards of 320 (units that large cost Ray
    half as much per sample as shards of 64, and hold the same scenes), 1,024 stage-2 descriptions and
    100 held-out scenes; writing them takes about 15 s."""
    from .s3server import LocalS3
    from .synthetic import write_dataset

    server = LocalS3().start()
    server.apply_env()
    server.create_bucket(BUCKET)
    root = f"s3://{BUCKET}/synthetic"
    summary = write_dataset(root, seed=seed, train_shards=train_shards, samples_per_shard=samples_per_shard,
                            align_samples=align_samples, heldout_samples=heldout_samples, image_size=image_size,
                            shapes=shapes, progress=progress)
    return EmbeddedData(server, root, train_shards, summary)
