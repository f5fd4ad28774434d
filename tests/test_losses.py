"""DMD, Re-DMD and critic losses: golden parity with the reference, and the per-video Re-DMD weighting."""

from __future__ import annotations

import pytest
import torch

from core.losses import (critic_loss, dmd_gradient, dmd_loss, noisy_latent, redmd_loss, redmd_loss_first_video,
                         reward_weights, training_timesteps)
from core.scheduler import FlowMatchScheduler
from helpers import assert_close


def test_golden_dmd_redmd_and_critic(golden):
    case, t = golden.case("dmd_losses"), golden.tensors("dmd_losses")
    cfg, atol = case["config"], golden.atol("dmd_losses")
    sched = FlowMatchScheduler(shift=cfg["timestep_shift"], num_train_timesteps=cfg["num_train_timestep"])
    x, frames = t["in.x"], t["in.x"].shape[1]
    bounds = dict(min_t=cfg["min_step"], max_t=cfg["max_step"])

    timestep = training_timesteps(sched, t["in.t_raw"], frames, **bounds)
    assert torch.equal(timestep, t["out.dmd_timestep"])
    assert_close(noisy_latent(sched, x, t["in.noise"], timestep), t["out.dmd_noisy_latent"], atol, "DMD noisy latent")
    grad = dmd_gradient(x, t["in.pred_fake"], t["in.pred_real_cond"], t["in.pred_real_uncond"], float(t["in.guidance_scale"]))
    assert_close(grad, t["out.dmd_grad"], atol, "DMD gradient")
    assert_close(grad.abs().mean(), t["out.dmd_log_gradient_norm"], atol, "gradient norm")
    assert_close(dmd_loss(x, grad), t["out.dmd_loss"], atol, "DMD loss")

    beta, mq = float(t["in.beta"]), t["in.reward_mq"]
    assert_close(redmd_loss_first_video(x, grad, mq[:1], beta), t["out.redmd_loss"], atol, "Re-DMD loss")
    assert_close(redmd_loss_first_video(x, grad, mq, beta), t["out.redmd_loss_mq_vector"], atol, "Re-DMD per reward")

    critic_t = training_timesteps(sched, t["in.critic_t_raw"], frames, **bounds)
    assert torch.equal(critic_t, t["out.critic_timestep"])
    assert_close(noisy_latent(sched, x, t["in.critic_noise"], critic_t), t["out.critic_noisy_latent"], atol, "critic x_t")
    loss = critic_loss(sched, x, t["in.critic_noise"], critic_t, t["in.critic_pred_fake"])
    assert_close(loss, t["out.critic_loss"], atol, "critic loss")


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
