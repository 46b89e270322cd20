"""The static slot engine: the same tokens as the simple path and HF generate, slots freed and reused,
and continuous batching in serving's Batcher (a request joins a running batch)."""
from __future__ import annotations

import threading

import pytest
import torch

import minigpt4.generate as generate
from minigpt4.generate import GenerationEngine, SamplingParams
from minigpt4.prompts import INSTRUCTION_TEMPLATES

TEXTS = [INSTRUCTION_TEMPLATES["vicuna_v0"].format("<Img><ImageHere></Img> Describe this image in detail."),
         "<Img><ImageHere></Img>",
         "Give the following image: <Img><ImageHere></Img>. What is the colour of the larger shape on the left?"]


@pytest.fixture
def embeds(tiny_model, tiny_tokenizer):
    """Prompts of 21, 8 and 34 positions, each with a different image."""
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return tiny_model.generation_inputs(tiny_tokenizer, TEXTS, pixels)


def _hf(model, emb, n):
    out = model.llm.generate(inputs_embeds=emb[None], attention_mask=torch.ones(1, emb.shape[0], dtype=torch.long),
                             eos_token_id=2, pad_token_id=0, do_sample=False, max_new_tokens=n)
    return out[0].tolist()


def _solo(model, tok, emb, params):
    return GenerationEngine(model.llm, tok, static=False).generate([emb], params)[0]


def test_static_equals_simple_equals_hf_with_per_sample_stops(tiny_model, tiny_tokenizer, embeds):
    """Mixed prompt lengths, different max_new_tokens and stop strings in one batch."""
    tok = tiny_tokenizer
    free = _solo(tiny_model, tok, embeds[1], SamplingParams(max_new_tokens=20)).text
    stop = free[len(free) // 2:len(free) // 2 + 2]  # text row 1 really produces, half way through
    params = [SamplingParams(max_new_tokens=14), SamplingParams(max_new_tokens=20, stop=(stop,)),
              SamplingParams(max_new_tokens=9, stop=("###",))]
    static = GenerationEngine(tiny_model.llm, tok).generate(embeds, params)
    simple = GenerationEngine(tiny_model.llm, tok, static=False).generate(embeds, params)
    assert static == simple
    assert static[1].finish_reason == "stop" and len(static[1].token_ids) < 20 and stop not in static[1].text
    assert [len(c.token_ids) for c in static] == [14, len(static[1].token_ids), 9]
    for emb, c, p in zip(embeds, static, params):  # a stopped row is HF's greedy output cut at its stop
        assert c.token_ids == _hf(tiny_model, emb, p.max_new_tokens)[:len(c.token_ids)]


def test_sampled_rows_reproducible_and_beside_greedy_rows(tiny_model, tiny_tokenizer, embeds):
    tok = tiny_tokenizer
    sampled = SamplingParams(max_new_tokens=10, do_sample=True, top_p=0.9, temperature=1.3, repetition_penalty=1.1,
                             seed=7)
    params = [sampled, SamplingParams(max_new_tokens=10), sampled]
    engine = GenerationEngine(tiny_model.llm, tok)
    a, b = engine.generate(embeds, params), engine.generate(embeds, params)
    assert a == b == GenerationEngine(tiny_model.llm, tok, static=False).generate(embeds, params)
    assert a[1] == _solo(tiny_model, tok, embeds[1], params[1])  # the greedy row is unaffected by its company
    other = engine.generate(embeds, [p.replace(seed=8) if p.do_sample else p for p in params])
    assert [c.token_ids for c in other] != [c.token_ids for c in a]


def test_freed_slots_take_new_prompts_with_their_solo_outputs(tiny_model, tiny_tokenizer, embeds):
    """Two slots: a long row keeps decoding while a short one finishes and a new prompt takes its slot,
    whose cache still holds the old row's longer sequence (the mask must hide it)."""
    tok = tiny_tokenizer
    long_p, short_p, new_p = SamplingParams(max_new_tokens=30), SamplingParams(max_new_tokens=4), \
        SamplingParams(max_new_tokens=12, repetition_penalty=1.2)
    engine = GenerationEngine(tiny_model.llm, tok, max_slots=2)
    long_id, short_id = engine.add([embeds[0], embeds[2]], [long_p, short_p])
    done = {}
    while short_id not in done:
        done |= {ev.index: ev.completion for ev in engine.step() if ev.completion}
    assert engine.free_slots == 1 and engine.busy
    new_id, = engine.add([embeds[1]], [new_p])
    assert engine.free_slots == 0
    while engine.busy:
        done |= {ev.index: ev.completion for ev in engine.step() if ev.completion}
    assert engine.free_slots == 2
    assert done[long_id] == _solo(tiny_model, tok, embeds[0], long_p)
    assert done[short_id] == _solo(tiny_model, tok, embeds[2], short_p)
    assert done[new_id] == _solo(tiny_model, tok, embeds[1], new_p)

    # generate() with more prompts than slots: the rest start as slots free up, outputs as if alone
    params = [SamplingParams(max_new_tokens=n) for n in (3, 16, 5, 9, 2)]
    prompts = [embeds[i % 3] for i in range(5)]
    out = engine.generate(prompts, params)
    assert out == [_solo(tiny_model, tok, e, p) for e, p in zip(prompts, params)]


def test_attention_spans_bound_the_shapes_to_capture():
    from minigpt4.generate import attention_span, attention_spans

    assert attention_spans(64) == [64] and attention_spans(256) == [64, 128, 192, 256]
    assert attention_spans(2048) == [256 * i for i in range(1, 9)]  # at most SPANS: steps grow with the capacity
    assert attention_spans(576) == [64 * i for i in range(1, 10)]
    assert [attention_span(n, 256) for n in (1, 64, 65, 129, 256)] == [64, 64, 128, 192, 256]
    with pytest.raises(IndexError):
        attention_span(257, 256)


def test_decode_attends_over_the_prefix_its_rows_fill(tiny_model, tiny_tokenizer, embeds, monkeypatch):
    """A cache sized for a long request: short rows decode over its first 64 positions only, and a
    row crossing 64 and 128 positions moves to the next prefix at the step its token needs it, with
    the simple path's tokens throughout (a prefix one short would hide the newest key)."""
    engine = GenerationEngine(tiny_model.llm, tiny_tokenizer, max_slots=4)
    calls = []
    step = engine._decode_step
    monkeypatch.setattr(engine, "_decode_step", lambda width, span: calls.append(
        (width, span, engine._cache.lengths[:width].max().item() + 1)) or step(width, span))
    simple = GenerationEngine(tiny_model.llm, tiny_tokenizer, static=False)
    long_p = SamplingParams(max_new_tokens=200, min_new_tokens=200)
    assert engine.generate([embeds[2]], long_p) == simple.generate([embeds[2]], long_p)  # 34 + 200 positions
    assert engine._cache.capacity == 256
    assert [span for _, span, _ in calls] == [64] * 30 + [128] * 64 + [192] * 64 + [256] * 41
    assert all(needed <= span < needed + 64 for _, span, needed in calls)

    calls.clear()  # the same cache, short rows
    params = [SamplingParams(max_new_tokens=n) for n in (12, 20, 8)]
    assert engine.generate(embeds, params) == simple.generate(embeds, params)
    assert engine._cache.capacity == 256 and {span for _, span, _ in calls} == {64}


def test_decode_step_compiles_as_one_graph(tiny_model, tiny_tokenizer, embeds, monkeypatch):
    """What CUDA graph capture needs: the decode step traces whole (fullgraph: no graph break, no host
    sync) and the compiled step gives the eager tokens. (Dynamo's eager backend: no C++ build on CPU.)"""
    monkeypatch.setattr(generate, "COMPILE_OPTIONS", dict(backend="eager", fullgraph=True))
    engine = GenerationEngine(tiny_model.llm, tiny_tokenizer, compile=True)
    params = SamplingParams(max_new_tokens=6)
    out = engine.generate(embeds, params)
    assert engine._compiled is not None  # no fallback to eager happened
    assert out == GenerationEngine(tiny_model.llm, tiny_tokenizer, static=False).generate(embeds, params)


def test_warmup_compiles_every_width_up_front_and_changes_no_output(tiny_model, tiny_tokenizer, embeds, monkeypatch):
    """After warmup() no request that fits compiles the decode step again (on a GPU a new width or
    prefix stalls every running sequence for the compile), whatever its batch size and length, and the
    tokens are those of an engine that never warmed up."""
    graphs = []

    from torch._dynamo.backends.registry import lookup_backend

    def backend(gm, inputs):  # counts what Dynamo compiles; traced through AOT autograd as Inductor's input is
        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, inputs)

    monkeypatch.setattr(generate, "COMPILE_OPTIONS", dict(backend=backend, fullgraph=True))
    import torch._inductor.config as inductor

    engine = GenerationEngine(tiny_model.llm, tiny_tokenizer, max_slots=8, compile=True)
    with inductor.patch({"triton.cudagraph_dynamic_shape_warn_limit": 3}):
        info = engine.warmup(tokens=128)
        assert inductor.triton.cudagraph_dynamic_shape_warn_limit == 8  # its graphs, one per shape, by design
    assert (info["slots"], info["capacity"], info["widths"], info["spans"], info["compiled"]) == \
        (8, 128, [1, 2, 4, 8], [64, 128], True)
    c = engine._cache
    assert info["cache_gib"] == sum(t.numel() * t.element_size() for t in c.tensors()) / 2**30
    assert c.lengths.eq(0).all() and not engine.busy and engine.free_slots == 8  # nothing decoded into the slots
    compiled = len(graphs)
    assert compiled == 2  # width 1, then one graph for every other width and prefix (each a long compile at 7B)

    reference = GenerationEngine(tiny_model.llm, tiny_tokenizer)
    for n in (1, 3, 2, 8, 5):  # widths 1, 4, 2, 8, 8: each one seen in warm-up
        prompts = [embeds[i % 3] for i in range(n)]
        params = [SamplingParams(max_new_tokens=4 + 12 * i) for i in range(n)]  # up to 34 + 88 positions
        assert engine.generate(prompts, params) == reference.generate(prompts, params)
    assert len(graphs) == compiled  # no compile after warm-up
    assert engine._cache is c  # nor a cache grown

    with pytest.raises(ValueError, match="static engine"):
        GenerationEngine(tiny_model.llm, tiny_tokenizer, static=False).warmup()


# -- continuous batching in serving -----------------------------------------------------------------
def test_batcher_admits_a_request_into_the_running_batch(tiny_model, tiny_tokenizer):
    """A request submitted while a long one decodes gets its tokens before the long one ends; each
    streams exactly the events it streams alone (tokens, text deltas, completion)."""
    from minigpt4.serving import Batcher, _Job

    tok = tiny_tokenizer
    pixels = torch.randn(2, 1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    long_p, short_p = SamplingParams(max_new_tokens=40, min_new_tokens=40), SamplingParams(max_new_tokens=6)
    log: list[tuple[str, object]] = []
    done = {"long": threading.Event(), "short": threading.Event()}
    long_started, short_submitted = threading.Event(), threading.Event()

    def deliver_to(name):
        def deliver(kind, payload):  # runs on the batcher thread
            log.append((name, payload))
            if kind == "error" or payload[1].completion is not None:
                done[name].set()
            elif name == "long" and not long_started.is_set():
                long_started.set()
                short_submitted.wait(30)  # the batch goes on only once the short request is queued
        return deliver

    batcher = Batcher(tiny_model, tok, max_rows=4, wait_s=0)
    batcher.submit(_Job([TEXTS[0]], [pixels[0]], [long_p], deliver_to("long")))
    assert long_started.wait(30)
    batcher.submit(_Job([TEXTS[2]], [pixels[1]], [short_p], deliver_to("short")))
    short_submitted.set()
    assert done["long"].wait(60) and done["short"].wait(60)

    names = [name for name, _ in log]
    assert names.index("short") < len(names) - 1 - names[::-1].index("long")  # joined, did not wait
    assert batcher.batches == 2 and batcher.steps < len(log)  # two prefills; steps shared by both rows
    for name, text, params, px in (("long", TEXTS[0], long_p, pixels[0]), ("short", TEXTS[2], short_p, pixels[1])):
        streamed = [p[1] for n, p in log if n == name]
        solo = [ev for events in tiny_model.stream(tok, [text], [px], params) for ev in events]
        assert [(ev.token_id, ev.text, ev.completion) for ev in streamed] == \
            [(ev.token_id, ev.text, ev.completion) for ev in solo]
