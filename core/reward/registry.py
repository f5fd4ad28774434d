"""Reward backends by name: `build_backend(cfg.reward)` builds the one a config's `reward:` section names.

A backend is a class with `name`, `score_batch`, `info` (core.reward.base.RewardBackend) and a classmethod
`from_config(section)`, plus a section class (a `core.config.RewardBackendConfig` subclass whose `backend`
field defaults to its name) holding its keys. `register_backend(section_cls, backend_cls)` makes both known:
configs then validate `reward.backend: <name>` with its keys, and the reward service serves it. The built-in
backends are registered here:

    motion       core.reward.motion.MotionScorer             pixels only, CPU, no weights (the default)
    videoreward  core.reward.videoreward.VideoRewardBackend  VideoReward (VideoAlign) from a local folder
    vlm_judge    core.reward.vlm_judge.VLMJudge              a local VLM through vLLM (the `vllm` extra)
"""

from __future__ import annotations

from core.config import REWARD_BACKENDS, MotionRewardConfig, RewardBackendConfig, VideoRewardConfig, VLMJudgeConfig
from core.reward.base import RewardBackend
from core.reward.motion import MotionScorer
from core.reward.videoreward import VideoRewardBackend
from core.reward.vlm_judge import VLMJudge

_BACKENDS: dict[str, type] = {}


def register_backend(section: type[RewardBackendConfig], backend: type) -> None:
    """Make `backend` the scorer of `reward.backend: <name>`, configured by `section` (name: its `backend` default)."""
    if not (isinstance(section, type) and issubclass(section, RewardBackendConfig)):
        raise TypeError(f"a reward backend's section must subclass core.config.RewardBackendConfig, got {section!r}")
    name = section.model_fields["backend"].default
    if not isinstance(name, str) or not name:
        raise TypeError(f"{section.__name__}.backend must default to the backend's name")
    missing = [m for m in ("score_batch", "info", "from_config") if not callable(getattr(backend, m, None))]
    if missing:
        raise TypeError(f"reward backend {backend!r} lacks {', '.join(missing)} (see core.reward.base.RewardBackend)")
    if _BACKENDS.get(name, backend) is not backend:
        raise ValueError(f"reward backend {name!r} is already registered ({_BACKENDS[name].__qualname__})")
    REWARD_BACKENDS[name] = section
    _BACKENDS[name] = backend


def backend_names() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def build_backend(cfg: RewardBackendConfig) -> RewardBackend:
    """The backend the `reward:` section `cfg` names, built from it."""
    if not isinstance(cfg, RewardBackendConfig):
        hint = " (pass the config's reward section: cfg.reward)" if hasattr(cfg, "reward") else ""
        raise TypeError(f"build_backend takes a reward section (core.config.RewardBackendConfig), got "
                        f"{type(cfg).__name__}{hint}")
    if cfg.backend not in _BACKENDS:
        raise ValueError(f"reward.backend {cfg.backend!r} has a section class but no registered backend; register "
                         "both with core.reward.registry.register_backend")
    return _BACKENDS[cfg.backend].from_config(cfg)


register_backend(MotionRewardConfig, MotionScorer)
register_backend(VideoRewardConfig, VideoRewardBackend)
register_backend(VLMJudgeConfig, VLMJudge)
