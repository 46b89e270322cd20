"""Training on Ray Train + DeepSpeed (2 CPU workers, ZeRO-2, gloo) from the local S3 server."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from minigpt4.config import from_dict
from minigpt4.train import JobConfig, TrainConfig, deepspeed_config, export_pth, lr_at, param_groups, run


def test_lr_schedule_is_minigpt4s_linear_warmup_cosine():
    t = TrainConfig(epochs=4, iters_per_epoch=5000, init_lr=1e-4, min_lr=8e-5, warmup_lr=1e-6, warmup_steps=5000)
    assert lr_at(0, t) == pytest.approx(1e-6)
    assert lr_at(2500, t) == pytest.approx(1e-6 + (1e-4 - 1e-6) * 0.5)
    assert lr_at(4999, t) == pytest.approx(1e-6 + (1e-4 - 1e-6) * 4999 / 5000)
    # from epoch 1 on: cosine by epoch, constant within an epoch
    for epoch in (1, 2, 3):
        want = (1e-4 - 8e-5) * 0.5 * (1 + math.cos(math.pi * epoch / 4)) + 8e-5
        assert lr_at(epoch * 5000, t) == pytest.approx(want) == lr_at(epoch * 5000 + 4999, t)
    short = TrainConfig(epochs=5, iters_per_epoch=200, init_lr=3e-5, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=100)
    assert lr_at(150, short) == pytest.approx(3e-5)  # warmup over, still epoch 0


def test_only_trainable_parameters_reach_the_optimizer_with_lavis_decay_rule():
    from minigpt4.model import build_model, preset

    m = build_model(preset("tiny"))
    m.set_trainable()
    groups = param_groups(m, 0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert [p.shape for p in groups[0]["params"]] == [m.llama_proj.weight.shape]
    assert [p.shape for p in groups[1]["params"]] == [m.llama_proj.bias.shape]
    cfg = deepspeed_config(TrainConfig(zero_stage=2, grad_accum=4, clip_grad=1.0, precision="fp16", batch_size=8))
    assert cfg["zero_optimization"] == {"stage": 2} and cfg["gradient_accumulation_steps"] == 4
    assert cfg["gradient_clipping"] == 1.0 and cfg["fp16"]["enabled"] and cfg["train_micro_batch_size_per_gpu"] == 8
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="int8")


def test_deepspeed_step_equals_plain_adamw_with_clipping(monkeypatch):
    """The training step as train_loop builds it (DeepSpeed ZeRO-2 with our fp32 config, the torch AdamW
    over trainable parameters, the LR set per step, clipping by DeepSpeed) moves the weights exactly as a
    plain AdamW + clip_grad_norm_ loop: DeepSpeed adds no cast, scaling or second state that changes the
    math. One rank, gloo, in this process."""
    import importlib
    import socket

    import torch.distributed as dist

    from minigpt4.model import build_model, preset
    from minigpt4.train import _base_optimizer

    importlib.import_module("deepspeed.ops").__compatible_ops__["deepspeed_shm_comm"] = False
    import deepspeed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0").items():
        monkeypatch.setenv(k, v)  # for this test only: later tests start their own process groups
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        t = TrainConfig(stage=1, num_workers=1, batch_size=4, precision="fp32", zero_stage=2, clip_grad=0.5,
                        weight_decay=0.05, epochs=1, iters_per_epoch=10, init_lr=1e-3, warmup_lr=1e-4, warmup_steps=4)
        cfg = preset("tiny", train_llm="full")

        def make():
            torch.manual_seed(42)
            m = build_model(cfg)
            m.set_trainable()
            return m.train()

        plain, ds = make(), make()
        opt = torch.optim.AdamW(param_groups(plain, t.weight_decay), lr=lr_at(0, t))
        engine, *_ = deepspeed.initialize(model=ds, optimizer=torch.optim.AdamW(param_groups(ds, t.weight_decay)),
                                          config=deepspeed_config(t), dist_init_required=False)
        g = torch.Generator().manual_seed(0)
        for step in range(t.total_steps):
            ids = torch.randint(3, 600, (4, 12), generator=g)
            ids[:, 0], ids[:, 1:5] = 1, -200
            batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.masked_fill(ids < 3, -100),
                         pixel_values=torch.randn(4, 3, 32, 32, generator=g))
            for group in (*opt.param_groups, *_base_optimizer(engine).param_groups):
                group["lr"] = lr_at(step, t)
            loss = plain(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(plain.trainable_parameters(), t.clip_grad)
            opt.step()
            opt.zero_grad()
            ds_loss = engine(**batch).loss
            engine.backward(ds_loss)
            engine.step()
            assert ds_loss.item() == pytest.approx(loss.item(), rel=1e-6, abs=1e-7)
        moved = max((a - b).abs().max().item() for a, b in zip(plain.parameters(), ds.parameters()))
        assert moved < 1e-6
        assert not torch.equal(plain.llama_proj.weight, make().llama_proj.weight)  # it trained
    finally:
        dist.destroy_process_group()


def _job(embedded_s3, storage: Path, **train) -> JobConfig:
    pattern = embedded_s3
    t = dict(stage=1, num_workers=2, cpus_per_worker=0.5, batch_size=8, epochs=2, iters_per_epoch=6,
             init_lr=1e-3, min_lr=1e-4, warmup_lr=1e-5, warmup_steps=3, precision="fp32", zero_stage=2,
             checkpoint_every=4, log_every=2, storage_path=str(storage), max_failures=2)
    t.update(train)
    return from_dict(JobConfig, {"model": {"preset": "tiny"}, "train": t,
                                 "data": {"sources": [{"path": pattern, "name": "syn"}],
                                          "errors": str(storage / "errors")}})


@pytest.fixture(scope="module")
def synthetic_shards(ray_cluster, s3_endpoint):
    import boto3

    from minigpt4.synthetic import write_dataset

    boto3.client("s3").create_bucket(Bucket="train-data")
    write_dataset("s3://train-data/syn", seed=1, train_shards=4, samples_per_shard=24, align_samples=8,
                  heldout_samples=4, image_size=32, progress=False)
    return "s3://train-data/syn/pretrain/{00000..00003}.tar"


def _ckpt_state(result) -> tuple[dict, dict, list[str]]:
    from safetensors.torch import load_file

    with result.checkpoint.as_directory() as d:
        files = sorted(p.name for p in Path(d).iterdir())
        return json.loads(Path(d, "state.json").read_text()), load_file(str(Path(d, "trainable.safetensors"))), files


def test_two_worker_zero2_run_checkpoints_resumes_and_survives_a_killed_worker(synthetic_shards, tmp_path):
    # 1. uninterrupted: 12 steps, checkpoints at 4, 8, 12
    base = run(_job(synthetic_shards, tmp_path / "a"))
    state, weights, files = _ckpt_state(base)
    assert state["step"] == 12 and state["world_size"] == 2 and state["zero_stage"] == 2
    assert files == ["optimizer-rank0.safetensors", "optimizer-rank1.safetensors", "state.json",
                     "trainable.safetensors"]
    assert sorted(weights) == ["llama_proj.bias", "llama_proj.weight"]  # only what trains
    assert weights["llama_proj.weight"].shape == (64, 32) and weights["llama_proj.weight"].dtype == torch.float32
    lr_a = {h["step"]: h["lr"] for h in state["history"]}
    from minigpt4.tbevents import read_scalars  # TensorBoard's scalars, written live by rank 0

    (events,) = (tmp_path / "a" / "pretrain" / "tensorboard").glob("events.out.tfevents.*")
    tb = read_scalars(events)
    tb_lr = [(s, v) for s, tag, v in tb if tag == "lr"]
    assert [s for s, _ in tb_lr] == sorted(lr_a) and [v for _, v in tb_lr] == pytest.approx(
        [lr_a[s] for s in sorted(lr_a)], rel=1e-6)  # float32 in the event file
    assert {tag for _, tag, _ in tb} >= {"loss", "lr", "samples_per_s", "tokens_per_s"}
    assert all(math.isfinite(h["loss"]) and h["samples_per_s"] > 0 for h in state["history"])
    # the data position: 4 shards of 24 rows per epoch, 16 rows per step. At step 4, 64 rows were
    # trained on: one or two whole shards are done, the rest of epoch 0 is still to come
    at4 = next(c for c, m in base.best_checkpoints if m["step"] == 4)
    with at4.as_directory() as d:
        pos4 = json.loads(Path(d, "state.json").read_text())["data_position"]["syn"]
    assert pos4["low"][0] == 0 and 1 <= pos4["low"][1] + len(pos4["done"]) <= 2
    assert state["data_position"]["syn"]["low"] == [2, 0]  # 12 steps = two whole epochs

    # 2. rank 1 is killed at step 6: Ray Train restarts the workers from the step-4 checkpoint and finishes
    killed = run(_job(synthetic_shards, tmp_path / "b", fail_at_step=6))
    assert (tmp_path / "b" / "pretrain" / "fault_injected").read_text() == "6"
    state_b, weights_b, _ = _ckpt_state(killed)
    assert state_b["step"] == 12
    steps = [h["step"] for h in state_b["history"]]
    assert steps[:2] == [2, 4] and steps[2] == 6 and steps[-1] == 12  # resumed at 5 after the step-4 checkpoint
    assert {h["step"]: h["lr"] for h in state_b["history"]} == lr_a  # the same LR at every step
    progress = (tmp_path / "b" / "pretrain" / "progress.log").read_text()
    assert "resumed from step 4" in progress and "data continues: syn at epoch 0 unit" in progress

    # 3. rerunning the finished job with a longer schedule continues from step 12, not from 0 (with
    # length bucketing on: reads of 2 batches cut into batches by length, markers still counted)
    longer = run(_job(synthetic_shards, tmp_path / "a", epochs=3, length_buckets=2))
    state_c, weights_c, _ = _ckpt_state(longer)
    assert state_c["step"] == 18
    after = [h for h in state_c["history"] if h["step"] > 12]
    assert [h["step"] for h in after] == [14, 16, 18] and all(0 <= h["padding"] < 1 for h in after)
    assert state_c["data_position"]["syn"]["low"] == [3, 0]  # epoch 2 read whole, in 3 reads of 16 rows
    assert after[0]["lr"] == pytest.approx(lr_at(13, _job(synthetic_shards, tmp_path, epochs=3).train))
    assert not torch.equal(weights_c["llama_proj.weight"], weights["llama_proj.weight"])

    # 4. the exported .pth loads back into the model and gives identical logits
    from minigpt4.model import build_model, preset
    from minigpt4.weights import load_minigpt4

    with longer.checkpoint.as_directory() as d:
        pth = export_pth(d, str(tmp_path / "stage1.pth"))
    exported = torch.load(pth, weights_only=True)
    assert sorted(exported["model"]) == ["llama_proj.bias", "llama_proj.weight"]
    torch.manual_seed(42)
    trained = build_model(preset("tiny"))
    trained.llama_proj.load_state_dict({k.split(".", 1)[1]: v for k, v in weights_c.items()})
    torch.manual_seed(42)
    reloaded = build_model(preset("tiny"))
    report = load_minigpt4(reloaded, pth)
    assert sorted(report.loaded) == ["llama_proj.bias", "llama_proj.weight"]
    ids = torch.tensor([[1] + [-200] * 4 + [300, 301, 302]])
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(1, 3, 32, 32))
    assert torch.equal(trained.eval()(**batch).logits, reloaded.eval()(**batch).logits)


def test_job_cli_rejects_bad_config_before_starting_ray(tmp_path, monkeypatch, capsys):
    from conftest import cli_error

    from minigpt4.train import main

    monkeypatch.chdir(tmp_path)  # the relative weights path resolves against the working directory
    cfg = tmp_path / "job.yaml"
    cfg.write_text("model: {preset: tiny}\nweights: {minigpt4: missing/stage1.pth}\n"
                   "data: {sources: [{path: 's3://b/{0..1}.tar'}]}\n")
    assert "weights.minigpt4: missing/stage1.pth does not exist (run jobs/pretrain.py first)" in cli_error(
        capsys, main(2, ["--config", str(cfg)]))
    assert "precision" in cli_error(capsys, main(1, ["--config", str(cfg), "train.precision=int4"]))


def test_tensorboard_event_file_format():
    from minigpt4.tbevents import EventWriter, crc32c, encode_event, read_scalars, record

    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    rec = record(encode_event(1.5, 3, {"loss": 0.25}))
    assert len(rec) == 16 + int.from_bytes(rec[:8], "little")
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        w = EventWriter(d)
        w.scalars(7, {"loss": 0.5, "lr": 2.0, "mfu": None, "flag": True})
        assert read_scalars(w.path) == [(7, "loss", 0.5), (7, "lr", 2.0)]


def test_gpu_sh_train_runs_the_train_step_and_caption_benches(tmp_path):
    """`bench/gpu.sh train`, the device call for issue 4's and 8's numbers, must keep working: on CPU its
    two benches run the tiny preset, with only what the GPU box has in that call (no boto3, moto or
    bitsandbytes), so the jobs read local files. bench/train_step.py runs the naive loops and the Ray
    Train jobs; bench/caption.py its engine rows (its job row: tests/test_caption.py)."""
    import os

    from conftest import gpu_sh

    out = gpu_sh("train", tmp_path, timeout=400, TRAIN_STEP_ARGS="--steps 6 --batch-size 8",
                 CAPTION_ARGS="--batches 1 --batch-size 2 --new-tokens 4 --job-images 0")
    logs = "".join(f.read_text()[-2000:] for f in tmp_path.glob("*.log"))
    assert out.returncode == 0 and "train_step: exit 0 in" in out.stdout and "caption: exit 0 in" in out.stdout, \
        out.stdout[-3000:] + out.stderr[-2000:] + logs
    assert "=== tables ===" in out.stdout and "| Ray Train + DeepSpeed job |" in out.stdout
    assert json.loads((tmp_path / "caption.json").read_text())["rows"]["our engine"]["tokens"] == 2 * 4
    assert not os.environ.get("MINIGPT4_ABSENT")  # the simulation stayed in the subprocess
    report = json.loads((tmp_path / "train_step.json").read_text())
    assert report["storage"] == "local files" and report["partial"] is None
    assert report["preset"] == "tiny" and list(report["rows"]) == [
        "naive eager loop", "Ray Train + DeepSpeed job", "naive eager loop, cached features",
        "Ray Train + DeepSpeed job, cached features", "naive eager loop, captions of 4-32 tokens",
        "naive eager loop, captions of 4-32 tokens, length-bucketed (x8)"]
    assert all(r["samples_per_s"] > 0 for r in report["rows"].values())
    rows = report["rows"]  # bucketing pads far fewer positions than batches as they come
    assert rows["naive eager loop"]["padding"] == 0
    assert rows["naive eager loop, captions of 4-32 tokens, length-bucketed (x8)"]["padding"] < \
        rows["naive eager loop, captions of 4-32 tokens"]["padding"] / 2
    # the feature job encoded every synthetic image (2 shards of 64 at batch 8) before its job read them
    assert report["feature_job"]["images_encoded"] == 128 and report["feature_job"]["errors_total"] == 0
    table = (tmp_path / "train_step.md").read_text()
    assert "| naive eager loop |" in table and "| Ray Train + DeepSpeed job, cached features |" in table
    # the targets under the table: not judged on CPU, but measured, against the naive loop, with a ceiling
    assert "Targets (not judged" in table and report["rates"]["flops"] > 0
    end_to_end, features = report["targets"]
    assert end_to_end["what"] == "stage 1 end to end >= 250 samples/s per GPU" and end_to_end["verdict"] == "n/a"
    assert end_to_end["measured"] == rows["Ray Train + DeepSpeed job"]["samples_per_s"]
    assert end_to_end["baseline"] == ["naive eager loop", rows["naive eager loop"]["samples_per_s"]]
    assert features["measured"] == rows["Ray Train + DeepSpeed job, cached features"]["samples_per_s"]
    assert features["ceiling"] > end_to_end["ceiling"] > 0  # no encoder to run: a higher ceiling
    assert [t["what"] for t in json.loads((tmp_path / "caption.json").read_text())["targets"]] == [
        "captioning >= 10,000 generated tok/s per GPU, our engine at batch 2",
        "captioning >= 15,000 generated tok/s per GPU, our engine at batch 2",
        "captioning >= 10,000 generated tok/s per GPU, the caption job after its first captions"]
