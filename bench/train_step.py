"""Stage-1 training step speed: our Ray Train + DeepSpeed job next to a naive eager PyTorch loop,
measured in the same run, samples/s per worker.

    python bench/train_step.py                      # GPU: vicuna7b at real sizes, random weights, bf16
    python bench/train_step.py --preset tiny        # CPU (what CI runs): the tiny preset, fp32
    python bench/train_step.py --batch-size 64 --steps 40

Rows of the table:
- `naive eager loop`: the model in train mode, AdamW over llama_proj, autocast (bf16 on GPU), one
  in-memory batch of random pixels and caption-length token ids reused every step: compute only,
  no data loading, no DeepSpeed. This is the ≈ 180 samples/s baseline of DESIGN.md on an H100.
- `Ray Train + DeepSpeed job`: `minigpt4.train.run` exactly as `jobs/pretrain.py` runs it: one
  worker, synthetic shards at the model's image size served by a local S3 server, streamed through
  the Ray Data pipeline, ZeRO-2, checkpoint at the end. Its samples/s is the median of the job's own
  log windows after the first (which includes start-up).
- `..., cached features`: the same two paths fed the frozen-feature cache instead of pixels (the ViT
  and Q-Former do not run): the naive loop gets one random (B, 32, 768) float16 batch; the job reads
  a `features` source that the feature job (`minigpt4.features.run`, one encoder actor) wrote from
  the same shards earlier in the run. The feature job's own images/s is reported under the table.

All use the stage-1 layout: [BOS][32 image tokens][caption of `--text-tokens` tokens].
Results also go to `<out>/train_step.json` and `.md`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import machine, write_results  # bench/ is the script's directory, first on sys.path


def naive_loop(cfg, batch_size: int, text_tokens: int, steps: int, warmup: int, device,
               features: bool = False) -> dict:
    import torch

    from minigpt4.model import IMAGE_TOKEN_ID, build_model
    from minigpt4.train import param_groups

    torch.manual_seed(0)
    model = build_model(cfg, device=device)
    model.set_trainable()
    model.train()
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4)
    n_img = cfg.num_image_tokens
    ids = torch.randint(3, 500, (batch_size, 1 + n_img + text_tokens), device=device)
    ids[:, 0] = 1
    ids[:, 1:1 + n_img] = IMAGE_TOKEN_ID
    labels = ids.clone()
    labels[:, :1 + n_img] = -100
    if features:  # what a features source delivers: the Q-Former's output, stored as float16
        image = {"image_feats": torch.randn(batch_size, cfg.num_query_tokens, cfg.proj_in_features, device=device,
                                            dtype=torch.float16)}
    else:
        image = {"pixel_values": torch.randn(batch_size, 3, cfg.image_size, cfg.image_size, device=device)}
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, **image)
    use_cuda = device.type == "cuda"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_cuda):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if use_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if use_cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    mem = torch.cuda.max_memory_allocated() / 2**30 if use_cuda else None
    del model, opt
    if use_cuda:
        torch.cuda.empty_cache()
    return {"samples_per_s": steps * batch_size / dt, "step_ms": 1000 * dt / steps, "gpu_mem_gb": mem}


def ray_jobs(preset: str, batch_size: int, steps: int, use_gpu: bool, image_size: int,
             workdir: Path) -> tuple[dict, dict]:
    """The Ray Train job from pixels, the feature job over the same shards, then the Ray Train job from its
    features: one local S3 server and one Ray session. Returns (rows by label, the feature job's summary)."""
    import ray

    from minigpt4.config import from_dict
    from minigpt4.features import FeaturesConfig
    from minigpt4.features import run as run_features
    from minigpt4.s3server import LocalS3
    from minigpt4.synthetic import write_dataset
    from minigpt4.train import JobConfig, run

    server = LocalS3().start()
    server.apply_env()
    server.create_bucket("bench")
    per_shard = 64
    shards = max(2, -(-batch_size * min(steps, 20) // per_shard))  # epochs restart at most every ~20 steps
    write_dataset("s3://bench/syn", train_shards=shards, samples_per_shard=per_shard, align_samples=0,
                  heldout_samples=0, image_size=image_size, progress=False)
    pattern = f"s3://bench/syn/pretrain/{{00000..{shards - 1:05d}}}.tar"
    log_every = max(1, steps // 5)

    def train(source: dict, name: str) -> dict:
        job = from_dict(JobConfig, {
            "model": {"preset": preset},
            "data": {"sources": [source], "errors": str(workdir / name / "errors")},
            "train": dict(stage=1, num_workers=1, use_gpu=use_gpu, cpus_per_worker=1, batch_size=batch_size,
                          epochs=1, iters_per_epoch=steps, warmup_steps=steps, log_every=log_every,
                          checkpoint_every=steps, precision="bf16" if use_gpu else "fp32", zero_stage=2,
                          storage_path=str(workdir / name),
                          torch_threads=0 if use_gpu else min(os.cpu_count() or 1, 8)),
        })
        t = time.perf_counter()
        result = run(job)
        wall = time.perf_counter() - t
        with result.checkpoint.as_directory() as d:
            history = json.loads(Path(d, "state.json").read_text())["history"]
        steady = [h["samples_per_s"] for h in history[1:]] or [history[-1]["samples_per_s"]]
        return {"samples_per_s": statistics.median(steady), "wall_s": wall, "mfu": history[-1].get("mfu"),
                "data_wait": statistics.median(h.get("data_wait", 0.0) for h in history[1:] or history),
                "gpu_mem_gb": history[-1].get("gpu_mem_gb"),
                "windows": [round(h["samples_per_s"], 1) for h in history]}

    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": server.env()})
    try:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        rows = {"Ray Train + DeepSpeed job": train({"path": pattern, "name": "syn"}, "pixels")}
        # the feature job on the same shards (GPU actor when there is one, bf16 autocast), then stage 1 from it
        features = run_features(FeaturesConfig(input=pattern, output="s3://bench/features/", model={"preset": preset},
                                               batch_size=batch_size, log_every=30.0), say=lambda _: None)
        rows["Ray Train + DeepSpeed job, cached features"] = train(
            {"path": "s3://bench/features/", "format": "features", "name": "syn"}, "features")
    finally:
        ray.shutdown()
        server.stop()
    return rows, features


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    ap.add_argument("--preset", default="vicuna7b" if gpu else "tiny")
    ap.add_argument("--batch-size", type=int, default=64 if gpu else 32)
    ap.add_argument("--steps", type=int, default=30 if gpu else 20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--text-tokens", type=int, default=24, help="caption tokens per sample (LAION/CC: ~20-30)")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)

    cfg, device, name = machine(args.preset)
    print(f"[bench] stage-1 step: preset {args.preset}, batch {args.batch_size}, {args.steps} steps, {name}", flush=True)
    rows = {}
    for label, features in (("naive eager loop", False), ("naive eager loop, cached features", True)):
        rows[label] = naive_loop(cfg, args.batch_size, args.text_tokens, args.steps, args.warmup, device, features)
        print(f"[bench] {label}: {rows[label]['samples_per_s']:.1f} samples/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        jobs, features = ray_jobs(args.preset, args.batch_size, args.steps, gpu, cfg.image_size, Path(tmp))
    # the table's order: each job next to its naive loop
    rows = {k: rows.get(k) or jobs[k] for k in ("naive eager loop", "Ray Train + DeepSpeed job",
                                                 "naive eager loop, cached features",
                                                 "Ray Train + DeepSpeed job, cached features")}
    base = rows["naive eager loop"]["samples_per_s"]
    lines = [f"Stage-1 step, preset `{args.preset}`, batch {args.batch_size}/worker, {name}", "",
             "| path | samples/s per worker | vs naive | data wait | peak GPU mem (GB) |", "|---|---|---|---|---|"]
    for label, r in rows.items():
        mem = f"{r['gpu_mem_gb']:.1f}" if r.get("gpu_mem_gb") else "-"
        wait = f"{100 * r['data_wait']:.0f}%" if "data_wait" in r else "-"
        lines.append(f"| {label} | {r['samples_per_s']:.1f} | {r['samples_per_s'] / base:.2f}x | {wait} | {mem} |")
    lines += ["", f"Feature job (once, before the cached-features job): {features['images_encoded']:,} images in "
              f"{features['wall_seconds']:.1f}s, {features['images_per_second']:.1f} images/s on one encoder actor, "
              f"{features['bytes_per_image'] / 1024:.1f} KB per image ({features['feature_shape'][0]} x "
              f"{features['feature_shape'][1]} {features['dtype']})."]
    write_results(args.out, "train_step", "\n".join(lines),
                  {"preset": args.preset, "batch_size": args.batch_size, "device": name, "rows": rows,
                   "feature_job": features})
    return 0


if __name__ == "__main__":
    sys.exit(main())
