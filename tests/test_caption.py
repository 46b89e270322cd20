"""Batch captioning (jobs/caption.py, minigpt4.caption) on the local S3 server and the session's Ray
cluster: exactly once across a killed driver and a killed actor, bad images listed, and captions equal
to calling the model directly."""
from __future__ import annotations

import dataclasses
import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import cli_error

from minigpt4.data import io as uio

REPO = Path(__file__).resolve().parents[1]
N_GOOD = 200
UNIT = 16


def _jpeg(scene_seed: int, size: int = 32) -> bytes:
    import random

    from minigpt4 import synthetic

    buf = io.BytesIO()
    synthetic.render(synthetic.random_scene(random.Random(scene_seed), 1), size).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def caption_input(s3_endpoint, tmp_path_factory):
    """200 good images and 5 bad ones under one prefix (spread over the units), plus a tiny MiniGPT-4
    .pth holding every part under its real key names."""
    import boto3
    import torch
    from PIL import Image

    from minigpt4.model import build_model, preset

    bucket = "caption-input"
    boto3.client("s3").create_bucket(Bucket=bucket)
    root = f"s3://{bucket}/images/"
    good = {}
    for i in range(N_GOOD):
        key = f"g{i:03d}.jpg" if i % 3 else f"sub/g{i:03d}.jpg"  # nested keys are keys too
        uio.write_bytes(root + key, _jpeg(i))
        good[key] = i
    sliver = io.BytesIO()
    Image.new("RGB", (600, 4), "red").save(sliver, "PNG")
    valid = _jpeg(999)
    bad = {"g010b.jpg": ("corrupt", valid[: len(valid) // 2]), "g050b.jpg": ("empty", b""),
           "g100b.png": ("not_image", b"<html>no</html>"), "g150b.png": ("bad_aspect", sliver.getvalue()),
           "g199b.webp": ("corrupt", b"RIFF....WEBPVP8 broken")}
    for key, (_, data) in bad.items():
        uio.write_bytes(root + key, data)
    torch.manual_seed(0)
    model = build_model(preset("tiny"))
    weights = tmp_path_factory.mktemp("weights") / "tiny_minigpt4.pth"
    torch.save({"model": model.state_dict()}, weights)
    return SimpleNamespace(input=root, good=set(good), bad={k: r for k, (r, _) in bad.items()}, weights=str(weights),
                           units=-(-(N_GOOD + len(bad)) // UNIT))


def job(inp, output, **kw):
    from minigpt4.caption import CaptionConfig
    from minigpt4.generate import SamplingParams
    from minigpt4.weights import WeightsConfig

    base = dict(input=inp.input, output=str(output), weights=WeightsConfig(minigpt4=inp.weights), unit_size=UNIT,
                batch_size=8, sampling=SamplingParams(max_new_tokens=12), concurrency=[1], preprocess_cpus=0.5,
                cpus_per_actor=0.5, log_every=1.0)
    return CaptionConfig(**{**base, **kw})


def all_rows(output) -> list[dict]:
    """Every row of every data file, committed or not: what a reader of the output prefix sees."""
    import pyarrow.parquet as pq

    rows = []
    for uri, _ in uio.iter_objects(str(output) + "/data/", (".parquet",)):
        rows += pq.read_table(uri).to_pylist()
    return rows


def assert_exactly_once(inp, output):
    from minigpt4.data.pipeline import read_errors

    rows = all_rows(output)
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)), "duplicate keys in the output"
    assert set(keys) == inp.good
    errors = read_errors(str(output) + "/_errors")
    assert {e["key"]: e["reason"] for e in errors} == inp.bad
    assert len(errors) == len(inp.bad)
    return rows


def test_caption_job_equals_direct_generate_and_reruns_as_noop(ray_cluster, caption_input, tmp_path):
    import numpy as np
    import torch

    from minigpt4 import caption
    from minigpt4.images import load_image, preprocess
    from minigpt4.weights import WeightsConfig, load_pretrained

    out = tmp_path / "caps"
    cfg = job(caption_input, out)
    lines = []
    summary = caption.run(cfg, say=lines.append)
    assert summary["images_captioned"] == N_GOOD and summary["units_committed"] == caption_input.units
    assert summary["errors"] == {"corrupt": 2, "empty": 1, "not_image": 1, "bad_aspect": 1}
    assert summary["generated_tokens"] > 0 and summary["images_per_second"] > 0
    # the rate a long job sustains leaves out the start-up before the first captions (actor, model load)
    assert summary["generated_tokens_per_second_after_first"] > summary["generated_tokens_per_second"]
    assert "after the first captions" in caption.format_summary(summary)
    rows = assert_exactly_once(caption_input, out)
    assert json.loads((out / "_summary.json").read_text())["images_captioned"] == N_GOOD
    r = rows[0]
    assert r["model"] == "tiny" and r["weights"] == f"minigpt4={caption_input.weights}"
    assert r["prompt"] == "###Human: <Img><ImageHere></Img> Describe this image in detail. ###Assistant: "
    assert json.loads(r["params"])["max_new_tokens"] == 12
    assert {x["finish_reason"] for x in rows} <= {"stop", "length"}
    assert all(0 < x["generated_tokens"] <= 12 and x["seconds"] > 0 for x in rows)

    # the same captions as the model called directly, all images in one batch (greedy)
    model, tok, _ = load_pretrained(cfg.model_config(), WeightsConfig(minigpt4=caption_input.weights))
    model.eval()
    keys = sorted(caption_input.good)
    pixels = torch.from_numpy(np.stack([preprocess(load_image(uio.read_bytes(caption_input.input + k)), 32)
                                        for k in keys]))
    prompt, stop = caption.caption_prompt(cfg.prompt, cfg.template, model.cfg.template)
    direct = model.generate(tok, [prompt] * len(keys), pixels, cfg.sampling_params(stop))
    got = {x["key"]: x["caption"] for x in rows}
    assert {k: c.text.strip() for k, c in zip(keys, direct)} == got

    # a rerun finds every unit committed and captions nothing
    again = caption.run(cfg, say=lines.append)
    assert again["images_captioned"] == 0 and again["units_skipped_as_done"] == caption_input.units
    assert any("resuming" in line for line in lines)
    assert len(all_rows(out)) == N_GOOD
    # ... and a different prompt on the same output is refused, not mixed in
    with pytest.raises(ValueError, match="different job.*prompt"):
        caption.run(dataclasses.replace(cfg, prompt="What is this?"), say=lines.append)


def test_caption_driver_killed_then_rerun_holds_every_key_once(ray_cluster, caption_input, tmp_path):
    from minigpt4 import caption

    out = tmp_path / "caps"
    cmd = [sys.executable, "jobs/caption.py", "--address", ray_cluster.get_runtime_context().gcs_address,
           "--input", caption_input.input, "--output", str(out), "--weights", caption_input.weights,
           f"unit_size={UNIT}", "batch_size=4", "sampling.max_new_tokens=12", "concurrency=[1]",
           "preprocess_cpus=0.5", "cpus_per_actor=0.5"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    done = out / "_done"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if done.is_dir() and len(list(done.glob("*.json"))) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = len(list(done.glob("*.json")))
    assert 2 <= committed < caption_input.units, "the driver was not killed part-way"

    lines = []
    summary = caption.run(job(caption_input, out), say=lines.append)
    assert summary["units_skipped_as_done"] == committed
    assert summary["units_done_total"] == caption_input.units
    assert summary["images_captioned"] < N_GOOD
    assert_exactly_once(caption_input, out)


def test_caption_actor_killed_mid_run_completes_exactly_once(ray_cluster, caption_input, tmp_path, monkeypatch):
    from minigpt4 import caption

    flag = tmp_path / "killed"
    monkeypatch.setenv(caption.FAIL_AFTER_ENV, f"3:{flag}")
    out = tmp_path / "caps"
    summary = caption.run(job(caption_input, out), say=lambda s: None)
    assert flag.exists(), "the fault was not injected"
    assert summary["units_done_total"] == caption_input.units
    assert_exactly_once(caption_input, out)


def test_caption_limit_is_a_dry_run_and_overwrite_starts_over(ray_cluster, caption_input, tmp_path):
    from minigpt4 import caption

    out = tmp_path / "caps"
    dry = caption.run(job(caption_input, out, limit=20), say=lambda s: None)
    assert dry["images_captioned"] == 20
    assert dry["units_committed"] == 1 and dry["units_cut_short"] == 1
    assert len(all_rows(out)) == 20
    full = caption.run(job(caption_input, out), say=lambda s: None)
    assert full["units_skipped_as_done"] == 1
    assert_exactly_once(caption_input, out)  # the cut-short unit's file was replaced, not added to

    raw = job(caption_input, out, prompt="", template="raw", limit=8)
    with pytest.raises(ValueError, match="different job.*prompt, template"):
        caption.run(raw, say=lambda s: None)
    lines = []
    other = caption.run(dataclasses.replace(raw, overwrite=True), say=lines.append)
    assert any("overwrite: removed" in line for line in lines)
    assert other["units_done_total"] == 0 and other["units_cut_short"] == 1
    rows = all_rows(out)
    assert len(rows) == 8 and {r["prompt"] for r in rows} == {"<ImageHere>"}


def test_caption_cli_embedded_default_and_errors(tmp_path, capsys):
    """`python jobs/caption.py` with no input captions the held-out scenes (here a 10-image dry run);
    bad options are one-line errors, exit code 2 (its main() here: an exception would fail the test)."""
    from minigpt4 import caption

    out = tmp_path / "caps"
    run = subprocess.run([sys.executable, "jobs/caption.py", "--output", str(out), "--limit", "10"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "no --input: the embedded default" in run.stdout and "10 images captioned" in run.stdout
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["images_captioned"] == 10 and summary["format"] == "images"
    (tmp_path / "empty").mkdir()
    for argv, msg in ((["--input", str(tmp_path / "empty"), "--output", str(out)], "cannot tell the format"),
                      (["--input", "x/", "--output", str(out), "template=nope"], "template must be one of"),
                      (["--input", "x/", "--output", str(out), "concurrency=[4,2]"], "concurrency must be")):
        assert msg in cli_error(capsys, caption.main(argv))


def test_caption_bench_runs_on_cpu_and_writes_its_table(tmp_path):
    """bench/caption.py (the GPU benchmark at real sizes) must keep working: on CPU it runs the tiny preset.
    Its job reads a local S3 server here (`--storage auto` with boto3 and moto installed); the train-step
    bench covers local files, what the GPU box gets (tests/test_train.py runs both through bench/gpu.sh)."""
    run = subprocess.run([sys.executable, "bench/caption.py", "--batches", "1", "--batch-size", "4", "--new-tokens",
                          "4", "--job-images", "16", "--out", str(tmp_path)], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    table = (tmp_path / "caption.md").read_text()
    for row in ("HF generate (dynamic cache)", "our engine", "caption job (end to end)"):
        assert f"| {row} |" in table
    report = json.loads((tmp_path / "caption.json").read_text())
    rows = report["rows"]
    assert report["partial"] is None and list(report["by_batch"]) == ["4"]
    assert rows["our engine"]["tokens"] == rows["HF generate (dynamic cache)"]["tokens"] == 4 * 4
    assert rows["caption job (end to end)"]["storage"] == "a local S3 server"
    assert "tokens_per_s_after_first" in rows["caption job (end to end)"]  # None when all came in one batch
    detok = report["detokenize"]  # the host's text cost per token, both ways, under the table
    assert set(detok) == {"windowed", "whole sequence"} and all(d["us_per_token"] > 0 for d in detok.values())
    assert "us a token decoding the newest tokens" in table
    engine, _, job = report["targets"]  # under the table: not judged on CPU, the arithmetic still there
    assert engine["measured"] == rows["our engine"]["tokens_per_s"] and engine["verdict"] == "n/a"
    assert engine["baseline"] == ["HF generate (dynamic cache)", rows["HF generate (dynamic cache)"]["tokens_per_s"]]
    assert engine["ceiling"] == report["ceiling"]["tokens_per_s"] > 0 and "batch 4: (" in engine["arithmetic"]
    assert job["row"] == "caption job, after its first captions"
    assert job["measured"] == rows["caption job (end to end)"]["tokens_per_s_after_first"]


def test_detect_format_and_prompts(tmp_path):
    from minigpt4.caption import caption_prompt, detect_format
    from minigpt4.synthetic import write_dataset

    write_dataset(str(tmp_path / "syn"), train_shards=1, samples_per_shard=2, align_samples=2, heldout_samples=2,
                  parquet_shards=1, image_size=16, progress=False)
    syn = tmp_path / "syn"
    assert detect_format(str(syn / "heldout/images")) == "images"
    assert detect_format(str(syn / "pretrain/{00000..00000}.tar")) == "webdataset"
    assert detect_format(str(syn / "pretrain_parquet")) == "parquet"
    assert detect_format(str(syn / "pretrain")) == "webdataset"  # img2dataset: 00000.parquet beside 00000.tar
    assert detect_format(str(syn / "align")) == "cc_sbu_align"
    assert detect_format(str(syn / "align/filter_cap.json")) == "cc_sbu_align"
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt/a.txt").write_text("x")
    with pytest.raises(ValueError, match="cannot tell the format"):
        detect_format(str(tmp_path / "txt"))

    assert caption_prompt("Describe it.", "chat", "vicuna_v0") == (
        "###Human: <Img><ImageHere></Img> Describe it. ###Assistant: ", ("###",))
    assert caption_prompt("Describe it.", "chat", "llama2") == (
        "[INST] <Img><ImageHere></Img> Describe it. [/INST] ", ("</s>",))
    assert caption_prompt("", "raw", "vicuna_v0") == ("<ImageHere>", ("\n",))
    assert caption_prompt("A photo of <ImageHere>:", "raw", "vicuna_v0")[0] == "A photo of <ImageHere>:"


def test_committer_dedups_retried_rows_and_repeated_keys(tmp_path):
    """Rows a retried task delivers twice count once; a key the input holds twice keeps its first row;
    a unit commits when all its rows (by ordinal) are in, data file before marker."""
    import numpy as np
    import pyarrow.parquet as pq

    from minigpt4.caption import Committer

    def batch(rows):  # (key, ordinal, unit_rows, caption)
        return {"key": np.array([r[0] for r in rows], object), "unit": np.array(["u1"] * len(rows), object),
                "unit_row": np.array([r[1] for r in rows]), "unit_rows": np.array([r[2] for r in rows]),
                "caption": np.array([r[3] for r in rows], object), "finish_reason": np.array(["stop"] * len(rows), object),
                "prompt_tokens": np.ones(len(rows), np.int32), "generated_tokens": np.full(len(rows), 3, np.int32),
                "seconds": np.ones(len(rows), np.float32)}

    c = Committer(str(tmp_path), None, {"prompt": "p", "params": "{}", "model": "tiny", "weights": "random"})
    c.add(batch([("a", 0, -1, "first a"), ("b", 1, -1, "b")]))
    c.add(batch([("a", 0, -1, "first a")]))  # a retried task's copy
    assert c.duplicates == 1 and not (tmp_path / "_done").exists()
    c.add(batch([("a", 2, 3, "second a")]))  # the input repeats key a; the unit's last row says 3 rows
    assert c.units == 1 and c.duplicate_keys == 1 and not c.pending
    rows = pq.read_table(tmp_path / "data" / "u1.parquet").to_pylist()
    assert [(r["key"], r["caption"]) for r in rows] == [("a", "first a"), ("b", "b")]
    assert json.loads((tmp_path / "_done" / "u1.json").read_text()) == {"unit": "u1", "rows": 2}
    c.add(batch([("b", 1, -1, "b")]))  # late copy of a committed unit's row
    assert c.duplicates == 2 and not c.pending
