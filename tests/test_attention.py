"""Attention backends agree; masked paths match their dense definition."""

from __future__ import annotations

import pytest
import torch

from core.model.attention import attention, block_causal_mask, dense_mask, flash_available, resolve_backend, teacher_forcing_mask


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


@pytest.mark.skipif(not (torch.cuda.is_available() and flash_available()), reason="needs CUDA and flash-attn")
def test_flash_matches_sdpa_on_gpu():
    q, k, v = (t.cuda().bfloat16() for t in _qkv(torch.float32))
    assert (attention(q, k, v, backend="flash").float() - attention(q, k, v, backend="sdpa").float()).abs().max() < 2e-2
