"""One rollout actor: a generator replica, the text encoder and the codec, producing scored samples.

`RolloutWorker.rollout(item, version, weights)` switches to the published weights if they are newer
(weight_sync.WeightSubscriber: weights only change between rollouts), runs the seeded training rollout
of the item's prompt (`VideoPipeline.training_rollout`: one exit step per rollout, recorded per block),
decodes the clean latents, scores the uint8 frames through the reward service's DeploymentHandle, and
returns a `Rollout`: the `Sample` (with its prompt's text context, so learners need no text encoder) as an
Arrow RecordBatch, or the reason it was dropped (a non-finite latent or a failed score is never turned into a
made-up reward), with the time spent in each stage.

The actor is async, and its blocking torch work (weight loading, rollout, decode, prompt encoding) runs on
one compute thread of its own, never on the event loop: weight staging (`receive_weights`), `status` and
`ready` are answered while a rollout computes, so the learner's broadcast waits only for the staging copy.
A lock holds the model from the weight switch to the end of the decode: weights change only between rollouts.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from core.codecs.video import to_uint8_frames
from core.config import Config
from core.records.checkpoint import load_into
from core.records.prompts import WorkItem
from core.records.sample import Sample, to_record_batch
from core.records.video_io import write_mp4
from core.stream.pipeline import VideoPipeline
from reward_service.client import RewardError, RewardHandleClient
from weight_sync import WeightSubscriber


@dataclass
class Rollout:
    item: WorkItem
    timings: dict[str, float]
    batch: pa.RecordBatch | None = None  # one Sample row
    drop_reason: str | None = None  # nonfinite_latents | score_timeout | score_rejected | score_unavailable
    message: str = ""


class RolloutWorker:
    def __init__(self, cfg: Config, name: str):
        self.cfg, self.name = cfg, name
        threads = max(1, int(cfg.actors.num_cpus))
        torch.set_num_threads(threads)
        self.pipe = VideoPipeline.from_config(cfg)
        self.reward = RewardHandleClient(cfg.actors.reward_app, timeout_s=cfg.actors.score_timeout_s,
                                         retries=cfg.actors.score_retries)
        self.weights = WeightSubscriber(name, self.pipe.dtype)
        # one thread: GPU work runs one call at a time, in order; torch's thread count is set per thread
        self.compute = ThreadPoolExecutor(1, thread_name_prefix=f"{name}-compute", initializer=torch.set_num_threads,
                                          initargs=(threads,))
        self.model_lock = asyncio.Lock()
        self.computing: str | None = None  # the sample id whose rollout holds the model
        self.rollouts = 0

    def ready(self) -> str:
        return self.name

    def status(self) -> dict:
        """Health: answered at once, mid-rollout too (the rollout computes off the event loop)."""
        return {"name": self.name, "weight_version": self.weights.version, "computing": self.computing,
                "rollouts": self.rollouts}

    async def _run(self, fn, *args):
        """`fn(*args)` on the compute thread; the event loop stays free meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self.compute, fn, *args)

    async def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        """The prompts' valid context rows on CPU, in the rollout dtype: a job encodes its negative prompt once
        here, with the encoder the actors already hold, for every learner worker."""
        rows = await self._run(self.pipe.text_encoder.encode_valid, prompts)
        return [r.cpu() for r in rows]

    def join_weight_group(self, host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float) -> None:
        self.weights.join(host, port, rank, world_size, backend, timeout_s)

    async def receive_weights(self, version: int, layout: list) -> None:
        await self.weights.receive(version, layout)

    async def _switch_weights(self, version: int, refs: list) -> float:
        """Load the published weights of `version` unless the model holds them; seconds spent. Called with the
        model lock held, so no rollout computes while the weights change."""
        start = time.perf_counter()
        state_dict = await self.weights.weights_of(version, refs)
        if state_dict is None:
            return 0.0
        await self._run(load_into, self.pipe.generator, state_dict)
        self.weights.loaded(version)
        return time.perf_counter() - start

    @torch.no_grad()
    def _decode(self, clean: torch.Tensor) -> np.ndarray:
        return to_uint8_frames(self.pipe.vae.decode(clean.transpose(1, 2))).numpy()

    def _write_video(self, path: str, frames: np.ndarray, item: WorkItem, version: int) -> None:
        """The MP4 with what made it (prompt, seed, weight version) in its tags and in a JSON file beside it."""
        made_by = {"prompt": item.prompt, "seed": item.seed, "prompt_id": item.prompt_id, "sample_id": item.sample_id,
                   "weight_version": version, "actor": self.name}
        write_mp4(path, frames, self.cfg.video.fps, metadata={"title": item.prompt, "comment": json.dumps(made_by)})
        Path(path).with_suffix(".json").write_text(json.dumps(made_by, indent=2))

    def _generate(self, item: WorkItem, timings: dict[str, float]) -> tuple:
        """The blocking part of a rollout (compute thread): the prompt's context rows, the training rollout and,
        when its latents are finite, the decoded frames (None otherwise)."""
        start = time.perf_counter()
        # the sample's context rows; the rollout's own encode of the prompt takes them from the encoder's cache
        text_context = self.pipe.text_encoder.encode_valid([item.prompt])[0]
        record = self.pipe.training_rollout(item.prompt, item.seed)
        timings["generate_s"] = time.perf_counter() - start
        clean = record.clean_latents()
        if not (torch.isfinite(clean).all() and all(torch.isfinite(b.noisy).all() for b in record.blocks)):
            return record, text_context, None
        start = time.perf_counter()
        frames = self._decode(clean)
        timings["decode_s"] = time.perf_counter() - start
        return record, text_context, frames

    async def rollout(self, item: WorkItem, version: int, refs: list, video_path: str | None = None) -> Rollout:
        """One scored sample; with `video_path` the decoded frames are also written there as an MP4."""
        async with self.model_lock:  # weights switch only here, between rollouts
            timings = {"load_weights_s": await self._switch_weights(version, refs)}
            made_with = self.weights.version
            self.computing = item.sample_id
            try:
                record, text_context, frames = await self._run(self._generate, item, timings)
            finally:
                self.computing = None
        self.rollouts += 1
        if frames is None:
            return Rollout(item, timings, drop_reason="nonfinite_latents", message="the rollout produced NaN/inf latents")
        if video_path:
            await self._run(self._write_video, video_path, frames, item, made_with)
        start = time.perf_counter()
        try:
            score = await self.reward.score(frames, float(self.cfg.video.fps), item.prompt)
        except RewardError as e:
            timings["score_s"] = time.perf_counter() - start
            return Rollout(item, timings, drop_reason=f"score_{e.kind}", message=str(e))
        timings["score_s"] = time.perf_counter() - start
        sample = Sample.from_rollout(record, score=score, text_context=text_context, sample_id=item.sample_id,
                                     prompt_id=item.prompt_id, prompt=item.prompt, epoch=item.epoch, seed=item.seed,
                                     weight_version=made_with, actor=self.name, timings=timings)
        return Rollout(item, timings, batch=to_record_batch([sample]))
