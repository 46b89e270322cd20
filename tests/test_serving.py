"""Online serving (minigpt4.serving) on the session's Ray cluster: the official `openai` client
(plain, streamed, multi-turn with an image), the native routes, batching across requests, and raw
HTTP for every error case (OpenAI-shaped JSON, never a stack trace)."""
from __future__ import annotations

import json
import threading

import pytest
import requests

from conftest import MODEL, SETTINGS, auth, data_url, png  # the fixtures server and client live there too


def test_openai_client_chat_matches_the_model_called_directly(server, client):
    import torch

    from minigpt4.config import from_dict
    from minigpt4.generate import SamplingParams
    from minigpt4.serving import ServeSettings, conversation_from_messages
    from minigpt4.weights import load_pretrained

    assert [m.id for m in client.models.list().data] == [MODEL]
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png())}},
                                             {"type": "text", "text": "Describe this image."}]},
                {"role": "assistant", "content": "A red square."},
                {"role": "user", "content": "What colour is it?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=12)
    c = r.choices[0]
    assert r.object == "chat.completion" and r.model == MODEL and c.message.role == "assistant"
    assert c.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 32  # 32 image tokens + the history
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    # the replica's answer is the model's own: same weights (seed 0), same prompt, same engine
    s = from_dict(ServeSettings, SETTINGS)
    torch.manual_seed(0)
    model, tok, _ = load_pretrained(s.model_config(), s.weights)
    prompt, images, _ = conversation_from_messages(messages, model.cfg.template, model.cfg.image_size, s)
    direct = model.eval().generate(tok, [prompt], [torch.cat(images)], SamplingParams(max_new_tokens=12, stop=("###",)))
    assert c.message.content == direct[0].text.strip()

    # streamed: the deltas add up to the same answer, then a finish reason, usage and [DONE]
    stream = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=12,
                                            stream=True, stream_options={"include_usage": True})
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
    assert text.strip() == c.message.content and finish == c.finish_reason
    assert usage.completion_tokens == r.usage.completion_tokens


def test_sse_wire_format_n_and_stop(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True, "n": 2,
            "max_tokens": 5, "temperature": 0.8, "seed": 1}
    with requests.post(server + "/v1/chat/completions", json=body, headers=auth(), stream=True, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines(decode_unicode=True) if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    finished = {ch["index"] for c in chunks for ch in c["choices"] if ch["finish_reason"]}
    assert finished == {0, 1} and all(c["object"] == "chat.completion.chunk" for c in chunks)

    r = requests.post(server + "/v1/chat/completions", headers=auth(), timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 3, "max_tokens": 6, "stop": ["e", "a"]})
    out = r.json()
    assert r.status_code == 200 and [c["index"] for c in out["choices"]] == [0, 1, 2]
    assert all("e" not in c["message"]["content"] and "a" not in c["message"]["content"] for c in out["choices"])


def test_captions_route_and_s3_images(server):
    r = requests.post(server + "/v1/captions", headers=auth(), timeout=60,
                      json={"images": [data_url(png()), "s3://serve-images/red.png"], "max_tokens": 8})
    assert r.status_code == 200, r.text
    out = r.json()
    assert [d["index"] for d in out["data"]] == [0, 1]
    assert out["data"][0]["caption"] == out["data"][1]["caption"]  # the same image, greedy
    assert out["usage"]["completion_tokens"] >= 2


def test_concurrent_requests_share_decode_steps(server):
    """Continuous batching: requests decode side by side (one step gives a token to every running
    request), however their arrivals spread over the running batch."""
    before = requests.get(server + "/healthz", timeout=10).json()["steps"]
    results, tokens = [], []

    def one(i):
        r = requests.post(server + "/v1/chat/completions", headers=auth(), timeout=60,
                          json={"model": MODEL, "messages": [{"role": "user", "content": f"question {i}"}],
                                "max_tokens": 20, "min_tokens": 20, "temperature": 0})
        results.append(r.status_code)
        tokens.append(r.json()["usage"]["completion_tokens"])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 8
    health = requests.get(server + "/healthz", timeout=10).json()
    steps = health["steps"] - before
    assert steps <= sum(tokens) / 2, f"8 concurrent requests made {sum(tokens)} tokens in {steps} decode steps"
    # the replica warmed up before its first request: its KV cache for every slot, each batch width run once
    warm = health["warmup"]
    assert (warm["slots"], warm["capacity"], warm["widths"]) == (8, 512, [1, 2, 4, 8]) and warm["cache_gib"] > 0
    assert warm["spans"] == [64 * i for i in range(1, 9)]  # and every prefix the decode step attends over


def test_web_page_is_self_contained(server):
    r = requests.get(server + "/", timeout=10)
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    page = r.text
    for needed in ('type="file"', 'id="temperature"', 'id="beams"', 'id="maxtokens"', 'id="restart"',
                   "/v1/chat/completions", "stream: true"):
        assert needed in page
    assert "http://" not in page and "https://" not in page and "<link" not in page  # no CDN assets


ERRORS = [  # (body or raw bytes, headers, status, substring of the message)
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, None, 404, "does not exist"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]},
     None, 400, "invalid base64"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(b"not an image")}}]}]},
     None, 400, "not_image"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, None, 400,
     "unsupported content part"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png((300, 300)))}}]}]},
     None, 413, "too_large"),
    ({"messages": [{"role": "user", "content": "x" * 400_000}]}, None, 413, "exceeds"),
    (b"{not json", None, 400, "not valid JSON"),
    ({"messages": []}, None, 400, "non-empty"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, None, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, None, 400, "temperature"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, None, 400, "last message"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "s3://private-images/x.png"}}]}]},
     None, 400, "not allowed"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/a.png"}}]}]},
     None, 400, "not a public address"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]},
     None, 400, "allow-list"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]},
     None, 400, "must be a data:"),
    ({"messages": [{"role": "user", "content": "hi"}]}, {"Authorization": "Bearer wrong"}, 401, "API key"),
    ({"messages": [{"role": "user", "content": "hi"}]}, {}, 401, "API key"),
]


@pytest.mark.parametrize("body,headers,status,message", ERRORS, ids=[f"{e[2]}-{e[3][:20]}" for e in ERRORS])
def test_error_cases_are_openai_shaped(server, body, headers, status, message):
    kw = {"data": body, "headers": {**auth(), "Content-Type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body, "headers": auth()}
    if headers is not None:
        kw["headers"] = {k: v for k, v in kw["headers"].items() if k != "Authorization"} | headers
    r = requests.post(server + "/v1/chat/completions", timeout=60, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"] and set(err) >= {"message", "type", "param", "code"}
    assert "Traceback" not in r.text and 'File "' not in r.text


def test_auth_covers_every_api_route_but_not_health(server):
    assert requests.get(server + "/healthz", timeout=10).status_code == 200
    assert requests.get(server + "/", timeout=10).status_code == 200
    for method, path in (("get", "/v1/models"), ("get", f"/v1/models/{MODEL}"), ("post", "/v1/captions"),
                         ("post", "/v1/chat/completions")):
        r = getattr(requests, method)(server + path, timeout=10, json={} if method == "post" else None)
        assert r.status_code == 401, (path, r.status_code)
    assert requests.get(server + "/v1/models/nope", headers=auth(), timeout=10).status_code == 404


def test_overload_answers_503_instead_of_queueing(server):
    codes = []

    def one():
        r = requests.post(server + "/v1/chat/completions", headers=auth(), timeout=120,
                          json={"model": MODEL, "messages": [{"role": "user", "content": "long"}], "n": 4,
                                "max_tokens": 200, "temperature": 0.7})
        codes.append(r.status_code)
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "overloaded" and r.headers["Retry-After"]

    threads = [threading.Thread(target=one) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(codes) <= {200, 503} and 503 in codes and 200 in codes, codes


def test_serve_bench_runs_on_cpu_and_writes_its_table(tmp_path):
    """bench/serve.py (the GPU benchmark at real sizes) must keep working: on CPU it runs the tiny preset,
    through its device command `bench/gpu.sh serve`, with only what the GPU box has in that call (no
    boto3, moto, deepspeed, bitsandbytes)."""
    from conftest import gpu_sh

    run = gpu_sh("serve", tmp_path, SERVE_ARGS="--streams 1 2 --rounds 1 --new-tokens 4")
    assert run.returncode == 0 and "serve: exit 0 in" in run.stdout, \
        run.stdout[-2000:] + run.stderr[-3000:] + "".join(f.read_text()[-3000:] for f in tmp_path.glob("*.log"))
    report = json.loads((tmp_path / "serve.json").read_text())
    rows = report["rows"]
    assert report["partial"] is None
    assert set(rows) == {"serve, 1 streams", "serve, 2 streams", "HF generate, batch 1", "HF generate, batch 2"}
    assert rows["serve, 2 streams"]["requests"] == 2 and rows["serve, 1 streams"]["tokens_per_s"] > 0
    assert "| serve, 2 streams |" in (tmp_path / "serve.md").read_text()
    one, many = report["targets"]  # not judged on CPU; 32 streams did not run here
    assert one["measured"] == rows["serve, 1 streams"]["per_stream_tokens_per_s"] and one["verdict"] == "n/a"
    assert one["baseline"] == ["HF generate, batch 1", rows["HF generate, batch 1"]["per_stream_tokens_per_s"]]
    assert many["verdict"] == "not run" and many["ceiling"] > 0
    # the replica's decode step attends over prefixes of its warmed-up cache, and the arithmetic says so
    assert report["warmup"]["capacity"] == 512 and "prefixes of its 512-position cache" in one["arithmetic"]


def test_warmup_setting(tiny_model, tiny_tokenizer, monkeypatch):
    """warmup_tokens: the capacity a replica's Batcher warms its engine for (0: none); a cache that does
    not fit is a startup error that says which settings to lower."""
    import torch

    from minigpt4.generate import GenerationEngine
    from minigpt4.serving import Batcher, ServeSettings

    with pytest.raises(ValueError, match="warmup_tokens must be >= 0"):
        ServeSettings(warmup_tokens=-1)
    assert Batcher(tiny_model, tiny_tokenizer, max_rows=4, wait_s=0).warmup is None
    warm = Batcher(tiny_model, tiny_tokenizer, max_rows=4, wait_s=0, warmup_tokens=100).warmup
    # 100 positions: a capacity of 128, in steps of 64
    assert (warm["slots"], warm["capacity"], warm["widths"], warm["spans"]) == (4, 128, [1, 2, 4], [64, 128])

    def oom(self, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    monkeypatch.setattr(GenerationEngine, "warmup", oom)
    with pytest.raises(RuntimeError, match="max_batch_size=4 rows of warmup_tokens=512 positions does not fit"):
        Batcher(tiny_model, tiny_tokenizer, max_rows=4, wait_s=0, warmup_tokens=512)


def test_warmup_runs_on_the_thread_that_decodes(tiny_model, tiny_tokenizer, monkeypatch):
    """torch.compile's CUDA graphs belong to the thread that records them (one cudagraph-tree manager per
    thread): a warm-up on the replica's constructor thread would leave the batcher thread to record every
    width again inside requests. Every decode step, the warm-up's and the requests', runs on the batcher
    thread; a compiled warm-up runs each width and prefix twice (a new shape runs eagerly once, then records)."""
    import threading

    import torch

    from minigpt4.generate import GenerationEngine, SamplingParams
    from minigpt4.serving import Batcher, _Job

    steps: list[tuple[str, int, int]] = []
    decode = GenerationEngine._decode
    monkeypatch.setattr(GenerationEngine, "_decode", lambda self, width, span: steps.append(
        (threading.current_thread().name, width, span)) or decode(self, width, span))
    batcher = Batcher(tiny_model, tiny_tokenizer, max_rows=4, wait_s=0, warmup_tokens=128)
    assert steps == [("minigpt4-batcher", w, s) for w in (1, 2, 4) for s in (64, 128)]  # eager on CPU: once each
    done, events = threading.Event(), []

    def deliver(kind, payload):
        events.append(kind)
        if kind == "error" or payload[1].completion is not None:
            done.set()

    batcher.submit(_Job(["<Img><ImageHere></Img> a"], [torch.randn(1, 3, 32, 32)], [SamplingParams(max_new_tokens=3)],
                        deliver))
    assert done.wait(60) and "error" not in events
    assert len(steps) > 6 and {name for name, *_ in steps} == {"minigpt4-batcher"}

    steps.clear()
    monkeypatch.setattr(GenerationEngine, "compiles", lambda self, device: True)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # what the engine calls: the step itself
    Batcher(tiny_model, tiny_tokenizer, max_rows=2, wait_s=0, warmup_tokens=64)
    assert steps == [("minigpt4-batcher", w, 64) for w in (1, 1, 2, 2)]


def test_messages_render_in_each_models_template():
    """OpenAI messages -> MiniGPT-4's conversation: Vicuna v0 `###` turns and LLaMA-2 `[INST]` turns,
    one `<ImageHere>` per image, the system message replacing MiniGPT-4's."""
    from minigpt4.serving import APIError, ServeSettings, conversation_from_messages

    s = ServeSettings()
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png())}},
                                         {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": "A square."},
            {"role": "user", "content": [{"type": "text", "text": "Colour?"}]}]
    prompt, images, _ = conversation_from_messages(msgs, "vicuna_v0", 32, s)
    assert prompt == ("Be brief.###Human: <Img><ImageHere></Img> What is it?###Assistant: A square.###"
                      "Human: Colour?###Assistant: ")
    assert len(images) == 1 and tuple(images[0].shape) == (1, 3, 32, 32)
    prompt, _, _ = conversation_from_messages(msgs, "llama2", 32, s)
    assert prompt == ("Be brief.<s>[INST] <Img><ImageHere></Img> What is it? [/INST] A square.<s>[INST] Colour? "
                      "[/INST] ")
    with pytest.raises(APIError, match="images go in user messages"):
        conversation_from_messages([{"role": "assistant", "content": [{"type": "image_url", "image_url": {
            "url": data_url(png())}}]}, {"role": "user", "content": "x"}], "vicuna_v0", 32, s)
    too_many = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png())}}] * 5}]
    with pytest.raises(APIError, match="at most 4 images"):
        conversation_from_messages(too_many, "vicuna_v0", 32, s)
