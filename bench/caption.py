"""Captioning throughput: our generation engine next to Hugging Face `generate`, at the same batch
size on the same prompt embeddings, measured in the same run; then the whole caption job.

    python bench/caption.py                        # GPU: vicuna7b at real sizes, random weights, bf16
    python bench/caption.py --preset tiny          # CPU (what CI runs): the tiny preset, fp32
    python bench/caption.py --batch-size 64 --new-tokens 128 --batches 3

Rows of the table (images/s and generated tok/s; every row generates exactly `--new-tokens` tokens
per image, `min_new_tokens` = `max_new_tokens`, so random weights cannot stop early and every row
does the same work):
- `HF generate (dynamic cache)`: `llm.generate(inputs_embeds=..., attention_mask=...)` greedy over
  the same left-padded prompts ([BOS] + `<Img>` + 32 image tokens + MiniGPT-4's chat prompt).
- `HF generate (static cache)`: the same with `cache_implementation="static"` (GPU only).
- `our engine`: `GenerationEngine.generate`, greedy, per-sample stop strings on.
- `caption job (end to end)`: `minigpt4.caption.run` over `--job-images` synthetic JPEGs on a local
  S3 server: read, decode, preprocess, the actor pool, parquet commit (CPU: tiny model; GPU: one
  actor with the preset at random weights).
The image encoder runs once per batch in every row. Results also go to `<out>/caption.json` and `.md`.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from _common import machine, write_results  # bench/ is the script's directory, first on sys.path


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def engine_rows(cfg, batch_size: int, new_tokens: int, batches: int, device, static: bool) -> dict:
    import torch

    from minigpt4.generate import GenerationEngine, SamplingParams
    from minigpt4.model import build_model
    from minigpt4.prompts import END_SYMS, INSTRUCTION_TEMPLATES
    from minigpt4.tokenizer import load_tokenizer

    torch.manual_seed(0)
    model = build_model(cfg, device=device).eval()
    model._cast_vision({"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.vision_dtype, torch.float32))
    tok = load_tokenizer()
    prompt = INSTRUCTION_TEMPLATES[cfg.template].format("<Img><ImageHere></Img> Describe this image in detail.")
    pixels = torch.randn(batch_size, 3, cfg.image_size, cfg.image_size, device=device)
    params = SamplingParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens, stop=(END_SYMS[cfg.template],))
    engine = GenerationEngine(model.llm, tok)

    def embeds():
        return model.generation_inputs(tok, [prompt] * batch_size, pixels)

    def ours():
        return sum(len(c.token_ids) for c in engine.generate(embeds(), params))

    def hf(cache: str | None):
        def run():
            e = embeds()
            x = torch.stack(e)  # every prompt has the same length here: no padding needed
            kw = {"cache_implementation": cache} if cache else {}
            out = model.llm.generate(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long,
                                                                                  device=device),
                                     max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kw)
            return int(out.shape[0] * (out.shape[1] if out.shape[1] <= new_tokens else new_tokens))
        return run

    runs = {"HF generate (dynamic cache)": hf(None)}
    if static:
        runs["HF generate (static cache)"] = hf("static")
    runs["our engine"] = ours
    rows = {}
    with torch.no_grad():
        for label, fn in runs.items():
            fn()  # warm-up (and the static cache's compile / allocation)
            _sync(device)
            t = time.perf_counter()
            tokens = sum(fn() for _ in range(batches))
            _sync(device)
            dt = time.perf_counter() - t
            rows[label] = {"images_per_s": batch_size * batches / dt, "tokens_per_s": tokens / dt,
                           "tokens": tokens, "seconds": dt}
            print(f"[bench] {label}: {rows[label]['tokens_per_s']:.1f} generated tok/s", flush=True)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def job_row(preset: str, images: int, batch_size: int, new_tokens: int, gpu: bool, workdir: Path) -> dict:
    import random

    import ray

    from minigpt4 import caption, synthetic
    from minigpt4.data import io as uio
    from minigpt4.generate import SamplingParams
    from minigpt4.s3server import LocalS3

    server = LocalS3().start()
    server.apply_env()
    try:
        server.create_bucket("bench")
        for i in range(images):
            img = synthetic.render(synthetic.random_scene(random.Random(i), 2), 256)
            import io

            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=90)
            uio.write_bytes(f"s3://bench/images/{i:06d}.jpg", buf.getvalue())
        ray.init(include_dashboard=False, runtime_env={"env_vars": server.env()})
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        cfg = caption.CaptionConfig(
            input="s3://bench/images/", output=str(workdir / "captions"), model={"preset": preset},
            sampling=SamplingParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens),
            batch_size=batch_size, unit_size=max(batch_size, 64), num_gpus=1 if gpu else 0,
            cpus_per_actor=1, concurrency=[1], preprocess_cpus=1, log_every=30)
        s = caption.run(cfg, say=lambda line: print(line, flush=True))
        return {"images_per_s": s["images_per_second"], "tokens_per_s": s["generated_tokens_per_second"],
                "tokens": s["generated_tokens"], "seconds": s["wall_seconds"],
                "first_captions_seconds": s["first_captions_seconds"]}
    finally:
        ray.shutdown()
        server.stop()


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    ap.add_argument("--preset", default="vicuna7b" if gpu else "tiny")
    ap.add_argument("--batch-size", type=int, default=64 if gpu else 16)
    ap.add_argument("--new-tokens", type=int, default=128 if gpu else 32)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--job-images", type=int, default=512 if gpu else 256, help="0 skips the job row")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)

    cfg, device, name = machine(args.preset)
    print(f"[bench] captioning: preset {args.preset}, batch {args.batch_size}, {args.new_tokens} new tokens, "
          f"{name}", flush=True)
    rows = engine_rows(cfg, args.batch_size, args.new_tokens, args.batches, device, static=gpu)
    if args.job_images:
        with tempfile.TemporaryDirectory() as tmp:
            rows["caption job (end to end)"] = job_row(args.preset, args.job_images, args.batch_size,
                                                       args.new_tokens, gpu, Path(tmp))
    base = rows["HF generate (dynamic cache)"]["tokens_per_s"]
    lines = [f"Captioning, preset `{args.preset}`, batch {args.batch_size}, {args.new_tokens} new tokens/image, "
             f"{name}", "", "| path | images/s | generated tok/s | vs HF generate |", "|---|---:|---:|---:|"]
    for label, r in rows.items():
        lines.append(f"| {label} | {r['images_per_s']:.2f} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base:.2f}x |")
    if "caption job (end to end)" in rows:
        r = rows["caption job (end to end)"]
        lines += ["", f"The job's {r['seconds']:.1f} s include {r['first_captions_seconds']:.1f} s before the first "
                      "captions reached the driver (listing, actor start-up, model load)."]
    write_results(args.out, "caption", "\n".join(lines), {"preset": args.preset, "batch_size": args.batch_size,
                                                           "new_tokens": args.new_tokens, "device": name, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
