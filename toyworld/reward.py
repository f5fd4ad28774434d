"""The toy world's exact reward (`reward.backend: world`): VideoReward's three axes, measured against the world's truth.

The motion scorer (core/reward/motion.py) rewards motion that looks smooth and large; on this world its optimum is
off the world (world clips score below the student). This backend scores what the world says a clip should be,
with the exact machinery of toyworld/exact.py:
- VQ, how world-like the clip is: minus the RMS distance (pixels in [-1, 1]) to the nearest world clip of any
  prompt, at any size and position (0 for a world clip);
- MQ, motion as prompted: minus the distance, in pixels per frame at 32 px, between the shape's mean displacement
  (`velocity_of`) and the prompt's velocity (0 for a world clip; a clip with no visible shape gets MISSING_MOTION);
- TA, the prompt's attributes: the fraction of colour, shape, background, direction and speed that the nearest
  world clip shares with the prompt (1 for a world clip of the prompt).
Each axis is z-normalised by the mean and spread of the shipped student's samples (NORMALIZATION), so the learner's
exp(beta * reward) weighs videos as it does with the other backends. Videos must have the world's geometry: sides
that are multiples of 32 pixels. Importing this module registers the backend (toyworld.config imports it).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

from core.codecs.video import from_uint8_frames
from core.config import RewardBackendConfig
from core.reward.base import Normalization, RewardScore, SamplingInfo, VideoInput
from core.reward.registry import register_backend
from toyworld.exact import WorldClips
from toyworld.world import DIRECTIONS, GRID, SPEEDS, parse_prompt, velocity_of

ATTRIBUTES = ("colour", "shape", "background", "direction", "speed")
MISSING_MOTION = 2.0  # px per frame: the motion error of a clip whose shape is not visible (beyond any real error)
# mean and std of each raw axis over the shipped student's samples (64 training prompts x 4 noise seeds, 9 frames)
NORMALIZATION = Normalization(mean={"VQ": -0.105, "MQ": -0.237, "TA": 0.870},
                              std={"VQ": 0.037, "MQ": 0.168, "TA": 0.170})


class WorldRewardConfig(RewardBackendConfig):
    """`world`: the toy world's exact reward (toyworld/reward.py); no settings, no weights."""

    backend: Literal["world"] = "world"


def prompted_velocity(prompt: str, width: int) -> tuple[float, float]:
    """Pixels per frame (x, y) that a world prompt asks for, at frame width `width`."""
    attrs = parse_prompt(prompt)
    dx, dy = DIRECTIONS[attrs.direction]
    v = SPEEDS[attrs.speed] * width / 32 if attrs.speed else 0.0
    return dx * v, dy * v


class WorldReward:
    """Exact VQ / MQ / TA of world videos (see the module docstring)."""

    name = "world"

    def __init__(self, normalization: Normalization = NORMALIZATION):
        self.normalization = normalization
        self._clips: dict[tuple[int, int, int], WorldClips] = {}

    @classmethod
    def from_config(cls, cfg: WorldRewardConfig | None = None) -> "WorldReward":
        return cls()

    def _world(self, frames: int, height: int, width: int) -> WorldClips:
        if height % GRID or width % GRID:
            raise ValueError(f"the world reward scores videos of the toy world, whose sides are multiples of {GRID} "
                             f"pixels; got {width}x{height}")
        key = (frames, height, width)
        if key not in self._clips:
            self._clips[key] = WorldClips(frames, height, width)
        return self._clips[key]

    def raw(self, video: VideoInput) -> dict[str, float]:
        """The three raw axes of one video."""
        t, h, w = video.frames.shape[:3]
        attrs = parse_prompt(video.prompt)  # a ValueError naming the world's grammar for any other prompt
        near = self._world(t, h, w).nearest(from_uint8_frames(video.frames, torch.float64)[0])
        velocity = velocity_of(video.frames)
        if velocity is None:
            motion_error = MISSING_MOTION
        else:
            want = prompted_velocity(video.prompt, w)
            motion_error = min(math.hypot((velocity[0] - want[0]) * 32 / w, (velocity[1] - want[1]) * 32 / h),
                               MISSING_MOTION)
        same = [getattr(near.attributes, a) == getattr(attrs, a) for a in ATTRIBUTES]
        return {"VQ": -near.rms, "MQ": -motion_error, "TA": float(np.mean(same))}

    def score_batch(self, videos: list[VideoInput]) -> list[RewardScore]:
        out = []
        for video in videos:
            t, h, w = video.frames.shape[:3]
            out.append(RewardScore.from_raw(self.raw(video), self.normalization,
                                            SamplingInfo(float(video.fps), t, t, (h, w))))
        return out

    def info(self) -> dict:
        return {"backend": self.name, "checkpoint": None, "deterministic": True,
                "axes": {"VQ": "minus the RMS distance to the nearest world clip of any prompt",
                         "MQ": "minus the distance (px per frame at 32 px) between the shape's mean displacement and "
                               f"the prompted velocity; {MISSING_MOTION} when no shape is visible",
                         "TA": "fraction of colour, shape, background, direction and speed the nearest world clip "
                               "shares with the prompt"},
                "normalization": {"mean": dict(self.normalization.mean), "std": dict(self.normalization.std)},
                "sampling": {"frames": "all", "resize": None}}


register_backend(WorldRewardConfig, WorldReward)
