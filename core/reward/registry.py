"""`build_backend(cfg.reward)`: the reward backend a RewardConfig names.

    motion       -> core.reward.motion.MotionScorer        (pixels, CPU, no weights; the default)
    vlm_judge    -> core.reward.vlm_judge.VLMJudge          (local VLM folder through vLLM)
    videoreward  -> core.reward.videoreward.VideoRewardBackend.from_config(cfg)

Each backend module is imported only when chosen, so a missing optional dependency (vLLM,
or VideoReward's model code) only matters to the configuration that asks for it.
"""

from __future__ import annotations

from typing import get_args

from core.config import ConfigError, RewardConfig
from core.reward.base import RewardBackend

BACKENDS: tuple[str, ...] = get_args(RewardConfig.model_fields["backend"].annotation)
NEEDS_CHECKPOINT = ("videoreward", "vlm_judge")


def build_backend(cfg: RewardConfig) -> RewardBackend:
    """Construct the backend `cfg.backend` names (see the module docstring)."""
    if not isinstance(cfg, RewardConfig):
        hint = " (pass the config's reward section: cfg.reward)" if hasattr(cfg, "reward") else ""
        raise TypeError(f"build_backend takes a core.config.RewardConfig, got {type(cfg).__name__}{hint}")
    backend = cfg.backend
    if backend not in BACKENDS:  # only reachable through model_construct / unvalidated configs
        raise ConfigError(f"reward.backend {backend!r} is not a reward backend; choose one of {', '.join(BACKENDS)}")
    if backend in NEEDS_CHECKPOINT and not cfg.checkpoint:
        raise ConfigError(f"reward.backend {backend!r} needs reward.checkpoint (a local model folder; "
                          "nothing is downloaded at run time), or use reward.backend=motion")
    if backend == "motion":
        from core.reward.motion import MotionScorer

        return MotionScorer.from_config(cfg)
    if backend == "vlm_judge":
        from core.reward.vlm_judge import VLMJudge

        return VLMJudge.from_config(cfg)
    try:
        from core.reward.videoreward import VideoRewardBackend
    except ModuleNotFoundError as e:
        if e.name != "core.reward.videoreward":
            raise
        raise RuntimeError("reward.backend 'videoreward' is not available in this build "
                           "(core/reward/videoreward.py is missing); use reward.backend=motion") from e
    return VideoRewardBackend.from_config(cfg)
