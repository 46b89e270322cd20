"""Online serving: Ray Serve replicas of the MiniGPT-4 graph behind an OpenAI-compatible HTTP API.

    serve run serve/config.yaml                 # embedded default: the tiny preset on 127.0.0.1:8000
    serve deploy serve/config.yaml              # on a running cluster (cluster.yaml); KubeRay: rayservice.yaml

Routes (one FastAPI app per replica, `MiniGPT4Deployment`):

    POST /v1/chat/completions   OpenAI chat: text + image_url parts, multi-turn, stream (SSE), n, stop, usage
    GET  /v1/models             the served model id
    POST /v1/captions           one or many images -> captions
    GET  /healthz               liveness (no key needed)
    GET  /                      the web chat page (no external assets)

Requests share forward passes by continuous batching: each replica runs one `Batcher` thread over
a `GenerationEngine` with a static KV cache of `max_batch_size` slots. A request joins the running
batch between two decode steps (its prompt prefilled into free slots; an idle replica first waits
`batch_wait_ms` for company), decodes alongside the others and leaves as soon as it finishes;
every token goes back to its request's event loop as it is made. Beam-search requests run alone.
A request that finds `max_queue` rows already waiting gets 503 (Serve's `max_queued_requests`
bounds the proxy's queue the same way).

Images come as `data:image/...;base64,` URLs, as `s3://` URLs of the buckets in `s3_buckets`, or as
http(s) URLs when `http_fetch` is on and the host is in `http_hosts` (never a private, loopback or
link-local address, no redirects). Errors are JSON in OpenAI's shape, never stack traces.
"""

import asyncio
import base64
import binascii
import hmac
import ipaddress
import json
import logging
import os
import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from urllib.parse import urlparse

from .weights import WeightsConfig

log = logging.getLogger(__name__)
API_KEY_ENV = "MINIGPT4_API_KEY"
MiB = 1024 * 1024


@dataclass
class ServeSettings:
    """The application's `args:` in serve/config.yaml."""

    model: dict = field(default_factory=lambda: {"preset": "tiny"})
    """Preset + ModelConfig overrides (e.g. {preset: vicuna7b, quantize_llm: 8bit})."""
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    model_id: str = ""
    """The name clients pass as `model` (default: minigpt4-<preset>)."""
    api_key_env: str = API_KEY_ENV
    """Environment variable holding the API key; when it is set and non-empty every /v1 route needs
    `Authorization: Bearer <key>`. The key itself never goes in a config file or a log."""
    max_body_bytes: int = 20 * MiB
    max_image_pixels: int = 16_777_216  # 4096 x 4096
    max_images: int = 4
    """Images per request."""
    s3_buckets: list[str] = field(default_factory=list)
    """Buckets whose s3:// URLs image_url may name (none by default)."""
    http_fetch: bool = False
    """Fetch http(s) image URLs (off by default; then only from `http_hosts`)."""
    http_hosts: list[str] = field(default_factory=list)
    fetch_timeout_s: float = 10.0
    default_max_tokens: int = 300
    max_tokens_limit: int = 1024
    max_n: int = 4
    max_batch_size: int = 32
    """Rows (requests x n) decoding at once: the slots of the engine's static KV cache."""
    warmup_tokens: int = 512
    """Before it takes requests, a replica allocates the KV cache for max_batch_size rows of this many
    positions (prompt + generated tokens) and compiles the decode step (CUDA graphs) at every batch
    width and cache prefix, so no request waits for a compile; a longer request grows the cache once.
    0: no warm-up. The cache takes max_batch_size x warmup_tokens x (2 x layers x hidden x 2 bytes):
    8 GiB at the defaults for a 7B LLM in bf16/fp16."""
    batch_wait_ms: float = 5.0
    """How long a request reaching an idle replica waits for others to share its prefill."""
    max_queue: int = 64
    """Rows waiting per replica beyond which requests get 503."""
    seed: int = 0
    """Initialisation of parts without weights (the embedded default's random tiny model)."""

    def __post_init__(self):
        for name in ("max_body_bytes", "max_image_pixels", "max_images", "default_max_tokens", "max_tokens_limit",
                     "max_n", "max_batch_size", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_tokens < 0:
            raise ValueError(f"warmup_tokens must be >= 0, got {self.warmup_tokens}")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError("default_max_tokens must not exceed max_tokens_limit")
        if not self.model_id:
            self.model_id = f"minigpt4-{self.model.get('preset', 'tiny')}"

    def model_config(self):
        from .model import preset

        spec = dict(self.model)
        return preset(spec.pop("preset", "tiny"), **spec)


class APIError(Exception):
    """An error a client sees: HTTP status + OpenAI's error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# -- images ----------------------------------------------------------------------------------------
def _public_address(host: str) -> None:
    """Refuse hosts that resolve to private, loopback, link-local, reserved or multicast addresses."""
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        raise APIError(400, f"image_url host {host!r} does not resolve", param="image_url") from None
    for info in infos:
        ip = ipaddress.ip_address(info[4][0])
        if not ip.is_global or ip.is_multicast:
            raise APIError(400, f"image_url host {host!r} is not a public address", param="image_url")


def fetch_image_bytes(url: str, s: ServeSettings) -> bytes:
    """The bytes an image_url names (data:, s3:// of an allowed bucket, or an allowed http(s) host)."""
    if not isinstance(url, str) or not url:
        raise APIError(400, "image_url.url must be a non-empty string", param="image_url")
    if url.startswith("data:"):
        head, sep, payload = url.partition(",")
        if not sep or ";base64" not in head or not head[5:].startswith("image/"):
            raise APIError(400, "data URLs must look like data:image/<type>;base64,<data>", param="image_url")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, "image_url holds invalid base64", param="image_url") from None
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if parsed.netloc not in s.s3_buckets:
            raise APIError(400, f"s3 bucket {parsed.netloc!r} is not allowed", param="image_url")
        from .data import io as uio

        try:
            data = uio.read_bytes(url)
        except uio.ObjectError as e:
            raise APIError(400, f"cannot read {url}: {e.reason}", param="image_url") from None
    elif parsed.scheme in ("http", "https"):
        host = parsed.hostname or ""
        if not s.http_fetch:
            raise APIError(400, "http(s) image URLs are disabled on this server; send a data: URL",
                           param="image_url")
        if host not in s.http_hosts:
            raise APIError(400, f"image host {host!r} is not in the allow-list", param="image_url")
        _public_address(host)
        import requests

        try:
            with requests.get(url, timeout=s.fetch_timeout_s, stream=True, allow_redirects=False) as r:
                if r.status_code != 200:
                    raise APIError(400, f"fetching the image gave HTTP {r.status_code} (redirects are not "
                                        "followed)", param="image_url")
                data = r.raw.read(s.max_body_bytes + 1, decode_content=True)
        except requests.RequestException as e:
            raise APIError(400, f"fetching the image failed: {type(e).__name__}", param="image_url") from None
    else:
        raise APIError(400, "image_url must be a data:, s3:// or http(s):// URL", param="image_url")
    if len(data) > s.max_body_bytes:
        raise APIError(413, "image is larger than the request size limit", param="image_url")
    return data


def decode_image(data: bytes, size: int, s: ServeSettings):
    """bytes -> (1, 3, S, S) float tensor, or an APIError (413 beyond the pixel limit, else 400)."""
    import torch

    from .images import ImageError, load_image, preprocess

    try:
        img = load_image(data, name="image_url", max_pixels=s.max_image_pixels)
    except ImageError as e:
        status = 413 if e.reason == "too_large" else 400
        raise APIError(status, f"bad image ({e.reason}): {e}", param="image_url", code=e.reason) from None
    return torch.from_numpy(preprocess(img, size))[None]


# -- requests -> prompts ----------------------------------------------------------------------------
def _int(body: dict, name: str, default, lo: int, hi: int):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise APIError(400, f"{name} must be an integer in [{lo}, {hi}]", param=name)
    return v


def _float(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise APIError(400, f"{name} must be a number in [{lo}, {hi}]", param=name)
    return float(v)


SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes
MIN_SAMPLING_TEMPERATURE = 1e-4


def sampling_params(body: dict, s: ServeSettings, template_stop: tuple[str, ...]):
    """OpenAI request fields -> SamplingParams (temperature 0 = greedy; `num_beams`, `repetition_penalty`
    and `min_tokens` are extensions)."""
    from .generate import SamplingParams

    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _int({"max_tokens": max_tokens}, "max_tokens", s.default_max_tokens, 1, s.max_tokens_limit)
    temperature = _float(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _float(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        top_p = 1e-6
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(x, str) and x for x in stop):
        raise APIError(400, "stop must be a non-empty string or a list of up to 4 of them", param="stop")
    beams = _int(body, "num_beams", 1, 1, 8)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not SEED_MIN <= seed <= SEED_MAX):
        raise APIError(400, f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}]", param="seed")
    penalty = _float(body, "repetition_penalty", 1.0, 0.5, 2.0)
    min_tokens = _int(body, "min_tokens", 0, 0, max_tokens)  # vLLM's extension: EOS is masked before it
    greedy = temperature < MIN_SAMPLING_TEMPERATURE  # argmax in effect; logits / ~0 overflow float32 to inf/nan
    return SamplingParams(max_new_tokens=max_tokens, min_new_tokens=min_tokens,
                          do_sample=not greedy and beams == 1,
                          temperature=1.0 if greedy else temperature, top_p=top_p, num_beams=beams,
                          repetition_penalty=penalty, stop=tuple(template_stop) + tuple(stop), seed=seed)


def conversation_from_messages(messages, template: str, image_size: int, s: ServeSettings):
    """OpenAI `messages` -> (prompt text with one `<ImageHere>` per image, [pixels (1,3,S,S)])."""
    from .prompts import CHAT_SYSTEM, IMAGE_PLACEHOLDER, Conversation

    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    system = CHAT_SYSTEM
    conv = None
    n_images = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise APIError(400, f"messages[{i}] needs a role of system, user or assistant", param="messages")
        role, content = m["role"], m.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise APIError(400, f"messages[{i}].content must be a string or a list of parts", param="messages")
        texts, images = [], []
        for j, p in enumerate(parts):
            kind = p.get("type") if isinstance(p, dict) else None
            if kind == "text" and isinstance(p.get("text"), str):
                if IMAGE_PLACEHOLDER in p["text"]:
                    raise APIError(400, f"messages[{i}].content[{j}]: text must not contain {IMAGE_PLACEHOLDER} "
                                        "(send images as image_url parts)", param="messages")
                texts.append(p["text"])
            elif kind == "image_url" and role == "user":
                url = p.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                n_images += 1
                if n_images > s.max_images:
                    raise APIError(400, f"at most {s.max_images} images per request", param="messages")
                images.append(decode_image(fetch_image_bytes(url, s), image_size, s))
            elif kind == "image_url":
                raise APIError(400, f"messages[{i}]: images go in user messages", param="messages")
            else:
                raise APIError(400, f"messages[{i}].content[{j}]: unsupported content part type {kind!r} "
                                    "(text and image_url are)", param="messages")
        text = " ".join(t.strip() for t in texts if t.strip())
        if role in ("system", "developer"):
            if conv is not None:
                raise APIError(400, "a system message must come first", param="messages")
            system = text
            continue
        if conv is None:
            conv = Conversation.for_template(template, system=system)
        if role == "user":
            for img in images:
                conv.add_image(img)
            if text or not images:
                conv.ask(text)
        else:
            conv.answer(text)
    if conv is None or messages[-1].get("role") != "user":
        raise APIError(400, "the last message must be from the user", param="messages")
    return conv.prompt(), list(conv.images), conv


# -- batching across requests ----------------------------------------------------------------------
@dataclass
class _Job:
    prompts: list[str]
    images: list  # per row: (k, 3, S, S) tensor or None
    params: list
    deliver: object  # callable(kind, payload), called from the batcher thread
    beams: bool = False


class Batcher:
    """One thread per replica running the model with continuous batching: waiting requests join the
    running batch between decode steps and leave it as they finish (see the module docstring)."""

    def __init__(self, model, tokenizer, max_rows: int, wait_s: float, warmup_tokens: int = 0):
        from .generate import GenerationEngine

        self.model, self.tokenizer = model, tokenizer
        self.engine = GenerationEngine(model.llm, tokenizer, max_slots=max_rows)
        self.warmup: dict | None = None  # what the warm-up did (None: no warm-up)
        self.wait_s = wait_s
        self.q: queue.Queue[_Job] = queue.Queue()
        self.waiting_rows = 0
        self.batches = 0  # prefills: requests that joined the running batch together
        self.steps = 0  # decode steps
        self._held: _Job | None = None  # taken from the queue, waiting for free slots (batcher thread only)
        self._owners: dict[int, tuple[_Job, int]] = {}  # engine sequence id -> (job, row)
        self._lock = threading.Lock()
        # The warm-up runs on the batcher thread, before its loop: the CUDA graphs that torch.compile records
        # belong to the thread that records them (cudagraph trees keep one tree manager per thread), so
        # graphs recorded here, on the constructor's thread, would be recorded again inside requests.
        ready, failed = threading.Event(), []
        threading.Thread(target=self._loop, args=(warmup_tokens, ready, failed), name="minigpt4-batcher",
                         daemon=True).start()
        ready.wait()
        if failed:
            raise failed[0]

    def _warm(self, tokens: int) -> dict:
        """GenerationEngine.warmup for every slot (on the batcher thread, before it takes requests)."""
        import torch

        try:
            info = self.engine.warmup(tokens=tokens)
        except torch.OutOfMemoryError as e:
            raise RuntimeError(f"the KV cache for max_batch_size={self.engine.max_slots} rows of warmup_tokens="
                               f"{tokens} positions does not fit beside the model; lower max_batch_size or "
                               f"warmup_tokens (0: no warm-up): {e}") from None
        log.info("warm-up: KV cache %.2f GiB (%d slots x %d positions), decode step %s for widths %s x prefixes "
                 "%s in %.1fs", info["cache_gib"], info["slots"], info["capacity"],
                 "compiled" if info["compiled"] else "run", info["widths"], info["spans"], info["seconds"])
        return info

    def submit(self, job: _Job) -> None:
        if len(job.prompts) > self.engine.max_slots:
            raise APIError(400, f"{len(job.prompts)} rows (n x images) exceed the {self.engine.max_slots} rows a "
                                "replica decodes at once (max_batch_size)")
        with self._lock:
            self.waiting_rows += len(job.prompts)
        self.q.put(job)

    def _next(self, timeout: float | None) -> _Job | None:
        """The oldest waiting job (the held one first), waiting up to `timeout` (None: forever, 0: not at all)."""
        if self._held is not None:
            job, self._held = self._held, None
            return job
        try:
            return self.q.get(timeout=timeout) if timeout != 0 else self.q.get_nowait()
        except queue.Empty:
            return None

    def _take(self) -> list[_Job]:
        """Jobs to start now, oldest first, as many as the free slots hold. An idle engine waits for a
        first job, then up to wait_s for others to share its prefill; a busy one takes what is queued.
        A beam-search job runs alone, after the running batch."""
        idle = not self.engine.busy
        jobs: list[_Job] = []
        rows, deadline = 0, None
        while True:
            timeout = 0 if not idle else None if deadline is None else max(0.0, deadline - time.monotonic())
            job = self._next(timeout)
            if job is None:
                return jobs
            if (job.beams and (jobs or not idle)) or rows + len(job.prompts) > self.engine.free_slots:
                self._held = job  # keeps its place at the head of the line
                return jobs
            jobs.append(job)
            if job.beams:
                return jobs
            rows += len(job.prompts)
            deadline = deadline or time.monotonic() + self.wait_s

    def _loop(self, warmup_tokens: int, ready: threading.Event, failed: list) -> None:
        try:
            self.warmup = self._warm(warmup_tokens) if warmup_tokens else None
        except BaseException as e:  # the constructor raises it
            failed.append(e)
            return
        finally:
            ready.set()
        while True:
            jobs = self._take()
            with self._lock:
                self.waiting_rows -= sum(len(j.prompts) for j in jobs)
            if jobs and jobs[0].beams:
                self._run_alone(jobs[0])
            elif jobs:
                self._join(jobs)
            if self.engine.busy:
                self._step()

    def _embeds(self, jobs: list[_Job]):
        import torch

        with torch.no_grad():
            return self.model.generation_inputs(self.tokenizer, [p for j in jobs for p in j.prompts],
                                                [x for j in jobs for x in j.images])

    def _join(self, jobs: list[_Job]) -> None:
        """Prefill the jobs' rows into free slots (one forward); they decode from the next step on.
        Each job samples from its own seeded generator: its output does not depend on its company."""
        import torch

        try:
            gens = []
            for j in jobs:
                seed = j.params[0].seed
                gen = torch.Generator(device=self.model.device).manual_seed(seed) if seed is not None else None
                gens += [gen] * len(j.prompts)
            ids = self.engine.add(self._embeds(jobs), [p for j in jobs for p in j.params], gens)
        except Exception as e:  # these requests fail; the running ones go on
            log.exception("prefill failed")
            for j in jobs:
                j.deliver("error", e)
            return
        self.batches += 1
        self._owners.update(zip(ids, [(j, r) for j in jobs for r in range(len(j.prompts))]))

    def _step(self) -> None:
        try:
            events = self.engine.step()
            self.steps += 1
            for ev in events:
                job, row = self._owners[ev.index] if ev.completion is None else self._owners.pop(ev.index)
                job.deliver("token", (row, ev))
        except Exception as e:  # the running requests fail, the replica lives on
            log.exception("decode step failed")
            for job in {id(j): j for j, _ in self._owners.values()}.values():
                job.deliver("error", e)
            self._owners.clear()
            self.engine.abort()

    def _run_alone(self, job: _Job) -> None:
        """Beam search: the whole job in one engine call (beams are known only at the end)."""
        try:
            for events in self.engine.stream(self._embeds([job]), job.params):
                for ev in events:
                    job.deliver("token", (ev.index, ev))
        except Exception as e:
            log.exception("beam search failed")
            job.deliver("error", e)
        self.batches += 1


# -- the documented request bodies (/openapi.json; the routes read raw JSON and validate it themselves) --
_LIMITS = ServeSettings()
_IMAGE_URL_DOC = "data:image/...;base64,<data>, s3://<allowed bucket>/key, or http(s):// of an allowed host"
_MAX_TOKENS = {"type": "integer", "minimum": 1, "maximum": _LIMITS.max_tokens_limit,
               "description": f"at most the server's max_tokens_limit (default {_LIMITS.max_tokens_limit})"}
_CONTENT_PART = {"oneOf": [
    {"type": "object", "required": ["type", "text"],
     "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}},
    {"type": "object", "required": ["type", "image_url"],
     "properties": {"type": {"type": "string", "enum": ["image_url"]},
                    "image_url": {"type": "object", "required": ["url"],
                                  "properties": {"url": {"type": "string", "description": _IMAGE_URL_DOC}}}}},
]}
CHAT_REQUEST_SCHEMA = {
    "type": "object", "required": ["messages"],
    "properties": {
        "model": {"type": "string"},
        "messages": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["role", "content"],
            "properties": {"role": {"type": "string", "enum": ["system", "developer", "user", "assistant"]},
                           "content": {"oneOf": [{"type": "string"},
                                                 {"type": "array", "items": _CONTENT_PART}]}}}},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1},
        "max_tokens": _MAX_TOKENS,
        "n": {"type": "integer", "minimum": 1, "maximum": _LIMITS.max_n,
              "description": f"at most the server's max_n (default {_LIMITS.max_n})"},
        "stop": {"oneOf": [{"type": "string", "minLength": 1},
                           {"type": "array", "maxItems": 4, "items": {"type": "string", "minLength": 1}}]},
        "stream": {"type": "boolean"},
        "seed": {"type": "integer", "description": "in [-2**63, 2**64 - 1]"},
        "num_beams": {"type": "integer", "minimum": 1, "maximum": 8, "description": "extension: beam search"},
    },
}
CAPTIONS_REQUEST_SCHEMA = {
    "type": "object", "required": ["images"],
    "properties": {
        "images": {"type": "array", "minItems": 1, "maxItems": _LIMITS.max_batch_size,
                   "items": {"oneOf": [{"type": "string", "description": _IMAGE_URL_DOC},
                                       {"type": "object", "required": ["url"],
                                        "properties": {"url": {"type": "string"}}}]}},
        "prompt": {"type": "string"},
        "template": {"type": "string", "enum": ["chat", "raw"]},
        "max_tokens": _MAX_TOKENS,
    },
}


def _body_doc(schema: dict) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


# -- the deployment --------------------------------------------------------------------------------
def _page() -> str:
    return resources.files("minigpt4").joinpath("assets/chat.html").read_text()


def build_api():
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    api = FastAPI(title="MiniGPT-4", version="0.1.0", docs_url=None, redoc_url=None)

    @api.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        err = APIError(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500 else "server_error")
        return JSONResponse(err.body(), status_code=e.status_code)

    @api.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return JSONResponse(APIError(400, "invalid request").body(), status_code=400)

    @api.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse(APIError(500, "internal error", "server_error").body(), status_code=500)

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(_page(), headers={"Content-Security-Policy": "default-src 'self'; img-src 'self' data: "
                                              "blob:; style-src 'self' 'unsafe-inline'; script-src 'self' "
                                              "'unsafe-inline'"})

    return api


def deployment_class():
    from fastapi import Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from ray import serve

    api = build_api()

    @serve.deployment(name="MiniGPT4Deployment", max_ongoing_requests=32)
    @serve.ingress(api)
    class MiniGPT4Deployment:
        def __init__(self, settings: dict):
            import torch

            from .config import from_dict
            from .prompts import END_SYMS
            from .weights import load_pretrained

            self.s = s = from_dict(ServeSettings, settings)
            key = os.environ.get(s.api_key_env, "")
            self._key = key.encode() if key else None
            torch.manual_seed(s.seed)
            device = "cuda" if torch.cuda.is_available() else "cpu"
            t = time.time()
            self.model, self.tokenizer, _ = load_pretrained(s.model_config(), s.weights, device=device)
            self.model.eval()
            self.template = self.model.cfg.template
            self.stop = (END_SYMS[self.template],)
            self.batcher = Batcher(self.model, self.tokenizer, s.max_batch_size, s.batch_wait_ms / 1000,
                                   s.warmup_tokens)
            self.created = int(time.time())
            self._metrics = _metrics()
            log.info("MiniGPT-4 replica ready on %s in %.1fs (model %s, auth %s)", device, time.time() - t,
                     s.model_id, "on" if self._key else "off")

        # -- plumbing ------------------------------------------------------------------------------
        def _auth(self, request: Request) -> None:
            if self._key is None:
                return
            header = request.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._key):
                raise APIError(401, "missing or invalid API key (Authorization: Bearer <key>)",
                               "authentication_error", code="invalid_api_key")

        async def _json(self, request: Request) -> dict:
            self._auth(request)
            length = request.headers.get("content-length")
            if length and length.isdigit() and int(length) > self.s.max_body_bytes:
                raise APIError(413, f"request body exceeds {self.s.max_body_bytes} bytes")
            body = b""
            async for chunk in request.stream():
                body += chunk
                if len(body) > self.s.max_body_bytes:
                    raise APIError(413, f"request body exceeds {self.s.max_body_bytes} bytes")
            try:
                data = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                raise APIError(400, "request body is not valid JSON") from None
            if not isinstance(data, dict):
                raise APIError(400, "request body must be a JSON object")
            return data

        def _check_model(self, body: dict) -> None:
            model = body.get("model")
            if model is None:
                return
            if model != self.s.model_id:
                raise APIError(404, f"model {model!r} does not exist; this server has {self.s.model_id!r}",
                               param="model", code="model_not_found")

        def _submit(self, prompts, images, params) -> asyncio.Queue:
            if self.batcher.waiting_rows + len(prompts) > self.s.max_queue:
                raise APIError(503, "server is busy, retry shortly", "server_error", code="overloaded")
            loop = asyncio.get_running_loop()
            out: asyncio.Queue = asyncio.Queue()

            def deliver(kind, payload):
                loop.call_soon_threadsafe(out.put_nowait, (kind, payload))

            self.batcher.submit(_Job(prompts, images, params, deliver, beams=params[0].num_beams > 1))
            return out

        @staticmethod
        async def _collect(out: asyncio.Queue, rows: int) -> list:
            comps = [None] * rows
            while any(c is None for c in comps):
                kind, payload = await out.get()
                if kind == "error":
                    raise APIError(500, "generation failed", "server_error")
                row, ev = payload
                if ev.completion is not None:
                    comps[row] = ev.completion
            return comps

        # -- routes ------------------------------------------------------------------------------
        @api.get("/healthz")
        async def healthz(self):
            return {"status": "ok", "model": self.s.model_id, "batches": self.batcher.batches,
                    "steps": self.batcher.steps, "waiting_rows": self.batcher.waiting_rows,
                    "warmup": self.batcher.warmup}

        @api.get("/v1/models")
        async def models(self, request: Request):
            self._auth(request)
            return {"object": "list", "data": [self._model_card()]}

        @api.get("/v1/models/{model_id}")
        async def model(self, model_id: str, request: Request):
            self._auth(request)
            if model_id != self.s.model_id:
                raise APIError(404, f"model {model_id!r} does not exist", param="model", code="model_not_found")
            return self._model_card()

        def _model_card(self) -> dict:
            return {"id": self.s.model_id, "object": "model", "created": self.created, "owned_by": "minigpt4"}

        @api.post("/v1/chat/completions", openapi_extra=_body_doc(CHAT_REQUEST_SCHEMA))
        async def chat(self, request: Request):
            import torch

            body = await self._json(request)
            self._check_model(body)
            n = _int(body, "n", 1, 1, self.s.max_n)
            params = sampling_params(body, self.s, self.stop)
            prompt, images, _ = await asyncio.to_thread(conversation_from_messages, body.get("messages"),
                                                        self.template, self.model.cfg.image_size, self.s)
            pixels = torch.cat(images) if images else None
            out = self._submit([prompt] * n, [pixels] * n, [params] * n)
            rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
            self._metrics["requests"].inc(tags={"route": "chat"})
            if body.get("stream"):
                opts = body.get("stream_options") or {}
                usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
                return StreamingResponse(self._sse(out, n, rid, created, usage), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            t0 = time.perf_counter()
            comps = await self._collect(out, n)
            self._metrics["latency"].observe(time.perf_counter() - t0)
            prompt_tokens = comps[0].prompt_tokens
            completion_tokens = sum(len(c.token_ids) for c in comps)
            self._metrics["tokens"].inc(completion_tokens)
            return JSONResponse({
                "id": rid, "object": "chat.completion", "created": created, "model": self.s.model_id,
                "choices": [{"index": i, "message": {"role": "assistant", "content": c.text.strip()},
                             "finish_reason": c.finish_reason, "logprobs": None} for i, c in enumerate(comps)],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}})

        async def _sse(self, out: asyncio.Queue, n: int, rid: str, created: int, usage: bool):
            def chunk(choices, **extra):
                return "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk", "created": created,
                                              "model": self.s.model_id, "choices": choices, **extra}) + "\n\n"

            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                         for i in range(n)])
            started = [False] * n
            done, prompt_tokens, completion_tokens = 0, 0, 0
            t0, first = time.perf_counter(), True
            while done < n:
                kind, payload = await out.get()
                if kind == "error":
                    yield "data: " + json.dumps(APIError(500, "generation failed", "server_error").body()) + "\n\n"
                    break
                row, ev = payload
                text = ev.text
                if not started[row]:
                    text = text.lstrip()
                    started[row] = bool(text)
                if text:
                    if first:
                        self._metrics["ttft"].observe(time.perf_counter() - t0)
                        first = False
                    yield chunk([{"index": row, "delta": {"content": text}, "finish_reason": None}])
                if ev.completion is not None:
                    done += 1
                    prompt_tokens = ev.completion.prompt_tokens
                    completion_tokens += len(ev.completion.token_ids)
                    yield chunk([{"index": row, "delta": {}, "finish_reason": ev.completion.finish_reason}])
            self._metrics["tokens"].inc(completion_tokens)
            if usage:
                yield chunk([], usage={"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                       "total_tokens": prompt_tokens + completion_tokens})
            yield "data: [DONE]\n\n"

        @api.post("/v1/captions", openapi_extra=_body_doc(CAPTIONS_REQUEST_SCHEMA))
        async def captions(self, request: Request):
            from .caption import caption_prompt

            body = await self._json(request)
            self._check_model(body)
            urls = body.get("images")
            if isinstance(urls, str):
                urls = [urls]
            if not isinstance(urls, list) or not urls or len(urls) > self.s.max_batch_size:
                raise APIError(400, f"images must be a list of 1 to {self.s.max_batch_size} image URLs",
                               param="images")
            prompt_text = body.get("prompt", "Describe this image in detail.")
            template = body.get("template", "chat")
            if not isinstance(prompt_text, str) or template not in ("chat", "raw"):
                raise APIError(400, "prompt must be a string and template chat or raw", param="prompt")
            if prompt_text.count("<ImageHere>") > 1:
                raise APIError(400, "prompt may hold one <ImageHere> (where the image goes), not more", param="prompt")
            prompt, stop = caption_prompt(prompt_text, template, self.template)
            body.setdefault("temperature", 0)
            params = sampling_params({**body, "stop": None}, self.s, stop)

            def load():
                return [decode_image(fetch_image_bytes(u.get("url") if isinstance(u, dict) else u, self.s),
                                     self.model.cfg.image_size, self.s) for u in urls]

            pixels = await asyncio.to_thread(load)
            out = self._submit([prompt] * len(urls), pixels, [params] * len(urls))
            self._metrics["requests"].inc(tags={"route": "captions"})
            comps = await self._collect(out, len(urls))
            completion_tokens = sum(len(c.token_ids) for c in comps)
            self._metrics["tokens"].inc(completion_tokens)
            return {"object": "list", "model": self.s.model_id,
                    "data": [{"index": i, "caption": c.text.strip(), "finish_reason": c.finish_reason}
                             for i, c in enumerate(comps)],
                    "usage": {"prompt_tokens": sum(c.prompt_tokens for c in comps),
                              "completion_tokens": completion_tokens,
                              "total_tokens": sum(c.prompt_tokens for c in comps) + completion_tokens}}

    return MiniGPT4Deployment


def _metrics() -> dict:
    """Our counters beside Serve's own (both on Ray's Prometheus endpoint)."""
    from ray.util import metrics

    return {
        "requests": metrics.Counter("minigpt4_requests", "requests served", tag_keys=("route",)),
        "tokens": metrics.Counter("minigpt4_generated_tokens", "tokens generated"),
        "ttft": metrics.Histogram("minigpt4_time_to_first_token_s", "streamed time to first token",
                                  boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10]),
        "latency": metrics.Histogram("minigpt4_request_latency_s", "non-streamed request latency",
                                     boundaries=[0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60]),
    }


def app(args: dict | None = None):
    """Serve's application builder (`import_path: minigpt4.serving:app`, `args:` = ServeSettings)."""
    from .config import from_dict, to_dict

    settings = from_dict(ServeSettings, dict(args or {}))  # a bad config fails `serve run`, not every replica
    return deployment_class().bind(to_dict(settings))
