"""One rollout actor: a generator replica, the text encoder and the VAE, producing scored samples.

`RolloutWorker.rollout(item, version, weights)` loads the published weights if they are newer
(so weights only change between rollouts), runs the training rollout of `core.rollout` (one
exit step per rollout, recorded per block), decodes the clean latents, scores the uint8
frames through the reward service's DeploymentHandle, and returns a `Rollout`: the `Sample`
as an Arrow RecordBatch, or the reason it was dropped (a non-finite latent or a failed score
is never turned into a made-up reward), with the time spent in each stage.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from core.config import Config
from core.prompts import WorkItem
from core.sample import Sample, to_record_batch


@dataclass
class Rollout:
    item: WorkItem
    timings: dict[str, float]
    batch: pa.RecordBatch | None = None  # one Sample row
    drop_reason: str | None = None  # nonfinite_latents | score_timeout | score_rejected | score_unavailable
    message: str = ""


class WeightsUnavailable(RuntimeError):
    """The published version went out by broadcast before this actor (re)joined the group; the pool hands
    the prompt out again and the actor gets the next version from the object store."""


class RolloutWorker:
    def __init__(self, config: dict, name: str):
        from core.pipeline import VideoPipeline
        from reward_service.client import RewardHandleClient

        self.cfg = Config.model_validate(config)
        self.name = name
        torch.set_num_threads(max(1, int(self.cfg.actors.num_cpus)))
        self.pipe = VideoPipeline.from_config(self.cfg)
        self.reward = RewardHandleClient(self.cfg.actors.reward_app, timeout_s=self.cfg.actors.score_timeout_s,
                                         retries=self.cfg.actors.score_retries)
        self.version = 0
        self.group = None  # core.weight_sync.BroadcastGroup, once joined
        self.received: dict[int, asyncio.Future] = {}  # broadcast version -> its weights, staged

    def join_weight_group(self, host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float) -> None:
        from core.weight_sync import BroadcastGroup

        self.group = BroadcastGroup(host, port, rank, world_size, backend, timeout_s)
        self.timeout_s = timeout_s

    def _staged(self, version: int) -> asyncio.Future:
        return self.received.setdefault(version, asyncio.get_running_loop().create_future())

    async def receive_weights(self, version: int, layout: list) -> None:
        """Take part in the broadcast of `version` and stage it; the model switches at the next rollout."""
        from core.weight_sync import numel, unpack

        if self.group is None:
            raise WeightsUnavailable(f"{self.name} is not in the weight broadcast group")
        buffer = torch.empty(numel(layout), dtype=self.pipe.dtype, device=self.group.device)
        self.group.broadcast(buffer)
        self._staged(version).set_result(unpack(buffer, layout))

    async def _load_weights(self, version: int, weights: list) -> float:
        """Switch to published weights `version` (an object-store ref to a state dict, or [None] when it is
        broadcast to the group); seconds spent."""
        if version == self.version:
            return 0.0
        import ray

        from core.checkpoint import load_into

        start = time.perf_counter()
        if weights and weights[0] is not None:
            state_dict = ray.get(weights[0])
        elif self.group is None:
            raise WeightsUnavailable(f"{self.name} missed the broadcast of version {version} (it joined no group)")
        else:
            state_dict = await asyncio.wait_for(self._staged(version), self.timeout_s)
        load_into(self.pipe.generator, state_dict)
        self.version = version
        self.received = {v: f for v, f in self.received.items() if v > version}
        return time.perf_counter() - start

    def _generate(self, item: WorkItem):
        cfg, pipe = self.cfg, self.pipe
        fpb = cfg.stream.num_frame_per_block
        lh, lw = cfg.video.latent_hw
        gen = torch.Generator().manual_seed(item.seed)
        from core.rollout import gaussian_noise

        noise = gaussian_noise((1, fpb, cfg.model.in_dim, lh, lw), gen, pipe.dtype, pipe.device)
        context = pipe.text_encoder.encode([item.prompt]).to(pipe.device, pipe.dtype)
        cache = pipe.generator.init_cache(1, (lh, lw))
        return pipe.rollout.training_rollout(context, cache, noise, cfg.video.num_latent_frames // fpb, generator=gen)

    @torch.no_grad()
    def _decode(self, clean: torch.Tensor) -> np.ndarray:
        from core.vae import to_uint8_frames

        return to_uint8_frames(self.pipe.vae.decode(clean.transpose(1, 2))).numpy()

    async def rollout(self, item: WorkItem, version: int, weights: list, video_path: str | None = None) -> Rollout:
        """One scored sample; with `video_path` the decoded frames are also written there as an MP4."""
        from reward_service.client import RewardError

        timings = {"load_weights_s": await self._load_weights(version, weights)}
        start = time.perf_counter()
        record = self._generate(item)
        timings["generate_s"] = time.perf_counter() - start
        clean = record.clean_latents()
        if not (torch.isfinite(clean).all() and all(torch.isfinite(b.noisy).all() for b in record.blocks)):
            return Rollout(item, timings, drop_reason="nonfinite_latents", message="the rollout produced NaN/inf latents")
        start = time.perf_counter()
        frames = self._decode(clean)
        timings["decode_s"] = time.perf_counter() - start
        if video_path:
            from core.video_io import write_mp4

            write_mp4(video_path, frames, self.cfg.video.fps)
        start = time.perf_counter()
        try:
            score = await self.reward.score(frames, float(self.cfg.video.fps), item.prompt)
        except RewardError as e:
            timings["score_s"] = time.perf_counter() - start
            return Rollout(item, timings, drop_reason=f"score_{e.kind}", message=str(e))
        timings["score_s"] = time.perf_counter() - start
        sample = Sample.from_rollout(record, score=score, sample_id=item.sample_id, prompt_id=item.prompt_id,
                                     prompt=item.prompt, epoch=item.epoch, seed=item.seed,
                                     weight_version=self.version, actor=self.name, timings=timings)
        return Rollout(item, timings, batch=to_record_batch([sample]))
