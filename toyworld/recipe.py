"""What the toy-world training recipes share: world clips as codec latents, the flow-matching loss the Wan
models are trained with, and the recipes' optimiser (teacher pretraining, ODE init)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from core.algo.scheduler import FlowMatchScheduler
from core.codecs.video import Codec, from_uint8_frames
from toyworld.world import Scene, render


def world_latents(codec: Codec, scenes: list[Scene], frames: int, height: int, width: int) -> torch.Tensor:
    """Codec latents [B, F, C, h, w] of the scenes' clips."""
    videos = torch.cat([from_uint8_frames(render(s, frames, height, width)) for s in scenes])
    return codec.encode(videos).transpose(1, 2)


def flow_matching_loss(model: torch.nn.Module, sched: FlowMatchScheduler, x0: torch.Tensor, context: torch.Tensor,
                       rng: torch.Generator) -> torch.Tensor:
    """mse(model(x_t, t) - (noise - x0)) at one table timestep per clip, for x0 [B, F, C, H, W]."""
    b, f = x0.shape[:2]
    index = torch.randint(0, sched.num_train_timesteps, (b,), generator=rng)
    t = sched.timesteps[index].to(x0.device)
    noise = torch.randn(x0.shape, generator=rng).to(x0)
    x_t = sched.add_noise(x0, noise, t)
    flow = model(x_t.transpose(1, 2), t[:, None].expand(b, f), context).transpose(1, 2)
    return F.mse_loss(flow.float(), (noise - x0).float())


class RecipeOptimizer:
    """AdamW with a linear warmup then a cosine down to a tenth of `lr`, and gradient-norm clipping: the
    optimiser of the toy-world recipes (teacher pretraining, ODE init)."""

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float, warmup_steps: int, total_steps: int,
                 grad_clip: float):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda step: min(1.0, (step + 1) / max(1, warmup_steps))
            * (0.55 + 0.45 * math.cos(math.pi * step / total_steps)))
        self.grad_clip = grad_clip

    def step(self, loss: torch.Tensor) -> float:
        """One update on `loss`; returns its value."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()
        self.schedule.step()
        return loss.item()


def scene_batch(rng: np.random.Generator, num_clips: int, seed: int, batch: int) -> list[Scene]:
    return [Scene.from_seed(seed + int(i)) for i in rng.integers(0, num_clips, batch)]
