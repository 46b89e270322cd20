"""Session fixtures: one local S3 server (moto, loopback) and, on demand, one local Ray cluster."""
from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A real S3-compatible HTTP server on 127.0.0.1; AWS_* variables point every client at it.

    Set before any Ray cluster starts, so Ray workers inherit the endpoint and credentials.
    """
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION", "MINIGPT4_CACHE")}
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", MINIGPT4_CACHE=str(tmp_path_factory.mktemp("cache")))
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


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
