"""The generation engine: equal to transformers' generate, batched == single, per-sample stops, streaming
(both decode paths: the static slot engine and the simple DynamicCache one; more on the static one in
test_engine.py)."""
from __future__ import annotations

import pytest
import torch

from minigpt4.generate import GenerationEngine, SamplingParams
from minigpt4.prompts import CHAT_SYSTEM, Conversation, INSTRUCTION_TEMPLATES
from reference import ScriptedLM


def _hf(model, emb, **kw):
    out = model.llm.generate(inputs_embeds=emb[None], attention_mask=torch.ones(1, emb.shape[0], dtype=torch.long),
                             eos_token_id=2, pad_token_id=0, **kw)
    return out[0].tolist()


def _prompts(model, tok, n=3):
    texts = [INSTRUCTION_TEMPLATES["vicuna_v0"].format("<Img><ImageHere></Img> Describe this image in detail."),
             "<Img><ImageHere></Img>",
             "Give the following image: <Img><ImageHere></Img>. What is the colour of the larger shape on the left?"][:n]
    pixels = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return texts, pixels


@pytest.mark.parametrize("params,static", [
    (dict(max_new_tokens=10, repetition_penalty=1.05), True),
    (dict(max_new_tokens=10, repetition_penalty=1.05), False),
    (dict(max_new_tokens=10, repetition_penalty=1.0), True),
    (dict(max_new_tokens=10, repetition_penalty=1.0), False),
    (dict(max_new_tokens=6, num_beams=3, length_penalty=1.0), True),  # beams take the simple path
    (dict(max_new_tokens=6, num_beams=2, length_penalty=0.3, repetition_penalty=1.2), True),
])
def test_equals_transformers_generate(tiny_model, tiny_tokenizer, params, static):
    texts, pixels = _prompts(tiny_model, tiny_tokenizer)
    embeds = tiny_model.generation_inputs(tiny_tokenizer, texts, pixels)
    ours = GenerationEngine(tiny_model.llm, tiny_tokenizer, static=static).generate(embeds, SamplingParams(**params))
    for emb, c in zip(embeds, ours):
        assert c.token_ids == _hf(tiny_model, emb, do_sample=False, **params)


def test_beam_search_with_eos_equals_transformers(tiny_model, tiny_tokenizer):
    """Make EOS likely so hypotheses end at different lengths: scoring by length must match HF."""
    with torch.no_grad():
        tiny_model.llm.lm_head.weight[2] *= 3.0
        tiny_model.llm.lm_head.weight[2] += 0.05
    texts, pixels = _prompts(tiny_model, tiny_tokenizer)
    embeds = tiny_model.generation_inputs(tiny_tokenizer, texts, pixels)
    saw_eos = False
    for lp in (1.0, 2.0, -0.5):
        params = SamplingParams(max_new_tokens=8, num_beams=3, length_penalty=lp)
        for emb, c in zip(embeds, GenerationEngine(tiny_model.llm, tiny_tokenizer).generate(embeds, params)):
            ref = _hf(tiny_model, emb, do_sample=False, max_new_tokens=8, num_beams=3, length_penalty=lp)
            assert c.token_ids == ref
            saw_eos |= c.token_ids[-1:] == [2]
    assert saw_eos


def test_batched_equals_single_with_images(tiny_model, tiny_tokenizer):
    texts, pixels = _prompts(tiny_model, tiny_tokenizer)
    params = SamplingParams(max_new_tokens=12, repetition_penalty=1.05)
    batched = tiny_model.generate(tiny_tokenizer, texts, pixels, params)
    for i in range(len(texts)):
        single = tiny_model.generate(tiny_tokenizer, [texts[i]], pixels[i:i + 1], params)[0]
        assert single.token_ids == batched[i].token_ids and single.text == batched[i].text
    assert len({c.prompt_tokens for c in batched}) == 3  # really different lengths: left padding exercised


def test_prompt_has_bos_only_on_first_segment(tiny_model, tiny_tokenizer):
    seen = []
    tiny_model.prompt_embeds = lambda segs, imgs, f=tiny_model.prompt_embeds: seen.append(segs) or f(segs, imgs)
    tiny_model.generation_inputs(tiny_tokenizer, ["Hi <Img><ImageHere></Img> there"], torch.zeros(1, 3, 32, 32))
    (first, second), = seen
    assert first[0] == 1 and 1 not in second
    assert first == tiny_tokenizer("Hi <Img>").input_ids
    assert second == tiny_tokenizer("</Img> there", add_special_tokens=False).input_ids


def test_sampling_is_reproducible_with_seed(tiny_model, tiny_tokenizer):
    texts, pixels = _prompts(tiny_model, tiny_tokenizer)
    p = SamplingParams(max_new_tokens=10, do_sample=True, top_p=0.9, temperature=1.3, seed=7)
    a = tiny_model.generate(tiny_tokenizer, texts, pixels, p)
    b = tiny_model.generate(tiny_tokenizer, texts, pixels, p)
    c = tiny_model.generate(tiny_tokenizer, texts, pixels, p.replace(seed=8))
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]


def test_top_k_one_is_greedy(tiny_model, tiny_tokenizer):
    texts, pixels = _prompts(tiny_model, tiny_tokenizer)
    greedy = tiny_model.generate(tiny_tokenizer, texts, pixels, SamplingParams(max_new_tokens=8))
    topk = tiny_model.generate(tiny_tokenizer, texts, pixels, SamplingParams(max_new_tokens=8, do_sample=True, top_k=1, seed=3))
    assert [c.token_ids for c in greedy] == [c.token_ids for c in topk]


# -- stopping and streaming with a scripted LM ------------------------------------------------------
def _scripted(tok, scripts, static):
    lm = ScriptedLM(scripts, vocab=len(tok))
    prompts = [torch.full((3 + i, 8), float(i)) for i in range(len(scripts))]  # row id in every position
    return GenerationEngine(lm, tok, static=static), lm, prompts


def _ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("static", [True, False])
def test_stop_words_end_each_sample_separately(tiny_tokenizer, static):
    tok = tiny_tokenizer
    alone, after = _ids(tok, "###"), _ids(tok, "red.###")[-1:]
    assert alone != after  # `###` has two tokenizations, as in LLaMA's vocabulary
    filler = _ids(tok, " circle")
    scripts = [
        _ids(tok, "a red circle") + alone + filler * 20,        # stop on the standalone form
        _ids(tok, "two blue squares.") + after + filler * 20,   # stop on the in-text form
        filler * 40,                                             # never stops: max_new_tokens
        [2] + filler * 40,                                       # EOS first
    ]
    engine, lm, prompts = _scripted(tok, scripts, static)
    out = engine.generate(prompts, SamplingParams(max_new_tokens=12, stop=("###",)))
    # the standalone form decodes as " ###": raw text keeps the space, Conversation.clean_answer strips it
    assert [c.text for c in out] == ["a red circle ", "two blue squares.", "circle" + " circle" * 11, ""]
    assert [c.finish_reason for c in out] == ["stop", "stop", "length", "stop"]
    assert out[0].token_ids == _ids(tok, "a red circle") + alone
    assert out[3].token_ids == [2]
    if static:  # finished rows free their slots (the decode keeps a power-of-two width over the slots)
        assert engine.free_slots == engine.max_slots and not engine.busy
    else:  # finished rows leave the batch: 4 rows, then fewer as samples end
        assert lm.batch_sizes[0] == 4 and lm.batch_sizes[-1] == 1
        assert sorted(lm.batch_sizes, reverse=True) == lm.batch_sizes


@pytest.mark.parametrize("static", [True, False])
def test_stream_deltas_hold_back_partial_stops_and_utf8(tiny_tokenizer, static):
    tok = tiny_tokenizer
    text = "café ✓ red##blue"  # bytes of é / ✓ arrive as separate byte-fallback tokens; '##' is not '###'
    scripts = [_ids(tok, text) + _ids(tok, "x.###") + [7] * 5, _ids(tok, "a red circle") + [2]]
    engine, _, prompts = _scripted(tok, scripts, static)
    deltas = {0: [], 1: []}
    finals = {}
    for events in engine.stream(prompts, SamplingParams(max_new_tokens=40, stop=("###",))):
        for ev in events:
            deltas[ev.index].append(ev.text)
            assert "\ufffd" not in ev.text
            if ev.completion:
                finals[ev.index] = ev.completion
    assert "".join(deltas[0]) == finals[0].text == text + " x."
    assert not any("#" in d for d in deltas[0][-3:])  # the stop string never leaks
    assert "".join(deltas[1]) == finals[1].text == "a red circle"


def test_incremental_detokenization_equals_a_full_decode_after_every_token(tiny_tokenizer):
    """Each step decodes only the newest tokens (with the window before them): after every token the
    text must be exactly what decoding the whole sequence gives: leading spaces, byte-fallback pieces
    of é / ✓ / emoji arriving one byte at a time, bytes that never form a character, special tokens."""
    import random

    from minigpt4.generate import _Seq

    tok = tiny_tokenizer
    engine = GenerationEngine(ScriptedLM([[1]], vocab=len(tok)), tok)
    assert engine._windows  # the Rust decoder without clean-up: the windowed path
    full = engine._detokenize
    texts = ["café ✓ red##blue", " a  red   circle\nabove 🙂 two blue squares.", "x.### y", "naïve — 日本"]
    byte_ids = [i for t, i in tok.get_vocab().items() if t.startswith("<0x")]
    rng = random.Random(0)
    natural = [_ids(tok, t) for t in texts]
    draw = lambda: rng.choices([rng.randrange(3, len(tok)), rng.choice(byte_ids), rng.choice([0, 1, 2])],
                               weights=[7, 2, 1])[0]
    for ids in natural + [[draw() for _ in range(60)] for _ in range(30)]:
        seq, window = _Seq(0, SamplingParams(), 0), []
        for n, token in enumerate(ids, 1):
            seq.ids.append(token)
            assert engine._text(seq) == full(ids[:n]), (ids[:n], seq.prefix, seq.read)
            window.append(n - seq.prefix)
        if ids in natural:  # a few tokens per step (a split character's bytes and their context), not all
            assert max(window) <= 6, window


def test_widened_tokenizer_encodes_as_tiny_and_decodes_every_id(tiny_tokenizer, tmp_path):
    """The benchmarks' tokenizer for random models at 32,000 ids: the tiny one decodes ids past its 640 to
    nothing (a stream of such tokens carries no text); widened, every id is a distinct piece that reads as
    letters, while text (prompts, captions, the pad token) encodes to exactly the tiny tokenizer's ids."""
    from minigpt4.tokenizer import load_tokenizer, write_widened_tokenizer

    assert tiny_tokenizer.decode([700, 5000, 31999]) == ""
    wide = load_tokenizer(write_widened_tokenizer(tmp_path, 32000))
    assert len(wide) == 32000
    pieces = wide.convert_ids_to_tokens(list(range(32000)))
    assert len(set(pieces)) == 32000 and pieces[:640] == tiny_tokenizer.convert_ids_to_tokens(list(range(640)))
    assert all(wide.decode([i]).strip().isalpha() for i in range(640, 32000, 7))
    words = [i for i in range(640, 700) if pieces[i].startswith("▁")]  # most, as LLaMA's: a space, then letters
    joined = next(i for i in range(640, 700) if not pieces[i].startswith("▁"))
    assert len(words) > 40
    assert wide.decode([1, words[0], words[1], joined, 2], skip_special_tokens=True) == (
        f"{pieces[words[0]][1:]} {pieces[words[1]][1:]}{pieces[joined]}")
    text = INSTRUCTION_TEMPLATES["vicuna_v0"].format("<Img><ImageHere></Img> a red circle, naïve 🙂 $$")
    assert wide(text).input_ids == tiny_tokenizer(text).input_ids
    assert (wide.pad_token_id, wide.bos_token_id, wide.eos_token_id) == (
        tiny_tokenizer.pad_token_id, tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id)
    assert len(load_tokenizer(write_widened_tokenizer(tmp_path / "same", 640))) == 640


@pytest.mark.parametrize("static", [True, False])
def test_min_new_tokens_blocks_eos(tiny_tokenizer, static):
    engine, _, prompts = _scripted(tiny_tokenizer, [[2, 2, 2]], static)
    # ScriptedLM puts all mass on EOS; with it masked, greedy takes the next-best token
    out = engine.generate(prompts, SamplingParams(max_new_tokens=5, min_new_tokens=2))[0]
    assert out.token_ids[:2] != [2, 2] and 2 not in out.token_ids[:2] and out.token_ids[2] == 2


def test_context_left_truncation(tiny_model, tiny_tokenizer):
    long = "Please answer my questions. " * 40 + "<Img><ImageHere></Img> Describe this image."
    emb = tiny_model.generation_inputs(tiny_tokenizer, [long], torch.zeros(1, 3, 32, 32))[0]
    p = SamplingParams(max_new_tokens=10, max_length=64)
    out = GenerationEngine(tiny_model.llm, tiny_tokenizer).generate([emb], p)[0]
    assert emb.shape[0] > 64 and out.prompt_tokens == 64 - 10
    assert out.token_ids == _hf(tiny_model, emb[-54:], do_sample=False, max_new_tokens=10)


def test_bad_params_are_clear_errors():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=0)
    with pytest.raises(ValueError, match="max_length"):
        SamplingParams(max_new_tokens=300, max_length=200)


# -- conversation ------------------------------------------------------------------------------------
def test_vicuna_conversation_prompt_and_answer_cleaning():
    conv = Conversation.for_template("vicuna_v0")
    conv.add_image(torch.zeros(1))
    conv.ask("What is this?")
    assert conv.prompt() == CHAT_SYSTEM + "###Human: <Img><ImageHere></Img> What is this?###Assistant: "
    conv.answer(conv.clean_answer(" Assistant: a red circle.###Human: more"))
    conv.ask("And the colour?")
    assert conv.prompt() == (CHAT_SYSTEM + "###Human: <Img><ImageHere></Img> What is this?###Assistant: a red circle.###"
                             "Human: And the colour?###Assistant: ")


def test_llama2_conversation_prompt():
    conv = Conversation.for_template("llama2")
    conv.add_image(torch.zeros(1))
    conv.ask("Describe it.")
    assert conv.prompt() == CHAT_SYSTEM + "<s>[INST] <Img><ImageHere></Img> Describe it. [/INST] "
    assert conv.clean_answer("[/INST] a cat</s>junk") == "a cat"
