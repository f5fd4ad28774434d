"""Attention kernels behind one call: flash-attn 3/2 when importable, PyTorch SDPA otherwise.

Masked attention (block-causal and teacher-forcing training forwards) is given
as a flex-attention style `mask_mod(b, h, q_idx, kv_idx) -> bool`: on CUDA it
runs through `flex_attention` without materialising the mask, elsewhere the
same function builds a dense boolean mask for SDPA. All tensors are
[batch, tokens, heads, head_dim].
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F

try:  # flash-attn 3 (Hopper): optional extra `gpu`
    from flash_attn_interface import flash_attn_func as _flash3
except ImportError:
    _flash3 = None
try:  # flash-attn 2: optional extra `gpu`
    from flash_attn import flash_attn_func as _flash2
except ImportError:
    _flash2 = None

from torch.nn.attention.flex_attention import create_block_mask, flex_attention

MaskMod = Callable[[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor], torch.Tensor]
BACKENDS = ("auto", "flash", "sdpa", "flex", "math")


def flash_available() -> bool:
    return _flash3 is not None or _flash2 is not None


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if _flash3 is not None:
        out = _flash3(q, k, v)
        return out[0] if isinstance(out, tuple) else out
    return _flash2(q, k, v)


def _math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Explicit softmax(q k^T / sqrt(d)) v in the input dtype: the float64 reference kernel."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v)


def dense_mask(mask_mod: MaskMod, q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    q_idx = torch.arange(q_len, device=device)[:, None]
    kv_idx = torch.arange(kv_len, device=device)[None, :]
    return mask_mod(None, None, q_idx, kv_idx)


@lru_cache(maxsize=1)
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_mod: MaskMod) -> torch.Tensor:
    block_mask = create_block_mask(mask_mod, None, None, q.shape[1], k.shape[1], device=q.device)
    kernel = _compiled_flex() if q.is_cuda else flex_attention
    out = kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask)
    return out.transpose(1, 2)


def resolve_backend(backend: str, q: torch.Tensor, masked: bool) -> str:
    """Pick the kernel that will actually run for these inputs."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    half = q.dtype in (torch.float16, torch.bfloat16)
    if backend == "flash":
        if not flash_available():
            raise RuntimeError("attention backend 'flash' needs flash-attn: pip install -e '.[gpu]' "
                               "(CUDA only), or use runtime.attention_backend=sdpa")
        if not (q.is_cuda and half):
            raise RuntimeError("flash-attn runs only on CUDA with float16/bfloat16 tensors")
    if backend == "auto":
        if masked:
            return "flex" if q.is_cuda else "sdpa"
        return "flash" if flash_available() and q.is_cuda and half else "sdpa"
    if masked and backend == "flash":
        return "flex"  # flash-attn has no arbitrary masks; flex keeps the mask sparse
    return backend


def attention_kernel(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The kernel an unmasked attention (every streaming call) runs for `backend` on this device and dtype, by name:
    flash-attn-3, flash-attn-2, sdpa (PyTorch picks flash, cuDNN or memory-efficient inside), flex or math."""
    kind = resolve_backend(backend, torch.empty(0, device=device, dtype=dtype), masked=False)
    if kind == "flash":
        return "flash-attn-3" if _flash3 is not None else "flash-attn-2"
    return kind


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
              mask_mod: MaskMod | None = None, backend: str = "auto") -> torch.Tensor:
    """Scaled dot-product attention of q [B, Lq, H, D] over k, v [B, Lk, H, D]."""
    kind = resolve_backend(backend, q, mask_mod is not None)
    if kind == "flash":
        return _flash(q, k, v)
    if kind == "flex":
        return _flex(q, k, v, mask_mod) if mask_mod is not None else _flex(q, k, v, _attend_all)
    mask = dense_mask(mask_mod, q.shape[1], k.shape[1], q.device) if mask_mod is not None else None
    if kind == "math":
        return _math(q, k, v, mask)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def _attend_all(b, h, q_idx, kv_idx):
    return q_idx >= 0


def block_causal_mask(tokens_per_block: int) -> MaskMod:
    """Each token sees every token of its own frame block and of earlier blocks."""
    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx // tokens_per_block <= q_idx // tokens_per_block
    return mask_mod


def teacher_forcing_mask(num_tokens: int, tokens_per_block: int) -> MaskMod:
    """Sequence [clean | noisy], `num_tokens` each: clean is block-causal; a noisy block
    sees the clean blocks before it and itself (CausVid / Self Forcing teacher forcing)."""
    def mask_mod(b, h, q_idx, kv_idx):
        q_noisy, kv_noisy = q_idx >= num_tokens, kv_idx >= num_tokens
        q_blk = (q_idx % num_tokens) // tokens_per_block
        kv_blk = (kv_idx % num_tokens) // tokens_per_block
        clean_ctx = ~kv_noisy & ((kv_blk < q_blk) | (~q_noisy & (kv_blk == q_blk)))
        own_noisy = q_noisy & kv_noisy & (kv_blk == q_blk)
        return clean_ctx | own_noisy
    return mask_mod
