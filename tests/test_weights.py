"""weights.py: released checkpoint formats -> MiniGPT4, checked by value.

The fake checkpoints below use exactly the key names of the released files (LAVIS eva_vit_g.pth,
blip2_pretrained_flant5xxl.pth, pretrained_minigpt4_7b.pth, HF BLIP-2, a HF LLaMA directory) at tiny
shapes. The expected placement of every tensor is written out here with attribute access on the model,
independently of the loader's own rename tables.
"""
from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from minigpt4.model import PRESETS, build_model, preset
from minigpt4.weights import (LoadReport, WeightsConfig, interpolate_pos_embed, load_blip2, load_eva_vit,
                              load_hf_blip2, load_llm, load_minigpt4, load_pretrained, read_state_dict)


def tiny_cfg(**overrides):
    """The tiny preset with every width distinct (ViT 48, Q-Former 32 / FFN 80, LLM 64), so a tensor
    landing in the wrong place, or a cross-attention key/value built on the wrong side, shows up as a shape
    error instead of passing silently."""
    vision = dict(PRESETS["tiny"]["vision"], hidden_size=48, intermediate_size=96)
    qformer = dict(PRESETS["tiny"]["qformer"], encoder_hidden_size=48, intermediate_size=80)
    return preset("tiny", vision=vision, qformer=qformer, **overrides)


def new_model(cfg=None, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg or tiny_cfg()).eval()


class _Rand:
    """Deterministic random tensors, small enough that attention does not saturate."""

    def __init__(self, seed):
        self.g = torch.Generator().manual_seed(seed)

    def __call__(self, *shape, scale=0.2):
        return torch.randn(*shape, generator=self.g) * scale

    def norm(self, n):  # LayerNorm weights sit around 1
        return 1 + self(n, scale=0.1)


# -- fake released checkpoints ---------------------------------------------------------------------
def eva_state(cfg, extra_blocks=1, seed=1):
    """LAVIS EVA ViT state dict; the block(s) past the model's depth play the released 40th block."""
    v, r = cfg.vision_config(), _Rand(seed)
    d, m, p = v.hidden_size, v.intermediate_size, (v.image_size // v.patch_size) ** 2
    sd = {"cls_token": r(1, 1, d), "pos_embed": r(1, 1 + p, d),
          "patch_embed.proj.weight": r(d, 3, v.patch_size, v.patch_size), "patch_embed.proj.bias": r(d)}
    for i in range(v.num_hidden_layers + extra_blocks):
        b = f"blocks.{i}."
        sd.update({
            b + "norm1.weight": r.norm(d), b + "norm1.bias": r(d),
            b + "attn.q_bias": r(d), b + "attn.v_bias": r(d), b + "attn.qkv.weight": r(3 * d, d),
            b + "attn.proj.weight": r(d, d), b + "attn.proj.bias": r(d),
            b + "norm2.weight": r.norm(d), b + "norm2.bias": r(d),
            b + "mlp.fc1.weight": r(m, d), b + "mlp.fc1.bias": r(m),
            b + "mlp.fc2.weight": r(d, m), b + "mlp.fc2.bias": r(d),
        })
    return sd


def blip2_state(cfg, seed=2):
    """LAVIS BLIP-2 (flant5xxl) "model" dict: Q-Former with its text branch, t5_proj, BERT embeddings."""
    q, r = cfg.qformer_config(), _Rand(seed)
    h, i_, dv = q.hidden_size, q.intermediate_size, q.encoder_hidden_size
    e = "Qformer.bert.embeddings."
    sd = {"query_tokens": r(1, cfg.num_query_tokens, h),
          "ln_vision.weight": r.norm(dv), "ln_vision.bias": r(dv),
          e + "position_ids": torch.arange(q.max_position_embeddings).expand(1, -1),
          e + "word_embeddings.weight": r(q.vocab_size, h),
          e + "position_embeddings.weight": r(q.max_position_embeddings, h),
          e + "LayerNorm.weight": r.norm(h), e + "LayerNorm.bias": r(h),
          "t5_proj.weight": r(24, h), "t5_proj.bias": r(24),
          "Qformer.cls.predictions.bias": r(q.vocab_size), "Qformer.cls.predictions.transform.dense.weight": r(h, h)}

    def dense(prefix, out_dim, in_dim):
        sd.update({prefix + ".weight": r(out_dim, in_dim), prefix + ".bias": r(out_dim)})

    def norm(prefix):
        sd.update({prefix + ".weight": r.norm(h), prefix + ".bias": r(h)})

    for n in range(q.num_hidden_layers):
        L = f"Qformer.bert.encoder.layer.{n}."
        for part in ("query", "key", "value"):
            dense(L + "attention.self." + part, h, h)
        dense(L + "attention.output.dense", h, h), norm(L + "attention.output.LayerNorm")
        if n % q.cross_attention_frequency == 0:
            dense(L + "crossattention.self.query", h, h)
            dense(L + "crossattention.self.key", h, dv)  # keys/values read the ViT's features
            dense(L + "crossattention.self.value", h, dv)
            dense(L + "crossattention.output.dense", h, h), norm(L + "crossattention.output.LayerNorm")
        for branch in ("", "_query"):  # text branch (ignored) and query branch (loaded)
            dense(L + f"intermediate{branch}.dense", i_, h)
            dense(L + f"output{branch}.dense", h, i_), norm(L + f"output{branch}.LayerNorm")
    return sd


def minigpt4_ckpt(cfg, seed=3):
    """A stage-1 checkpoint as MiniGPT-4's runner saves it: model, optimizer, scaler, config, epoch."""
    r = _Rand(seed)
    w, b = r(cfg.llm_config().hidden_size, cfg.proj_in_features), r(cfg.llm_config().hidden_size)
    return {"model": {"llama_proj.weight": w, "llama_proj.bias": b},
            "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros_like(w)}},
                          "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0, 1]}]},
            "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 0},
            "config": {"model": {"arch": "mini_gpt4", "max_txt_len": 160},
                       "run": {"lr_sched": "linear_warmup_cosine_lr"}},
            "epoch": 3}


# -- where each tensor must land (written out independently of the loader) --------------------------
def qkv_bias_parts(attn):
    """(q, k, v) bias of a vision attention module, whichever layout this transformers version uses."""
    if hasattr(attn, "q_bias"):
        return attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias
    return attn.qkv.bias.chunk(3)


def eva_placements(model, sd):
    """[(checkpoint key, value, model tensor)] for every EVA key the model should take."""
    emb, out = model.vision.embeddings, []
    out += [("cls_token", sd["cls_token"], emb.class_embedding), ("pos_embed", sd["pos_embed"], emb.position_embedding),
            ("patch_embed.proj.weight", sd["patch_embed.proj.weight"], emb.patch_embedding.weight),
            ("patch_embed.proj.bias", sd["patch_embed.proj.bias"], emb.patch_embedding.bias)]
    for i, layer in enumerate(model.vision.encoder.layers):
        b = f"blocks.{i}."
        q, k, v = qkv_bias_parts(layer.self_attn)
        out += [(b + "norm1.weight", sd[b + "norm1.weight"], layer.layer_norm1.weight),
                (b + "norm1.bias", sd[b + "norm1.bias"], layer.layer_norm1.bias),
                (b + "attn.qkv.weight", sd[b + "attn.qkv.weight"], layer.self_attn.qkv.weight),
                (b + "attn.q_bias", sd[b + "attn.q_bias"], q),
                ("(k bias)", torch.zeros_like(k), k),
                (b + "attn.v_bias", sd[b + "attn.v_bias"], v),
                (b + "attn.proj.weight", sd[b + "attn.proj.weight"], layer.self_attn.projection.weight),
                (b + "attn.proj.bias", sd[b + "attn.proj.bias"], layer.self_attn.projection.bias),
                (b + "norm2.weight", sd[b + "norm2.weight"], layer.layer_norm2.weight),
                (b + "norm2.bias", sd[b + "norm2.bias"], layer.layer_norm2.bias),
                (b + "mlp.fc1.weight", sd[b + "mlp.fc1.weight"], layer.mlp.fc1.weight),
                (b + "mlp.fc1.bias", sd[b + "mlp.fc1.bias"], layer.mlp.fc1.bias),
                (b + "mlp.fc2.weight", sd[b + "mlp.fc2.weight"], layer.mlp.fc2.weight),
                (b + "mlp.fc2.bias", sd[b + "mlp.fc2.bias"], layer.mlp.fc2.bias)]
    return out


def blip2_placements(model, sd):
    qf, out = model.qformer, []
    out += [("query_tokens", sd["query_tokens"], model.query_tokens)]
    for p in ("weight", "bias"):
        out += [(f"ln_vision.{p}", sd[f"ln_vision.{p}"], getattr(model.vision.post_layernorm, p)),
                (f"Qformer.bert.embeddings.LayerNorm.{p}", sd[f"Qformer.bert.embeddings.LayerNorm.{p}"],
                 getattr(qf.layernorm, p))]
    for n, layer in enumerate(qf.encoder.layer):
        L = f"Qformer.bert.encoder.layer.{n}."
        modules = {"attention.self.query": layer.attention.attention.query,
                   "attention.self.key": layer.attention.attention.key,
                   "attention.self.value": layer.attention.attention.value,
                   "attention.output.dense": layer.attention.output.dense,
                   "attention.output.LayerNorm": layer.attention.output.LayerNorm,
                   "intermediate_query.dense": layer.intermediate_query.dense,
                   "output_query.dense": layer.output_query.dense,
                   "output_query.LayerNorm": layer.output_query.LayerNorm}
        if layer.has_cross_attention:
            modules.update({"crossattention.self.query": layer.crossattention.attention.query,
                            "crossattention.self.key": layer.crossattention.attention.key,
                            "crossattention.self.value": layer.crossattention.attention.value,
                            "crossattention.output.dense": layer.crossattention.output.dense,
                            "crossattention.output.LayerNorm": layer.crossattention.output.LayerNorm})
        for name, module in modules.items():
            for p in ("weight", "bias"):
                out.append((L + f"{name}.{p}", sd[L + f"{name}.{p}"], getattr(module, p)))
    return out


def assert_placed(placements):
    for key, value, tensor in placements:
        assert tensor.shape == value.shape, key
        torch.testing.assert_close(tensor.detach(), value.to(tensor.dtype), rtol=0, atol=0, msg=key)


def eva_reference(sd, ln_w, ln_b, pixels, cfg):
    """The EVA ViT forward written from LAVIS' definition (+ ln_vision), on the raw checkpoint tensors."""
    v = cfg.vision_config()
    d, heads = v.hidden_size, v.num_attention_heads
    x = F.conv2d(pixels, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=v.patch_size)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd["pos_embed"]
    b, n, _ = x.shape
    for i in range(v.num_hidden_layers):
        p = lambda name: sd[f"blocks.{i}.{name}"]  # noqa: E731
        h = F.layer_norm(x, (d,), p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        qkv_bias = torch.cat([p("attn.q_bias"), torch.zeros_like(p("attn.v_bias")), p("attn.v_bias")])
        q, k, val = F.linear(h, p("attn.qkv.weight"), qkv_bias).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
        attn = ((q * (d // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        x = x + F.linear((attn @ val).transpose(1, 2).reshape(b, n, d), p("attn.proj.weight"), p("attn.proj.bias"))
        h = F.layer_norm(x, (d,), p("norm2.weight"), p("norm2.bias"), eps=1e-6)
        h = F.gelu(F.linear(h, p("mlp.fc1.weight"), p("mlp.fc1.bias")))
        x = x + F.linear(h, p("mlp.fc2.weight"), p("mlp.fc2.bias"))
    return F.layer_norm(x, (d,), ln_w, ln_b, eps=1e-5)


@pytest.fixture
def files(tmp_path):
    """The three LAVIS/MiniGPT-4 files for tiny_cfg(), saved with torch.save."""
    cfg = tiny_cfg()
    out = {"eva": tmp_path / "eva_vit_g.pth", "blip2": tmp_path / "blip2_pretrained_flant5xxl.pth",
           "minigpt4": tmp_path / "pretrained_minigpt4_7b.pth"}
    out["eva_sd"], out["blip2_sd"], out["ckpt"] = eva_state(cfg), blip2_state(cfg), minigpt4_ckpt(cfg)
    torch.save(out["eva_sd"], out["eva"])
    torch.save({"model": out["blip2_sd"], "epoch": 10}, out["blip2"])
    torch.save(out["ckpt"], out["minigpt4"])
    return out


# -- format 1: EVA ---------------------------------------------------------------------------------
def test_eva_vit_lands_in_the_right_parameters(files):
    model = new_model()
    report = load_eva_vit(model, str(files["eva"]))
    assert_placed(eva_placements(model, files["eva_sd"]))
    depth = len(model.vision.encoder.layers)
    assert report.ok and report.kind == "eva_vit"
    assert sorted(report.ignored) == sorted(k for k in files["eva_sd"] if k.startswith(f"blocks.{depth}."))
    assert len(report.ignored) == 13  # the whole "40th" block
    vision_params = [n for n, _ in model.named_parameters()
                     if n.startswith("vision.") and not n.startswith("vision.post_layernorm")]
    assert sorted(report.loaded) == sorted(vision_params)


def test_eva_vit_wrapped_in_model_or_state_dict(tmp_path, files):
    for wrapper in ("model", "state_dict"):
        path = tmp_path / f"wrapped_{wrapper}.pth"
        torch.save({wrapper: files["eva_sd"], "note": "not a tensor"}, path)
        model = new_model()
        assert load_eva_vit(model, str(path)).ok
        assert_placed(eva_placements(model, files["eva_sd"]))


def test_vision_output_equals_lavis_reference(files):
    """After EVA + BLIP-2 (ln_vision), the ViT computes what LAVIS' EVA + ln_vision compute."""
    cfg = tiny_cfg()
    model = new_model(cfg)
    load_eva_vit(model, str(files["eva"]))
    load_blip2(model, str(files["blip2"]))
    pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = model.vision(pixel_values=pixels).last_hidden_state
    want = eva_reference(files["eva_sd"], files["blip2_sd"]["ln_vision.weight"], files["blip2_sd"]["ln_vision.bias"],
                         pixels, cfg)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fp16_vision_keeps_layernorms_fp32(files):
    """Values are converted to each parameter's dtype: Linear/Conv weights fp16, LayerNorms fp32."""
    model = new_model(tiny_cfg(vision_dtype="fp16"))
    load_eva_vit(model, str(files["eva"]))
    layer = model.vision.encoder.layers[0]
    assert layer.self_attn.qkv.weight.dtype == torch.float16
    assert layer.layer_norm1.weight.dtype == torch.float32
    assert_placed(eva_placements(model, files["eva_sd"]))  # compared after conversion to the param dtype
    torch.testing.assert_close(layer.layer_norm1.weight, files["eva_sd"]["blocks.0.norm1.weight"], rtol=0, atol=0)


def _with_separate_qv_bias(model):
    """Give the model the q_bias/v_bias layout of other transformers versions (e.g. 5.17)."""
    for layer in model.vision.encoder.layers:
        attn = layer.self_attn
        d = attn.qkv.weight.shape[1]
        attn.qkv.register_parameter("bias", None)
        attn.q_bias = torch.nn.Parameter(torch.zeros(d))
        attn.v_bias = torch.nn.Parameter(torch.zeros(d))
    return model


def test_eva_vit_into_separate_q_v_bias_layout(files):
    model = _with_separate_qv_bias(new_model())
    report = load_eva_vit(model, str(files["eva"]))
    assert report.ok
    for i, layer in enumerate(model.vision.encoder.layers):
        assert torch.equal(layer.self_attn.q_bias, files["eva_sd"][f"blocks.{i}.attn.q_bias"])
        assert torch.equal(layer.self_attn.v_bias, files["eva_sd"][f"blocks.{i}.attn.v_bias"])


# -- position embedding interpolation ---------------------------------------------------------------
def test_interpolate_pos_embed_shape_cls_and_identity():
    pos = torch.randn(1, 1 + 9, 8)
    out = interpolate_pos_embed(pos, 16)
    assert out.shape == (1, 17, 8)
    assert torch.equal(out[:, 0], pos[:, 0])  # CLS row untouched
    assert interpolate_pos_embed(pos, 9) is pos  # same grid: as is
    const = torch.full((1, 1 + 9, 8), 0.5)
    torch.testing.assert_close(interpolate_pos_embed(const, 25), torch.full((1, 26, 8), 0.5))
    with pytest.raises(ValueError, match="square"):
        interpolate_pos_embed(torch.randn(1, 1 + 8, 8), 16)


def test_interpolate_pos_embed_matches_transformers():
    """Same result as transformers' own bicubic resize of BLIP-2 position embeddings (a 3x3 -> 4x4 grid)."""
    from transformers import Blip2VisionConfig
    from transformers.models.blip_2.modeling_blip_2 import Blip2VisionEmbeddings

    emb = Blip2VisionEmbeddings(Blip2VisionConfig(hidden_size=8, image_size=24, patch_size=8))
    pos = torch.randn(1, 10, 8)
    emb.position_embedding.data.copy_(pos)
    with torch.no_grad():
        want = emb.interpolate_pos_encoding(torch.zeros(1, 17, 8), height=32, width=32)
    torch.testing.assert_close(interpolate_pos_embed(pos, 16), want)


def test_eva_pos_embed_from_another_grid_is_interpolated(tmp_path, files):
    sd = dict(files["eva_sd"])
    sd["pos_embed"] = torch.randn(1, 1 + 9, sd["pos_embed"].shape[-1])  # a 3x3 grid; the model has 4x4
    torch.save(sd, tmp_path / "eva.pth")
    model = new_model()
    assert load_eva_vit(model, str(tmp_path / "eva.pth")).ok
    pos = model.vision.embeddings.position_embedding
    assert pos.shape == (1, 17, sd["pos_embed"].shape[-1])
    assert torch.equal(pos[:, 0], sd["pos_embed"][:, 0])
    torch.testing.assert_close(pos.detach(), interpolate_pos_embed(sd["pos_embed"], 16), rtol=0, atol=0)


# -- format 2: BLIP-2 ------------------------------------------------------------------------------
def test_blip2_lands_in_the_right_parameters(files):
    model = new_model()
    report = load_blip2(model, str(files["blip2"]))
    assert report.ok and report.kind == "blip2"
    assert_placed(blip2_placements(model, files["blip2_sd"]))
    cross = model.qformer.encoder.layer[0].crossattention.attention
    assert cross.key.weight.shape == (32, 48) and cross.value.weight.shape == (32, 48)  # in-dim = ViT width
    ignored = set(report.ignored)
    assert {"t5_proj.weight", "t5_proj.bias", "Qformer.bert.embeddings.position_ids",
            "Qformer.bert.embeddings.word_embeddings.weight", "Qformer.bert.embeddings.position_embeddings.weight",
            "Qformer.cls.predictions.bias", "Qformer.bert.encoder.layer.0.intermediate.dense.weight",
            "Qformer.bert.encoder.layer.1.output.LayerNorm.bias"} <= ignored
    assert not any("_query" in k for k in ignored)  # the query branch is loaded, never skipped
    qformer_params = [n for n, _ in model.named_parameters() if n.startswith("qformer.")]
    assert sorted(report.loaded) == sorted(qformer_params + ["query_tokens", "vision.post_layernorm.bias",
                                                              "vision.post_layernorm.weight"])


def test_blip2_visual_encoder_overrides_eva(tmp_path, files):
    """A BLIP-2 file that carries `visual_encoder.*` wins over eva_vit_g.pth (the original load order)."""
    other_vit = eva_state(tiny_cfg(), seed=11)
    sd = dict(files["blip2_sd"], **{"visual_encoder." + k: v for k, v in other_vit.items()})
    torch.save({"model": sd}, tmp_path / "blip2_with_vit.pth")
    cfg = tiny_cfg()
    model, _, reports = load_pretrained(cfg, WeightsConfig(eva_vit=str(files["eva"]),
                                                           blip2=str(tmp_path / "blip2_with_vit.pth")))
    assert_placed(eva_placements(model, other_vit))
    assert_placed(blip2_placements(model, files["blip2_sd"]))
    assert "visual_encoder.blocks.2.attn.q_bias" in reports[1].ignored


def test_blip2_refused_for_the_llama2_variant(files):
    cfg = preset("llama2_7b", vision=PRESETS["tiny"]["vision"], llm=PRESETS["tiny"]["llm"],
                 vision_dtype="fp32", llm_dtype="fp32")
    model = build_model(cfg)
    with pytest.raises(ValueError, match="has none"):
        load_blip2(model, str(files["blip2"]))


# -- format 3: MiniGPT-4 ---------------------------------------------------------------------------
def test_minigpt4_checkpoint_sets_llama_proj(files):
    model = new_model()
    report = load_minigpt4(model, str(files["minigpt4"]))
    assert report.ok and report.loaded == ["llama_proj.bias", "llama_proj.weight"]
    w, b = files["ckpt"]["model"]["llama_proj.weight"], files["ckpt"]["model"]["llama_proj.bias"]
    feats = torch.randn(2, 4, w.shape[1])
    with torch.no_grad():
        torch.testing.assert_close(model.llama_proj(feats), feats @ w.T + b)


def test_image_tokens_after_full_load_use_the_loaded_projection(files):
    """encode_images = llama_proj(Q-Former output) with the checkpoint's projection."""
    model, _, _ = load_pretrained(tiny_cfg(), WeightsConfig(eva_vit=str(files["eva"]), blip2=str(files["blip2"]),
                                                            minigpt4=str(files["minigpt4"])))
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        image = model.vision(pixel_values=pixels).last_hidden_state
        feats = model.qformer(query_embeds=model.query_tokens, encoder_hidden_states=image).last_hidden_state
        w, b = files["ckpt"]["model"]["llama_proj.weight"], files["ckpt"]["model"]["llama_proj.bias"]
        torch.testing.assert_close(model.encode_images(pixels), feats @ w.T + b)


def test_lora_adapters_in_the_checkpoint(tmp_path, files):
    pytest.importorskip("peft")
    cfg = tiny_cfg(train_llm="lora", lora_r=4)
    model = new_model(cfg)
    lora = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    assert lora
    # as MiniGPT-v2 saves them: `llama_model.` + the peft name, here without the adapter name
    saved = {"llama_model." + n[len("llm."):].replace(".default.", "."): torch.randn_like(p) for n, p in lora.items()}
    ckpt = dict(files["ckpt"], model=dict(files["ckpt"]["model"], **saved))
    torch.save(ckpt, tmp_path / "stage2.pth")
    report = load_minigpt4(model, str(tmp_path / "stage2.pth"))
    assert report.ok and len(report.loaded) == 2 + len(lora)
    params = dict(model.named_parameters())
    for key, value in saved.items():
        name = "llm." + key[len("llama_model."):]
        name = name.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
        assert torch.equal(params[name], value)
    # without LoRA in the config, the same keys are unknown
    with pytest.raises(ValueError, match="unknown keys: llama_model"):
        load_minigpt4(new_model(), str(tmp_path / "stage2.pth"))


# -- strictness and errors -------------------------------------------------------------------------
def test_unknown_key_strict_raises_and_leaves_model_untouched(tmp_path, files):
    sd = dict(files["eva_sd"], **{"norm.weight": torch.ones(48), "head.weight": torch.ones(10, 48)})
    path = tmp_path / "eva_extra.pth"
    torch.save(sd, path)
    model = new_model()
    before = model.vision.encoder.layers[0].mlp.fc1.weight.clone()
    with pytest.raises(ValueError, match=r"2 unknown keys: (head|norm)\.weight, (head|norm)\.weight") as err:
        load_eva_vit(model, str(path))
    assert "eva_extra.pth" in str(err.value)
    assert torch.equal(model.vision.encoder.layers[0].mlp.fc1.weight, before)  # all-or-nothing


def test_unknown_key_non_strict_is_reported(tmp_path, files, caplog):
    path = tmp_path / "eva_extra.pth"
    torch.save(dict(files["eva_sd"], **{"fc_norm.bias": torch.ones(48)}), path)
    model = new_model()
    with caplog.at_level(logging.WARNING, logger="minigpt4.weights"):
        report = load_eva_vit(model, str(path), strict=False)
    assert report.unexpected == ["fc_norm.bias"] and not report.ok
    assert any("fc_norm.bias" in r.getMessage() for r in caplog.records)
    assert_placed(eva_placements(model, files["eva_sd"]))


def test_missing_key_names_the_parameter(tmp_path, files):
    sd = dict(files["eva_sd"])
    del sd["blocks.1.mlp.fc1.weight"]
    torch.save(sd, tmp_path / "eva_missing.pth")
    with pytest.raises(ValueError, match=r"1 missing model parameters: vision\.encoder\.layers\.1\.mlp\.fc1\.weight"):
        load_eva_vit(new_model(), str(tmp_path / "eva_missing.pth"))
    report = load_eva_vit(new_model(), str(tmp_path / "eva_missing.pth"), strict=False)
    assert report.missing == ["vision.encoder.layers.1.mlp.fc1.weight"]


def test_shape_mismatch_names_keys_file_and_shapes_even_non_strict(tmp_path, files):
    ckpt = dict(files["ckpt"], model={"llama_proj.weight": torch.zeros(64, 31), "llama_proj.bias": torch.zeros(64)})
    torch.save(ckpt, tmp_path / "bad_proj.pth")
    for strict in (True, False):
        with pytest.raises(ValueError) as err:
            load_minigpt4(new_model(), str(tmp_path / "bad_proj.pth"), strict=strict)
        msg = str(err.value)
        assert "bad_proj.pth" in msg and "'llama_proj.weight' -> model parameter 'llama_proj.weight'" in msg
        assert "(64, 31)" in msg and "(64, 32)" in msg


def test_shape_mismatch_in_renamed_key(tmp_path, files):
    sd = dict(files["blip2_sd"])
    key = "Qformer.bert.encoder.layer.0.crossattention.self.key.weight"
    sd[key] = torch.zeros(32, 32)  # built on the Q-Former width instead of the ViT width
    torch.save({"model": sd}, tmp_path / "blip2_bad.pth")
    with pytest.raises(ValueError, match=r"blip2_bad\.pth.*crossattention\.self\.key\.weight.*"
                                         r"qformer\.encoder\.layer\.0\.crossattention\.attention\.key\.weight.*"
                                         r"\(32, 32\).*\(32, 48\)"):
        load_blip2(new_model(), str(tmp_path / "blip2_bad.pth"))


class NotATensor:
    """Stands for anything torch.load would have to import to unpickle."""


def test_pickle_with_custom_class_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"llama_proj.weight": torch.zeros(2)}, "config": NotATensor()}, path)
    with pytest.raises(ValueError, match=r"evil\.pth.*refusing to load.*NotATensor"):
        read_state_dict(str(path))
    with pytest.raises(ValueError, match="evil.pth"):
        load_minigpt4(new_model(), str(path))


def test_read_state_dict_formats(tmp_path):
    t = {"a": torch.arange(3.0), "b": torch.ones(2, 2)}
    save_file(t, tmp_path / "x.safetensors")
    torch.save({"model": t, "epoch": 1}, tmp_path / "x.pth")
    torch.save(t, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)  # cannot be memory-mapped
    for name in ("x.safetensors", "x.pth", "legacy.pt"):
        got = read_state_dict(str(tmp_path / name))
        assert got.keys() == t.keys() and all(torch.equal(got[k], t[k]) for k in t)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_state_dict(str(tmp_path / "nope.pth"))


def test_report_summary_truncates_long_lists():
    report = LoadReport(source="s3://b/f.pth", kind="eva_vit", loaded=["a"], ignored=["x"] * 3,
                        unexpected=[f"k{i}" for i in range(20)], missing=["vision.p"])
    text = report.summary()
    assert "s3://b/f.pth" in text and "20 unknown keys: k0, k1" in text and "(12 more)" in text
    assert "k19" not in text and "1 missing model parameters: vision.p" in text


# -- format 4: Hugging Face BLIP-2 ---------------------------------------------------------------
def hf_blip2_state(source_model, separate_qv_bias):
    """Blip2ForConditionalGeneration names for the vision/Q-Former weights of `source_model`, plus the
    language side MiniGPT-4 does not use."""
    sd = {}
    for n, p in source_model.named_parameters():
        if n.startswith("vision."):
            sd["vision_model." + n[len("vision."):]] = p.detach().clone()
        elif n.startswith("qformer.") or n == "query_tokens":
            sd[n] = p.detach().clone()
    for key in [k for k in sd if k.endswith("self_attn.qkv.bias")]:
        q, _, v = sd[key].chunk(3)
        sd[key] = torch.cat([q, torch.zeros_like(q), v])  # BLIP-2 has no key bias
        if separate_qv_bias:  # as checkpoints written by transformers 4.x
            del sd[key]
            sd[key.replace("qkv.bias", "q_bias")], sd[key.replace("qkv.bias", "v_bias")] = q.clone(), v.clone()
    sd["language_projection.weight"] = torch.randn(64, 32)
    sd["language_model.model.decoder.embed_tokens.weight"] = torch.randn(100, 64)
    return sd


@pytest.mark.parametrize("separate_qv_bias", [True, False])
def test_hf_blip2_file(tmp_path, separate_qv_bias):
    source = new_model(seed=7)
    with torch.no_grad():  # make every value distinctive (HF initialises biases to zero)
        for n, p in source.named_parameters():
            if n.startswith(("vision.", "qformer.", "query_tokens")):
                p.copy_(torch.randn_like(p))
    sd = hf_blip2_state(source, separate_qv_bias)
    save_file(sd, tmp_path / "model.safetensors")
    model = new_model()
    report = load_hf_blip2(model, str(tmp_path / "model.safetensors"))
    assert report.ok and report.kind == "hf_blip2"
    assert {"language_projection.weight", "language_model.model.decoder.embed_tokens.weight"} <= set(report.ignored)
    src_params = dict(source.named_parameters())
    for n, p in model.named_parameters():
        if n.startswith(("vision.", "qformer.", "query_tokens")):
            want = src_params[n]
            if n.endswith("qkv.bias"):
                q, _, v = want.chunk(3)
                want = torch.cat([q, torch.zeros_like(q), v])
            assert torch.equal(p, want), n
    # a directory of shards works too, and a combined qkv.bias also fits the separate q/v layout
    (tmp_path / "hf").mkdir()
    keys = sorted(sd)
    save_file({k: sd[k] for k in keys[::2]}, tmp_path / "hf" / "model-00001-of-00002.safetensors")
    save_file({k: sd[k] for k in keys[1::2]}, tmp_path / "hf" / "model-00002-of-00002.safetensors")
    other = _with_separate_qv_bias(new_model())
    assert load_hf_blip2(other, str(tmp_path / "hf")).ok
    q, _, v = src_params["vision.encoder.layers.0.self_attn.qkv.bias"].chunk(3)
    assert torch.equal(other.vision.encoder.layers[0].self_attn.q_bias, q)
    assert torch.equal(other.vision.encoder.layers[0].self_attn.v_bias, v)


# -- format 5: the LLM, and everything from S3 -------------------------------------------------------
@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    """A tiny HF LLaMA directory: config, safetensors (with an old-style rotary inv_freq buffer), tokenizer."""
    from transformers import LlamaForCausalLM

    from minigpt4.tokenizer import load_tokenizer

    path = tmp_path_factory.mktemp("vicuna-tiny")
    torch.manual_seed(42)
    llm = LlamaForCausalLM(tiny_cfg().llm_config()).eval()
    llm.save_pretrained(path)
    load_tokenizer().save_pretrained(path)
    shard = load_file(path / "model.safetensors")
    shard["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # as in the original LLaMA shards
    save_file(shard, path / "model.safetensors", metadata={"format": "pt"})
    ids = torch.tensor([[1, 50, 60, 70, 80, 90]])
    with torch.no_grad():
        logits = llm(ids).logits
    return path, ids, logits


def test_load_llm_directory(llm_dir):
    path, ids, logits = llm_dir
    llm = load_llm(str(path), tiny_cfg())
    with torch.no_grad():
        assert torch.equal(llm(ids).logits, logits)


def test_llm_directory_missing_weights_is_an_error(tmp_path, llm_dir):
    import shutil

    path, _, _ = llm_dir
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    shard = load_file(broken / "model.safetensors")
    del shard["model.layers.1.mlp.up_proj.weight"]
    save_file(shard, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"llm\.model\.layers\.1\.mlp\.up_proj\.weight"):
        load_llm(str(broken), tiny_cfg())


@pytest.mark.parametrize("bits, layer_class", [("8bit", "Linear8bitLt"), ("4bit", "Linear4bit")])
def test_quantized_llm_goes_through_bitsandbytes(llm_dir, bits, layer_class):
    pytest.importorskip("bitsandbytes")
    path, ids, logits = llm_dir
    llm = load_llm(str(path), tiny_cfg(quantize_llm=bits))
    assert type(llm.model.layers[0].self_attn.q_proj).__name__ == layer_class
    assert type(llm.model.layers[1].mlp.down_proj).__name__ == layer_class
    with torch.no_grad():
        got = llm(ids).logits.float()
    assert not torch.equal(got, logits)
    tol = 0.05 if bits == "8bit" else 0.25
    assert (got - logits).abs().max() < tol * logits.abs().max()


def test_load_pretrained_everything_from_s3(s3_bucket, files, llm_dir):
    import boto3

    s3 = boto3.client("s3")
    for name in ("eva", "blip2", "minigpt4"):
        s3.upload_file(str(files[name]), s3_bucket, f"ckpt/{files[name].name}")
    path, ids, logits = llm_dir
    for f in path.iterdir():
        s3.upload_file(str(f), s3_bucket, f"vicuna-tiny/{f.name}")
    weights = WeightsConfig(eva_vit=f"s3://{s3_bucket}/ckpt/eva_vit_g.pth",
                            blip2=f"s3://{s3_bucket}/ckpt/blip2_pretrained_flant5xxl.pth",
                            llm=f"s3://{s3_bucket}/vicuna-tiny/",
                            minigpt4=f"s3://{s3_bucket}/ckpt/pretrained_minigpt4_7b.pth")
    cfg = tiny_cfg()
    model, tokenizer, reports = load_pretrained(cfg, weights)
    assert [r.kind for r in reports] == ["llm", "eva_vit", "blip2", "minigpt4"]
    assert all(r.ok for r in reports) and reports[1].source == weights.eva_vit
    with torch.no_grad():
        assert torch.equal(model.llm(ids).logits, logits)
    assert_placed(eva_placements(model, files["eva_sd"]))
    assert_placed(blip2_placements(model, files["blip2_sd"]))
    assert torch.equal(model.llama_proj.weight, files["ckpt"]["model"]["llama_proj.weight"])
    assert tokenizer("a red circle").input_ids[0] == 1 and tokenizer.pad_token == "$$"
    assert model.llama_proj.weight.requires_grad and not model.vision.embeddings.class_embedding.requires_grad


def test_load_pretrained_without_files_is_random_with_tiny_tokenizer():
    model, tokenizer, reports = load_pretrained(tiny_cfg(), WeightsConfig())
    assert reports == [] and tokenizer.pad_token == "$$"
    assert model.llm.config.hidden_size == 64


def test_weights_config_fields():
    names = [f.name for f in dataclasses.fields(WeightsConfig)]
    assert names == ["eva_vit", "blip2", "hf_blip2", "llm", "minigpt4", "tokenizer", "strict"]
    assert WeightsConfig().strict is True
