"""Attention backends agree; masked paths match their dense definition."""

from __future__ import annotations

import pytest
import torch

from core.model.attention import (
    attention,
    block_causal_mask,
    block_mask,
    dense_mask,
    flash_available,
    flash_kernel,
    resolve_backend,
    teacher_forcing_mask,
)


def _qkv(dtype, lq=24, lk=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, n, 3, 8, generator=g, dtype=dtype) for n in (lq, lk, lk)]


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("masked", [False, True])
def test_backends_agree(dtype, atol, masked):
    q, k, v = _qkv(dtype)
    mask_mod = block_causal_mask(8) if masked else None
    ref = attention(q, k, v, mask_mod=mask_mod, backend="math")
    for backend in ("sdpa", "flex", "auto"):
        out = attention(q, k, v, mask_mod=mask_mod, backend=backend)
        assert (out - ref).abs().max() < atol, backend


def test_block_causal_mask_is_block_lower_triangular():
    m = dense_mask(block_causal_mask(2), 6, 6, torch.device("cpu"))
    expected = torch.tensor([[1, 1, 0, 0, 0, 0]] * 2 + [[1, 1, 1, 1, 0, 0]] * 2 + [[1] * 6] * 2, dtype=torch.bool)
    assert torch.equal(m, expected)


def test_teacher_forcing_mask():
    n, tpb = 4, 2  # two blocks of two tokens; sequence [clean0 clean1 | noisy0 noisy1]
    m = dense_mask(teacher_forcing_mask(n, tpb), 2 * n, 2 * n, torch.device("cpu")).int()
    expected = torch.tensor([
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],   # noisy block 0: only itself
        [0, 0, 0, 0, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 0, 1, 1],   # noisy block 1: clean block 0 and itself
        [1, 1, 0, 0, 0, 0, 1, 1],
    ])
    assert torch.equal(m, expected)


def test_flash_is_optional_and_guarded():
    q, _, _ = _qkv(torch.float32)
    assert resolve_backend("auto", q, masked=False) == "sdpa"  # CPU never picks flash
    if not flash_available():
        with pytest.raises(RuntimeError, match=r"pip install -e '\.\[gpu\]'"):
            resolve_backend("flash", q, masked=False)
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("xformers", q, masked=False)


@pytest.mark.parametrize("capability, fa3, fa2, expected", [
    ((9, 0), True, True, "flash-attn-3"),  # Hopper: FA3 first
    ((9, 0), True, False, "flash-attn-3"),
    ((9, 0), False, True, "flash-attn-2"),
    ((9, 0), False, False, None),
    ((8, 0), True, True, "flash-attn-2"),  # Ampere: FA3's kernels are Hopper-only
    ((8, 0), True, False, None),
    ((8, 0), False, True, "flash-attn-2"),
    ((8, 9), True, True, "flash-attn-2"),  # Ada
    ((8, 9), True, False, None),
    ((10, 0), True, True, "flash-attn-2"),  # Blackwell
    ((10, 0), True, False, None),
    ((10, 0), False, False, None),
    ((7, 5), False, True, None),  # Turing: below FA2's sm80
])
def test_flash_attn_3_runs_only_on_hopper(capability, fa3, fa2, expected):
    assert flash_kernel(capability, fa3, fa2) == expected


@pytest.mark.parametrize("make_mask, q_len, kv_len", [
    (lambda: block_causal_mask(8), 24, 24),
    (lambda: teacher_forcing_mask(12, 4), 24, 24),
], ids=["block_causal", "teacher_forcing"])
def test_masked_flex_builds_each_block_mask_once_and_matches_sdpa(make_mask, q_len, kv_len):
    q, k, v = _qkv(torch.float32, q_len, kv_len)
    ref = attention(q, k, v, mask_mod=make_mask(), backend="sdpa")
    block_mask.cache_clear()
    for _ in range(3):  # as a training forward: the mask rebuilt by its builder for every layer
        out = attention(q, k, v, mask_mod=make_mask(), backend="flex")
        assert (out - ref).abs().max() < 1e-5
    assert block_mask.cache_info().misses == 1 and block_mask.cache_info().hits == 2
    attention(*_qkv(torch.float32, 2 * q_len, 2 * kv_len), mask_mod=make_mask(), backend="flex")
    assert block_mask.cache_info().misses == 2  # another length is another BlockMask


@pytest.mark.skipif(not (torch.cuda.is_available() and flash_available()), reason="needs CUDA and flash-attn")
def test_flash_matches_sdpa_on_gpu():
    q, k, v = (t.cuda().bfloat16() for t in _qkv(torch.float32))
    assert (attention(q, k, v, backend="flash").float() - attention(q, k, v, backend="sdpa").float()).abs().max() < 2e-2
