"""Weight-only int8 LLM (quantize_llm='int8wo'): the layer against a dequantized-weight reference, which
layers of MiniGPT-4 it replaces, generation, training through it, loading, compilation, and its bench."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import minigpt4.generate as generate
import minigpt4.int8 as int8
from minigpt4.generate import GenerationEngine, SamplingParams
from minigpt4.int8 import Int8Linear, dequantize, quantize_llm_int8, quantize_weight
from minigpt4.model import build_model, preset

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "###Human: <Img><ImageHere></Img> Describe this image in detail. ###Assistant: "
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _models():
    """(fp32 tiny model, int8wo tiny model, fp32 reference whose decoder Linears hold the int8wo model's
    dequantized weights), all from one seed: every other tensor is the same in the three."""
    torch.manual_seed(0)
    fp32 = build_model(preset("tiny")).eval()
    torch.manual_seed(0)
    quant = build_model(preset("tiny", quantize_llm="int8wo")).eval()
    ref = copy.deepcopy(fp32)
    with torch.no_grad():
        for name, m in quant.llm.named_modules():
            if isinstance(m, Int8Linear):
                ref.llm.get_submodule(name).weight.copy_(dequantize(m.weight, m.scale, torch.float32))
    return fp32, quant, ref


def _pixels(n=2, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# -- the layer -------------------------------------------------------------------------------------
def test_quantize_weight_is_symmetric_per_output_channel():
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 2, 48)[:, None]
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.shape == (48,)
    torch.testing.assert_close(scale, w.abs().amax(dim=1) / 127)
    assert torch.equal(q.abs().amax(dim=1), torch.full((48,), 127, dtype=torch.int8))  # each row's absmax -> ±127
    assert (dequantize(q, scale, torch.float32) - w).abs().le(scale[:, None] / 2 + 1e-7).all()  # round to nearest
    assert torch.equal(quantize_weight(torch.zeros(3, 8))[0], torch.zeros(3, 8, dtype=torch.int8))  # no 0/0


@pytest.mark.parametrize("rows", [3, 40], ids=["kernel", "dequantized-matmul"])
def test_int8_linear_equals_dequantized_reference(rows):
    """Both eager paths (the aten kernel for decode-sized inputs, F.linear over the dequantized weight
    for prefill-sized ones) and the compiled decode's multiply-sum compute x @ (W_q * scale).T + b, and
    stay within int8 rounding of the fp32 layer."""
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(64, 48)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 64, generator=g) * 0.05)
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(1, rows, 64, generator=g)
    assert layer._kernel(x[0]) == (rows <= int8.DECODE_MAX_ROWS) and "cpu" in int8.KERNEL_DEVICES
    with torch.no_grad():
        out = layer(x)
        ref = F.linear(x, dequantize(layer.weight, layer.scale, torch.float32), linear.bias)
        exact = linear(x)
        gemv = int8.fused_gemv(x[0], layer.weight, layer.scale) + linear.bias
    assert out.shape == (1, rows, 48) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gemv, ref[0], rtol=1e-5, atol=1e-6)
    assert (out - exact).norm() / exact.norm() < 0.01

    with torch.no_grad():  # bf16 activations (the GPU presets'): same path, output in bf16
        got = layer(x.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, rtol=0.02, atol=0.02)


def test_fp16_activations_do_not_overflow():
    """x @ W_q.T alone (64 * 100 * 127) would exceed fp16's 65504 before the scale brings it back to
    64, so neither path may form it in fp16."""
    linear = nn.Linear(64, 8, bias=False)
    with torch.no_grad():
        linear.weight.fill_(0.01)
    layer = Int8Linear.from_linear(linear.half())
    x = torch.full((20, 64), 100.0, dtype=torch.float16)
    with torch.no_grad():
        for rows in (1, 20):  # kernel, dequantized matmul
            out = layer(x[:rows])
            torch.testing.assert_close(out.float(), torch.full((rows, 8), 64.0), rtol=2e-3, atol=0)


# -- the model ---------------------------------------------------------------------------------------
def test_int8wo_replaces_the_decoder_linears_only():
    fp32, quant, _ = _models()
    layers = quant.llm.model.layers
    replaced = {n for n, m in quant.named_modules() if isinstance(m, Int8Linear)}
    assert replaced == {f"llm.model.layers.{i}.{part}.{p}" for i in range(len(layers))
                        for part, names in (("self_attn", DECODER_LINEARS[:4]), ("mlp", DECODER_LINEARS[4:]))
                        for p in names}
    assert len(replaced) == 14
    assert not any(type(m) is nn.Linear for m in layers.modules())
    assert type(quant.llm.lm_head) is nn.Linear and quant.llm.lm_head.weight.dtype == torch.float32
    assert quantize_llm_int8(quant.llm) == 0  # idempotent
    # everything but the decoder Linears' weights is untouched: vision, Q-Former, llama_proj, embeddings...
    want, got = fp32.state_dict(), quant.state_dict()
    quantized = {n + ".weight" for n in replaced}
    for key, value in want.items():
        if key not in quantized:
            assert torch.equal(got[key], value), key
    assert {k for k in got if k.endswith(".scale")} == {n + ".scale" for n in replaced}
    # only llama_proj trains, and the parameter counts (FLOPs in train.py) are the model's
    assert {n for n, p in quant.named_parameters() if p.requires_grad} == {"llama_proj.weight", "llama_proj.bias"}
    assert quant.parameter_counts() == fp32.parameter_counts()


def test_llm_weight_bytes_quarter_of_fp32_in_the_decoder():
    fp32, quant, _ = _models()
    n_weights = sum(m.weight.numel() for m in quant.modules() if isinstance(m, Int8Linear))
    n_scales = sum(m.scale.numel() for m in quant.modules() if isinstance(m, Int8Linear))
    # fp32 weight (4 bytes) -> int8 (1 byte) + one fp32 scale per output channel
    assert quant.llm_weight_bytes() == fp32.llm_weight_bytes() - 3 * n_weights + 4 * n_scales

    def decoder_bytes(model):
        return sum(t.numel() * t.element_size() for t in (*model.llm.model.layers.parameters(),
                                                           *model.llm.model.layers.buffers()))
    assert 0.25 < decoder_bytes(quant) / decoder_bytes(fp32) < 0.27
    # the real preset, on the meta device: bf16 12.6 GiB -> int8wo 6.5 GiB (embeddings and lm_head stay bf16)
    bf16 = build_model(preset("vicuna7b", llm_dtype="bf16"), device="meta")
    wo = build_model(preset("vicuna7b", llm_dtype="bf16", quantize_llm="int8wo"), device="meta")
    assert round(bf16.llm_weight_bytes() / 2**30, 1) == 12.6 and round(wo.llm_weight_bytes() / 2**30, 1) == 6.5


def test_generation_matches_the_dequantized_reference_and_stays_near_fp32(tiny_tokenizer):
    fp32, quant, ref = _models()
    tok, pixels, params = tiny_tokenizer, _pixels(), SamplingParams(max_new_tokens=12)
    out = quant.generate(tok, [PROMPT] * 2, pixels, params)
    assert [len(c.token_ids) for c in out] == [12, 12]
    assert [c.token_ids for c in out] == [c.token_ids for c in ref.generate(tok, [PROMPT] * 2, pixels, params)]
    # teacher-forced on the int8wo model's own output: the logits stay within int8 rounding of fp32's
    with torch.no_grad():
        prompt = quant.generation_inputs(tok, [PROMPT], pixels[:1])[0]
        seq = torch.cat([prompt, quant.embed_tokens(torch.tensor(out[0].token_ids))])[None]
        want, got = fp32.llm(inputs_embeds=seq).logits, quant.llm(inputs_embeds=seq).logits
    assert (got - want).abs().max() < 0.03 * want.abs().max()


def test_training_through_an_int8wo_llm(tiny_tokenizer):
    """llama_proj trains through the frozen int8 LLM with the dequantized reference's gradients, and
    the backward keeps no dequantized copy of any weight (it re-dequantizes the int8 one)."""
    from test_model import _batch

    _, quant, ref = _models()
    batch, *_ = _batch(tiny_tokenizer, quant)
    shapes = {tuple(m.weight.shape) for m in quant.modules() if isinstance(m, Int8Linear)}
    saved = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = quant.train()(**batch).loss
    loss.backward()
    assert not [s for s in saved if s[1] in shapes and s[0].is_floating_point]
    ref_loss = ref.train()(**batch).loss
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert {n for n, p in quant.named_parameters() if p.grad is not None} == {"llama_proj.weight", "llama_proj.bias"}
    torch.testing.assert_close(quant.llama_proj.weight.grad, ref.llama_proj.weight.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("fused", [False, True], ids=["kernel", "fused-gemv"])
def test_decode_step_with_int8wo_traces_as_one_graph(tiny_tokenizer, monkeypatch, fused):
    """What CUDA graph capture needs: the engine's decode step traces whole (fullgraph) through every
    int8 layer, on the aten kernel (CPU) or on the multiply-sum (what CUDA takes, here on the CPU), and
    the compiled step gives the eager tokens. (A recording backend: no C++ build.)"""
    _, quant, _ = _models()
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(generate, "COMPILE_OPTIONS", dict(backend=record, fullgraph=True))
    monkeypatch.setattr(int8, "FUSED_GEMV_DEVICES", frozenset({"cpu"} if fused else ()))
    embeds = quant.generation_inputs(tiny_tokenizer, [PROMPT, "<Img><ImageHere></Img>"], _pixels())
    engine = GenerationEngine(quant.llm, tiny_tokenizer, compile=True)
    params = SamplingParams(max_new_tokens=6)
    out = engine.generate(embeds, params)
    assert engine._compiled is not None and graphs  # compiled, no fallback to eager
    nodes = [n for gm in graphs for n in gm.graph.nodes]
    kernels = [n for n in nodes if "_weight_int8pack_mm" in str(n.target)]
    sums = [n for n in nodes if n.target == "sum"]
    assert (len(kernels), len(sums)) == ((0, 14) if fused else (14, 0))
    assert out == GenerationEngine(quant.llm, tiny_tokenizer, static=False).generate(embeds, params)


def test_int8wo_config_checks():
    with pytest.raises(ValueError, match="none/int8wo/8bit/4bit"):
        preset("tiny", quantize_llm="int4wo")
    with pytest.raises(ValueError, match="cannot adapt int8wo"):
        preset("tiny", quantize_llm="int8wo", train_llm="lora")
    with pytest.raises(ValueError, match="cannot train a quantized LLM"):
        preset("tiny", quantize_llm="int8wo", train_llm="full")


def test_load_pretrained_quantizes_the_llm_and_loads_a_minigpt4_checkpoint(tmp_path, tiny_tokenizer):
    """An HF LLaMA directory loads as int8wo (quantized after loading, onto the requested device) and a
    MiniGPT-4 .pth (llama_proj only) loads into that model exactly as into an unquantized one."""
    from transformers import LlamaForCausalLM

    from minigpt4.weights import WeightsConfig, load_pretrained

    torch.manual_seed(3)
    llm = LlamaForCausalLM(preset("tiny").llm_config()).eval()
    llm.save_pretrained(tmp_path / "llm")
    tiny_tokenizer.save_pretrained(tmp_path / "llm")
    proj = {"llama_proj.weight": torch.randn(64, 32), "llama_proj.bias": torch.randn(64)}
    torch.save({"model": proj, "epoch": 3}, tmp_path / "stage2.pth")
    weights = WeightsConfig(llm=str(tmp_path / "llm"), minigpt4=str(tmp_path / "stage2.pth"))
    model, _, reports = load_pretrained(preset("tiny", quantize_llm="int8wo"), weights, device="cpu")
    assert [r.kind for r in reports] == ["llm", "minigpt4"] and all(r.ok for r in reports)
    assert reports[1].loaded == ["llama_proj.bias", "llama_proj.weight"]
    assert torch.equal(model.llama_proj.weight, proj["llama_proj.weight"])
    assert sum(isinstance(m, Int8Linear) for m in model.llm.modules()) == 14
    q = model.llm.model.layers[1].mlp.down_proj
    torch.testing.assert_close(dequantize(q.weight, q.scale, torch.float32), llm.model.layers[1].mlp.down_proj.weight,
                               atol=q.scale.max().item() / 2, rtol=0)
    ids = torch.tensor([[1, 50, 60, 70]])
    with torch.no_grad():
        want, got = llm(ids).logits, model.llm(ids).logits
    assert (got - want).abs().max() < 0.03 * want.abs().max()


# -- the bench -------------------------------------------------------------------------------------
def test_quantize_bench_runs_on_cpu(tmp_path):
    """bench/quantize.py (the GPU benchmark at real sizes) must keep working: on CPU, the tiny preset;
    the bitsandbytes rows run where bitsandbytes does, and are skipped with a reason elsewhere. It runs
    through bench/gpu.sh, the device-call script, which must keep working too, with only what the GPU box
    has in that call (no ray, deepspeed, boto3 or moto)."""
    from conftest import gpu_sh

    run = gpu_sh("quant", tmp_path, "--batch-size", "1", "2", "--new-tokens", "4")
    assert run.returncode == 0 and "quantize: exit 0 in" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
    assert "=== tables ===" in run.stdout and "| int8wo (ours) | 2 |" in run.stdout
    run.stdout = (tmp_path / "quantize.log").read_text()  # the bench's own output
    result = json.loads((tmp_path / "quantize.json").read_text())
    rows, skipped = result["rows"], result["skipped"]
    assert result["baseline"] == "fp32" and list(rows)[:2] == ["fp32", "int8wo (ours)"] and result["partial"] is None
    assert set(rows) | set(skipped) == {"fp32", "int8wo (ours)", "bitsandbytes LLM.int8", "bitsandbytes NF4"}
    assert all(f"skipping {label}: {reason}" in run.stdout for label, reason in skipped.items())
    base, ours = rows["fp32"], rows["int8wo (ours)"]
    assert ours["llm_weight_gib"] < 0.7 * base["llm_weight_gib"]
    for row in rows.values():
        assert set(row["by_batch"]) == {"1", "2"}
        for r in row["by_batch"].values():
            assert r["tokens_per_s"] > 0 and r["ttft_s"] > 0 and 0 <= r["same_tokens"] <= 1
    assert base["by_batch"]["1"]["same_tokens"] == 1 and base["by_batch"]["2"]["vs_baseline"] == 1
    assert "| int8wo (ours) | 2 |" in (tmp_path / "quantize.md").read_text()
    speed, memory = result["targets"]  # not judged on CPU; the speed's ceiling reads the int8 weights
    assert speed["measured"] == ours["by_batch"]["1"]["tokens_per_s"] and speed["verdict"] == "n/a"
    assert speed["ceiling"] > 0 and speed["arithmetic"].startswith("batch 1: (")
    assert memory["measured"] is None and memory["verdict"] == "no GPU" and memory["at_most"]
    assert memory["ceiling"] * 1e9 > ours["model_bytes"] and "at least" in memory["arithmetic"]


def test_bench_results_are_rewritten_after_every_row(tmp_path, capsys):
    """The benches save their table after every row (bench/_common.write_results): until the last row the
    files say what had not run, so a bench stopped by bench/gpu.sh's timeout leaves the rows it finished."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from _common import write_results
    finally:
        sys.path.remove(str(ROOT / "bench"))
    write_results(str(tmp_path), "b", "| row 1 |", {"rows": {"1": 1}}, remaining="`row 2`")
    assert "Partial table: `row 2` had not run" in (tmp_path / "b.md").read_text()
    assert json.loads((tmp_path / "b.json").read_text()) == {"rows": {"1": 1}, "partial": "`row 2`"}
    assert capsys.readouterr().out == ""  # a partial table is not printed
    write_results(str(tmp_path), "b", "| row 1 |\n| row 2 |", {"rows": {"1": 1, "2": 2}})
    assert (tmp_path / "b.md").read_text() == "| row 1 |\n| row 2 |\n"
    assert json.loads((tmp_path / "b.json").read_text())["partial"] is None
    assert "| row 2 |" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json", "b.md"]  # no temporary files left

