"""Distribution-matching losses (docs/reference.md): DMD, Re-DMD and the critic's flow loss.

DMD pushes the generator's clean sample x along the difference between the critic's
("fake") and the teacher's ("real", with CFG) x0 predictions at a random noise level,
normalised per sample by mean |x - real|. Re-DMD weights each video's DMD loss by
exp(beta * r), r the z-normalised motion-quality reward, so high-reward samples pull
harder; beta = 0 is vanilla DMD. The score models are called by the learner; these
functions only hold the math, in float64 where the reference uses float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from core.algo.scheduler import FlowMatchScheduler


def training_timesteps(sched: FlowMatchScheduler, t_raw: torch.Tensor, num_frames: int,
                       min_t: int = 20, max_t: int = 980) -> torch.Tensor:
    """Per-frame float32 timesteps [B, F] from integer draws [B, 1] in [0, 1000): shifted, clamped."""
    return sched.shift_training_timesteps(t_raw.repeat(1, num_frames), min_t, max_t)


def noisy_latent(sched: FlowMatchScheduler, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t for [B, F, C, H, W] latents at per-frame timesteps t [B, F]."""
    b, f = x.shape[:2]
    return sched.add_noise(x.flatten(0, 1), noise.flatten(0, 1), t.flatten()).unflatten(0, (b, f))


def dmd_gradient(x: torch.Tensor, pred_fake: torch.Tensor, pred_real_cond: torch.Tensor,
                 pred_real_uncond: torch.Tensor, guidance_scale: float = 3.0) -> torch.Tensor:
    """(fake - real_cfg) / mean_{F,C,H,W} |x - real_cfg| per sample, NaN/inf zeroed; no grad flows through it."""
    real = pred_real_cond + guidance_scale * (pred_real_cond - pred_real_uncond)
    grad = pred_fake - real
    norm = (x - real).abs().mean(dim=tuple(range(1, x.dim())), keepdim=True)
    return torch.nan_to_num(grad / norm).detach()


def _per_sample_mse(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    x64 = x.double()
    target = (x64 - grad.double()).detach()
    return F.mse_loss(x64, target, reduction="none").flatten(1).mean(dim=1)


def dmd_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5 * mean((x - (x - grad))^2) in float64: its gradient w.r.t. x is grad / numel."""
    return 0.5 * _per_sample_mse(x, grad).mean()


def reward_weights(rewards: torch.Tensor, beta: float, clip: float | None = None,
                   normalize: bool = False) -> torch.Tensor:
    """exp(beta * r) per video. Optional (off by default, not in the paper): clip the weight to
    [1/clip, clip], and divide by the batch mean so the loss scale does not drift with rewards."""
    w = torch.exp(beta * rewards.double())
    if clip is not None:
        w = w.clamp(1.0 / clip, clip)
    if normalize:
        w = w / w.mean()
    return w


def weighted_dmd_loss(x: torch.Tensor, grad: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """0.5 * mean_b(w_b * mse_b): the DMD loss with one weight per video (float64)."""
    if weights.shape != (x.shape[0],):
        raise ValueError(f"need one reward weight per video: weights {tuple(weights.shape)} for a batch of {x.shape[0]}")
    return 0.5 * (weights.double().to(x.device) * _per_sample_mse(x, grad)).mean()


def redmd_loss(x: torch.Tensor, grad: torch.Tensor, rewards: torch.Tensor, beta: float = 2.0,
               clip: float | None = None, normalize: bool = False) -> torch.Tensor:
    """Re-DMD: 0.5 * mean_b(exp(beta * r_b) * mse_b), one reward per video.

    The reference scores only the first video of its batch of one and scales the batch-mean
    loss by that one weight; at batch 1 the two agree (see `redmd_loss_first_video`).
    """
    if rewards.shape != (x.shape[0],):
        raise ValueError(f"need one reward per video: rewards {tuple(rewards.shape)} for a batch of {x.shape[0]}")
    return weighted_dmd_loss(x, grad, reward_weights(rewards, beta, clip, normalize))


def redmd_loss_first_video(x: torch.Tensor, grad: torch.Tensor, reward: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """The reference's Re-DMD: exp(beta * reward) (one value, or one loss per value) times the batch-mean loss."""
    return torch.exp(beta * reward.double()) * dmd_loss(x, grad)


def critic_loss(sched: FlowMatchScheduler, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                pred_x0: torch.Tensor) -> torch.Tensor:
    """Flow-matching loss of the critic on the detached generator sample x: mean((v_pred - (noise - x))^2),
    with v_pred = (x_t - pred_x0) / sigma from the critic's x0 prediction at x_t = noisy_latent(x, noise, t)."""
    b, f = x.shape[:2]
    xt = noisy_latent(sched, x, noise, t)
    flow = sched.flow_from_x0(pred_x0.flatten(0, 1), xt.flatten(0, 1), t.flatten()).unflatten(0, (b, f))
    return torch.mean((flow - (noise - x)) ** 2)
