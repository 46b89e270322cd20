"""The benches' targets (DESIGN.md section 8, the issues' acceptance numbers) and the ceiling arithmetic
beside them: what this machine can do at most for the measured model, from rates measured in the same
run (a device-to-device copy for memory bandwidth, a large matmul for FLOP/s).

Every bench ends its table with a `Targets` section built here: per target the measured number, met or
the gap, the ratio to the run's best baseline (naive loop or Hugging Face), and the ceiling with its
arithmetic. Targets are judged only where they apply (a real preset at full depth on a GPU); elsewhere
the section still prints, marked not judged, so CI keeps the arithmetic working."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

GB = 1e9


def si(value: float, unit: str) -> str:
    """`value` in `unit` with the largest SI prefix that keeps it at least 1: si(2.05e12, "FLOP") = "2.05 TFLOP"."""
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def measure_rates(device, dtype=None) -> dict:
    """{"bandwidth": bytes/s of a device-to-device copy (read + write counted), "flops": FLOP/s of a square
    matmul in `dtype` (default: bf16 on a GPU, as the benches run there; fp32 on CPU), "how": the words}.
    A second or less: 1 GiB buffers and 8192-wide matmuls on a GPU, 64 MiB and 1024-wide on CPU. These are
    the attainable rates the ceilings use (an H100 SXM copies at about 3 of its 3.35 TB/s spec and
    multiplies bf16 at about 700-800 of its 989 TFLOP/s)."""
    import torch

    cuda = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    n_bytes, width, reps = (2**30, 8192, 20) if cuda else (2**26, 1024, 5)

    def timed(fn) -> float:
        fn()  # warm-up: kernel selection, first-touch of the pages
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / reps

    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    bandwidth = 2 * n_bytes / timed(lambda: dst.copy_(src))
    del src, dst
    a = torch.randn(width, width, device=device).to(dtype)
    b = torch.randn(width, width, device=device).to(dtype)
    flops = 2 * width**3 / timed(lambda: a @ b)
    del a, b
    if cuda:
        torch.cuda.empty_cache()
    name = str(dtype).removeprefix("torch.")
    return {"bandwidth": bandwidth, "flops": flops,
            "how": f"measured here: copy {si(bandwidth, 'B/s')}, {name} matmul {si(flops, 'FLOP/s')}"}


def llm_decode_bytes(llm) -> int:
    """Bytes of the LLM's weights that one decode step reads: every parameter and buffer (int8wo's int8
    weights and scales are buffers) but the input embedding table, of which a step gathers one row per
    sequence (unless the head shares it)."""
    emb, head = llm.get_input_embeddings(), llm.get_output_embeddings()
    skip = set() if head is not None and head.weight is emb.weight else {id(emb.weight)}
    tensors = {id(t): t for t in (*llm.parameters(), *llm.buffers()) if id(t) not in skip}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def kv_bytes_per_token(llm) -> int:
    """Bytes of keys and values one position adds to the KV cache, over all layers."""
    c = llm.config
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * heads * head_dim * llm.get_input_embeddings().weight.element_size()


def decode_flops_per_token(llm, context: float) -> float:
    """Multiply-adds x 2 of one generated token: its weight matmuls (the decode bytes' parameters, at one
    multiply-add per weight) and attention over `context` positions (scores and weighted values)."""
    c = llm.config
    emb, head = llm.get_input_embeddings(), llm.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    weights = sum(p.numel() for p in llm.parameters() if tied or p is not emb.weight)
    weights += sum(b.numel() for n, b in llm.named_buffers() if n.endswith(".weight"))  # int8wo's int8 weights
    q_width = c.num_attention_heads * (getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    return 2 * weights + 4 * c.num_hidden_layers * q_width * context


def decode_figures(llm, tokenizer, cfg, prompt: str, new_tokens: int, capacity: int | None = None) -> dict:
    """What `decode_ceiling` needs of a bench's generation, `decode_ceiling(rates, batch=B, **figures)`: the
    LLM's decode bytes, KV bytes a position and FLOPs a token, the average context (the prompt's positions,
    image tokens included, plus half the new tokens), the positions our static cache gives each slot
    (`capacity`, by default the engine's `slot_capacity` of prompt + new tokens) and those its decode
    steps attend over on average (`engine_context`: each step's `attention_span`). Works on the meta device."""
    from minigpt4.generate import attention_span, slot_capacity
    from minigpt4.prompts import tokenize_segments

    segments = tokenize_segments(tokenizer, prompt, bos=True)
    positions = sum(map(len, segments)) + (len(segments) - 1) * cfg.num_image_tokens
    context = positions + new_tokens / 2
    capacity = max(capacity or 0, slot_capacity(positions + new_tokens))  # a longer request grows the cache
    # decode step j (1 .. new_tokens - 1; the first token comes from the prefill) writes the j-th token
    spans = [attention_span(positions + j, capacity) for j in range(1, new_tokens)]
    return {"weight_bytes": llm_decode_bytes(llm), "kv_per_token": kv_bytes_per_token(llm),
            "flops_per_token": decode_flops_per_token(llm, context), "context": context,
            "engine_context": sum(spans) / len(spans) if spans else context, "capacity": capacity}


def decode_ceiling(rates: dict, weight_bytes: float, kv_per_token: float, flops_per_token: float, batch: int,
                   context: float, engine_context: float | None = None, capacity: int | None = None) -> dict:
    """Generated tok/s at most when every step reads the weights once plus each row's KV cache over
    `context` positions (memory) and does `batch` tokens' FLOPs (compute): batch / max(both times).
    `engine_context`: the positions our decode steps' attention actually reads on average (prefixes of
    the static cache's `capacity` positions), when more than `context`: the engine's own bound, which
    the arithmetic names beside the physical one."""
    def bound(ctx: float) -> tuple[float, float, float]:
        step_bytes = weight_bytes + batch * ctx * kv_per_token
        return step_bytes, step_bytes / rates["bandwidth"], batch * flops_per_token / rates["flops"]

    step_bytes, t_mem, t_flops = bound(context)
    tps = batch / max(t_mem, t_flops)
    words = (f"batch {batch}: ({si(weight_bytes, 'B')} weights + {batch} x {context:.0f} positions x "
             f"{si(kv_per_token, 'B')} KV) = {si(step_bytes, 'B')} a step at {si(rates['bandwidth'], 'B/s')} "
             f"= {1e3 * t_mem:.3g} ms; {batch} x {si(flops_per_token, 'FLOP')} at {si(rates['flops'], 'FLOP/s')} "
             f"= {1e3 * t_flops:.3g} ms; {'memory' if t_mem >= t_flops else 'compute'}-bound: {tps:,.0f} tok/s")
    out = {"tokens_per_s": tps, "bound": "memory" if t_mem >= t_flops else "compute", "arithmetic": words}
    if engine_context and engine_context > context:
        _, e_mem, e_flops = bound(engine_context)
        out["engine_tokens_per_s"] = batch / max(e_mem, e_flops)
        prefixes = f" (prefixes of its {capacity}-position cache)" if capacity else ""
        out["arithmetic"] += (f"; our decode steps attend over {engine_context:.0f} positions on average{prefixes}: "
                              f"{out['engine_tokens_per_s']:,.0f} tok/s")
    return out


def train_ceiling(rates: dict, flops_per_sample: float) -> dict:
    """Samples/s at most at the measured matmul rate, every FLOP of the step counted."""
    sps = rates["flops"] / flops_per_sample
    return {"samples_per_s": sps, "bound": "compute",
            "arithmetic": f"{si(flops_per_sample, 'FLOP')} a sample at {si(rates['flops'], 'FLOP/s')} "
                          f"= {sps:,.1f} samples/s"}


@dataclass
class Target:
    what: str  # the target in words, with its number: "stage 1 end to end >= 250 samples/s per GPU"
    goal: float
    unit: str
    measured: float | None  # None: the row did not run (skipped, failed, or stopped by the timeout)
    row: str = ""  # the table row it reads
    at_most: bool = False  # a limit (memory) rather than a rate
    baseline: tuple[str, float] | None = None  # (the best baseline row's label, its number)
    ceiling: float | None = None
    arithmetic: str = ""
    missing: str = "not run"  # the verdict while `measured` is None

    def verdict(self, judged: bool) -> str:
        if self.measured is None:
            return self.missing
        if not judged:
            return "n/a"
        met = self.measured <= self.goal if self.at_most else self.measured >= self.goal
        if met:
            return "met"
        if self.at_most:
            return f"missed: {self.measured / self.goal:.2f}x the limit"
        return f"missed: {int(100 * self.measured / self.goal + 1e-9)}% of the target"  # 99.7% is not "100%"


def applies(preset: str, depth: int | None, device) -> bool:
    """Whether the targets judge this run: a real preset at its full depth on a GPU."""
    return preset != "tiny" and depth is None and device.type == "cuda"


def section(targets: list[Target], rates: dict, judged: bool, run: str) -> tuple[str, list[dict]]:
    """(the markdown under a bench's table, the JSON list): per target measured, verdict, ratio to the
    run's baseline, ceiling and the share of it reached, and the arithmetic."""
    def num(v: float | None) -> str:
        return "—" if v is None else (f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}")

    lines = ["", "Targets" + ("" if judged else f" (not judged: they are for a real preset at full depth on a GPU; "
                              f"this run is {run}; the arithmetic is this run's model on this machine)") + ", "
             f"ceilings from rates {rates['how']}:", "",
             "| target | measured | verdict | vs baseline | ceiling (floor for a limit) | share of ceiling |",
             "|---|---:|---|---:|---:|---:|"]
    for t in targets:
        vs = (f"{t.measured / t.baseline[1]:.2f}x {t.baseline[0]}" if t.baseline and t.measured is not None
              and t.baseline[1] else "—")
        share = f"{t.measured / t.ceiling:.0%}" if t.ceiling and t.measured is not None and not t.at_most else "—"
        measured = "—" if t.measured is None else f"{num(t.measured)} {t.unit}"
        lines.append(f"| {t.what} | {measured} | {t.verdict(judged)} | {vs} | {num(t.ceiling)} | {share} |")
    rows: dict[str, list[str]] = {}  # each ceiling's arithmetic once, after the rows it bounds
    for t in targets:
        if t.arithmetic and t.row not in rows.setdefault(t.arithmetic, []):
            rows[t.arithmetic].append(t.row)
    lines += [""] + [f"- {', '.join(f'`{r}`' for r in labels)}: {words}" for words, labels in rows.items()]
    return "\n".join(lines), [asdict(t) | {"verdict": t.verdict(judged)} for t in targets]
