"""Weight-only int8 for the LLM (`quantize_llm='int8wo'`): int8 weights, dequantized inside the matmul.

Why: at batch 1 the decode step reads every LLM weight once per token, so its speed is the weights'
bytes over memory bandwidth, and int8 weights halve bf16's bytes. bitsandbytes' LLM.int8 saves the
memory but not the time (7.6 tok/s for a 7B on an H100: it splits outlier features out of every
activation matrix); here only the weights are quantized, the activations stay in the LLM's dtype.

Quantization is symmetric per output channel (gpt-fast's and torchao's int8 weight-only scheme):
scale = max|W[n, :]| / 127, W_q = round(W / scale) in [-127, 127], y = x @ (W_q * scale).T.
`Int8Linear` computes y on one of three paths, all plain aten ops (the module traces whole under
torch.compile, so the engine compiles and CUDA-graphs its decode step as it does for bf16):
- decode-sized x (<= DECODE_MAX_ROWS tokens) under torch.compile on CUDA: a broadcast multiply and a
  sum over K, which Inductor emits as one reduction kernel reading the int8 weight once (a matmul over
  `W_q.to(bf16)` would first write a dequantized copy for cuBLAS: 2.5x the bytes of bf16);
- decode-sized x otherwise, where the device has it: PyTorch's weight-only kernel
  `aten._weight_int8pack_mm` (int8 weight read directly, fp32 accumulation, scale on the result);
- anything else (prefill, training): the weight dequantized to x's dtype, then F.linear (tensor cores).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

DECODE_MAX_ROWS = 16
"""Largest x (tokens in the call) for the two decode paths: neither reuses a weight tile across rows,
which suits a decode step and not a prefill of hundreds of tokens."""
FUSED_GEMV_DEVICES = frozenset({"cuda"})
"""Devices whose compiled decode takes the fused multiply-sum (where a device has a good
`_weight_int8pack_mm`, as the CPU does, Inductor calls that instead)."""
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KERNEL_K_MULTIPLE = 8
"""In-features must be a multiple of this for `_weight_int8pack_mm`: torch 2.13's CPU kernel crashes on
bf16 inputs otherwise."""


def _kernel_devices() -> frozenset[str]:
    """Device types with a `_weight_int8pack_mm` kernel in this torch build (CPU; CUDA in builds since
    late 2025); empty where the op does not exist."""
    if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        return frozenset()
    return frozenset(d.lower() for d in ("CPU", "CUDA")
                     if torch._C._dispatch_has_kernel_for_dispatch_key("aten::_weight_int8pack_mm", d))


KERNEL_DEVICES = _kernel_devices()
"""Computed once: a constant under torch.compile (a dispatcher query inside forward would break the graph)."""


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> (int8 (N, K), fp32 scale (N,)), symmetric per output row, round to nearest.

    Scales stay fp32 (N values, nothing next to N x K): a small fp16 one would be subnormal."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)  # an all-zero row: no 0/0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, K) W_q * scale, computed in fp32 and rounded once to `dtype`."""
    return (weight.float() * scale[:, None]).to(dtype)


def fused_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(T, K) x, int8 (N, K) W_q -> (T, N) x @ (W_q * scale).T, accumulated in fp32. Written for Inductor,
    which fuses the casts, the product and the sum into one kernel; run eagerly it would materialize
    (T, N, K), so it is only taken under torch.compile."""
    return ((x.float()[:, None, :] * weight.float()[None]).sum(-1) * scale.float()).to(x.dtype)


class _DequantMatmul(torch.autograd.Function):
    """x @ (W_q * scale).T for training through the frozen LLM (the gradient goes to x only): the
    backward dequantizes W_q again, where plain autograd would keep every layer's dequantized weight,
    more than bf16's bytes in all, alive from the forward to the backward pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight, scale)
        return F.linear(x, dequantize(weight, scale, x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, scale = ctx.saved_tensors
        return grad @ dequantize(weight, scale, grad.dtype), None, None


class Int8Linear(nn.Module):
    """A frozen nn.Linear with int8 weights and per-output-channel scales: y = x @ (W_q * scale).T + b.

    `weight` (int8), `scale` and `bias` are buffers, not parameters: nothing here trains, optimizers
    never see them, and a MiniGPT-4 checkpoint (llama_proj only) is the same with or without them.
    Gradients flow to x, so llama_proj trains through an int8wo LLM.
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if weight.dtype != torch.int8 or weight.dim() != 2 or scale.shape != weight.shape[:1]:
            raise ValueError(f"expected an int8 (N, K) weight and an (N,) scale, got {weight.dtype} "
                             f"{tuple(weight.shape)} and {tuple(scale.shape)}")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, device: torch.device | str | None = None) -> "Int8Linear":
        """Quantize `linear` (its weight moved to `device` first, when given)."""
        weight = linear.weight.detach().to(device)
        bias = None if linear.bias is None else linear.bias.detach().to(device)
        return cls(*quantize_weight(weight), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (T, K)
        if torch.is_grad_enabled() and x.requires_grad:  # neither decode path has a derivative
            out = _DequantMatmul.apply(x, self.weight, self.scale)
        elif self._fused_gemv(rows):
            out = fused_gemv(rows, self.weight, self.scale).reshape(*x.shape[:-1], self.out_features)
        elif self._kernel(rows):
            # the CPU kernel takes the scales in x's dtype (CUDA's converts them to fp32 itself)
            out = torch.ops.aten._weight_int8pack_mm(rows.contiguous(), self.weight, self.scale.to(x.dtype))
            out = out.reshape(*x.shape[:-1], self.out_features)
        else:
            # scale applied to the weight, not to x @ W_q.T: in fp16 the unscaled product can overflow
            out = F.linear(x, dequantize(self.weight, self.scale, x.dtype))
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def _fused_gemv(self, rows: torch.Tensor) -> bool:
        return (torch.compiler.is_compiling() and rows.device.type in FUSED_GEMV_DEVICES
                and rows.shape[0] <= DECODE_MAX_ROWS)

    def _kernel(self, rows: torch.Tensor) -> bool:
        return (rows.device.type in KERNEL_DEVICES and rows.dtype in KERNEL_DTYPES
                and self.in_features % KERNEL_K_MULTIPLE == 0 and rows.shape[0] <= DECODE_MAX_ROWS)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_llm_int8(llm: nn.Module, device: torch.device | str | None = None) -> int:
    """Replace every plain nn.Linear in the LLM's decoder layers by an Int8Linear; returns how many.

    The embeddings and lm_head keep their dtype (the output projection is the layer most sensitive to
    rounding, and 2% of a 7B's bytes). Idempotent: Int8Linear layers are left alone. device: where the
    quantized weights go, layer by layer, and then the rest of the LLM: quantizing a CPU-loaded 7B onto
    the GPU this way never holds more than one layer's bf16 weights there.
    """
    replaced = 0
    for block in llm.get_decoder().layers:
        for name, child in list(block.named_modules()):
            if type(child) is nn.Linear:  # exactly: bitsandbytes' layers subclass nn.Linear
                parent, _, attr = name.rpartition(".")
                setattr(block.get_submodule(parent), attr, Int8Linear.from_linear(child, device))
                replaced += 1
    if device is not None:
        llm.to(device)
    return replaced
