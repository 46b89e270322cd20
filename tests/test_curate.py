"""Stage-2 data curation (jobs/curate.py, minigpt4.curate) on the local S3 server and the session's Ray
cluster: continuation of exactly the short first answers, planted fixer outputs dropped for the right
reason, a cc_sbu_align set the stage-2 loader reads, the fixer against our own Serve endpoint, an
unreachable fixer counted, and reruns that neither generate nor fix again."""
from __future__ import annotations

import io
import json
import random
import shutil
import socket
import threading
from collections import Counter
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import KEY, MODEL, SETTINGS, cli_error
from minigpt4.data import io as uio

REPO = Path(__file__).resolve().parents[1]
MAX_NEW, MIN_TOKENS = 24, 15  # the tiny model's greedy first answers here: 10 or 19 tokens, so both kinds occur
# tiny, with its random ViT at std 0.02: transformers' default ViT init (1e-10, for loading pretrained
# weights over) leaves a random model blind to the image, every answer the same length
MODEL_SPEC = {"preset": "tiny", "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                           "num_attention_heads": 4, "image_size": 32, "patch_size": 8,
                                           "layer_norm_eps": 1e-6, "qkv_bias": True, "hidden_act": "gelu",
                                           "initializer_range": 0.02}}
CLEAN = [
    "The image shows a red circle in the middle of a white background. A small blue square sits to its right.",
    "A green triangle stands near the top left corner of the picture, and the rest of the frame is empty.",
    "There is a yellow star at the bottom of the image. Its five points are sharp and evenly spaced.",
    "In this picture, a purple square and an orange circle overlap slightly in the centre of a grey canvas.",
]
APOLOGY = ["I'm sorry, I made a mistake. The image shows a red circle on a plain white background.",
           "I apologize for the confusion; the picture contains a blue square in the middle of the frame."]
REPETITION = ["The image shows a red circle on a white background. It is large and bright. "
              "The image shows a red circle on a white background.",
              "The picture shows a red circle a red circle a red circle a red circle a red circle a red"]
PLANTED = CLEAN + APOLOGY + REPETITION


def _image(seed: int, fmt: str) -> bytes:
    from minigpt4 import synthetic

    buf = io.BytesIO()
    synthetic.render(synthetic.random_scene(random.Random(seed), 1), 32).save(buf, fmt, **(
        {"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.fixture(scope="module")
def curate_input(s3_endpoint):
    """8 good images under an s3 prefix (a PNG whose key clashes with a JPEG's once the extension is gone,
    another PNG) and one corrupt JPEG."""
    import boto3

    boto3.client("s3").create_bucket(Bucket="curate-input")
    root = "s3://curate-input/images/"
    good = {f"g{i:03d}.jpg": _image(i, "JPEG") for i in range(6)} | {"g000.png": _image(6, "PNG"),
                                                                      "p007.png": _image(7, "PNG")}
    for key, data in good.items():
        uio.write_bytes(root + key, data)
    uio.write_bytes(root + "bad.jpg", good["g001.jpg"][:100])
    return SimpleNamespace(input=root, good=good)


@pytest.fixture(scope="module")
def generated(ray_cluster, curate_input, tmp_path_factory):
    """Phase 1 done once (no fixer): the tests copy this output and resume it, so none generates again."""
    from minigpt4.curate import CurateConfig, run
    from minigpt4.generate import SamplingParams

    out = tmp_path_factory.mktemp("curate") / "base"
    cfg = CurateConfig(input=curate_input.input, output=str(out), unit_size=4, min_tokens=MIN_TOKENS,
                       model=MODEL_SPEC, sampling=SamplingParams(max_new_tokens=MAX_NEW), batch_size=8, concurrency=[1],
                       preprocess_cpus=0.5, cpus_per_actor=0.5, log_every=1.0)
    lines = []
    report = run(cfg, say=lines.append)
    return SimpleNamespace(cfg=cfg, report=report, out=out, lines=lines)


def copy_of(generated, tmp_path, **fixer):
    """The generated output copied to tmp_path, and the job's config on it with these fixer settings."""
    from minigpt4.curate import FixerConfig

    out = tmp_path / "align"
    shutil.copytree(generated.out, out)
    return replace(generated.cfg, output=str(out), fixer=FixerConfig(**fixer) if fixer else FixerConfig())


def fix_rows(out) -> dict[str, dict]:
    import pyarrow.parquet as pq

    return {r["key"]: r for p in sorted((Path(out) / "_fix").glob("*.parquet")) for r in pq.read_table(p).to_pylist()}


class StubFixer:
    """A local OpenAI-compatible endpoint: answers the planted texts in request order, the very first
    request with a 503 (the client must retry it), and records every request."""

    def __init__(self):
        self.requests, self.answers, self.lock = [], iter(PLANTED), threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.requests.append((self.path, self.headers.get("Authorization"), body))
                    first = len(stub.requests) == 1
                    text = None if first else next(stub.answers)
                reply = (json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})
                         if text else '{"error": "warming up"}').encode()
                self.send_response(503 if first else 200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def stage2_rows(out) -> list[dict]:
    """The output read the way stage 2 reads its data: the cc_sbu_align source through the training pipeline."""
    from minigpt4.data.pipeline import build_dataset
    from minigpt4.data.process import ProcessConfig
    from minigpt4.data.sources import SourceConfig
    from minigpt4.model import preset

    ds = build_dataset(SourceConfig(path=str(out), format="cc_sbu_align", unit_size=64),
                       ProcessConfig.for_model(preset("tiny"), "stage2"), errors=str(Path(out).parent / "read_errors"))
    return [row for batch in ds.iter_batches(batch_size=None, batch_format="numpy")
            for row in ({"key": k, "caption": c, "n": len(i)} for k, c, i in
                        zip(batch["key"], batch["caption"], batch["input_ids"]))]


def test_generation_continues_exactly_the_short_first_answers(generated, curate_input):
    import numpy as np
    import torch

    from minigpt4.caption import caption_prompt
    from minigpt4.curate import DESCRIBE_PROMPT, generated as generated_rows
    from minigpt4.generate import SamplingParams
    from minigpt4.images import load_image, preprocess
    from minigpt4.prompts import follow_up
    from minigpt4.weights import WeightsConfig, load_pretrained

    rows = {r["key"]: r for unit in generated_rows(str(generated.out)).values() for r in unit}
    assert set(rows) == set(curate_input.good)
    first_tokens = {k: r["generated_tokens"] - r["continued_tokens"] for k, r in rows.items()}
    continued = {k for k, r in rows.items() if r["continued_tokens"] > 0}
    assert continued == {k for k, n in first_tokens.items() if n < MIN_TOKENS}
    assert 0 < len(continued) < len(rows), "the fixture should hold both short and long first answers"
    r = generated.report
    assert r["generate"]["continued"] == len(continued) and r["generate"]["bad_images"] == {"corrupt": 1}
    assert r["filter"]["total"] == len(rows) and r["fix"] is None
    assert any(line.startswith("[curate] generate: ") for line in generated.lines)

    # the same descriptions as the model called directly: first turn, then the paper's continuation turn
    torch.manual_seed(0)  # the actors' init of a model without weights
    model, tok, _ = load_pretrained(generated.cfg.caption_config().model_config(), WeightsConfig())
    model.eval()
    keys = sorted(rows)
    pixels = torch.from_numpy(np.stack([preprocess(load_image(curate_input.good[k]), 32) for k in keys]))
    prompt, stop = caption_prompt(DESCRIBE_PROMPT, "chat", model.cfg.template)
    assert prompt == ("###Human: <Img><ImageHere></Img> Describe this image in detail. Give as many details as "
                      "possible. Say everything you see. ###Assistant: ")
    params = SamplingParams(max_new_tokens=MAX_NEW, stop=stop)
    first = {k: c for k, c in zip(keys, model.generate(tok, [prompt] * len(keys), pixels, params))}
    assert {k: len(c.token_ids) for k, c in first.items()} == first_tokens
    short = [k for k in keys if k in continued]
    second = model.generate(tok, [follow_up(prompt, first[k].text.strip(), "Continue", model.cfg.template)
                                  for k in short], pixels[[keys.index(k) for k in short]], params)
    assert follow_up(prompt, "A red circle.", "Continue", "vicuna_v0") == prompt + \
        "A red circle.###Human: Continue ###Assistant: "
    expected = {k: first[k].text.strip() for k in keys} | {
        k: " ".join(t for t in (first[k].text.strip(), c.text.strip()) if t) for k, c in zip(short, second)}
    assert {k: r["caption"] for k, r in rows.items()} == expected
    assert {k: r["continued_tokens"] for k, r in rows.items() if k in continued} == {
        k: len(c.token_ids) for k, c in zip(short, second)}


def test_planted_fixes_are_filtered_written_for_stage2_and_not_asked_again(generated, curate_input, tmp_path,
                                                                          monkeypatch):
    from minigpt4.curate import FIX_INSTRUCTION, image_ids, run
    from minigpt4.filters import clean

    monkeypatch.setenv("CURATE_TEST_FIXER_KEY", "sekret")
    stub = StubFixer()
    try:
        cfg = copy_of(generated, tmp_path, url=stub.url, model="stub-model", api_key_env="CURATE_TEST_FIXER_KEY",
                      concurrency=2, backoff=0.01)
        lines = []
        report = run(cfg, say=lines.append)
        descriptions = {k: r["description"] for k, r in fix_rows(cfg.output).items()}
        # every description went to the endpoint once (plus the retried 503), with the paper's instruction
        assert len(stub.requests) == len(descriptions) + 1
        assert all(path == "/v1/chat/completions" and auth == "Bearer sekret" and body["model"] == "stub-model"
                   and body["temperature"] == 0.0 for path, auth, body in stub.requests)
        sent = Counter(body["messages"][0]["content"] for _, _, body in stub.requests[1:])
        assert sent == Counter(f"{FIX_INSTRUCTION}\n\n{d}" for d in descriptions.values())
        assert "sekret" not in json.dumps(report) + "\n".join(lines)
        fix = report["fix"]
        assert (fix["descriptions"], fix["asked"], fix["fixed"], fix["failed"], fix["requests"]) == (8, 8, 8, 0, 9)

        # the planted apologies and repetitions are dropped for those reasons, the clean ones kept
        f = report["filter"]
        assert f["by_reason"] == {"fixer_failed": 0, "empty": 0, "non_english": 0, "apology": 2, "repetition": 2,
                                  "fragment": 0}
        assert f["kept"] == 4 and {e["text"] for e in f["examples"]["apology"]} == set(APOLOGY)
        kept = {k for k, r in fix_rows(cfg.output).items() if r["fixed"] in CLEAN}
        ids = image_ids(kept)
        annotations = json.loads((Path(cfg.output) / "filter_cap.json").read_text())["annotations"]
        assert {a["image_id"]: a["caption"] for a in annotations} == {
            ids[k]: clean(fix_rows(cfg.output)[k]["fixed"]) for k in kept}
        for key, image_id in ids.items():  # JPEG bytes copied as they are, PNGs re-encoded as JPEG
            data = (Path(cfg.output) / "image" / f"{image_id}.jpg").read_bytes()
            assert (data == curate_input.good[key]) if key.endswith(".jpg") else (data[:3] == b"\xff\xd8\xff")

        # the stage-2 loader reads the set: one training row per survivor, captions as written
        rows = stage2_rows(cfg.output)
        assert sorted(r["caption"] for r in rows) == sorted(CLEAN) and all(r["n"] > 0 for r in rows)

        # a rerun neither generates nor asks the endpoint again, and writes the same set
        again = run(cfg, say=lines.append)
        assert len(stub.requests) == 9
        assert again["generate"]["described_this_run"] == 0 and again["fix"]["asked"] == 0
        assert again["fix"]["reused"] == 8 and again["filter"] == report["filter"]
        assert json.loads((Path(cfg.output) / "filter_cap.json").read_text())["annotations"] == annotations
        assert again["written"]["images"]["copied"] == 0 and again["written"]["images"]["already_there"] == 4
    finally:
        stub.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_fixer_is_counted_and_its_descriptions_asked_again_later(generated, tmp_path):
    from minigpt4.curate import run

    down = f"http://127.0.0.1:{_closed_port()}"
    cfg = copy_of(generated, tmp_path, url=down, model="any", max_retries=1, backoff=0.01, concurrency=1,
                  give_up_after=3, on_failure="drop")
    lines = []
    report = run(cfg, say=lines.append)
    fix = report["fix"]
    # 3 descriptions tried twice each, then the endpoint is taken for down and the other 5 fail at once
    assert fix["failed"] == 8 and fix["failed_by_error"] == {"connection": 3, "gave_up": 5}
    assert fix["requests"] == 6 and any("gave up after 3 failures" in line for line in lines)
    assert report["filter"]["by_reason"]["fixer_failed"] == 8 and report["filter"]["kept"] == 0
    assert report["filter"]["examples"]["fixer_failed"][0]["text"]
    assert json.loads((Path(cfg.output) / "filter_cap.json").read_text()) == {"annotations": []}

    # on_failure=keep: the unfixed descriptions go on to the rule filters, as if there were no fixer
    keep = run(replace(cfg, fixer=replace(cfg.fixer, on_failure="keep")), say=lines.append)
    assert keep["fix"]["asked"] == 8 and keep["fix"]["failed"] == 8  # failed rows are asked again on a rerun
    no_fixer = dict(generated.report["filter"]["by_reason"])
    assert keep["filter"]["by_reason"] == {"fixer_failed": 0, **no_fixer}


def test_fixer_against_our_serve_endpoint(generated, server, tmp_path, monkeypatch):
    import torch

    from minigpt4.config import from_dict
    from minigpt4.curate import FIX_INSTRUCTION, run
    from minigpt4.generate import SamplingParams
    from minigpt4.serving import ServeSettings, conversation_from_messages
    from minigpt4.weights import load_pretrained

    monkeypatch.setenv("CURATE_SERVE_KEY", KEY)
    monkeypatch.setenv("CURATE_WRONG_KEY", "not-the-key")
    cfg = copy_of(generated, tmp_path, url=server, model=MODEL, api_key_env="CURATE_WRONG_KEY", max_tokens=8,
                  concurrency=1, give_up_after=2, backoff=0.01)
    denied = run(cfg, say=lambda s: None)["fix"]
    assert denied["failed_by_error"] == {"http_401": 2, "gave_up": 6} and denied["requests"] == 2  # 401: no retry

    cfg = replace(cfg, fixer=replace(cfg.fixer, api_key_env="CURATE_SERVE_KEY", concurrency=4))
    fix = run(cfg, say=lambda s: None)["fix"]
    assert (fix["asked"], fix["fixed"], fix["failed"], fix["requests"]) == (8, 8, 0, 8)

    # each fix is the served model's greedy answer to the instruction and the description
    rows = fix_rows(cfg.output)
    s = from_dict(ServeSettings, SETTINGS)
    torch.manual_seed(0)
    model, tok, _ = load_pretrained(s.model_config(), s.weights)
    for r in rows.values():
        messages = [{"role": "user", "content": f"{FIX_INSTRUCTION}\n\n{r['description']}"}]
        prompt, _, _ = conversation_from_messages(messages, model.cfg.template, model.cfg.image_size, s)
        direct = model.eval().generate(tok, [prompt], None, SamplingParams(max_new_tokens=8, stop=("###",)))
        assert (r["status"], r["fixed"]) == ("fixed", direct[0].text.strip())


def test_config_checks_and_cli_errors(tmp_path, capsys):
    import yaml

    from minigpt4.config import ConfigError, from_dict, load
    from minigpt4.curate import CurateConfig, FixerConfig, image_ids, main, run

    path = REPO / "jobs/configs/curate_vicuna7b.yaml"
    assert path.read_text().splitlines()[0] == "# python jobs/curate.py --config jobs/configs/curate_vicuna7b.yaml " \
                                               "[key=value ...]"
    cfg = load(CurateConfig, path)
    assert cfg.min_tokens == 80 and cfg.fixer.endpoint() == "http://YOUR-LLM-HOST:8000/v1/chat/completions"
    assert yaml.safe_load(path.read_text())["fixer"]["api_key_env"] == "FIXER_API_KEY"
    assert FixerConfig(url="http://h:1/v1/", model="m").endpoint() == "http://h:1/v1/chat/completions"
    for data, msg in (({"fixer": {"url": "http://h:1"}}, "fixer.model is required"),
                      ({"fixer": {"on_failure": "maybe"}}, "on_failure must be one of"),
                      ({"fixer": {"url": "h:1", "model": "m"}}, "http"),
                      ({"min_tokens": -1}, "min_tokens must be >= 0"),
                      ({"concurrency": [3, 1]}, "concurrency must be")):
        with pytest.raises(ConfigError, match=msg):
            from_dict(CurateConfig, data)
    # a missing API key is an error before anything is generated
    with pytest.raises(ValueError, match="CURATE_UNSET_KEY.*not set"):
        run(CurateConfig(input=str(tmp_path), output=str(tmp_path / "o"),
                         fixer=FixerConfig(url="http://127.0.0.1:9", model="m", api_key_env="CURATE_UNSET_KEY")))
    assert not (tmp_path / "o").exists()
    assert image_ids(["a/b c.JPG", "a.jpg", "a.png", "a.webp", "..png"]) == {
        "..png": "image", "a.jpg": "a", "a.png": "a-2", "a.webp": "a-3", "a/b c.JPG": "a_b_c"}

    assert "on_failure must be one of" in cli_error(
        capsys, main(["--input", "x/", "--output", str(tmp_path), "fixer.on_failure=maybe"]))
