"""The model graph: sizes, freezing, precision, and parity with hand-written references."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minigpt4.model import IMAGE_TOKEN_ID, build_model, expected_trainable, preset
from minigpt4.prompts import (ALIGNMENT_INSTRUCTIONS, STAGE1_END_SYM, collate_training, encode_training_sample,
                              stage2_prompt)
from reference import eva_vit, original_loss_inputs, qformer

ROOT = Path(__file__).resolve().parents[1]


# -- layout ---------------------------------------------------------------------------------------
def test_platform_is_a_source_root_not_a_package():
    assert not (ROOT / "platform" / "__init__.py").exists(), "platform/__init__.py shadows the stdlib module"
    # Ray puts the working dir first on sys.path: the stdlib modules must still win from the repo root.
    code = "import platform, uuid, ray, minigpt4; print(platform.system(), uuid.uuid4().version)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["Linux", "4"]


def test_model_module_has_no_distribution_imports():
    code = ("import sys, minigpt4.model, minigpt4.config, minigpt4.prompts, minigpt4.generate; "
            "print([m for m in ('ray', 'deepspeed', 'bitsandbytes', 'peft') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# -- sizes (meta device: no 7B allocation) ---------------------------------------------------------
def _vit_params(width=1408, depth=39, mlp=6144, patch=14, size=224):
    block = 3 * width * width + 3 * width + width * width + width + 2 * width * mlp + mlp + width + 4 * width
    return depth * block + 3 * patch * patch * width + width + width + ((size // patch) ** 2 + 1) * width + 2 * width


def _qformer_params(h=768, layers=12, inter=3072, enc=1408, queries=32):
    attn = lambda kv: h * h + h + 2 * (kv * h + h) + h * h + h + 2 * h
    ffn = h * inter + inter + inter * h + h + 2 * h
    return layers * (attn(h) + ffn) + (layers // 2) * attn(enc) + 2 * h + queries * h


def _llama_params(vocab=32000, h=4096, inter=11008, layers=32):
    return 2 * vocab * h + layers * (4 * h * h + 3 * h * inter + 2 * h) + h


@pytest.mark.parametrize("name, llm, proj", [
    ("vicuna7b", _llama_params(), 768 * 4096 + 4096),
    ("vicuna13b", _llama_params(h=5120, inter=13824, layers=40), 768 * 5120 + 5120),
    ("llama2_7b", _llama_params(), 5632 * 4096 + 4096),
])
def test_preset_parameter_counts(name, llm, proj):
    model = build_model(preset(name), device="meta")
    c = model.parameter_counts()
    assert c["vision"] == _vit_params()  # 39 blocks (40th dropped), MLP 6144, ln_vision included
    assert c["llm"] == llm
    assert c["trainable"] == c["llama_proj"] == proj == expected_trainable(model.cfg)
    assert c["qformer"] == (0 if name == "llama2_7b" else _qformer_params())
    if name == "vicuna7b":  # "7B + 1.0B ViT + 0.1B Q-Former, 3.15M trainable"
        assert round(c["llm"] / 1e9, 2) == 6.74 and round(c["vision"] / 1e9, 1) == 1.0
        assert round(c["qformer"] / 1e9, 1) == 0.1 and round(c["trainable"] / 1e6, 2) == 3.15
    assert model.cfg.num_image_tokens == (64 if name == "llama2_7b" else 32)


def test_unknown_preset_and_field_are_errors():
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("vicuna70b")
    with pytest.raises(ValueError, match="unknown model config field"):
        preset("tiny", llm_dtyp="bf16")
    with pytest.raises(ValueError, match="quantize_llm"):
        preset("tiny", quantize_llm="3bit")


# -- freezing --------------------------------------------------------------------------------------
def _batch(tok, model, n=2, stage2=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    answers = ["a red circle above a blue square", "two small green stars on the left of the picture"][:n]
    prompts = [stage2_prompt("vicuna_v0", instruction=ALIGNMENT_INSTRUCTIONS[i]) for i in range(n)] if stage2 else [None] * n
    end = "###" if stage2 else STAGE1_END_SYM
    samples = [encode_training_sample(tok, p, a, end, 160, model.cfg.num_image_tokens) for p, a in zip(prompts, answers)]
    batch = collate_training(samples, tok.pad_token_id)
    batch["pixel_values"] = torch.randn(n, 3, model.cfg.image_size, model.cfg.image_size, generator=g)
    return batch, prompts, answers, end


def test_gradient_reaches_only_the_projection(tiny_model, tiny_tokenizer):
    model = tiny_model.train()
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"llama_proj.weight", "llama_proj.bias"}
    assert not model.vision.training and not model.qformer.training and not model.llm.training
    batch, *_ = _batch(tiny_tokenizer, model)
    model(**batch).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {"llama_proj.weight", "llama_proj.bias"}
    assert model.llama_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["vicuna7b", "llama2_7b"])
def test_real_widths_one_layer_deep_train_and_generate_in_bf16(name, tiny_tokenizer, tmp_path):
    """The real presets' shapes at depth 1, in bf16 as on the GPU box: 224 px images, 32 Q-Former
    queries (LLaMA-2: 64 concatenated patch tokens), the 4096-wide LLM with its 32,000-token head. A
    stage-1 step trains only llama_proj; the static engine gives the simple path's tokens, and their text
    (the benchmarks' tokenizer, widened to the 32,000 ids)."""
    from minigpt4.generate import GenerationEngine, SamplingParams
    from minigpt4.tokenizer import load_tokenizer, write_widened_tokenizer

    base = preset(name)
    cfg = preset(name, vision=dict(base.vision, num_hidden_layers=1), llm=dict(base.llm, num_hidden_layers=1),
                 qformer=dict(base.qformer, num_hidden_layers=1) if base.qformer else None,
                 vision_dtype="bf16", llm_dtype="bf16")
    torch.manual_seed(0)
    model = build_model(cfg).train()
    tokens = 64 if name == "llama2_7b" else 32
    assert (cfg.image_size, cfg.num_image_tokens, model.llama_proj.in_features) == (
        224, tokens, 5632 if name == "llama2_7b" else 768)
    batch, *_ = _batch(tiny_tokenizer, model, stage2=False)
    assert (batch["input_ids"] == IMAGE_TOKEN_ID).sum(1).tolist() == [tokens, tokens]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and 9 < loss.item() < 12  # ~ln(32000) = 10.4 for a random model
    assert {n for n, p in model.named_parameters() if p.grad is not None} == {"llama_proj.weight",
                                                                               "llama_proj.bias"}
    model.eval()
    prompt = "###Human: <Img><ImageHere></Img> Describe this image. ###Assistant: " if name == "vicuna7b" \
        else "[INST] <Img><ImageHere></Img> Describe this image. [/INST] "
    with torch.no_grad():
        embeds = model.generation_inputs(tiny_tokenizer, [prompt] * 2, batch["pixel_values"])
    assert embeds[0].shape[1] == 4096 and embeds[0].shape[0] > tokens + 10 and embeds[0].dtype == torch.bfloat16
    params = SamplingParams(max_new_tokens=5, min_new_tokens=5)
    wide = load_tokenizer(write_widened_tokenizer(tmp_path, 32000))
    static = GenerationEngine(model.llm, wide).generate(embeds, params)
    assert static == GenerationEngine(model.llm, wide, static=False).generate(embeds, params)
    assert all(len(c.token_ids) == 5 and len(c.text.split()) >= 1 for c in static)


def test_train_llm_full_and_lora():
    full = build_model(preset("tiny", train_llm="full"))
    names = {n for n, p in full.named_parameters() if p.requires_grad}
    assert names == {n for n, _ in full.named_parameters() if n.startswith(("llm.", "llama_proj."))}
    lora = build_model(preset("tiny", train_llm="lora", lora_r=4))
    names = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert names - {"llama_proj.weight", "llama_proj.bias"}
    assert all("lora_" in n for n in names - {"llama_proj.weight", "llama_proj.bias"})
    assert all(("q_proj" in n or "v_proj" in n) for n in names if "lora_" in n)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_low_precision_vision_keeps_layernorms_fp32(dtype, tiny_tokenizer):
    torch.manual_seed(0)
    model = build_model(preset("tiny", vision_dtype=dtype, llm_dtype="bf16")).eval()
    want = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    assert model.vision.embeddings.patch_embedding.weight.dtype == want
    assert model.vision.encoder.layers[0].mlp.fc1.weight.dtype == want
    assert model.vision.encoder.layers[0].layer_norm1.weight.dtype == torch.float32
    assert model.vision.post_layernorm.weight.dtype == torch.float32  # ln_vision
    assert model.vision.post_layernorm.eps == 1e-5 and model.vision.encoder.layers[0].layer_norm1.eps == 1e-6
    assert model.llm.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.llama_proj.weight.dtype == torch.float32  # the trainable part stays fp32 (master weights)
    batch, *_ = _batch(tiny_tokenizer, model)
    loss = model(**batch).loss
    assert torch.isfinite(loss)


# -- parity ----------------------------------------------------------------------------------------
def lavis_state_dict(model) -> dict:
    """Our tiny model's weights under the released LAVIS key names (for the references)."""
    v, sd = model.vision, {}
    sd["cls_token"] = v.embeddings.class_embedding
    sd["pos_embed"] = v.embeddings.position_embedding
    sd["patch_embed.proj.weight"] = v.embeddings.patch_embedding.weight
    sd["patch_embed.proj.bias"] = v.embeddings.patch_embedding.bias
    width = v.config.hidden_size
    for i, layer in enumerate(v.encoder.layers):
        b = f"blocks.{i}."
        sd[b + "norm1.weight"], sd[b + "norm1.bias"] = layer.layer_norm1.weight, layer.layer_norm1.bias
        sd[b + "attn.qkv.weight"] = layer.self_attn.qkv.weight
        sd[b + "attn.q_bias"], sd[b + "attn.v_bias"] = layer.self_attn.qkv.bias[:width], layer.self_attn.qkv.bias[2 * width:]
        sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"] = layer.self_attn.projection.weight, layer.self_attn.projection.bias
        sd[b + "norm2.weight"], sd[b + "norm2.bias"] = layer.layer_norm2.weight, layer.layer_norm2.bias
        for fc in ("fc1", "fc2"):
            sd[b + f"mlp.{fc}.weight"], sd[b + f"mlp.{fc}.bias"] = getattr(layer.mlp, fc).weight, getattr(layer.mlp, fc).bias
    sd["ln_vision.weight"], sd["ln_vision.bias"] = v.post_layernorm.weight, v.post_layernorm.bias
    sd["query_tokens"] = model.query_tokens
    q = model.qformer
    sd["Qformer.bert.embeddings.LayerNorm.weight"], sd["Qformer.bert.embeddings.LayerNorm.bias"] = q.layernorm.weight, q.layernorm.bias
    for i, layer in enumerate(q.encoder.layer):
        L = f"Qformer.bert.encoder.layer.{i}."
        kinds = ["attention"] + (["crossattention"] if layer.has_cross_attention else [])
        for kind in kinds:
            mod = getattr(layer, kind)
            for n in ("query", "key", "value"):
                sd[L + f"{kind}.self.{n}.weight"] = getattr(mod.attention, n).weight
                sd[L + f"{kind}.self.{n}.bias"] = getattr(mod.attention, n).bias
            for n in ("dense", "LayerNorm"):
                sd[L + f"{kind}.output.{n}.weight"] = getattr(mod.output, n).weight
                sd[L + f"{kind}.output.{n}.bias"] = getattr(mod.output, n).bias
        sd[L + "intermediate_query.dense.weight"] = layer.intermediate_query.dense.weight
        sd[L + "intermediate_query.dense.bias"] = layer.intermediate_query.dense.bias
        for n in ("dense", "LayerNorm"):
            sd[L + f"output_query.{n}.weight"] = getattr(layer.output_query, n).weight
            sd[L + f"output_query.{n}.bias"] = getattr(layer.output_query, n).bias
    return {k: t.detach().float() for k, t in sd.items()}


def test_image_path_equals_hand_composed_reference(tiny_model):
    model, cfg = tiny_model, tiny_model.cfg
    sd = lavis_state_dict(model)
    pixels = torch.randn(3, 3, cfg.image_size, cfg.image_size)
    vit = eva_vit(sd, pixels, depth=cfg.vision["num_hidden_layers"], heads=cfg.vision["num_attention_heads"])
    q = qformer(sd, vit, layers=cfg.qformer["num_hidden_layers"], heads=cfg.qformer["num_attention_heads"])
    ref = torch.nn.functional.linear(q, model.llama_proj.weight, model.llama_proj.bias)
    with torch.no_grad():
        ours = model.encode_images(pixels)
    assert ours.shape == (3, cfg.num_query_tokens, cfg.llm["hidden_size"])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stage2", [False, True])
def test_loss_and_logits_equal_original_procedure(tiny_model, tiny_tokenizer, stage2):
    """Sequence layout, BOS, per-segment tokenization, padding behind the answer, answer-only targets."""
    model, tok = tiny_model, tiny_tokenizer
    batch, prompts, answers, end = _batch(tok, model, stage2=stage2)
    answers = answers + ["$$ a long caption " + "with many words " * 12]  # pad-id token + truncation
    prompts = prompts + [stage2_prompt("vicuna_v0", instruction=ALIGNMENT_INSTRUCTIONS[3]) if stage2 else None]
    max_txt_len = 32 if not stage2 else 40
    samples = [encode_training_sample(tok, p, a, end, max_txt_len, model.cfg.num_image_tokens) for p, a in zip(prompts, answers)]
    batch = collate_training(samples, tok.pad_token_id)
    pixels = torch.randn(3, 3, 32, 32)
    batch["pixel_values"] = pixels
    with torch.no_grad():
        ours = model(**batch)
        img = model.encode_images(pixels)
        inputs, atts, targets = original_loss_inputs(model.embed_tokens, tok, img, prompts if stage2 else None,
                                                     answers, end, max_txt_len)
        ref = model.llm(inputs_embeds=inputs, attention_mask=atts, labels=targets)
    assert batch["labels"].shape == targets.shape
    assert torch.equal(batch["labels"], targets)
    assert torch.equal(batch["attention_mask"], atts.long())
    torch.testing.assert_close(ours.logits, ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.loss, ref.loss, atol=1e-6, rtol=1e-6)
    # the long caption lost its end_sym to max_txt_len, as in the original
    last = [t for t in batch["labels"][2].tolist() if t != -100]
    assert len(last) == max_txt_len - 1  # one answer token is the pad piece `$$`: masked like the original


def test_splice_rejects_wrong_image_count(tiny_model):
    ids = torch.tensor([[1] + [IMAGE_TOKEN_ID] * 4 + [5]])
    with pytest.raises(ValueError, match="4 image positions but 8"):
        tiny_model.splice(ids, torch.zeros(2, 4, 64))


def test_label_mask_token_by_token(tiny_tokenizer):
    """Which positions carry loss, spelled out: only the answer and its end_sym."""
    tok = tiny_tokenizer
    prompt = stage2_prompt("vicuna_v0", instruction="<Img><ImageHere></Img> Describe this image in detail.")
    s = encode_training_sample(tok, prompt, "a red circle", "###", max_txt_len=160, num_image_tokens=2)
    shown = [("<IMG>" if i == IMAGE_TOKEN_ID else tok.convert_ids_to_tokens(i), "loss" if l != -100 else "-")
             for i, l in zip(s["input_ids"], s["labels"])]
    assert shown == [
        ("<s>", "-"), ("▁###", "-"), ("Human", "-"), (":", "-"), ("▁<Img>", "-"), ("<IMG>", "-"), ("<IMG>", "-"),
        ("▁", "-"), ("</Img>", "-"), ("▁Describe", "-"), ("▁this", "-"), ("▁image", "-"), ("▁in", "-"),
        ("▁detail", "-"), (".", "-"), ("▁###", "-"), ("Assistant", "-"), (":", "-"), ("▁", "-"),
        ("▁a", "loss"), ("▁red", "loss"), ("▁circle", "loss"), ("###", "loss"),
    ]
    assert s["prompt_len"] == 19
    stage1 = encode_training_sample(tok, None, "a red circle", STAGE1_END_SYM, 32, num_image_tokens=2)
    assert stage1["input_ids"][:3] == [1, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID]  # [BOS][img][caption + "\n"]
    assert stage1["labels"][:3] == [-100] * 3 and all(l != -100 for l in stage1["labels"][3:])
