"""Self-forced rollout of the causal generator, and the replay of its exit steps.

Streaming (`SelfForcedRollout.stream`): each block of `num_frame_per_block`
latent frames starts from noise, is denoised at the few-step timesteps
(re-noising between steps), yielded, then re-run once at t = context_noise so
the KV cache holds its clean keys/values.

Training (`SelfForcedRollout.training_rollout`): one exit index e is drawn per
rollout and shared by all blocks; each block is denoised up to step e and its
exit-step input, timestep and prediction are recorded. The rollout runs without
grad anywhere; `replay_exit_steps` recomputes only the exit steps with grad, with
the cache of the clean context written without grad, which reproduces Self
Forcing's gradient exactly (docs/architecture.md, why the learner replays).

Latents here are [B, F, C, H, W]; the model takes [B, C, F, H, W].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn

from core.algo.scheduler import FlowMatchScheduler
from core.model.kv_cache import BlockView, KVCache
from core.model.wan import CausalWanModel

# noise_fn(block, step) -> noise [B, f, C, H, W]; step -1 is the block's initial noise,
# step i >= 0 the fresh noise used to re-noise after denoising step i, "context" the context noise.
NoiseFn = Callable[[int, int | str], torch.Tensor]


def gaussian_noise(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype,
                   device: torch.device | str) -> NoiseFn:
    """Fresh N(0, 1) noise of one block's shape for every request, drawn from `generator`."""
    def draw(block: int, step: int | str) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=dtype, device=generator.device).to(device)
    return draw


@dataclass
class Block:
    index: int
    start_frame: int
    latents: torch.Tensor  # clean prediction [B, f, C, H, W]


@dataclass
class ReplayBlock:
    start_frame: int
    noisy: torch.Tensor  # exit-step input [B, f, C, H, W]
    clean: torch.Tensor  # exit-step prediction: the block's output and its cached context
    context_input: torch.Tensor | None = None  # what the context re-run saw, when context_noise > 0


@dataclass
class RolloutRecord:
    """What a training rollout must keep for the learner to replay its exit steps."""

    exit_index: int
    exit_timestep: float
    context_timestep: float
    blocks: list[ReplayBlock] = field(default_factory=list)

    def clean_latents(self) -> torch.Tensor:
        return torch.cat([b.clean for b in self.blocks], dim=1)


def _bcfhw(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)


class SelfForcedRollout:
    def __init__(self, model: CausalWanModel, scheduler: FlowMatchScheduler, timesteps: torch.Tensor,
                 context_noise: int = 0, context_rerun: bool = True):
        self.model = model
        self.scheduler = scheduler
        self.timesteps = timesteps.to(torch.float32)
        self.context_noise = context_noise
        self.context_rerun = context_rerun  # streaming only: False keeps the last denoising step's K/V instead
        self.frames_per_block = model.stream.num_frame_per_block

    def predict_x0(self, x: torch.Tensor, t: float, context, cache: KVCache | BlockView,
                   start_frame: int | torch.Tensor, blocks: Sequence[nn.Module] | None = None) -> torch.Tensor:
        """The model's clean estimate of the block x [B, f, C, H, W] at timestep t."""
        b, f = x.shape[:2]
        t_frames = torch.full((b, f), t, dtype=torch.float32, device=x.device)
        flow = _bcfhw(self.model(_bcfhw(x), t_frames, context, cache=cache, start_frame=start_frame, blocks=blocks))
        return self.scheduler.x0_from_flow(flow.flatten(0, 1), x.flatten(0, 1), t_frames.flatten()).unflatten(0, (b, f))

    def renoise(self, x0: torch.Tensor, noise: torch.Tensor, t: float) -> torch.Tensor:
        b, f = x0.shape[:2]
        t_frames = torch.full((b * f,), t, dtype=torch.float32, device=x0.device)
        return self.scheduler.add_noise(x0.flatten(0, 1), noise.flatten(0, 1), t_frames).unflatten(0, (b, f))

    def denoise_block(self, x: torch.Tensor, context, cache: KVCache | BlockView, start_frame: int | torch.Tensor,
                      renoise_noise: Callable[[int], torch.Tensor],
                      blocks: Sequence[nn.Module] | None = None) -> torch.Tensor:
        """All few-step denoising steps of one block from its initial noise x (re-noised after step i with
        `renoise_noise(i)`): its clean estimate. The context re-run is the caller's."""
        timesteps = self.timesteps.tolist()
        for i, t in enumerate(timesteps):
            x0 = self.predict_x0(x, t, context, cache, start_frame, blocks)
            if i + 1 < len(timesteps):
                x = self.renoise(x0, renoise_noise(i), timesteps[i + 1])
        return x0

    def write_cache(self, x: torch.Tensor, context: torch.Tensor | None, cache: KVCache | BlockView,
                    start_frame: int | torch.Tensor, t: float | None = None,
                    blocks: Sequence[nn.Module] | None = None) -> None:
        """Run finished latents x [B, f, C, H, W] at timestep `t` (default: the context timestep) so their K/V
        land in the cache: a block's context re-run, a replay's, and a prompt switch's re-cache."""
        t = float(self.context_noise) if t is None else t
        t_frames = torch.full(x.shape[:2], t, dtype=torch.float32, device=x.device)
        self.model(_bcfhw(x), t_frames, context, cache=cache, start_frame=start_frame, blocks=blocks)

    def _write_context(self, x0: torch.Tensor, context, cache: KVCache, start_frame: int, block: int,
                       noise_fn: NoiseFn) -> torch.Tensor:
        """Re-run the finished block at t = context_noise so its clean K/V land in the cache."""
        x = x0 if self.context_noise == 0 else self.renoise(x0, noise_fn(block, "context"), float(self.context_noise))
        self.write_cache(x, context, cache, start_frame)
        return x

    @torch.no_grad()
    def stream(self, context: torch.Tensor, cache: KVCache, noise_fn: NoiseFn,
               num_blocks: int | None = None) -> Iterator[Block]:
        """Yield finished blocks one by one (forever when `num_blocks` is None)."""
        block = 0
        while num_blocks is None or block < num_blocks:
            start = cache.frames
            x0 = self.denoise_block(noise_fn(block, -1), context, cache, start, lambda step: noise_fn(block, step))
            yield Block(block, start, x0)
            if self.context_rerun:
                self._write_context(x0, context, cache, start, block, noise_fn)
            block += 1

    @torch.no_grad()
    def generate(self, context: torch.Tensor, cache: KVCache, noise_fn: NoiseFn, num_blocks: int) -> torch.Tensor:
        """All clean latents [B, num_blocks * f, C, H, W]."""
        return torch.cat([b.latents for b in self.stream(context, cache, noise_fn, num_blocks)], dim=1)

    @torch.no_grad()
    def training_rollout(self, context: torch.Tensor, cache: KVCache, noise_fn: NoiseFn, num_blocks: int,
                         exit_index: int | None = None, generator: torch.Generator | None = None) -> RolloutRecord:
        """Denoise every block up to one exit step (drawn once per rollout) and record the replay inputs."""
        n_steps = len(self.timesteps)
        if exit_index is None:
            exit_index = int(torch.randint(0, n_steps, (1,), generator=generator))
        if not 0 <= exit_index < n_steps:
            raise ValueError(f"exit_index {exit_index} outside [0, {n_steps})")
        record = RolloutRecord(exit_index, float(self.timesteps[exit_index]), float(self.context_noise))
        for block in range(num_blocks):
            start = cache.frames
            x = noise_fn(block, -1)
            for i in range(exit_index + 1):
                t = float(self.timesteps[i])
                x0 = self.predict_x0(x, t, context, cache, start)
                if i < exit_index:
                    x = self.renoise(x0, noise_fn(block, i), float(self.timesteps[i + 1]))
            ctx_in = self._write_context(x0, context, cache, start, block, noise_fn)
            record.blocks.append(ReplayBlock(start, x, x0, ctx_in if self.context_noise else None))
        return record

    def replay_exit_steps(self, record: RolloutRecord, context: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The exit-step predictions of a recorded rollout, recomputed with grad: [B, F, C, H, W].

        Per block: one forward of the recorded noisy latent at the exit timestep (with grad, attending
        to the cached clean context), then the context re-run of the recorded clean output without grad.
        """
        outputs = []
        for blk in record.blocks:
            outputs.append(self.predict_x0(blk.noisy, record.exit_timestep, context, cache, blk.start_frame))
            with torch.no_grad():
                ctx_in = blk.clean if blk.context_input is None else blk.context_input
                self.write_cache(ctx_in, context, cache, blk.start_frame, record.context_timestep)
        return torch.cat(outputs, dim=1)
