"""Online serving throughput: our Serve app at 1, 8 and 32 concurrent streams next to Hugging Face
`generate` at the same batch sizes, measured in the same run.

    python bench/serve.py                      # GPU: vicuna7b at real sizes, random weights, bf16
    python bench/serve.py --preset tiny        # CPU (what CI runs): the tiny preset
    python bench/serve.py --preset vicuna7b --depth 1 # CPU: the GPU run's widths, one layer deep, fp32
    python bench/serve.py --streams 1 8 32 --new-tokens 128

Every request streams a chat completion about one image with `min_tokens` = `max_tokens` (random
weights cannot stop early, so every row does the same work). Rows of the table:
- `serve, N streams`: N clients in threads, each sending `--rounds` requests back to back over HTTP
  (SSE) to one replica; aggregate generated tok/s over the wall time, median time to first token,
  and per-stream tok/s (tokens after the first / time after the first). The replica warmed up
  before it took requests (ServeSettings.warmup_tokens: KV cache allocated, decode step compiled at
  every width), so no row pays a compile; the start-up, warm-up included, is printed.
- `HF generate, batch N`: `llm.generate(inputs_embeds=...)` greedy in this process on the same
  prompt (image encoded once per batch): the in-process baseline without HTTP. Its time to first token
  is a 1-token run (image, prefill, first token); per stream, the tokens after the first over the time
  after the first, as the serve rows count.
Results also go to `<out>/serve.json` and `.md`.
"""
import argparse
import base64
import io
import json
import statistics
import sys
import threading
import time

# bench/ is the script's directory, first on sys.path
from _ceilings import Target, applies, decode_ceiling, decode_figures, measure_rates, section
from _common import machine, model_args, tokenizer_dir, write_results

PROMPT = "Describe this image in detail."


def image_url() -> str:
    import random

    from minigpt4 import synthetic

    buf = io.BytesIO()
    synthetic.render(synthetic.random_scene(random.Random(0), 2), 224).save(buf, "JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_prompt(cfg) -> tuple:
    """(prompt, (1, 3, S, S) pixels): the conversation the app builds from a bench request."""
    import torch

    from minigpt4.images import load_image, preprocess
    from minigpt4.prompts import CHAT_SYSTEM, Conversation

    conv = Conversation.for_template(cfg.template, system=CHAT_SYSTEM)
    url = image_url()
    px = torch.from_numpy(preprocess(load_image(base64.b64decode(url.split(",", 1)[1])), cfg.image_size))[None]
    conv.add_image(px)
    conv.ask(PROMPT)
    return conv.prompt(), px


def hf_row(cfg, tokenizer: str, batch: int, new_tokens: int, device) -> dict:
    import torch

    from minigpt4.model import build_model
    from minigpt4.tokenizer import load_tokenizer

    torch.manual_seed(0)
    model = build_model(cfg, device=device).eval()
    tok = load_tokenizer(tokenizer)
    prompt, px = chat_prompt(cfg)
    pixels = px.repeat(batch, 1, 1, 1).to(device)

    def run(n: int) -> float:
        """Seconds of one `generate` of `n` new tokens for the batch, from the pixels on."""
        t = time.perf_counter()
        with torch.no_grad():
            x = torch.stack(model.generation_inputs(tok, [prompt] * batch, pixels))
            model.llm.generate(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long, device=device),
                               max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id,
                               eos_token_id=tok.eos_token_id)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    run(new_tokens)  # warm-up
    ttft, dt = run(1), run(new_tokens)
    del model
    # per stream as the serve rows count it: the tokens after the first over the time after the first
    return {"tokens_per_s": batch * new_tokens / dt, "ttft_s": ttft,
            "per_stream_tokens_per_s": (new_tokens - 1) / (dt - ttft) if dt > ttft and new_tokens > 1
            else new_tokens / dt}


def stream_once(base: str, model: str, url: str, new_tokens: int) -> tuple[float, float, int]:
    """(time to first token, seconds, completion tokens) of one streamed request."""
    import requests

    body = {"model": model, "stream": True, "max_tokens": new_tokens, "min_tokens": new_tokens, "temperature": 0,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": PROMPT}]}]}
    t0 = time.perf_counter()
    first, tokens = None, 0
    with requests.post(base + "/v1/chat/completions", json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines(decode_unicode=True):
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and any(c.get("delta", {}).get("content") for c in chunk["choices"]):
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    if first is None:  # a time to first token of 0 would look like the best row of the table
        raise RuntimeError(f"a stream of {tokens} tokens carried no text: its tokenizer does not decode the "
                           "model's ids")
    return first, time.perf_counter() - t0, tokens


def serve_rows(model: dict, tokenizer: str, streams: list[int], rounds: int, new_tokens: int, gpu: bool, rows: dict,
               on_row=lambda warmup: None) -> None:
    """One Serve deployment, then each stream count in turn: its row goes into `rows`, then `on_row(the
    replica's warm-up as /healthz reports it)`."""
    import socket

    import ray
    import requests
    from ray import serve

    from minigpt4.config import from_dict, to_dict
    from minigpt4.serving import ServeSettings, deployment_class

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = from_dict(ServeSettings, {"model": model, "weights": {"tokenizer": tokenizer},
                                         "max_batch_size": max(streams), "max_queue": 4 * max(streams),
                                         "max_tokens_limit": max(new_tokens, 300), "batch_wait_ms": 5})
    dep = deployment_class().options(max_ongoing_requests=max(streams) * 2,
                                     ray_actor_options={"num_cpus": 1, "num_gpus": 1 if gpu else 0})
    t = time.perf_counter()
    serve.run(dep.bind(to_dict(settings)), name="bench", route_prefix="/")
    base, url = f"http://127.0.0.1:{port}", image_url()
    warm = requests.get(base + "/healthz", timeout=30).json()["warmup"]
    print(f"[bench] replica up in {time.perf_counter() - t:.1f} s; warm-up {warm['seconds']:.1f} s: KV cache "
          f"{warm['cache_gib']:.2f} GiB ({warm['slots']} slots x {warm['capacity']}), widths {warm['widths']}, "
          f"prefixes {warm['spans']}, compiled {warm['compiled']}", flush=True)
    try:
        stream_once(base, settings.model_id, url, 4)  # warm-up
        for n in streams:
            results: list[tuple[float, float, int]] = []
            lock = threading.Lock()

            def client():
                for _ in range(rounds):
                    r = stream_once(base, settings.model_id, url, new_tokens)
                    with lock:
                        results.append(r)

            threads = [threading.Thread(target=client) for _ in range(n)]
            t = time.perf_counter()
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            wall = time.perf_counter() - t
            tokens = sum(r[2] for r in results)
            rows[f"serve, {n} streams"] = {
                "tokens_per_s": tokens / wall, "ttft_s": statistics.median(r[0] for r in results),
                "per_stream_tokens_per_s": statistics.median((r[2] - 1) / max(r[1] - r[0], 1e-9) for r in results),
                "requests": len(results)}
            print(f"[bench] serve {n} streams: {rows[f'serve, {n} streams']['tokens_per_s']:.1f} tok/s", flush=True)
            on_row(warm)
    finally:
        serve.shutdown()
        ray.shutdown()


def ceilings(figures: dict, rates: dict, batches: list[int]) -> dict:
    """`decode_ceiling` per batch size of the chat's `decode_figures`."""
    return {b: decode_ceiling(rates, batch=b, **figures) for b in batches}


def targets(rows: dict, limits: dict) -> list[Target]:
    """Chat >= 170 tok/s at batch 1 (a stream's rate after its first token) and >= 2,500 tok/s aggregate
    over 32 concurrent streams (issue 6), each against HF generate at the same batch size in this run."""
    out = []
    for what, goal, n, key in (("chat >= 170 tok/s at batch 1 (one stream)", 170, 1, "per_stream_tokens_per_s"),
                               ("chat >= 2,500 tok/s aggregate over 32 streams", 2_500, 32, "tokens_per_s")):
        serve, hf = rows.get(f"serve, {n} streams"), rows.get(f"HF generate, batch {n}")
        limit = limits.get(n) or {}
        out.append(Target(what, goal, "tok/s", serve and serve[key], f"serve, {n} streams",
                          baseline=hf and (f"HF generate, batch {n}", hf[key]), ceiling=limit.get("tokens_per_s"),
                          arithmetic=limit.get("arithmetic", "")))
    return out


def main(argv=None) -> int:
    import torch

    from minigpt4.model import build_model
    from minigpt4.tokenizer import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    model_args(ap, gpu)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=2, help="requests per stream")
    ap.add_argument("--new-tokens", type=int, default=128 if gpu else 32)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)

    cfg, device, name, spec = machine(args.preset, args.depth)
    print(f"[bench] serving: preset {args.preset}, streams {args.streams}, {args.new_tokens} new tokens, {name}",
          flush=True)
    rows: dict[str, dict] = {}
    labels = [f"serve, {n} streams" for n in args.streams] + [f"HF generate, batch {n}" for n in args.streams]
    tokenizer = tokenizer_dir(cfg)
    rates = measure_rates(device)
    print(f"[bench] {rates['how']}", flush=True)
    replica: dict = {}  # the replica's warm-up (/healthz), once it is up
    meta_llm, tok, prompt = build_model(cfg, device="meta").llm, load_tokenizer(tokenizer), chat_prompt(cfg)[0]

    def save(warmup: dict | None = None):  # after every row: a run stopped by its timeout leaves the rows it finished
        replica.update(warmup or {})
        # the replica's cache (ServeSettings.warmup_tokens sizes it) sets the prefixes its decode attends over
        figures = decode_figures(meta_llm, tok, cfg, prompt, args.new_tokens, replica.get("capacity"))
        limits = ceilings(figures, rates, sorted({1, 32, *args.streams}))
        lines = [f"Serving, preset `{args.preset}`, {args.new_tokens} new tokens/request, {name}", "",
                 "| path | aggregate tok/s | per-stream tok/s | median TTFT (s) |", "|---|---:|---:|---:|"]
        for label, r in rows.items():
            ttft = f"{r['ttft_s']:.3f}" if r.get("ttft_s") is not None else "-"
            lines.append(f"| {label} | {r['tokens_per_s']:.1f} | {r['per_stream_tokens_per_s']:.1f} | {ttft} |")
        words, verdicts = section(targets(rows, limits), rates, applies(args.preset, args.depth, device),
                                  f"`{args.preset}` on {name}")
        write_results(args.out, "serve", "\n".join(lines) + "\n" + words,
                      {"preset": args.preset, "new_tokens": args.new_tokens, "device": name, "rows": rows,
                       "warmup": replica or None, "rates": rates, "targets": verdicts},
                      ", ".join(label for label in labels if label not in rows))

    serve_rows(spec, tokenizer, args.streams, args.rounds, args.new_tokens, gpu, rows, on_row=save)
    for n in args.streams:
        rows[f"HF generate, batch {n}"] = hf_row(cfg, tokenizer, n, args.new_tokens, device)
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
