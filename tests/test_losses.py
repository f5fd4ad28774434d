"""The per-video Re-DMD weighting and the reward-weight options (parity with the reference: tests/test_golden.py)."""

from __future__ import annotations

import pytest
import torch

from core.algo.losses import (
    dmd_gradient,
    dmd_loss,
    redmd_loss,
    redmd_loss_first_video,
    reward_weights,
)
from helpers import assert_close


def _batch(seed=0, b=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, 4, 2, 2, dtype=torch.float64, generator=g, requires_grad=True)
    preds = [x.detach() + 0.5 * torch.randn(x.shape, dtype=torch.float64, generator=g) for _ in range(3)]
    return x, dmd_gradient(x.detach(), *preds)


def test_redmd_weights_each_video_and_matches_the_reference_at_batch_one():
    x, grad = _batch()
    rewards = torch.tensor([-0.7, 0.0, 1.3], dtype=torch.float64)
    per_video = torch.stack([redmd_loss(x[i:i + 1], grad[i:i + 1], rewards[i:i + 1]) for i in range(3)])
    assert_close(redmd_loss(x, grad, rewards), per_video.mean(), 1e-15, "batch = mean of per-video losses")
    for i in range(3):  # batch of one: our per-video weighting is the reference's
        assert_close(per_video[i], redmd_loss_first_video(x[i:i + 1], grad[i:i + 1], rewards[i:i + 1])[0], 1e-15, "b=1")
    assert_close(redmd_loss(x, grad, rewards, beta=0.0), dmd_loss(x, grad), 1e-15, "beta 0 is vanilla DMD")
    # the gradient w.r.t. each video's x is its DMD direction scaled by its weight
    redmd_loss(x, grad, rewards).backward()
    w = reward_weights(rewards, 2.0)
    expected = (w.view(-1, 1, 1, 1, 1) * grad) / grad[0].numel() / 3
    assert_close(x.grad, expected, 1e-15, "d loss / d x")


def test_reward_weight_options_and_errors():
    r = torch.tensor([-3.0, 0.0, 3.0], dtype=torch.float64)
    assert torch.allclose(reward_weights(r, 2.0), torch.exp(2 * r))
    assert reward_weights(r, 2.0, clip=10.0).max() == 10.0 and reward_weights(r, 2.0, clip=10.0).min() == 0.1
    assert reward_weights(r, 2.0, normalize=True).mean().item() == pytest.approx(1.0)
    x, grad = _batch()
    with pytest.raises(ValueError, match="one reward per video"):
        redmd_loss(x, grad, torch.zeros(2))
