"""A local S3-compatible server (moto) for the tests and for trying the pipeline by hand.

    python -m minigpt4.s3server --port 9000 --bucket synthetic   # prints the `export AWS_...` lines

It binds loopback only unless asked otherwise: moto accepts any credentials and keeps every object in
memory, so it must never be reachable from other machines by accident. Moto's backends are global to
the process, so two `LocalS3` servers in one process see the same buckets.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.request

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _is_loopback(host: str) -> bool:
    """True when every address `host` names is a loopback one (a name is resolved)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def _url_host(host: str) -> str:
    """The host as clients on this machine reach it: wildcard binds map to loopback, IPv6 in brackets."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"[{host}]" if ":" in host else host


class LocalS3:
    """moto's S3 server on a background thread; a context manager (`with LocalS3() as s3: ...`)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, allow_remote: bool = False,
                 log_requests: bool = False, ready_timeout: float = 10.0):
        if not allow_remote and not _is_loopback(host):
            raise ValueError(f"LocalS3 refuses to bind {host!r}: not a loopback address, and the server accepts "
                             "any credentials; pass allow_remote=True (--allow-remote) to expose it")
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be 0..65535, got {port}")
        self.host, self.port = host, port
        self.log_requests = log_requests
        self.ready_timeout = ready_timeout
        self._server = None
        self._client = None
        self._saved_env: dict[str, str | None] | None = None

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("LocalS3 is not started; call start() first")
        return f"http://{_url_host(self.host)}:{self.port}"

    def start(self) -> LocalS3:
        """Bind (a free port when `port` is 0), serve on a daemon thread, and return once it answers HTTP."""
        if self._server is not None:
            return self
        from moto.server import ThreadedMotoServer

        if self.port:
            self._check_port_free()
        if not self.log_requests:
            # werkzeug logs every request at INFO (and turns its logger on at INFO when unset): a
            # dataset upload would print a line per object. Errors still show.
            logging.getLogger("werkzeug").setLevel(logging.WARNING)
        server = ThreadedMotoServer(ip_address=self.host, port=self.port, verbose=False)
        server.start()
        self._server = server
        self.port = server.get_host_and_port()[1]  # the port the OS picked when 0 was asked
        self._wait_ready()
        return self

    def _check_port_free(self) -> None:
        """Fail clearly on a taken port: moto's thread would die on bind and its start() wait forever."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server itself binds
            try:
                s.bind((self.host, self.port))
            except OSError as err:
                raise OSError(err.errno, f"cannot bind {self.host}:{self.port}: {err.strerror}") from None

    def _wait_ready(self) -> None:
        """Poll GET / until the server answers (any HTTP status counts); proxies are bypassed."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + self.ready_timeout
        delay = 0.005
        while True:
            try:
                with opener.open(self.endpoint + "/", timeout=0.5):
                    return
            except urllib.error.HTTPError:
                return
            except OSError as err:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"local S3 server at {self.endpoint} did not answer within "
                                       f"{self.ready_timeout:g}s: {err}") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def env(self) -> dict[str, str]:
        """The variables that point boto3 (and anything using the AWS chain) at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, **CREDENTIALS}

    def apply_env(self) -> None:
        """Set `env()` in os.environ (before clients are created: boto3 reads it at client creation)."""
        env = self.env()
        if self._saved_env is None:
            self._saved_env = {k: os.environ.get(k) for k in env}
        os.environ.update(env)

    def restore_env(self) -> None:
        if self._saved_env is None:
            return
        for k, v in self._saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self._saved_env = None

    def client(self):
        """A boto3 S3 client for this server, independent of os.environ."""
        if self._client is None:
            import boto3

            self._client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                                        aws_secret_access_key="testing", region_name="us-east-1")
        return self._client

    def create_bucket(self, name: str) -> None:
        """Create a bucket; one that already exists is left as it is."""
        from botocore.exceptions import ClientError

        try:
            self.client().create_bucket(Bucket=name)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    def stop(self) -> None:
        """Shut the server down and restore any environment `apply_env` changed."""
        self.restore_env()
        if self._server is not None:
            self._server.stop()
            self._server = None
            self._client = None

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def export_lines(env: dict[str, str]) -> str:
    return "\n".join(f"export {k}={v}" for k, v in env.items())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minigpt4.s3server", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000, help="0 picks a free port (default: 9000)")
    p.add_argument("--bucket", action="append", default=[], metavar="NAME", help="create this bucket (repeatable)")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --host")
    p.add_argument("--log-requests", action="store_true", help="log every HTTP request")
    args = p.parse_args(argv)
    try:
        server = LocalS3(args.host, args.port, allow_remote=args.allow_remote, log_requests=args.log_requests).start()
    except (ValueError, OSError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        for name in args.bucket:
            server.create_bucket(name)
        print(f"local S3 serving at {server.endpoint}" + (f" (buckets: {', '.join(args.bucket)})" if args.bucket else ""))
        print(export_lines(server.env()))
        print("Ctrl-C to stop", flush=True)
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
