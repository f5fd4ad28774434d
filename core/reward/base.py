"""The reward interface every backend implements, and the records it returns.

A backend scores a batch of decoded videos (uint8 frames [T, H, W, 3], their fps and
prompt) and returns, per video, the three VideoReward axes: VQ (visual quality), MQ
(motion quality) and TA (text alignment), raw and z-normalised, with Overall = the sum
of the normalised axes, plus how the video was sampled. Backends hold the model math;
the Ray Serve deployment only batches, limits and transports.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np

AXES = ("VQ", "MQ", "TA")


@dataclass
class VideoInput:
    frames: np.ndarray  # uint8 [T, H, W, 3]
    fps: float
    prompt: str

    def __post_init__(self) -> None:
        f = self.frames
        if not isinstance(f, np.ndarray) or f.dtype != np.uint8 or f.ndim != 4 or f.shape[-1] != 3 or f.shape[0] < 1:
            got = f"{getattr(f, 'dtype', type(f).__name__)} {tuple(getattr(f, 'shape', ()))}"
            raise ValueError(f"frames must be a uint8 numpy array [T >= 1, H, W, 3], got {got}")
        if not self.fps > 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")


@dataclass
class SamplingInfo:
    """How the backend looked at the video (returned to callers so scores are reproducible)."""

    source_fps: float
    source_frames: int
    frames_used: int
    resized_hw: tuple[int, int]


@dataclass
class Normalization:
    """Per-axis z-normalisation: normalized = (raw - mean) / std."""

    mean: dict[str, float]
    std: dict[str, float]

    def apply(self, raw: dict[str, float]) -> dict[str, float]:
        return {k: (raw[k] - self.mean[k]) / self.std[k] for k in AXES}


@dataclass
class RewardScore:
    raw: dict[str, float]
    normalized: dict[str, float]
    sampling: SamplingInfo
    extra: dict[str, float] = field(default_factory=dict)  # backend-specific terms, for inspection

    @classmethod
    def from_raw(cls, raw: dict[str, float], norm: Normalization, sampling: SamplingInfo,
                 extra: dict[str, float] | None = None) -> "RewardScore":
        return cls({k: float(raw[k]) for k in AXES}, norm.apply(raw), sampling, extra or {})

    @property
    def overall(self) -> float:
        return sum(self.normalized[k] for k in AXES)

    def to_dict(self) -> dict:
        """JSON shape of the API: VQ/MQ/TA (normalised), Overall, raw, normalized, sampling."""
        out = {k: self.normalized[k] for k in AXES}
        out.update(Overall=self.overall, raw=dict(self.raw), normalized=dict(self.normalized),
                   sampling=asdict(self.sampling), extra=dict(self.extra))
        return out


class RewardBackend(Protocol):
    name: str

    def score_batch(self, videos: list[VideoInput]) -> list[RewardScore]:
        """Score several videos at once (dynamic batching hands over whatever arrived together)."""
        ...

    def info(self) -> dict:
        """Backend name, checkpoint identity, normalisation and sampling settings, for GET /v1/info."""
        ...
