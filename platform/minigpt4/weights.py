"""Load the released MiniGPT-4 checkpoints into `minigpt4.model.MiniGPT4`.

The original implementation assembles a model from four files, in this order (later files win):

    eva_vit_g.pth                     LAVIS EVA ViT-g/14           -> model.vision (blocks, embeddings)
    blip2_pretrained_flant5xxl.pth    LAVIS BLIP-2 (Q-Former)      -> model.query_tokens, model.qformer,
                                                                      model.vision.post_layernorm (= ln_vision)
    <vicuna / llama-2 HF directory>   the LLM                      -> model.llm (LlamaForCausalLM)
    pretrained_minigpt4_7b.pth        stage-1/2 MiniGPT-4 ckpt     -> model.llama_proj (+ LoRA adapters)

A Hugging Face `Blip2ForConditionalGeneration` checkpoint can stand in for the two LAVIS files.

Each file is loaded in three steps: every key is *planned* (renamed to a model parameter, or classed
as a known extra, or as unknown), the plan is *checked* (shapes always; missing and unknown keys when
strict), and only then are values *copied* into the parameters — so a rejected file leaves the model
untouched. Every file yields a `LoadReport`, logged and returned. Files are read with
`torch.load(weights_only=True)` or safetensors: a checkpoint that needs arbitrary unpickling is refused.

Any path may be an `s3://` URI; `storage.resolve` fetches it once per node.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from minigpt4.int8 import quantize_llm_int8
from minigpt4.model import DTYPES, MiniGPT4, ModelConfig, build_model
from minigpt4.storage import resolve

log = logging.getLogger(__name__)

__all__ = ["WeightsConfig", "LoadReport", "resolve", "read_state_dict", "interpolate_pos_embed",
           "load_eva_vit", "load_blip2", "load_hf_blip2", "load_minigpt4", "load_llm", "load_pretrained"]


@dataclass
class WeightsConfig:
    """Where each part's pretrained weights come from: local paths or s3:// URIs; None = random init."""

    eva_vit: str | None = None
    """LAVIS EVA ViT-g checkpoint (`eva_vit_g.pth`) -> the vision tower."""
    blip2: str | None = None
    """LAVIS BLIP-2 checkpoint (`blip2_pretrained_flant5xxl.pth`) -> Q-Former, query tokens, ln_vision."""
    hf_blip2: str | None = None
    """Hugging Face BLIP-2 file or directory (vision_model.* / qformer.* / query_tokens), instead of the two above."""
    llm: str | None = None
    """Hugging Face LLaMA/Vicuna model directory (s3:// prefix allowed) -> model.llm."""
    minigpt4: str | list[str] | None = None
    """MiniGPT-4 stage-1/2 checkpoint (`pretrained_minigpt4_7b.pth`) -> llama_proj (and LoRA adapters); a
    list loads several in order (the tiny demo: stage 1's .pth, which holds the encoder, then stage 2's)."""
    tokenizer: str | None = None
    """Tokenizer directory; defaults to the llm directory, and to the tiny test tokenizer without one."""
    strict: bool = True
    """Refuse files with unknown keys or with keys missing for the parts they load (shape errors always raise)."""


@dataclass
class LoadReport:
    """What one checkpoint file did to the model."""

    source: str
    """The file as given (path or URI)."""
    loaded: list[str] = field(default_factory=list)
    """Model parameter names that received a value."""
    ignored: list[str] = field(default_factory=list)
    """Checkpoint keys that are known not to belong in MiniGPT-4 (T5 projection, text branch, 40th ViT block...)."""
    unexpected: list[str] = field(default_factory=list)
    """Checkpoint keys this loader does not recognise."""
    missing: list[str] = field(default_factory=list)
    """Model parameters this file should have supplied but did not."""
    kind: str = ""
    """Which format the file was read as (eva_vit, blip2, hf_blip2, minigpt4, llm)."""

    @property
    def ok(self) -> bool:
        return not self.unexpected and not self.missing

    def summary(self, max_names: int = 8) -> str:
        """One paragraph: counts, and unknown/missing keys by name (lists truncated, with counts)."""
        parts = [f"{self.kind or 'checkpoint'} {self.source}: loaded {len(self.loaded)} tensors",
                 f"ignored {len(self.ignored)} known extra keys"]
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unknown keys: {_names(self.unexpected, max_names)}")
        if self.missing:
            parts.append(f"{len(self.missing)} missing model parameters: {_names(self.missing, max_names)}")
        return "; ".join(parts) + "."


def _names(names: list[str], limit: int) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


# -- reading files ---------------------------------------------------------------------------------
def read_state_dict(uri: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file (or of every shard in a directory), on the CPU.

    `{"model": ...}` / `{"state_dict": ...}` wrappers are unwrapped and non-tensor entries dropped.
    """
    return _read_tensors(uri)[0]


def _read_tensors(uri, skip: Callable[[str], bool] = lambda key: False) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(tensors, skipped keys). Skipped tensors are never materialised: safetensors reads only the
    wanted ones and pickled files are memory-mapped, which matters for a full HF BLIP-2 directory
    whose language model is ten times the size of what MiniGPT-4 takes from it."""
    path = resolve(uri)
    files = _weight_files(path)
    tensors: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for f in files:
        state = _read_safetensors(f, skip, skipped) if f.suffix == ".safetensors" else _read_pickled(f, skip, skipped)
        tensors.update(state)
    return tensors, skipped


# In a directory, the first pattern that matches wins: safetensors over pickles, and HF's shard names
# before any other file, so that e.g. a Trainer's training_args.bin is never mistaken for weights.
_DIR_PATTERNS = ("model*.safetensors", "*.safetensors", "pytorch_model*.bin", "*.bin", "*.pth", "*.pt")


def _weight_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    for pattern in _DIR_PATTERNS:
        files = sorted(path.glob(pattern))
        if files:
            return files
    raise FileNotFoundError(f"no weight files ({', '.join(_DIR_PATTERNS)}) in directory {path}")


def _read_safetensors(path: Path, skip, skipped: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for key in f.keys():
            if skip(key):
                skipped.append(key)
            else:
                out[key] = f.get_tensor(key)
    return out


def _read_pickled(path: Path, skip, skipped: list[str]) -> dict[str, torch.Tensor]:
    obj = _torch_load(path)
    if isinstance(obj, dict):
        for wrapper in ("model", "state_dict"):  # training checkpoints keep optimizer, epoch... beside it
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, found a {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        if skip(key):
            skipped.append(key)
        else:
            out[key] = value
    return out


def _torch_load(path: Path):
    """torch.load that only rebuilds tensors and plain containers (never arbitrary objects)."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            # files in torch's legacy (pre-1.6, non-zip) format cannot be memory-mapped
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message is long advice on how to bypass the check; keep only the line naming the object
        detail = next((ln.strip() for ln in str(err).splitlines() if "Unsupported global" in ln), "")
        raise ValueError(f"{path}: refusing to load: the checkpoint holds pickled Python objects other than "
                         f"tensors and plain containers (torch.load weights_only=True). {detail}".rstrip()) from None


# -- planning: checkpoint key -> model parameter ---------------------------------------------------
class _Plan:
    """What one file will write into the model, checked as a whole before anything is written."""

    def __init__(self, model: MiniGPT4, source: str, kind: str):
        self.model = model
        self.params = dict(model.named_parameters())
        self.report = LoadReport(source=str(source), kind=kind)
        self.writes: dict[str, torch.Tensor] = {}
        self.expected: set[str] = set()

    # recording
    def put(self, target: str, value: torch.Tensor, key: str) -> None:
        """Write checkpoint `key` (or keys joined with '+') into parameter `target`, shapes permitting."""
        param = self.params.get(target)
        if param is None:  # e.g. a Q-Former layer the model's config does not have
            self.report.unexpected.append(key)
            return
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"{self.report.source}: shape mismatch for checkpoint key {key!r} -> model parameter "
                             f"{target!r}: checkpoint {tuple(value.shape)}, model {tuple(param.shape)}")
        self.writes[target] = value

    def ignore(self, key: str) -> None:
        self.report.ignored.append(key)

    def unknown(self, key: str) -> None:
        self.report.unexpected.append(key)

    def expect(self, *prefixes: str) -> None:
        """Parameters under these prefixes must all come from this file."""
        self.expected |= {n for n in self.params if n.startswith(prefixes)}

    # vision helpers shared by the LAVIS and HF formats
    @property
    def vision_depth(self) -> int:
        return len(self.model.vision.encoder.layers)

    def put_pos_embed(self, value: torch.Tensor, key: str) -> None:
        target = "vision.embeddings.position_embedding"
        want = self.params[target].shape
        if value.ndim == 3 and value.shape[-1] == want[-1] and value.shape[1] != want[1]:
            try:
                value = interpolate_pos_embed(value, want[1] - 1)
            except ValueError as err:
                raise ValueError(f"{self.report.source}: cannot fit {key!r} {tuple(value.shape)} to {target!r} "
                                 f"{tuple(want)}: {err}") from None
        self.put(target, value, key)

    def put_qv_bias(self, layer: int, q: tuple[str, torch.Tensor] | None, v: tuple[str, torch.Tensor] | None):
        """EVA keeps q_bias and v_bias (k has none); the model holds qkv.bias = cat(q, 0, v), or, in some
        transformers versions, q_bias/v_bias themselves."""
        attn = f"vision.encoder.layers.{layer}.self_attn."
        if q is None or v is None:  # half a pair cannot be loaded; the bias stays missing
            self.report.unexpected.extend(k for k, _ in filter(None, (q, v)))
            return
        if attn + "q_bias" in self.params:
            self.put(attn + "q_bias", q[1], q[0])
            self.put(attn + "v_bias", v[1], v[0])
        else:
            self.put(attn + "qkv.bias", torch.cat([q[1], torch.zeros_like(v[1]), v[1]]), f"{q[0]}+{v[0]}")

    def put_qkv_bias(self, layer: int, value: torch.Tensor, key: str) -> None:
        """A combined qkv.bias (saved by transformers versions that hold one) onto either model layout."""
        attn = f"vision.encoder.layers.{layer}.self_attn."
        if attn + "q_bias" not in self.params:
            self.put(attn + "qkv.bias", value, key)
            return
        if value.shape != (3 * self.params[attn + "q_bias"].shape[0],):
            self.put(attn + "q_bias", value, key)  # raises the shape-mismatch error
        q, k, v = value.chunk(3)
        if k.count_nonzero():
            raise ValueError(f"{self.report.source}: {key!r} has a non-zero key bias, which the model "
                             f"(separate q_bias/v_bias) cannot hold")
        self.put(attn + "q_bias", q, key)
        self.put(attn + "v_bias", v, key)

    # checking and applying
    def finish(self, strict: bool) -> LoadReport:
        """Fill in the report, refuse (strict) or copy the values in, log the summary."""
        report = self.report
        report.loaded = sorted(self.writes)
        report.missing = sorted(self.expected - set(self.writes))
        if strict and not report.ok:
            raise ValueError(report.summary() + " (set strict=False to load it anyway)")
        with torch.no_grad():
            for target, value in self.writes.items():
                # copy_ converts to the parameter's dtype: fp16 ViT Linear weights stay fp16, LayerNorms fp32
                self.params[target].data.copy_(value)
        (log.info if report.ok else log.warning)(report.summary())
        return report


def _rename(name: str, table: tuple[tuple[str, str], ...]) -> str | None:
    """Apply the first matching (source prefix -> target prefix) rule; None when no rule matches."""
    for src, dst in table:
        if name.startswith(src):
            return dst + name[len(src):]
    return None


def interpolate_pos_embed(pos_embed: torch.Tensor, num_patches: int) -> torch.Tensor:
    """(1, 1 + P, D) -> (1, 1 + num_patches, D): CLS row kept, the sqrt(P) x sqrt(P) grid of patch
    positions resized bicubically (align_corners=False), as LAVIS does for other image sizes."""
    old = pos_embed.shape[1] - 1
    old_side, new_side = round(old ** 0.5), round(num_patches ** 0.5)
    if old_side * old_side != old or new_side * new_side != num_patches:
        raise ValueError(f"position grids must be square: {old} -> {num_patches} patches")
    if old_side == new_side:
        return pos_embed
    dim = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].float().reshape(1, old_side, old_side, dim).permute(0, 3, 1, 2)  # (1, D, s, s)
    grid = torch.nn.functional.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    patches = grid.permute(0, 2, 3, 1).reshape(1, num_patches, dim).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :1], patches], dim=1)


# -- format 1: LAVIS EVA ViT-g ---------------------------------------------------------------------
_EVA_BLOCK = (  # LAVIS EVA block -> transformers Blip2EncoderLayer
    ("norm1.", "layer_norm1."),
    ("norm2.", "layer_norm2."),
    ("attn.qkv.weight", "self_attn.qkv.weight"),
    ("attn.proj.", "self_attn.projection."),
    ("mlp.fc1.", "mlp.fc1."),
    ("mlp.fc2.", "mlp.fc2."),
)


def _plan_eva(plan: _Plan, state: dict[str, torch.Tensor], prefix: str = "") -> None:
    """EVA ViT keys (optionally under `prefix`, e.g. BLIP-2's `visual_encoder.`) -> model.vision."""
    qv: dict[int, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, value in state.items():
        name = key[len(prefix):]
        block = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
        if name == "cls_token":
            plan.put("vision.embeddings.class_embedding", value, key)
        elif name == "pos_embed":
            plan.put_pos_embed(value, key)
        elif name.startswith("patch_embed.proj."):
            plan.put("vision.embeddings.patch_embedding." + name[len("patch_embed.proj."):], value, key)
        elif block and int(block[1]) >= plan.vision_depth:
            plan.ignore(key)  # MiniGPT-4 uses the first 39 of EVA's 40 blocks
        elif block and block[2] in ("attn.q_bias", "attn.v_bias"):
            qv.setdefault(int(block[1]), {})[block[2][5]] = (key, value)
        elif block and (target := _rename(block[2], _EVA_BLOCK)) is not None:
            plan.put(f"vision.encoder.layers.{block[1]}.{target}", value, key)
        else:
            plan.unknown(key)
    for layer, pair in sorted(qv.items()):
        plan.put_qv_bias(layer, pair.get("q"), pair.get("v"))
    plan.expect("vision.embeddings.", "vision.encoder.")


def load_eva_vit(model: MiniGPT4, uri: str, strict: bool = True) -> LoadReport:
    """LAVIS `eva_vit_g.pth` -> model.vision (all but post_layernorm, which is BLIP-2's ln_vision)."""
    plan = _Plan(model, uri, "eva_vit")
    _plan_eva(plan, read_state_dict(uri))
    return plan.finish(strict)


# -- format 2: LAVIS BLIP-2 ------------------------------------------------------------------------
_QFORMER_LAYER = (  # LAVIS BertLayer -> transformers Blip2QFormerLayer
    ("attention.self.", "attention.attention."),
    ("attention.output.", "attention.output."),
    ("crossattention.self.", "crossattention.attention."),
    ("crossattention.output.", "crossattention.output."),
    ("intermediate_query.", "intermediate_query."),
    ("output_query.", "output_query."),
)
_QFORMER_TEXT_BRANCH = ("intermediate.", "output.")  # the text-side FFN: BLIP-2 pre-training only
_BLIP2_IGNORED = ("t5_proj.", "t5_model.", "Qformer.cls.", "Qformer.bert.embeddings.position_ids",
                  "Qformer.bert.embeddings.word_embeddings.", "Qformer.bert.embeddings.position_embeddings.")


def _plan_blip2(plan: _Plan, state: dict[str, torch.Tensor]) -> None:
    for key, value in state.items():
        layer = re.fullmatch(r"Qformer\.bert\.encoder\.layer\.(\d+)\.(.+)", key)
        if key == "query_tokens":
            plan.put("query_tokens", value, key)
        elif key.startswith("ln_vision."):
            plan.put("vision.post_layernorm." + key[len("ln_vision."):], value, key)
        elif key.startswith("Qformer.bert.embeddings.LayerNorm."):
            plan.put("qformer.layernorm." + key[len("Qformer.bert.embeddings.LayerNorm."):], value, key)
        elif key.startswith(_BLIP2_IGNORED) or (layer and layer[2].startswith(_QFORMER_TEXT_BRANCH)):
            plan.ignore(key)
        elif layer and (target := _rename(layer[2], _QFORMER_LAYER)) is not None:
            plan.put(f"qformer.encoder.layer.{layer[1]}.{target}", value, key)
        elif not key.startswith("visual_encoder."):
            plan.unknown(key)
    plan.expect("query_tokens", "vision.post_layernorm.", "qformer.")
    vit = {k: v for k, v in state.items() if k.startswith("visual_encoder.")}
    if vit:  # a BLIP-2 file that carries its own ViT overrides eva_vit_g.pth, as in the original load order
        _plan_eva(plan, vit, prefix="visual_encoder.")


def _require_qformer(model: MiniGPT4, uri: str) -> None:
    if model.qformer is None:
        raise ValueError(f"{uri}: a BLIP-2 checkpoint loads the Q-Former, but this model variant "
                         f"({model.cfg.name}) has none; leave weights.blip2/hf_blip2 unset")


def load_blip2(model: MiniGPT4, uri: str, strict: bool = True) -> LoadReport:
    """LAVIS `blip2_pretrained_*.pth` -> query_tokens, qformer, vision.post_layernorm (ln_vision)."""
    _require_qformer(model, uri)
    plan = _Plan(model, uri, "blip2")
    _plan_blip2(plan, read_state_dict(uri))
    return plan.finish(strict)


# -- format 4: Hugging Face BLIP-2 -----------------------------------------------------------------
_HF_IGNORED = ("language_projection.", "language_model.")


def _plan_hf_blip2(plan: _Plan, state: dict[str, torch.Tensor]) -> None:
    """HF names already match the model's (vision_model.* -> vision.*), up to the q/v bias layout."""
    qv: dict[int, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, value in state.items():
        vit = re.fullmatch(r"vision_model\.encoder\.layers\.(\d+)\.(.+)", key)
        text_ffn = re.fullmatch(r"qformer\.encoder\.layer\.\d+\.(.+)", key)
        if key == "query_tokens":
            plan.put("query_tokens", value, key)
        elif key == "vision_model.embeddings.position_embedding":
            plan.put_pos_embed(value, key)
        elif vit and int(vit[1]) >= plan.vision_depth:
            plan.ignore(key)
        elif vit and vit[2] in ("self_attn.q_bias", "self_attn.v_bias"):  # checkpoints of transformers 4.x
            qv.setdefault(int(vit[1]), {})[vit[2][len("self_attn.")]] = (key, value)
        elif vit and vit[2] == "self_attn.qkv.bias":
            plan.put_qkv_bias(int(vit[1]), value, key)
        elif key.startswith("vision_model."):
            plan.put("vision." + key[len("vision_model."):], value, key)
        elif key.startswith("qformer.") and key in plan.params:
            plan.put(key, value, key)
        elif key.startswith(_HF_IGNORED) or (text_ffn and text_ffn[1].startswith(_QFORMER_TEXT_BRANCH)):
            plan.ignore(key)  # the text-side FFN exists in HF only with use_qformer_text_input
        else:
            plan.unknown(key)
    for layer, pair in sorted(qv.items()):
        plan.put_qv_bias(layer, pair.get("q"), pair.get("v"))
    plan.expect("query_tokens", "vision.", "qformer.")


def load_hf_blip2(model: MiniGPT4, uri: str, strict: bool = True) -> LoadReport:
    """A Hugging Face Blip2ForConditionalGeneration file or directory -> vision, qformer, query_tokens."""
    _require_qformer(model, uri)
    plan = _Plan(model, uri, "hf_blip2")
    tensors, skipped = _read_tensors(uri, skip=lambda key: key.startswith(_HF_IGNORED))
    plan.report.ignored.extend(skipped)
    _plan_hf_blip2(plan, tensors)
    return plan.finish(strict)


# -- format 3: MiniGPT-4 checkpoint ----------------------------------------------------------------
def _plan_minigpt4(plan: _Plan, state: dict[str, torch.Tensor]) -> None:
    cfg = plan.model.cfg
    lora = cfg.train_llm == "lora"
    # parts a from-scratch config trained (the tiny demo model) are exported under our own names; they
    # load whether or not this config trains them further (the demo's stage 2 keeps stage 1's encoder)
    own = ["vision.", "qformer.", "query_tokens", "llm."]
    present = set()
    for key, value in state.items():
        if key in ("llama_proj.weight", "llama_proj.bias"):
            plan.put(key, value, key)
        elif lora and key.startswith("llama_model.") and ".lora_" in key:
            plan.put(_lora_target(plan, key), value, key)
        elif key in plan.params and any(key.startswith(p) for p in own):
            plan.put(key, value, key)
            present.add(next(p for p in own if key.startswith(p)))
        else:
            plan.unknown(key)
    plan.expect("llama_proj.")
    for prefix in present:  # a file holding part of a trained module must hold all of it
        plan.expect(prefix)
    if any(n.startswith("llm.") for n in plan.writes):  # a file with adapters must hold all of them
        plan.expected |= {n for n in plan.params if n.startswith("llm.") and ".lora_" in n}


def _lora_target(plan: _Plan, key: str) -> str:
    """`llama_model.<peft name>` -> `llm.<peft name>`; peft names carry the adapter (`lora_A.default.`),
    which checkpoints saved from a merged state dict may lack."""
    target = "llm." + key[len("llama_model."):]
    if target not in plan.params:
        target = re.sub(r"\.(lora_[AB])\.", r".\1.default.", target)
    return target


def load_minigpt4(model: MiniGPT4, uri: str, strict: bool = True) -> LoadReport:
    """MiniGPT-4 stage-1/2 checkpoint (its "model" dict) -> llama_proj, and LoRA adapters in LoRA runs."""
    plan = _Plan(model, uri, "minigpt4")
    _plan_minigpt4(plan, read_state_dict(uri))
    return plan.finish(strict)


# -- format 5: the LLM -----------------------------------------------------------------------------
def _quantization_config(cfg: ModelConfig):
    """BitsAndBytesConfig for cfg.quantize_llm (None for 'none' and for our 'int8wo', applied after loading);
    transformers 5 takes no load_in_8bit kwarg."""
    if cfg.quantize_llm in ("none", "int8wo"):
        return None
    from transformers import BitsAndBytesConfig  # needs bitsandbytes only when actually used

    if cfg.quantize_llm == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=DTYPES[cfg.llm_dtype], bnb_4bit_use_double_quant=True)


def _load_llm(uri: str, cfg: ModelConfig, device=None):
    """(LlamaForCausalLM, LoadReport, local directory)."""
    from transformers import LlamaForCausalLM

    path = resolve(uri)
    int8wo = cfg.quantize_llm == "int8wo"
    kwargs = dict(dtype=DTYPES[cfg.llm_dtype], attn_implementation=cfg.attn_implementation,
                  quantization_config=_quantization_config(cfg))
    if device is not None and not int8wo:  # bitsandbytes weights must be placed at load time, not moved afterwards
        kwargs["device_map"] = {"": str(device)}
    # transformers itself drops the rotary `inv_freq` buffers that old LLaMA shards carry
    llm, info = LlamaForCausalLM.from_pretrained(str(path), output_loading_info=True, **kwargs)
    missing = set(info.get("missing_keys", ()))
    report = LoadReport(source=str(uri), kind="llm", unexpected=sorted(info.get("unexpected_keys", ())),
                        missing=sorted("llm." + k for k in missing),
                        loaded=["llm." + n for n, _ in llm.named_parameters() if n not in missing])
    if int8wo:  # loaded on the CPU, quantized onto the device layer by layer: never all of it there in llm_dtype
        quantize_llm_int8(llm, device)
    return llm, report, path


def load_llm(uri: str, cfg: ModelConfig, device=None, strict: bool = True):
    """A Hugging Face LLaMA directory (local or s3:// prefix) -> LlamaForCausalLM in cfg's dtype /
    quantization / attention kernel. strict: weights missing from the directory are an error (transformers
    would only warn and leave them randomly initialised)."""
    llm, report, _ = _load_llm(uri, cfg, device)
    _check_llm(report, strict)
    return llm


def _check_llm(report: LoadReport, strict: bool) -> None:
    if strict and not report.ok:
        raise ValueError(report.summary() + " (set strict=False to load it anyway)")
    (log.info if report.ok else log.warning)(report.summary())


# -- everything ------------------------------------------------------------------------------------
_PART_LOADERS = (  # the original load order: a later file overrides an earlier one
    ("eva_vit", load_eva_vit),
    ("blip2", load_blip2),
    ("hf_blip2", load_hf_blip2),
    ("minigpt4", load_minigpt4),
)


def load_pretrained(cfg: ModelConfig, weights: WeightsConfig, device="cpu"):
    """Build MiniGPT-4 from released weights -> (model, tokenizer, [LoadReport per file]).

    Parts without a file keep their random initialisation (the LLM is then built from cfg.llm).
    """
    from minigpt4.tokenizer import load_tokenizer

    reports: list[LoadReport] = []
    llm, llm_dir = None, None
    if weights.llm:
        llm, report, llm_dir = _load_llm(weights.llm, cfg, device)
        _check_llm(report, weights.strict)
        reports.append(report)
    model = build_model(cfg, device=device, llm=llm)
    for name, loader in _PART_LOADERS:
        uris = getattr(weights, name)
        for uri in [uris] if isinstance(uris, str) else uris or []:
            reports.append(loader(model, uri, strict=weights.strict))
    model._cast_vision(DTYPES[cfg.vision_dtype])
    tokenizer = load_tokenizer(resolve(weights.tokenizer) if weights.tokenizer else llm_dir)
    return model, tokenizer, reports
