"""Session fixtures: one local S3 server (moto, loopback) and, on demand, one local Ray cluster."""
from __future__ import annotations

import base64
import io
import os
import socket

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls its workers every 2 s by default, so each fit ended ~4 s after its last
# report; at 0.25 s a 2-step fit takes ~5 s less. Set here so that the suite's session cluster and the
# clusters that subprocesses start (the demo, the benches, the multi-node test) all inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


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


# What the lent GPU box lacks during each bench/gpu.sh call: its image has no boto3 or moto, and a call
# carries one wheel bundle of ../shared/device/pack-wheels.sh (train: ray + deepspeed; serve: ray +
# ray[serve]; quant: bitsandbytes). See ../shared/ENVIRONMENT.md.
GPU_IMAGE_LACKS = ("boto3", "botocore", "s3transfer", "moto")
BUNDLE_LACKS = {
    "train": ("bitsandbytes", "fastapi", "starlette", "uvicorn"),
    "serve": ("bitsandbytes", "deepspeed", "tensorboardX", "hjson"),
    "quant": ("ray", "deepspeed", "fastapi", "starlette", "uvicorn", "tensorboardX", "hjson", "pydantic"),
}


def gpu_sh(call: str, out, *args: str, timeout: int = 300, **bench_env: str):
    """Run `bench/gpu.sh <call> [args]` as a device call runs it, seeing only what the GPU box has during
    that call (tests/gpu_image/sitecustomize.py hides the rest, in Ray's workers too): results in `out`,
    this box's Python, no wheel bundle; `bench_env`: the benches' own arguments (TRAIN_STEP_ARGS=...)."""
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join(p for p in (os.path.join(here, "gpu_image"), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "MINIGPT4_ABSENT": ",".join(GPU_IMAGE_LACKS + BUNDLE_LACKS[call]),
           "OUT": str(out), "PYTHON": sys.executable, "WHEELS": "", **bench_env}
    return subprocess.run(["bash", "bench/gpu.sh", call, *args], cwd=os.path.dirname(here), env=env,
                          capture_output=True, text=True, timeout=timeout)


def cli_error(capsys, code: int) -> str:
    """What a CLI's main() returned and printed for bad input, called in-process: exit code 2 and one
    line on stderr (no traceback); returns that stderr."""
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, (code, err[-2000:])
    return err


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


# -- the serving app (tests/test_serving*.py) ------------------------------------------------------
KEY = "test-key-123"
MODEL = "minigpt4-tiny"
SETTINGS = {"model": {"preset": "tiny"}, "max_body_bytes": 300_000, "max_image_pixels": 200 * 200,
            "s3_buckets": ["serve-images"], "http_fetch": True, "http_hosts": ["127.0.0.1", "localhost"],
            "max_batch_size": 8, "batch_wait_ms": 20, "max_queue": 12, "default_max_tokens": 16}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(size=(32, 32), colour=(200, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def server(ray_cluster, s3_endpoint):
    import boto3
    from ray import serve

    from minigpt4.config import from_dict, to_dict
    from minigpt4.serving import ServeSettings, deployment_class

    boto3.client("s3").create_bucket(Bucket="serve-images")
    boto3.client("s3").put_object(Bucket="serve-images", Key="red.png", Body=png())
    boto3.client("s3").create_bucket(Bucket="private-images")
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    dep = deployment_class().options(ray_actor_options={"num_cpus": 0.5,
                                                        "runtime_env": {"env_vars": {"MINIGPT4_API_KEY": KEY}}})
    serve.run(dep.bind(to_dict(from_dict(ServeSettings, SETTINGS))), name="minigpt4", route_prefix="/",
              blocking=False)
    base = f"http://127.0.0.1:{port}"
    import time

    import requests

    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if requests.get(base + "/healthz", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    yield base
    serve.delete("minigpt4")
    serve.shutdown()


def auth(key=KEY):
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


