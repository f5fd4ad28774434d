"""Attention kernels behind one call: flash-attn 3 on Hopper, flash-attn 2 elsewhere when importable, PyTorch SDPA
otherwise.

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

from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

MaskMod = Callable[[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor], torch.Tensor]
BACKENDS = ("auto", "flash", "sdpa", "flex", "math")


def flash_available() -> bool:
    return _flash3 is not None or _flash2 is not None


def flash_kernel(capability: tuple[int, int], fa3: bool, fa2: bool) -> str | None:
    """The flash-attn that runs on a GPU of this compute capability, given which packages import; None when neither
    does. FA3's kernels are built for Hopper (sm90) alone, FA2's for Ampere (sm80) and newer."""
    if fa3 and capability == (9, 0):
        return "flash-attn-3"
    if fa2 and capability >= (8, 0):
        return "flash-attn-2"
    return None


def _device_flash_kernel(device: torch.device) -> str | None:
    return flash_kernel(torch.cuda.get_device_capability(device), _flash3 is not None, _flash2 is not None)


def _no_flash_error(device: torch.device) -> RuntimeError:
    major, minor = torch.cuda.get_device_capability(device)
    if _flash2 is None:
        return RuntimeError(f"flash-attn 3 runs only on Hopper (sm90) GPUs and {device} is sm{major}{minor}: install "
                            "flash-attn 2 (pip install flash-attn) for it, or use runtime.attention_backend=sdpa")
    return RuntimeError(f"flash-attn 2 needs an Ampere or newer GPU (sm80+) and {device} is sm{major}{minor}: "
                        "use runtime.attention_backend=sdpa")


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if _device_flash_kernel(q.device) == "flash-attn-3":
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


@lru_cache(maxsize=32)
def block_mask(mask_mod: MaskMod, q_len: int, kv_len: int, device: torch.device) -> BlockMask:
    """The flex-attention BlockMask of `mask_mod` for these lengths, built once: a training forward asks for the same
    one in every layer. Keyed on the mask_mod object, which the mask builders below return once per argument set."""
    return create_block_mask(mask_mod, None, None, q_len, kv_len, device=device)


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_mod: MaskMod) -> torch.Tensor:
    mask = block_mask(mask_mod, q.shape[1], k.shape[1], q.device)
    kernel = _compiled_flex() if q.is_cuda else flex_attention
    out = kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask)
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
        if _device_flash_kernel(q.device) is None:
            raise _no_flash_error(q.device)
    if backend == "auto":
        if masked:
            return "flex" if q.is_cuda else "sdpa"
        return "flash" if q.is_cuda and half and _device_flash_kernel(q.device) is not None else "sdpa"
    if masked and backend == "flash":
        return "flex"  # flash-attn has no arbitrary masks; flex keeps the mask sparse
    return backend


def attention_kernel(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The kernel an unmasked attention (every streaming call) runs for `backend` on this device and dtype, by name:
    flash-attn-3, flash-attn-2, sdpa (PyTorch picks flash, cuDNN or memory-efficient inside), flex or math."""
    kind = resolve_backend(backend, torch.empty(0, device=device, dtype=dtype), masked=False)
    if kind == "flash":
        return _device_flash_kernel(device)
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


@lru_cache(maxsize=32)
def block_causal_mask(tokens_per_block: int) -> MaskMod:
    """Each token sees every token of its own frame block and of earlier blocks. One function per argument, so the
    BlockMask cache (`block_mask`) finds it again."""
    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx // tokens_per_block <= q_idx // tokens_per_block
    return mask_mod


@lru_cache(maxsize=32)
def teacher_forcing_mask(num_tokens: int, tokens_per_block: int) -> MaskMod:
    """Sequence [clean | noisy], `num_tokens` each: clean is block-causal; a noisy block
    sees the clean blocks before it and itself (CausVid / Self Forcing teacher forcing). One function per argument
    set, so the BlockMask cache (`block_mask`) finds it again."""
    def mask_mod(b, h, q_idx, kv_idx):
        q_noisy, kv_noisy = q_idx >= num_tokens, kv_idx >= num_tokens
        q_blk = (q_idx % num_tokens) // tokens_per_block
        kv_blk = (kv_idx % num_tokens) // tokens_per_block
        clean_ctx = ~kv_noisy & ((kv_blk < q_blk) | (~q_noisy & (kv_blk == q_blk)))
        own_noisy = q_noisy & kv_noisy & (kv_blk == q_blk)
        return clean_ctx | own_noisy
    return mask_mod
