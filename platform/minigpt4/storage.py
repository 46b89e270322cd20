"""Weights live on local disk or in S3; `resolve` turns either into a local path, cached once per node.

    resolve("/data/vicuna-7b")               -> Path("/data/vicuna-7b")                (must exist)
    resolve("s3://models/eva_vit_g.pth")     -> <cache>/s3/models/eva_vit_g.pth        (one object)
    resolve("s3://models/vicuna-7b/")        -> <cache>/s3/models/vicuna-7b            (every object below)

<cache> is `$MINIGPT4_CACHE`, else `~/.cache/minigpt4`. Beside the data tree, `<cache>/meta/` holds a
small JSON sidecar per object (its ETag and size) and the lock files, so cached model directories hold
nothing but the model's own files.

A cached object is re-used when S3 still reports the same ETag and size (one HEAD request, or the
listing for a prefix). When S3 cannot be reached at all, a complete cached copy is used with a warning,
so a node that was warmed up keeps working offline.

Every worker process on a node calls `resolve` for the same files at about the same time: an fcntl
lock per object makes exactly one of them download while the others wait and then re-use the result,
and the data is written to a temporary file and `os.replace`d into place, so no reader ever sees a
partial file. The S3 client uses the standard AWS credential chain; `AWS_ENDPOINT_URL` (a local
S3-compatible server, as in the tests) is honoured by boto3 itself. Nothing here logs credentials.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

log = logging.getLogger(__name__)

S3_SCHEME = "s3://"
_NOT_FOUND_CODES = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}


# -- public API ------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """Root of the node-local cache: `$MINIGPT4_CACHE`, else `~/.cache/minigpt4`."""
    return Path(os.environ.get("MINIGPT4_CACHE") or Path.home() / ".cache" / "minigpt4").expanduser()


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith(S3_SCHEME)


def resolve(uri: str | os.PathLike) -> Path:
    """A local path for `uri`: local paths as they are, `s3://` objects and prefixes downloaded once.

    Raises FileNotFoundError naming `uri` when the path, object, prefix or bucket does not exist, and
    RuntimeError naming `uri` for any other S3 failure (access denied, S3 unreachable with no cached copy).
    """
    if not is_s3(uri):
        path = Path(uri).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"weights path {str(uri)!r} does not exist")
        return path
    loc = _S3Location.parse(str(uri))
    if loc.is_prefix:
        return _sync_prefix(loc)
    return _resolve_object(loc)


# -- locations -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _S3Location:
    bucket: str
    key: str  # "" for a whole bucket; ends with "/" for a prefix

    @classmethod
    def parse(cls, uri: str) -> "_S3Location":
        bucket, _, key = uri[len(S3_SCHEME):].partition("/")
        if not bucket:
            raise ValueError(f"{uri!r} names no bucket (expected s3://bucket/key)")
        _safe_relpath(key, uri)  # refuse keys that would escape the cache before any request is made
        return cls(bucket, key)

    @property
    def uri(self) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self.key}"

    @property
    def is_prefix(self) -> bool:
        return self.key == "" or self.key.endswith("/")

    def as_prefix(self) -> "_S3Location":
        return _S3Location(self.bucket, self.key.rstrip("/") + "/")

    def local_path(self) -> Path:
        """<cache>/s3/<bucket>/<key>; a prefix maps to the directory of the same name."""
        return cache_dir() / "s3" / self.bucket / _safe_relpath(self.key, self.uri)

    def meta_path(self, suffix: str) -> Path:
        """Sidecar/lock file for this location, in a tree parallel to the data (no clutter in model dirs)."""
        rel = _safe_relpath(self.key.rstrip("/"), self.uri)
        return cache_dir() / "meta" / self.bucket / rel.parent / (rel.name + suffix)


def _safe_relpath(key: str, uri: str) -> PurePosixPath:
    """The key as a relative path, refusing keys that would escape the cache (`..`, absolute, `//`)."""
    parts = key.rstrip("/").split("/") if key.strip("/") else []
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"refusing S3 key with an empty, '.' or '..' path segment: {uri!r}")
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


# -- S3 access -------------------------------------------------------------------------------------
_session_lock = threading.Lock()
_session = None


def _client():
    """A new S3 client from one shared session (a session loads botocore's service data once: ~0.1 s).

    Sessions are not thread-safe, hence the lock; the client itself is. A client per call picks up
    the current environment (AWS_ENDPOINT_URL, AWS_MAX_ATTEMPTS...).
    """
    global _session
    import boto3

    with _session_lock:
        if _session is None:
            _session = boto3.session.Session()
        return _session.client("s3")


def _unreachable_errors() -> tuple[type[Exception], ...]:
    """Errors meaning "S3 could not be reached" (as opposed to "S3 said no")."""
    from botocore.exceptions import ConnectionError, HTTPClientError

    return ConnectionError, HTTPClientError


def _client_error(err: Exception, loc: _S3Location, what: str) -> Exception:
    """Translate a botocore ClientError into FileNotFoundError / RuntimeError naming the URI."""
    error = getattr(err, "response", {}).get("Error", {})
    code = str(error.get("Code", "?"))
    if code in _NOT_FOUND_CODES:
        reason = "bucket does not exist" if code == "NoSuchBucket" else "no such object or prefix"
        return FileNotFoundError(f"{loc.uri}: {reason}")
    return RuntimeError(f"S3 {what} of {loc.uri} failed: {code} {error.get('Message', '')}".rstrip())


@dataclass(frozen=True)
class _ObjectVersion:
    """What identifies the bytes of an object: its ETag and size."""

    etag: str
    size: int


def _head(client, loc: _S3Location) -> _ObjectVersion | None:
    """The object's version, or None when there is no object with that exact key."""
    from botocore.exceptions import ClientError

    try:
        head = client.head_object(Bucket=loc.bucket, Key=loc.key)
    except ClientError as err:
        if str(err.response.get("Error", {}).get("Code")) in _NOT_FOUND_CODES:
            return None
        raise _client_error(err, loc, "HEAD") from None
    return _ObjectVersion(head["ETag"], int(head["ContentLength"]))


def _has_objects_below(client, loc: _S3Location) -> bool:
    """Whether any key (folder markers included) starts with the prefix: one small listing request."""
    from botocore.exceptions import ClientError

    try:
        return client.list_objects_v2(Bucket=loc.bucket, Prefix=loc.key, MaxKeys=1).get("KeyCount", 0) > 0
    except ClientError as err:
        raise _client_error(err, loc, "listing") from None


def _list(client, loc: _S3Location) -> list[tuple[str, _ObjectVersion]]:
    """(key, version) of every object under the prefix, following pagination."""
    from botocore.exceptions import ClientError

    found: list[tuple[str, _ObjectVersion]] = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=loc.key):
            for obj in page.get("Contents", []):
                if not obj["Key"].endswith("/"):  # "folder" placeholder objects carry no data
                    found.append((obj["Key"], _ObjectVersion(obj["ETag"], int(obj["Size"]))))
    except ClientError as err:
        raise _client_error(err, loc, "listing") from None
    return found


def _download(client, loc: _S3Location, version: _ObjectVersion, dest: Path) -> None:
    """Fetch exactly `version` of the object into `dest` (a temporary path).

    boto3's managed transfer (parallel ranged GETs for large files) is told the ETag and size we saw,
    so every GET carries IfMatch: a concurrent overwrite fails the download instead of mixing versions
    or storing bytes under another version's ETag.
    """
    from boto3.s3.transfer import TransferConfig, create_transfer_manager
    from botocore.exceptions import ClientError
    from s3transfer.subscribers import BaseSubscriber

    class PinVersion(BaseSubscriber):
        def on_queued(self, future, **kwargs):
            future.meta.provide_transfer_size(version.size)
            future.meta.provide_object_etag(version.etag)

    try:
        with create_transfer_manager(client, TransferConfig()) as manager:
            manager.download(loc.bucket, loc.key, str(dest), subscribers=[PinVersion()]).result()
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code"))
        if code in ("412", "PreconditionFailed"):
            raise RuntimeError(f"{loc.uri} changed in S3 while it was being downloaded; retry") from None
        raise _client_error(err, loc, "download") from None
    except _unreachable_errors() as err:
        raise RuntimeError(f"download of {loc.uri} failed: {err}") from err


# -- the cache -------------------------------------------------------------------------------------
@contextlib.contextmanager
def _locked(path: Path):
    """Exclusive fcntl lock on `path` (released when the process dies, so never stale)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_atomically(path: Path, write) -> None:
    """Call write(tmp_path) on a temp file in path's directory, then os.replace it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; a node cache is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _cached_version(loc: _S3Location) -> _ObjectVersion | None:
    """The version recorded for the cached copy, if the copy is there and has the recorded size."""
    try:
        meta = json.loads(loc.meta_path(".json").read_text())
        version = _ObjectVersion(meta["etag"], int(meta["size"]))
        if loc.local_path().stat().st_size != version.size:
            return None
        return version
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _fetch_if_changed(client, loc: _S3Location, version: _ObjectVersion) -> Path:
    """Make the cached copy of `loc` be `version`, downloading only when it is not already."""
    target = loc.local_path()
    if _cached_version(loc) == version:
        return target
    with _locked(loc.meta_path(".lock")):
        if _cached_version(loc) == version:  # another process finished it while we waited
            return target
        log.info("downloading %s (%.1f MB) -> %s", loc.uri, version.size / 1e6, target)
        _write_atomically(target, lambda tmp: _download(client, loc, version, tmp))
        meta = json.dumps({"uri": loc.uri, "etag": version.etag, "size": version.size})
        _write_atomically(loc.meta_path(".json"), lambda tmp: tmp.write_text(meta))
    return target


def _resolve_object(loc: _S3Location) -> Path:
    """One object, or the prefix of that name when no such object exists but objects lie below it."""
    client = _client()
    try:
        version = _head(client, loc)
    except _unreachable_errors() as err:
        return _offline_fallback(loc, err)
    if version is None:
        if _has_objects_below(client, loc.as_prefix()):
            return _sync_prefix(loc.as_prefix(), client)
        raise FileNotFoundError(f"{loc.uri}: no such object or prefix")
    return _fetch_if_changed(client, loc, version)


def _sync_prefix(loc: _S3Location, client=None) -> Path:
    """Every object under the prefix, mirrored below the prefix's local directory."""
    client = client or _client()
    try:
        listing = _list(client, loc)
    except _unreachable_errors() as err:
        return _offline_fallback(loc, err)
    if not listing:
        raise FileNotFoundError(f"{loc.uri}: no objects under this prefix")
    for key, version in listing:
        _fetch_if_changed(client, _S3Location(loc.bucket, key), version)
    # Recording the listing marks the prefix complete, which is what makes offline re-use safe.
    manifest = json.dumps({"uri": loc.uri, "keys": [key for key, _ in listing]})
    _write_atomically(loc.meta_path(".prefix.json"), lambda tmp: tmp.write_text(manifest))
    _warn_about_strays(loc, {key for key, _ in listing})
    return loc.local_path()


def _warn_about_strays(loc: _S3Location, keys: set[str]) -> None:
    """Files cached under a prefix that S3 no longer has are left alone (another process may be using
    them) but reported, since a stale shard in a model directory can change what gets loaded."""
    root = loc.local_path()
    strays = [p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".part")
              and f"{loc.key.rstrip('/')}/{p.relative_to(root).as_posix()}".lstrip("/") not in keys]
    if strays:
        log.warning("%d cached file(s) under %s are no longer in %s, e.g. %s", len(strays), root, loc.uri,
                    strays[0].name)


def _offline_fallback(loc: _S3Location, err: Exception) -> Path:
    """S3 is unreachable: use a complete cached copy (object, or prefix with all its files) if there is one."""
    if not loc.is_prefix and _cached_version(loc) is not None:
        log.warning("S3 unreachable (%s); using the cached copy of %s", type(err).__name__, loc.uri)
        return loc.local_path()
    prefix = loc if loc.is_prefix else loc.as_prefix()
    with contextlib.suppress(OSError, ValueError, KeyError):
        keys = json.loads(prefix.meta_path(".prefix.json").read_text())["keys"]
        if all(_cached_version(_S3Location(loc.bucket, k)) is not None for k in keys):
            log.warning("S3 unreachable (%s); using the cached copy of %s", type(err).__name__, prefix.uri)
            return prefix.local_path()
    raise RuntimeError(f"cannot reach S3 for {loc.uri} and there is no complete cached copy: {err}") from err
