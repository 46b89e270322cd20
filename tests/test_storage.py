"""storage.resolve against a real S3 protocol server (moto on loopback, see conftest.s3_endpoint)."""
from __future__ import annotations

import logging
import multiprocessing
import os

import boto3
import pytest

from minigpt4 import storage


@pytest.fixture
def s3(s3_endpoint):
    return boto3.client("s3")


@pytest.fixture
def downloads(monkeypatch):
    """Keys actually fetched from S3 (a spy on storage._download)."""
    fetched: list[str] = []
    real = storage._download

    def spy(client, loc, version, dest):
        fetched.append(loc.key)
        return real(client, loc, version, dest)

    monkeypatch.setattr(storage, "_download", spy)
    return fetched


def test_local_path_is_returned_as_is(tmp_path):
    f = tmp_path / "w.pth"
    f.write_bytes(b"x")
    assert storage.resolve(str(f)) == f
    assert storage.resolve(f) == f


def test_missing_local_path_names_the_path(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        storage.resolve(str(missing))


def test_object_downloads_into_the_cache(s3, s3_bucket, downloads):
    s3.put_object(Bucket=s3_bucket, Key="ckpt/eva_vit_g.pth", Body=b"weights-v1")
    path = storage.resolve(f"s3://{s3_bucket}/ckpt/eva_vit_g.pth")
    assert path == storage.cache_dir() / "s3" / s3_bucket / "ckpt" / "eva_vit_g.pth"
    assert path.read_bytes() == b"weights-v1"
    assert downloads == ["ckpt/eva_vit_g.pth"]
    # no temporary files are left beside it, and the sidecar does not live in the data tree
    assert sorted(p.name for p in path.parent.iterdir()) == ["eva_vit_g.pth"]


def test_unchanged_object_is_not_downloaded_again(s3, s3_bucket, downloads):
    s3.put_object(Bucket=s3_bucket, Key="a.bin", Body=b"same")
    uri = f"s3://{s3_bucket}/a.bin"
    first = storage.resolve(uri)
    stat = first.stat()
    second = storage.resolve(uri)
    assert second == first
    assert downloads == ["a.bin"]
    assert (second.stat().st_ino, second.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)


def test_changed_object_is_downloaded_again(s3, s3_bucket, downloads):
    uri = f"s3://{s3_bucket}/a.bin"
    s3.put_object(Bucket=s3_bucket, Key="a.bin", Body=b"version one")
    assert storage.resolve(uri).read_bytes() == b"version one"
    s3.put_object(Bucket=s3_bucket, Key="a.bin", Body=b"version two!")  # new ETag and size
    assert storage.resolve(uri).read_bytes() == b"version two!"
    s3.put_object(Bucket=s3_bucket, Key="a.bin", Body=b"version 3 ..")  # new ETag, same size
    assert storage.resolve(uri).read_bytes() == b"version 3 .."
    assert downloads == ["a.bin"] * 3


def test_corrupted_cached_copy_is_replaced(s3, s3_bucket, downloads):
    """A cached file whose size no longer matches its sidecar (e.g. truncated) is fetched again."""
    s3.put_object(Bucket=s3_bucket, Key="a.bin", Body=b"0123456789")
    path = storage.resolve(f"s3://{s3_bucket}/a.bin")
    path.write_bytes(b"0123")
    assert storage.resolve(f"s3://{s3_bucket}/a.bin").read_bytes() == b"0123456789"
    assert len(downloads) == 2


def _upload_model_dir(s3, bucket, prefix):
    files = {"config.json": b"{}", "model.safetensors": b"\0" * 1000, "tok/tokenizer.json": b"{\"v\": 1}"}
    for name, body in files.items():
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=body)
    s3.put_object(Bucket=bucket, Key=f"{prefix}/", Body=b"")  # a console-made "folder" marker
    s3.put_object(Bucket=bucket, Key=f"{prefix}-other/x", Body=b"not part of the prefix")
    return files


@pytest.mark.parametrize("trailing_slash", [True, False])
def test_prefix_downloads_every_object(s3, s3_bucket, downloads, trailing_slash):
    files = _upload_model_dir(s3, s3_bucket, "models/vicuna")
    uri = f"s3://{s3_bucket}/models/vicuna" + ("/" if trailing_slash else "")
    local = storage.resolve(uri)
    assert local == storage.cache_dir() / "s3" / s3_bucket / "models" / "vicuna"
    assert local.is_dir()
    got = {p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*") if p.is_file()}
    assert got == files
    assert sorted(downloads) == sorted(f"models/vicuna/{n}" for n in files)
    # second resolve: listing only, nothing fetched
    assert storage.resolve(uri) == local
    assert len(downloads) == len(files)


def test_prefix_refetches_only_changed_objects(s3, s3_bucket, downloads):
    _upload_model_dir(s3, s3_bucket, "m")
    storage.resolve(f"s3://{s3_bucket}/m/")
    downloads.clear()
    s3.put_object(Bucket=s3_bucket, Key="m/config.json", Body=b'{"changed": true}')
    local = storage.resolve(f"s3://{s3_bucket}/m/")
    assert downloads == ["m/config.json"]
    assert (local / "config.json").read_bytes() == b'{"changed": true}'


def test_listing_is_paginated(s3, s3_bucket, monkeypatch):
    for i in range(5):
        s3.put_object(Bucket=s3_bucket, Key=f"p/shard-{i}", Body=bytes([i]))
    real_client = storage._client

    def small_pages():
        client = real_client()
        paginator = client.get_paginator

        def get_paginator(name):
            p = paginator(name)
            real_paginate = p.paginate
            p.paginate = lambda **kw: real_paginate(**{**kw, "PaginationConfig": {**kw.get(
                "PaginationConfig", {}), "PageSize": 2}})
            return p

        client.get_paginator = get_paginator
        return client

    monkeypatch.setattr(storage, "_client", small_pages)
    local = storage.resolve(f"s3://{s3_bucket}/p/")
    assert sorted(p.name for p in local.iterdir()) == [f"shard-{i}" for i in range(5)]


def test_missing_key_names_the_uri(s3, s3_bucket):
    uri = f"s3://{s3_bucket}/no/such/file.pth"
    with pytest.raises(FileNotFoundError, match=uri):
        storage.resolve(uri)
    with pytest.raises(FileNotFoundError, match="no objects"):
        storage.resolve(f"s3://{s3_bucket}/empty-prefix/")


def test_missing_bucket_names_the_uri(s3_endpoint):
    uri = "s3://no-such-bucket-anywhere/x.pth"
    with pytest.raises(FileNotFoundError, match="bucket does not exist") as err:
        storage.resolve(uri)
    assert uri in str(err.value)


def test_other_client_errors_are_runtime_errors(s3, s3_bucket, monkeypatch):
    from botocore.exceptions import ClientError

    s3.put_object(Bucket=s3_bucket, Key="a.bin", Body=b"x")
    real_client = storage._client

    def denying_client():
        client = real_client()

        def head_object(**_):
            raise ClientError({"Error": {"Code": "403", "Message": "Forbidden"}}, "HeadObject")

        client.head_object = head_object
        return client

    monkeypatch.setattr(storage, "_client", denying_client)
    uri = f"s3://{s3_bucket}/a.bin"
    with pytest.raises(RuntimeError, match=f"{uri}.*403"):
        storage.resolve(uri)


def test_keys_that_escape_the_cache_are_refused(s3_endpoint):
    with pytest.raises(ValueError, match=r"'\.\.'"):
        storage.resolve("s3://bucket/../../etc/passwd")


def _go_offline(monkeypatch):
    """Point the client at a closed loopback port: every request fails to connect, at once."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")


def test_offline_uses_the_cached_copy_with_a_warning(s3, s3_bucket, monkeypatch, caplog):
    s3.put_object(Bucket=s3_bucket, Key="a.bin", Body=b"cached")
    _upload_model_dir(s3, s3_bucket, "m")
    obj = storage.resolve(f"s3://{s3_bucket}/a.bin")
    prefix = storage.resolve(f"s3://{s3_bucket}/m/")
    _go_offline(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="minigpt4.storage"):
        assert storage.resolve(f"s3://{s3_bucket}/a.bin") == obj
        assert storage.resolve(f"s3://{s3_bucket}/m/") == prefix
        assert storage.resolve(f"s3://{s3_bucket}/m") == prefix  # resolved as a prefix when online
    assert sum("unreachable" in r.getMessage() for r in caplog.records) == 3
    with pytest.raises(RuntimeError, match="no complete cached copy"):
        storage.resolve(f"s3://{s3_bucket}/never-fetched.bin")


def _resolve_in_child(uri, endpoint, cache, queue):
    os.environ.update(AWS_ENDPOINT_URL=endpoint, MINIGPT4_CACHE=cache)
    fetched = []
    real = storage._download
    storage._download = lambda *args: (fetched.append(1), real(*args))
    queue.put((str(storage.resolve(uri)), len(fetched)))


def test_concurrent_processes_download_once(s3, s3_bucket, s3_endpoint):
    """Four processes resolve the same object at once: one downloads, all get the complete file."""
    body = os.urandom(3 * 1024 * 1024)
    s3.put_object(Bucket=s3_bucket, Key="big.bin", Body=body)
    uri = f"s3://{s3_bucket}/big.bin"
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters, like Ray workers on one node
    queue = ctx.Queue()
    procs = [ctx.Process(target=_resolve_in_child, args=(uri, s3_endpoint, str(storage.cache_dir()), queue))
             for _ in range(4)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len({path for path, _ in results}) == 1
    assert sum(n for _, n in results) == 1
    with open(results[0][0], "rb") as f:
        assert f.read() == body
