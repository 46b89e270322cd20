"""Session fixtures: one local S3 server (moto, loopback) and, on demand, one local Ray cluster."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A real S3-compatible HTTP server on 127.0.0.1; AWS_* variables point every client at it.

    Set before any Ray cluster starts, so Ray workers inherit the endpoint and credentials.
    """
    from minigpt4.s3server import LocalS3

    saved_cache = os.environ.get("MINIGPT4_CACHE")
    with LocalS3() as server:
        server.apply_env()  # restored by stop() on exit
        os.environ["MINIGPT4_CACHE"] = str(tmp_path_factory.mktemp("cache"))
        try:
            yield server.endpoint
        finally:
            if saved_cache is None:
                os.environ.pop("MINIGPT4_CACHE", None)
            else:
                os.environ["MINIGPT4_CACHE"] = saved_cache


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A fresh bucket per test, named after the test."""
    import boto3

    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from minigpt4.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture
def tiny_model():
    import torch
    from minigpt4.model import build_model, preset

    torch.manual_seed(0)
    return build_model(preset("tiny")).eval()


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint):
    """One local Ray cluster for the session (2 CPUs, 512 MiB object store), started after the S3
    server so its workers inherit the AWS_* variables. Train workers in tests ask for 0.5 CPU each:
    with whole CPUs they would starve Ray Data's read tasks on a 2-core box."""
    import ray

    # test modules hold train functions: workers unpickle them by module name, so they need tests/ too
    path = os.pathsep.join(p for p in (os.path.dirname(__file__), os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=2, object_store_memory=512 * 1024**2, include_dashboard=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false",
                                       "PYTHONPATH": path}})
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
