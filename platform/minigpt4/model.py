"""MiniGPT-4: frozen EVA ViT-g/14 -> ln_vision -> frozen Q-Former (32 queries) -> Linear -> frozen LLaMA.

One file, readable top to bottom: the config dataclass, the presets, and the graph. The parts are
transformers' own classes (`Blip2VisionModel`, `Blip2QFormerModel`, `LlamaForCausalLM`), composed.
This module knows nothing about how it is distributed: no ray, deepspeed or bitsandbytes imports.

Sequence layout (training), as the original implementation builds it:
    [BOS] [prompt segments with the image tokens spliced in] [answer + end_sym] [padding]
Image positions are marked in `input_ids` with IMAGE_TOKEN_ID; `forward` scatters the projected
image embeddings into them. Labels are -100 everywhere but the answer (prompts.py builds them).
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGE_TOKEN_ID = -200  # placeholder id for image-embedding positions in input_ids (never a vocab id)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ModelConfig:
    """Architecture and runtime options of one MiniGPT-4 variant."""

    name: str = "tiny"
    """Preset name this config came from (informational)."""
    vision: dict = field(default_factory=dict)
    """`Blip2VisionConfig` kwargs (EVA ViT-g/14: width 1408, 39 blocks, 16 heads, MLP 6144, eps 1e-6)."""
    ln_vision_eps: float = 1e-5
    """eps of `ln_vision` (LAVIS LayerNorm default), which differs from the ViT blocks' 1e-6."""
    qformer: dict | None = field(default_factory=dict)
    """`Blip2QFormerConfig` kwargs; None for the LLaMA-2 variant (no Q-Former)."""
    num_query_tokens: int = 32
    """Learned Q-Former queries = image tokens per image (Vicuna variant)."""
    patch_concat: int = 4
    """LLaMA-2 variant: adjacent patch tokens concatenated into one LLM token (256 -> 64)."""
    llm: dict = field(default_factory=dict)
    """`LlamaConfig` kwargs for a randomly initialised LLM (ignored when weights.llm names a directory)."""
    template: str = "vicuna_v0"
    """Conversation / instruction template: 'vicuna_v0' (`###Human: ... ###Assistant: `) or 'llama2' (`[INST] ... [/INST] `)."""
    vision_dtype: str = "fp16"
    """Storage dtype of the ViT's Conv/Linear weights (LayerNorms stay fp32); compute runs under autocast."""
    llm_dtype: str = "fp16"
    """LLM weight dtype (fp32/fp16/bf16) when not quantized; with int8wo, of the embeddings, norms and lm_head."""
    quantize_llm: str = "none"
    """'none'; 'int8wo' (ours, minigpt4.int8): weight-only int8, every Linear of the decoder layers holds int8
    weights and one scale per output channel and dequantizes inside the matmul (about half of bf16's bytes;
    the engine compiles it, so it is the fast 8-bit path); or bitsandbytes, through transformers'
    BitsAndBytesConfig, as MiniGPT-4's low-resource mode: '8bit' (LLM.int8) or '4bit' (NF4)."""
    train_llm: str = "none"
    """'none' (MiniGPT-4: only llama_proj trains), 'full', or 'lora' (needs peft)."""
    train_vision: bool = False
    """Also train the ViT (+ ln_vision). Never for the real presets (MiniGPT-4 keeps it frozen); the tiny
    preset's random encoder has to learn to see from scratch in the demo."""
    train_qformer: bool = False
    """Also train the Q-Former and its query tokens (same caveat)."""
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    attn_implementation: str = "sdpa"
    """Attention kernel for all three parts ('sdpa' or 'eager')."""

    def __post_init__(self):
        for key in ("vision_dtype", "llm_dtype"):
            if getattr(self, key) not in DTYPES:
                raise ValueError(f"model.{key} must be one of {sorted(DTYPES)}, got {getattr(self, key)!r}")
        if self.quantize_llm not in ("none", "int8wo", "8bit", "4bit"):
            raise ValueError(f"model.quantize_llm must be none/int8wo/8bit/4bit, got {self.quantize_llm!r}")
        if self.train_llm not in ("none", "full", "lora"):
            raise ValueError(f"model.train_llm must be none/full/lora, got {self.train_llm!r}")
        if self.quantize_llm != "none" and self.train_llm == "full":
            raise ValueError("model.train_llm='full' cannot train a quantized LLM; use 'lora' or quantize_llm='none'")
        if self.quantize_llm == "int8wo" and self.train_llm == "lora":  # peft knows nn.Linear and bitsandbytes only
            raise ValueError("model.train_llm='lora' cannot adapt int8wo layers; use quantize_llm='8bit'/'4bit'/'none'")
        if self.template not in ("vicuna_v0", "llama2"):
            raise ValueError(f"model.template must be vicuna_v0 or llama2, got {self.template!r}")
        self.lora_target_modules = tuple(self.lora_target_modules)
        if self.qformer is None:
            patches = (self.vision_config().image_size // self.vision_config().patch_size) ** 2
            if patches % self.patch_concat:
                raise ValueError(f"{patches} patch tokens are not divisible by patch_concat={self.patch_concat}")

    # -- derived -------------------------------------------------------------------------------
    def vision_config(self):
        from transformers import Blip2VisionConfig

        return Blip2VisionConfig(**self.vision)

    def qformer_config(self):
        from transformers import Blip2QFormerConfig

        return Blip2QFormerConfig(**self.qformer)

    def llm_config(self):
        from transformers import LlamaConfig

        return LlamaConfig(**self.llm)

    @property
    def has_qformer(self) -> bool:
        return self.qformer is not None

    @property
    def image_size(self) -> int:
        return self.vision_config().image_size

    @property
    def num_image_tokens(self) -> int:
        """LLM tokens one image becomes: 32 (Q-Former) or 256/4 = 64 (LLaMA-2 patch concat)."""
        if self.has_qformer:
            return self.num_query_tokens
        v = self.vision_config()
        return (v.image_size // v.patch_size) ** 2 // self.patch_concat

    @property
    def proj_in_features(self) -> int:
        return self.qformer_config().hidden_size if self.has_qformer else self.vision_config().hidden_size * self.patch_concat

    def check_cached_features(self) -> None:
        """ValueError unless precomputed encoder outputs (minigpt4.features) can replace the pixels: the
        encoder must be frozen (features fixed once cannot follow a ViT or Q-Former that trains) and
        be the Q-Former variant (the LLaMA-2 variant has no Q-Former output to cache)."""
        if not self.has_qformer:
            raise ValueError(f"model {self.name} has no Q-Former: cached image features need the Q-Former "
                             "variant (vicuna7b/vicuna13b/tiny)")
        trains = [k for k in ("train_vision", "train_qformer") if getattr(self, k)]
        if trains:
            raise ValueError(f"cached image features need a frozen encoder, but model.{' and model.'.join(trains)} "
                             "is on: features computed once cannot follow weights that train; read pixels instead")

    @property
    def end_sym(self) -> str:
        """Stage-2 / chat answer terminator."""
        return "###" if self.template == "vicuna_v0" else "</s>"


# -- presets ------------------------------------------------------------------------------------
EVA_VIT_G = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                 image_size=224, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu")
QFORMER_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                    cross_attention_frequency=2, encoder_hidden_size=1408, layer_norm_eps=1e-12,
                    hidden_act="gelu", vocab_size=30522, max_position_embeddings=512)
LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6,
                bos_token_id=1, eos_token_id=2, pad_token_id=None, tie_word_embeddings=False)
LLAMA_13B = dict(LLAMA_7B, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                 num_key_value_heads=40)
LLAMA2_7B = dict(LLAMA_7B, max_position_embeddings=4096, rms_norm_eps=1e-5)

PRESETS: dict[str, dict[str, Any]] = {
    # Tests: same classes as the real presets, tiny sizes; builds in milliseconds.
    "tiny": dict(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    image_size=32, patch_size=8, layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu"),
        qformer=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     cross_attention_frequency=2, encoder_hidden_size=32, layer_norm_eps=1e-12,
                     hidden_act="gelu", vocab_size=100, max_position_embeddings=64),
        num_query_tokens=4,
        llm=dict(vocab_size=640, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=1,
                 eos_token_id=2, pad_token_id=None, tie_word_embeddings=False),
        vision_dtype="fp32", llm_dtype="fp32",
    ),
}
# The embedded default (`make demo`, the jobs with no arguments): tiny, with a ViT (width 64, 8 px
# patches: 16 + CLS tokens at 32 px) and a Q-Former (cross-attention in every layer) just big enough
# to learn the synthetic scenes from random init in minutes on 2 CPU cores; the LLM and tokenizer are
# tiny's. 4 px patches learn shapes in about as many steps but cost twice as much per step. No dropout
# in the Q-Former (BERT's default is 0.1): trained from scratch at this size, dropout only slowed it
# (eager replica of stage 1, seeds 42/1: 98%/86% held-out at step 2,400 with it, 96%/99% without).
PRESETS["tiny_demo"] = dict(
    PRESETS["tiny"],
    vision=dict(PRESETS["tiny"]["vision"], hidden_size=64, intermediate_size=128, patch_size=8),
    qformer=dict(PRESETS["tiny"]["qformer"], hidden_size=64, intermediate_size=128, cross_attention_frequency=1,
                 encoder_hidden_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
)
PRESETS |= {
    "vicuna7b": dict(vision=EVA_VIT_G, qformer=QFORMER_BASE, llm=LLAMA_7B),
    "vicuna13b": dict(vision=EVA_VIT_G, qformer=QFORMER_BASE, llm=LLAMA_13B),
    # MiniGPT-4 (LLaMA-2): no Q-Former; CLS dropped, 4 adjacent patches -> Linear(5632, 4096).
    "llama2_7b": dict(vision=EVA_VIT_G, qformer=None, llm=LLAMA2_7B, template="llama2"),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A preset's ModelConfig with field overrides (unknown names are an error)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ValueError(f"unknown model config field(s) {bad}; valid: {sorted(fields)}")
    return ModelConfig(name=name, **{**PRESETS[name], **overrides})


# -- the graph ----------------------------------------------------------------------------------
class MiniGPT4(nn.Module):
    """vision (EVA ViT-g, its post_layernorm = ln_vision) -> qformer + query_tokens -> llama_proj -> llm.

    Parameter names `query_tokens` and `llama_proj.*` match the original checkpoints.
    """

    def __init__(self, cfg: ModelConfig, llm: nn.Module | None = None):
        super().__init__()
        from transformers import Blip2QFormerModel, Blip2VisionModel, LlamaForCausalLM

        self.cfg = cfg
        vcfg = cfg.vision_config()
        vcfg._attn_implementation = cfg.attn_implementation
        self.vision = Blip2VisionModel(vcfg)
        # HF's post_layernorm is exactly where LAVIS applies ln_vision (BLIP-2's conversion maps one onto
        # the other); it must carry ln_vision's eps (1e-5), not the blocks' 1e-6.
        self.vision.post_layernorm = nn.LayerNorm(vcfg.hidden_size, eps=cfg.ln_vision_eps)
        if cfg.has_qformer:
            qcfg = cfg.qformer_config()
            qcfg._attn_implementation = cfg.attn_implementation
            self.qformer = Blip2QFormerModel(qcfg)
            self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_tokens, qcfg.hidden_size))
            nn.init.normal_(self.query_tokens, std=qcfg.initializer_range)
        else:
            self.qformer = None
            self.query_tokens = None
        if llm is None:
            lcfg = cfg.llm_config()
            lcfg._attn_implementation = cfg.attn_implementation
            llm = LlamaForCausalLM(lcfg)
            if cfg.quantize_llm in ("none", "int8wo"):
                llm.to(DTYPES[cfg.llm_dtype])
        if cfg.quantize_llm == "int8wo":  # a no-op for an LLM that weights.py loaded quantized
            from minigpt4.int8 import quantize_llm_int8

            quantize_llm_int8(llm)
        self.llm = llm
        self.llama_proj = nn.Linear(cfg.proj_in_features, self.llm.config.hidden_size)  # (B, 32, 768) -> (B, 32, H)
        self._cast_vision(DTYPES[cfg.vision_dtype])
        self.set_trainable()

    # -- precision / freezing ---------------------------------------------------------------------
    def _cast_vision(self, dtype: torch.dtype):
        """As LAVIS' convert_weights_to_fp16: Conv/Linear weights in low precision; LayerNorms, class and
        position embeddings stay fp32. transformers 5.2x folds q_bias/v_bias into the qkv Linear's bias, so
        they follow its dtype here; LAVIS keeps them fp32 but autocast casts them to fp16 at compute anyway."""
        for m in self.vision.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.to(dtype)

    def set_trainable(self):
        """MiniGPT-4 freezes everything but llama_proj; cfg.train_llm adds the LLM (full) or LoRA adapters."""
        self.requires_grad_(False)
        self.llama_proj.requires_grad_(True)
        if self.cfg.train_vision:
            self.vision.requires_grad_(True)
        if self.cfg.train_qformer and self.qformer is not None:
            self.qformer.requires_grad_(True)
            self.query_tokens.requires_grad_(True)
        if self.cfg.train_llm == "full":
            self.llm.requires_grad_(True)
        elif self.cfg.train_llm == "lora":
            from peft import LoraConfig, get_peft_model  # optional dependency, only for LoRA runs

            if not hasattr(self.llm, "peft_config"):
                self.llm = get_peft_model(self.llm, LoraConfig(
                    r=self.cfg.lora_r, lora_alpha=self.cfg.lora_alpha, lora_dropout=self.cfg.lora_dropout,
                    target_modules=list(self.cfg.lora_target_modules), bias="none", task_type="CAUSAL_LM"))
            for n, p in self.llm.named_parameters():
                p.requires_grad_("lora_" in n)
        # frozen parts stay in eval mode (no dropout) even while the module trains
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.cfg.train_vision:
            self.vision.eval()
        if self.qformer is not None and not self.cfg.train_qformer:
            self.qformer.eval()
        if self.cfg.train_llm == "none":
            self.llm.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameters; int8wo's int8 weights (buffers) count as the frozen parameters they stand for."""
        n = sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
        return n if trainable_only else n + _int8_weights(self)

    def llm_weight_bytes(self) -> int:
        """Bytes of the LLM's parameters and buffers (int8wo's int8 weights and scales are buffers);
        bitsandbytes keeps its quantization statistics outside both, a few percent of its bytes."""
        return sum(t.numel() * t.element_size() for t in (*self.llm.parameters(), *self.llm.buffers()))

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per part (works on the meta device; a dropped encoder counts 0)."""
        parts = {"vision": self.vision, "llama_proj": self.llama_proj, "llm": self.llm}
        out = {k: sum(p.numel() for p in m.parameters()) + _int8_weights(m) for k, m in parts.items()}
        out["qformer"] = (sum(p.numel() for p in self.qformer.parameters())
                          + (self.query_tokens.numel() if self.query_tokens is not None else 0)
                          if self.qformer is not None else 0)
        out["trainable"] = self.num_parameters(trainable_only=True)
        out["total"] = self.num_parameters()
        return out

    def drop_encoder(self) -> int:
        """Free the frozen ViT and Q-Former of a model that trains from cached features only
        (`minigpt4.features`): their output comes with the data, so keeping them costs memory for
        nothing (about 2 GB of bf16 at 7B). Pixels given afterwards are a clear error. Call after the
        model is built and loaded (the random init of the rest must not change). Returns the number
        of parameters freed."""
        self.cfg.check_cached_features()
        freed = self.parameter_counts()
        self.vision, self.qformer, self.query_tokens = _DroppedEncoder("vision"), _DroppedEncoder("qformer"), None
        return freed["vision"] + freed["qformer"]

    # -- image side ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.llama_proj.weight.device

    def _autocast(self, dtype: torch.dtype):
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalized pixels -> (B, N, H) LLM-space image tokens (N = 32 or 64)."""
        return self.project_image_features(self.image_features(pixel_values))

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalized pixels -> (B, N, D) output of the frozen encoder, before llama_proj:
        the Q-Former's last_hidden_state (B, 32, 768), or the LLaMA-2 variant's concatenated patches
        (B, 64, 5632). What the frozen-feature cache stores (minigpt4.features)."""
        # The ViT and Q-Former are frozen in every MiniGPT-4 variant: no graph is kept for them
        # (unless a from-scratch config trains them, see train_vision / train_qformer).
        grad = torch.is_grad_enabled() and (self.cfg.train_vision or self.cfg.train_qformer)
        with torch.set_grad_enabled(grad), self._autocast(DTYPES[self.cfg.vision_dtype]):
            # HF's post_layernorm is ln_vision; LayerNorm runs in fp32 under autocast, as LAVIS forces it
            image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state  # (B, 257, 1408)
            if self.qformer is not None:
                query = self.query_tokens.expand(image_embeds.shape[0], -1, -1)  # (B, 32, 768)
                return self.qformer(query_embeds=query, encoder_hidden_states=image_embeds).last_hidden_state
            patches = image_embeds[:, 1:, :]  # drop CLS: (B, 256, 1408)
            b, n, d = patches.shape
            return patches.reshape(b, n // self.cfg.patch_concat, d * self.cfg.patch_concat)  # (B, 64, 5632)

    def project_image_features(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, N, D) encoder output -> (B, N, H) LLM-space image tokens: llama_proj, under the vision
        autocast. The one projection both the pixel path and cached features go through."""
        with self._autocast(DTYPES[self.cfg.vision_dtype]):
            return self.llama_proj(feats.to(self.llama_proj.weight.dtype))  # (B, N, H)

    def check_image_features(self, image_feats: torch.Tensor) -> None:
        """ValueError unless `image_feats` can stand in for pixels: the config must allow cached
        features (`ModelConfig.check_cached_features`) and the shape must be (B, N, D) of this encoder."""
        self.cfg.check_cached_features()
        want = (self.cfg.num_query_tokens, self.cfg.proj_in_features)
        if image_feats.ndim != 3 or tuple(image_feats.shape[1:]) != want:
            raise ValueError(f"image_feats must be (batch, {want[0]}, {want[1]}) for model {self.cfg.name}, "
                             f"got {tuple(image_feats.shape)} (features of another encoder?)")

    # -- language side ---------------------------------------------------------------------------
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.llm.get_input_embeddings()(input_ids)

    def splice(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with image embeddings scattered into the IMAGE_TOKEN_ID positions, in order.

        input_ids: (B, L) with N * n_images image positions per row; image_embeds: (B * n_images, N, H)
        or (B, n_images * N, H), images of a row in order.
        """
        is_image = input_ids == IMAGE_TOKEN_ID
        embeds = self.embed_tokens(input_ids.masked_fill(is_image, 0))  # (B, L, H)
        n_slots = int(is_image.sum())
        if n_slots == 0:
            return embeds
        if image_embeds is None or image_embeds.numel() // image_embeds.shape[-1] != n_slots:
            have = 0 if image_embeds is None else image_embeds.numel() // image_embeds.shape[-1]
            raise ValueError(f"input_ids hold {n_slots} image positions but {have} image embeddings were given "
                             f"({self.cfg.num_image_tokens} per image)")
        return embeds.masked_scatter(is_image.unsqueeze(-1), image_embeds.to(embeds.dtype))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, image_feats: torch.Tensor | None = None, **_: Any):
        """Batch from prompts.collate_training -> transformers CausalLMOutput (loss over answer tokens only).

        Images come as `pixel_values` (B, 3, S, S), or as `image_feats` (B, 32, 768): the frozen encoder's
        output computed beforehand (`image_features`, the feature cache), which skips the ViT and Q-Former.
        Position ids run 0..L-1 (right padding), exactly as in the original implementation.
        """
        if image_feats is not None:
            if pixel_values is not None:
                raise ValueError("give pixel_values or image_feats, not both")
            self.check_image_features(image_feats)
            image_embeds = self.project_image_features(image_feats.to(self.device))
        else:
            image_embeds = self.encode_images(pixel_values) if pixel_values is not None else None
        inputs_embeds = self.splice(input_ids, image_embeds)
        with self._autocast(DTYPES[self.cfg.llm_dtype]):  # also the bitsandbytes compute dtype (weights.py)
            return self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, use_cache=False)

    def prompt_embeds(self, segments: list[list[int]], image_embeds: torch.Tensor | None) -> torch.Tensor:
        """One prompt for generation: token segments interleaved with images -> (L, H).

        segments: k + 1 lists of ids for k images (BOS already in the first); image_embeds: (k, N, H).
        """
        k = 0 if image_embeds is None else image_embeds.shape[0]
        if len(segments) != k + 1:
            raise ValueError(f"prompt has {len(segments) - 1} <ImageHere> placeholders but {k} images were given")
        dtype = self.llm.get_input_embeddings().weight.dtype
        parts = []
        for i, seg in enumerate(segments):
            if seg:
                parts.append(self.embed_tokens(torch.tensor(seg, dtype=torch.long, device=self.device)))
            if i < k:
                parts.append(image_embeds[i].to(dtype))
        return torch.cat(parts, dim=0)  # (L, H)

    # -- generation --------------------------------------------------------------------------------
    @torch.no_grad()
    def generation_inputs(self, tokenizer, prompts: list[str], images=None) -> list[torch.Tensor]:
        """Prompts with `<ImageHere>` placeholders -> per-prompt embeddings (L_i, H) for the engine.

        images: None, a (B, 3, S, S) tensor (one image per prompt), or a list with one (k_i, 3, S, S)
        tensor (or None) per prompt. All images are encoded in one batched pass.
        """
        from minigpt4.prompts import tokenize_segments

        if images is None:
            per_prompt = [None] * len(prompts)
        elif isinstance(images, torch.Tensor):
            per_prompt = list(images.unsqueeze(1))
        else:
            per_prompt = list(images)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but images for {len(per_prompt)}")
        counts = [0 if x is None else x.shape[0] for x in per_prompt]
        encoded = None
        if sum(counts):
            pixels = torch.cat([x for x in per_prompt if x is not None]).to(self.device)
            encoded = self.encode_images(pixels).split(counts)  # (k_i, N, H) per prompt
        return [self.prompt_embeds(tokenize_segments(tokenizer, p, bos=True), encoded[i] if counts[i] else None)
                for i, p in enumerate(prompts)]

    def engine(self, tokenizer):
        """The model's generation engine, made once: its static KV cache and compiled decode step are
        reused by every later call (captioning calls generate once per batch). One call at a time:
        an engine runs one generate/stream (serving's Batcher has its own)."""
        from minigpt4.generate import GenerationEngine

        engine = getattr(self, "_engine", None)
        if engine is None or engine.tokenizer is not tokenizer or engine.llm is not self.llm:
            self._engine = engine = GenerationEngine(self.llm, tokenizer)
        return engine

    def generate(self, tokenizer, prompts: list[str], images=None, params=None):
        """Batched generation -> list of generate.Completion (see GenerationEngine for the guarantees)."""
        from minigpt4.generate import SamplingParams

        embeds = self.generation_inputs(tokenizer, prompts, images)
        return self.engine(tokenizer).generate(embeds, params or SamplingParams())

    def stream(self, tokenizer, prompts: list[str], images=None, params=None):
        """Like generate, yielding TokenEvents per decode step."""
        from minigpt4.generate import SamplingParams

        embeds = self.generation_inputs(tokenizer, prompts, images)
        return self.engine(tokenizer).stream(embeds, params or SamplingParams())


class _DroppedEncoder(nn.Module):
    """Stands in for a part `MiniGPT4.drop_encoder` freed: no parameters, and an error if it is run."""

    def __init__(self, part: str):
        super().__init__()
        self.part = part

    def forward(self, *args, **kwargs):
        raise ValueError(f"this model's {self.part} was dropped (it trains from cached features): give image_feats, "
                         "not pixel_values")


# -- building -----------------------------------------------------------------------------------
def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", llm: nn.Module | None = None) -> MiniGPT4:
    """Build the graph with random weights on `device` (use 'meta' to count 7B parameters for free)."""
    with torch.device(device):
        return MiniGPT4(cfg, llm=llm)


def _int8_weights(module: nn.Module) -> int:
    """Weight and bias elements of the int8wo layers in `module` (buffers, so not among its parameters)."""
    from minigpt4.int8 import Int8Linear

    return sum(m.weight.numel() + (0 if m.bias is None else m.bias.numel())
               for m in module.modules() if isinstance(m, Int8Linear))


def expected_trainable(cfg: ModelConfig) -> int:
    """llama_proj parameters: 768*4096+4096 = 3,149,824 for 7B; 5632*4096+4096 = 23,072,768 for LLaMA-2."""
    h = cfg.llm_config().hidden_size
    return cfg.proj_in_features * h + h


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over labels != -100 (what transformers' LlamaForCausalLM computes)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)

