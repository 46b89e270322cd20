"""Independent references for parity tests, written from the LAVIS / MiniGPT-4 math, not from our code.

- `eva_vit` / `qformer`: EVA ViT-g and the BLIP-2 Q-Former query path as plain tensor ops.
- `original_loss_inputs`: the original MiniGPT-4 training procedure (prompt_wrap, right padding,
  concat_emb_input_output moving the prompt padding behind the answer, BOS, targets).
- `ScriptedLM`: a causal-LM stand-in whose rows emit fixed token scripts, for stop/stream tests.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _mha(q_in, kv_in, wq, bq, wk, bk, wv, bv, heads):
    b, n, _ = q_in.shape
    q, k, v = F.linear(q_in, wq, bq), F.linear(kv_in, wk, bk), F.linear(kv_in, wv, bv)
    d = q.shape[-1] // heads
    split = lambda t: t.view(b, t.shape[1], heads, d).transpose(1, 2)
    att = (split(q) @ split(k).transpose(-1, -2)) * d ** -0.5
    return (att.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, n, heads * d)


def eva_vit(sd: dict, pixels: torch.Tensor, depth: int, heads: int, ln_vision_eps: float = 1e-5) -> torch.Tensor:
    """EVA ViT (LAVIS key names in `sd`) + ln_vision: all tokens, CLS kept, no final norm."""
    x = F.conv2d(pixels, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"],
                 stride=sd["patch_embed.proj.weight"].shape[-1])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], 1) + sd["pos_embed"]
    width = x.shape[-1]
    for i in range(depth):
        p = lambda n: sd[f"blocks.{i}.{n}"]
        h = F.layer_norm(x, (width,), p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        w = p("attn.qkv.weight")
        bias = torch.cat([p("attn.q_bias"), torch.zeros_like(p("attn.v_bias")), p("attn.v_bias")])
        qkv_b = bias.split(width)
        a = _mha(h, h, w[:width], qkv_b[0], w[width:2 * width], qkv_b[1], w[2 * width:], qkv_b[2], heads)
        x = x + F.linear(a, p("attn.proj.weight"), p("attn.proj.bias"))
        h = F.layer_norm(x, (width,), p("norm2.weight"), p("norm2.bias"), eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(h, p("mlp.fc1.weight"), p("mlp.fc1.bias"))), p("mlp.fc2.weight"), p("mlp.fc2.bias"))
    return F.layer_norm(x, (width,), sd["ln_vision.weight"], sd["ln_vision.bias"], eps=ln_vision_eps)


def qformer(sd: dict, image_embeds: torch.Tensor, layers: int, heads: int, cross_freq: int = 2) -> torch.Tensor:
    """BLIP-2 Q-Former, query-only path (LAVIS key names `Qformer.bert.*`, `query_tokens`)."""
    pre = "Qformer.bert."
    q = sd["query_tokens"].expand(image_embeds.shape[0], -1, -1)
    hdim = q.shape[-1]
    ln = lambda t, n: F.layer_norm(t, (hdim,), sd[n + ".weight"], sd[n + ".bias"], eps=1e-12)
    x = ln(q, pre + "embeddings.LayerNorm")
    for i in range(layers):
        L = f"{pre}encoder.layer.{i}."
        g = lambda n: sd[L + n]

        def attn(kind, h, kv):
            a = _mha(h, kv, g(f"{kind}.self.query.weight"), g(f"{kind}.self.query.bias"), g(f"{kind}.self.key.weight"),
                     g(f"{kind}.self.key.bias"), g(f"{kind}.self.value.weight"), g(f"{kind}.self.value.bias"), heads)
            return ln(F.linear(a, g(f"{kind}.output.dense.weight"), g(f"{kind}.output.dense.bias")) + h,
                      L + f"{kind}.output.LayerNorm")

        x = attn("attention", x, x)
        if i % cross_freq == 0:
            x = attn("crossattention", x, image_embeds)
        h = F.gelu(F.linear(x, g("intermediate_query.dense.weight"), g("intermediate_query.dense.bias")))
        x = ln(F.linear(h, g("output_query.dense.weight"), g("output_query.dense.bias")) + x, L + "output_query.LayerNorm")
    return x


def original_loss_inputs(embed, tokenizer, img_embeds, instructions, answers, end_sym, max_txt_len):
    """The original MiniGPT-4 training input: (inputs_embeds, attention_mask, targets).

    embed: token-id -> embedding; instructions: None (stage 1) or one prompt per sample.
    """
    b = img_embeds.shape[0]
    if instructions is None:
        cond, cond_atts = img_embeds, torch.ones(img_embeds.shape[:2], dtype=torch.long)
    else:
        embs = []
        for img, prompt in zip(img_embeds, instructions):
            before, after = prompt.split("<ImageHere>")
            t_before = torch.tensor(tokenizer(before, add_special_tokens=False).input_ids, dtype=torch.long)
            t_after = torch.tensor(tokenizer(after, add_special_tokens=False).input_ids, dtype=torch.long)
            embs.append(torch.cat([embed(t_before), img, embed(t_after)]))
        n = max(e.shape[0] for e in embs)
        pad_emb = embed(torch.tensor(tokenizer.pad_token_id))
        cond = pad_emb.expand(b, n, -1).clone()
        cond_atts = torch.zeros(b, n, dtype=torch.long)
        for i, e in enumerate(embs):
            cond[i, :e.shape[0]] = e
            cond_atts[i, :e.shape[0]] = 1
    tokenizer.padding_side = "right"
    reg = tokenizer([a + end_sym for a in answers], return_tensors="pt", padding="longest", truncation=True,
                    max_length=max_txt_len, add_special_tokens=False)
    part_targets = reg.input_ids.masked_fill(reg.input_ids == tokenizer.pad_token_id, -100)
    reg_embeds = embed(reg.input_ids)
    cat_e, cat_a, lens = [], [], []
    for i in range(b):
        n = int(cond_atts[i].sum())
        lens.append(n)
        cat_e.append(torch.cat([cond[i][:n], reg_embeds[i], cond[i][n:]]))
        cat_a.append(torch.cat([cond_atts[i][:n], reg.attention_mask[i], cond_atts[i][n:]]))
    inputs = torch.stack(cat_e)
    atts = torch.stack(cat_a)
    bos = embed(torch.full((b, 1), tokenizer.bos_token_id, dtype=torch.long))
    inputs = torch.cat([bos, inputs], 1)
    atts = torch.cat([torch.ones(b, 1, dtype=torch.long), atts], 1)
    targets = torch.full(inputs.shape[:2], -100, dtype=torch.long)
    for i, t in enumerate(part_targets):
        targets[i, lens[i] + 1:lens[i] + 1 + len(t)] = t
    return inputs, atts, targets


class ScriptedLM(torch.nn.Module):
    """Causal-LM stand-in: row r emits scripts[id_r] token by token (id_r = round(prompt embedding[0, 0])).

    Prefill stores (script id, prompt length) in the KV cache at every real position; each step reads
    them back from the positions its attention mask lets it see and takes its step count from its
    position id. So it runs on both engine paths: the dynamic cache whose rows the simple path removes
    (`batch_select_indices`, 2-D masks) and the static slot cache (4-D masks over the whole capacity).
    `batch_sizes` records each forward's batch size.
    """

    def __init__(self, scripts: list[list[int]], vocab: int):
        super().__init__()
        from transformers import LlamaConfig

        self.scripts, self.vocab = scripts, vocab
        self.config = LlamaConfig(vocab_size=vocab, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                  num_attention_heads=1, num_key_value_heads=1)
        self.batch_sizes: list[int] = []

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None, cache=None, **_):
        from types import SimpleNamespace

        if inputs_embeds is not None:  # prefill (left-padded, 2-D mask)
            real = attention_mask.float()  # (B, L)
            info = torch.stack([inputs_embeds[..., 0].round() * real, real.sum(1, keepdim=True) * real], -1)
            kv = info[:, None]  # (B, 1, L, 2): (script id, prompt length)
        else:
            kv = torch.zeros(input_ids.shape[0], 1, 1, 2)
        keys, _ = cache.update(kv, kv, 0)
        visible = attention_mask if attention_mask.dim() == 2 else attention_mask[:, 0, -1]  # (B, kv length)
        script_id, prompt_len = (keys[:, 0] * visible.bool()[..., None]).amax(1).long().unbind(-1)
        steps = position_ids[:, -1] + 1 - prompt_len
        b = keys.shape[0]
        self.batch_sizes.append(b)
        logits = torch.full((b, 1, self.vocab), -1e4)
        for r in range(b):
            script = self.scripts[int(script_id[r])]
            logits[r, 0, script[min(int(steps[r]), len(script) - 1)]] = 0
        return SimpleNamespace(logits=logits)
