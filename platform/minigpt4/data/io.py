"""Objects by URI: a local path or `s3://bucket/key`, read, written and listed the same way.

S3 access goes through boto3 with the standard credential chain (environment, profile, SSO, instance
profile / IRSA); `AWS_ENDPOINT_URL` points it at any S3-compatible server (the tests' and the demo's
local one). `S3Options` overrides endpoint, region, profile or anonymous access explicitly; it never
holds secrets, so configs that carry it can be printed and logged.

Listing is paged: `iter_objects` yields one object at a time from 1,000-key pages, so a prefix of
millions of images is never held in memory as a whole.
"""
from __future__ import annotations

import io
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

S3_SCHEME = "s3://"


@dataclass(frozen=True)
class S3Options:
    """Explicit S3 settings; every field left empty falls back to the standard AWS chain."""

    endpoint_url: str | None = None  # e.g. http://127.0.0.1:9000 (MinIO, moto, Ceph); else AWS_ENDPOINT_URL
    region: str | None = None
    profile: str | None = None  # a profile of ~/.aws/config (credentials stay in the AWS files)
    anonymous: bool = False  # unsigned requests, for public buckets
    max_attempts: int = 8  # boto3's retry budget per request (adaptive mode)


class ObjectError(OSError):
    """An object that could not be read: `reason` is `missing` or `unreadable`."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith(S3_SCHEME)


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = str(uri)[len(S3_SCHEME):].partition("/")
    if not bucket:
        raise ValueError(f"not an s3:// URI with a bucket: {uri!r}")
    return bucket, key


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or an s3:// URI."""
    out = str(base)
    for p in parts:
        if not p:
            continue
        out = out.rstrip("/") + "/" + str(p).lstrip("/") if out else str(p)
    return out


_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


def client(options: S3Options | None = None):
    """One boto3 S3 client per process, options and AWS environment (clients are thread-safe;
    sessions are not). The environment is part of the key, so pointing AWS_ENDPOINT_URL at another
    server (a local one started later, say) gets a new client rather than a stale one."""
    options = options or S3Options()
    key = (options, *(os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE",
                                                  "AWS_ACCESS_KEY_ID", "AWS_DEFAULT_REGION")))
    with _clients_lock:
        c = _clients.get(key)
        if c is None:
            import boto3
            from botocore import UNSIGNED
            from botocore.config import Config

            session = boto3.session.Session(profile_name=options.profile)
            cfg = Config(retries={"max_attempts": options.max_attempts, "mode": "adaptive"},
                         max_pool_connections=32, signature_version=UNSIGNED if options.anonymous else None)
            c = session.client("s3", endpoint_url=options.endpoint_url or None, region_name=options.region,
                               config=cfg)
            _clients[key] = c
        return c


def _s3_error(err: Exception, uri: str) -> ObjectError:
    code = str(getattr(err, "response", {}).get("Error", {}).get("Code", ""))
    if code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
        return ObjectError("missing", f"{uri}: no such object")
    return ObjectError("unreadable", f"{uri}: {code or type(err).__name__}")


def read_bytes(uri: str, options: S3Options | None = None) -> bytes:
    """The whole object; `ObjectError` (missing / unreadable) when it cannot be read."""
    if is_s3(uri):
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = split_s3(uri)
        try:
            return client(options).get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as err:
            raise _s3_error(err, uri) from None
        except BotoCoreError as err:
            raise ObjectError("unreadable", f"{uri}: {type(err).__name__}: {err}") from None
    try:
        return Path(uri).read_bytes()
    except FileNotFoundError:
        raise ObjectError("missing", f"{uri}: no such file") from None
    except OSError as err:
        raise ObjectError("unreadable", f"{uri}: {err.strerror or err}") from None


def open_stream(uri: str, options: S3Options | None = None) -> BinaryIO:
    """A forward-only binary stream over the object (S3: the GET body, not buffered whole)."""
    if is_s3(uri):
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = split_s3(uri)
        try:
            body = client(options).get_object(Bucket=bucket, Key=key)["Body"]
        except ClientError as err:
            raise _s3_error(err, uri) from None
        except BotoCoreError as err:
            raise ObjectError("unreadable", f"{uri}: {type(err).__name__}: {err}") from None
        return io.BufferedReader(_BodyReader(body), buffer_size=1 << 20)
    try:
        return open(uri, "rb")
    except FileNotFoundError:
        raise ObjectError("missing", f"{uri}: no such file") from None
    except OSError as err:
        raise ObjectError("unreadable", f"{uri}: {err.strerror or err}") from None


class _BodyReader(io.RawIOBase):
    """botocore's StreamingBody as a file object that tarfile's stream mode accepts."""

    def __init__(self, body):
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self._body.read(len(b))
        b[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self._body.close()
        super().close()


def write_bytes(uri: str, data: bytes, options: S3Options | None = None) -> None:
    """Write an object whole; local files are written to a temporary name and renamed into place."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        client(options).put_object(Bucket=bucket, Key=key, Body=data)
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def remove_prefix(prefix: str, options: S3Options | None = None, exact: bool = False) -> int:
    """Delete every object under `prefix` (with `exact`: the one object `prefix` names); returns how
    many. Local paths: the files under the directory (or the file)."""
    if is_s3(prefix):
        bucket, key = split_s3(prefix)
        c = client(options)
        if exact:
            if not exists(prefix, options):
                return 0
            c.delete_object(Bucket=bucket, Key=key)
            return 1
        n = 0
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
            objs = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if objs:  # a listing page holds at most 1,000 keys, DeleteObjects' limit
                c.delete_objects(Bucket=bucket, Delete={"Objects": objs, "Quiet": True})
                n += len(objs)
        return n
    path = Path(prefix)
    if path.is_file():
        path.unlink()
        return 1
    if exact or not path.is_dir():
        return 0
    n = sum(1 for p in path.rglob("*") if p.is_file())
    shutil.rmtree(path)
    return n


def exists(uri: str, options: S3Options | None = None) -> bool:
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        try:
            client(options).head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as err:
            if _s3_error(err, uri).reason == "missing":
                return False
            raise
    return Path(uri).exists()


def iter_objects(prefix: str, suffixes: tuple[str, ...] | None = None, options: S3Options | None = None,
                 start_after: str | None = None) -> Iterator[tuple[str, int]]:
    """(uri, size) of every object under a prefix (a directory for local paths), in key order.

    Paged for S3 (ListObjectsV2, 1,000 keys a request) and a sorted directory walk locally; only the
    current page is in memory. `suffixes` filters by lower-cased extension; hidden files and "folder"
    placeholder objects are skipped. `start_after` (a URI) resumes a listing.
    """
    suffixes = tuple(s.lower() for s in suffixes) if suffixes else None

    def wanted(name: str) -> bool:
        base = name.rsplit("/", 1)[-1]
        if not base or base.startswith("."):
            return False
        return suffixes is None or base.lower().endswith(suffixes)

    if is_s3(prefix):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(prefix)
        kwargs = {"Bucket": bucket, "Prefix": key}
        if start_after:
            kwargs["StartAfter"] = split_s3(start_after)[1]
        try:
            for page in client(options).get_paginator("list_objects_v2").paginate(**kwargs):
                for obj in page.get("Contents", []):
                    if wanted(obj["Key"]):
                        yield f"{S3_SCHEME}{bucket}/{obj['Key']}", int(obj["Size"])
        except ClientError as err:
            raise _s3_error(err, prefix) from None
        return
    root = Path(prefix)
    if root.is_file():
        if wanted(root.name):
            yield str(root), root.stat().st_size
        return
    if not root.is_dir():
        raise ObjectError("missing", f"{prefix}: no such directory")

    def walk(d: Path) -> Iterator[tuple[str, int]]:
        with os.scandir(d) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                if not e.name.startswith("."):
                    yield from walk(Path(e.path))
            elif wanted(e.name):
                if start_after is None or e.path > start_after:
                    yield e.path, e.stat().st_size

    yield from walk(root)
