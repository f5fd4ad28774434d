"""The toy world's config: `Config` plus the sections of its recipes (teacher pretraining, ODE init).

`launch.py` loads every config with `WorldConfig`, so a file may carry these sections (the embedded
default does) or leave them at their defaults; the roles (actors, learner, services) only read the
`Config` part.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from core.config import REPO_ROOT, Config, ConfigSection, load_config

# registered wherever the world config is read: learner.teacher.kind exact_world and reward.backend world
from toyworld import exact, reward  # noqa: F401

DEFAULT_CONFIG = REPO_ROOT / "configs" / "tiny.yaml"  # the embedded default: the toy world with its shipped weights


class _RecipeConfig(ConfigSection):
    """What the toy-world training recipes share: `steps` AdamW steps of `batch_size` clips from `num_clips`
    world scenes (seeds `seed`..); the learning rate warms up linearly over `warmup_steps`, then follows a
    cosine down to a tenth of `lr`; `output` gets loss.csv (every step; the bar shows the loss every
    `log_every`), the weights and eval.json (`eval_clips` held-out scenes, 0: skip)."""

    steps: int
    batch_size: int = 8
    lr: float
    warmup_steps: int
    weight_decay: float  # AdamW weight decay
    grad_clip: float = 1.0  # gradients are clipped to this total norm before each step
    num_clips: int
    seed: int
    output: str
    log_every: int = 10
    eval_clips: int = 24

    @model_validator(mode="after")
    def _check_sizes(self) -> "_RecipeConfig":
        if min(self.num_clips, self.steps, self.batch_size) < 1:
            raise ValueError("num_clips, steps and batch_size of a training recipe must be >= 1")
        return self


class PretrainConfig(_RecipeConfig):
    """Flow-matching pretraining of a small bidirectional teacher on the toy world (`launch.py pretrain-teacher`),
    the prompt dropped for `cfg_dropout` of the clips (so the teacher supports classifier-free guidance).
    Training timesteps come from a table of its own `shift`: at 32 px a shift-5 table spends most steps at
    noise levels where no shape is visible, so the teacher would learn backgrounds long before shapes. The
    teacher is the exponential moving average of the weights (`ema_decay`; 0 keeps the last weights): with
    batches of a few clips the last weights are noisy. The held-out samples are drawn with `eval_steps`
    Euler steps at CFG `eval_guidance`."""

    steps: int = 2000
    lr: float = 5e-4
    warmup_steps: int = 100
    weight_decay: float = 0.01
    num_clips: int = 4096
    seed: int = 0
    output: str = "runs/teacher"
    shift: float = 1.0
    cfg_dropout: float = 0.1
    ema_decay: float = 0.999
    eval_steps: int = 20
    eval_guidance: float = 3.0


class OdeInitConfig(_RecipeConfig):
    """Regression initialisation of the causal student (`launch.py ode-init`, toyworld/ode_init.py) from the
    teacher learner.teacher describes, on the prompts of the `num_clips` scenes; `pairs` says what it regresses:
    - `ode`: the end of the teacher's flow ODE (`ode_steps` Euler steps, CFG `guidance`; 1 is unguided) from
      its states at the student's few-step timesteps (CausVid, Self Forcing);
    - `causal_ode`: the same ODE solved block by block, each conditioned on the clean blocks before it (the
      autoregressive teacher Causal Forcing asks for; unguided);
    - `few_step`: the teacher's x0 at each state of the student's own few-step sampler run with the teacher as
      its denoiser (unguided), so the student learns the denoiser where it will be used.
    With `on_policy`, that fraction of the steps instead regresses the teacher's x0 at the states the student's
    own rollout reaches (DAgger). `first_block_weight` weighs the first block's error against the others': that
    block picks the shape's place from pure noise, the hardest step. The student starts from `init` (or the Wan
    teacher's weights). `output` gets `ode_init.pt` (Self-Forcing layout: checkpoint.generator loads it)."""

    steps: int = 400
    lr: float = 2e-4
    warmup_steps: int = 20
    weight_decay: float = 0.0
    num_clips: int = 256
    seed: int = 100_000
    output: str = "runs/ode_init"
    ode_steps: int = 20
    guidance: float = 3.0
    init: str | None = None  # the student's starting weights; None: the teacher's (a Wan teacher), else Wan's init
    pairs: Literal["ode", "causal_ode", "few_step"] = "ode"
    on_policy: float = 0.0  # the fraction of steps regressing the teacher's x0 at the student's own rollout states
    first_block_weight: float = 1.0  # the first block's share of the loss relative to each later block's

    @model_validator(mode="after")
    def _block_wise_is_unguided(self) -> "OdeInitConfig":
        if self.pairs != "ode" and self.guidance != 1:
            raise ValueError(f"ode_init.pairs={self.pairs} runs the conditional teacher unguided: set "
                             "ode_init.guidance to 1")
        return self

    @model_validator(mode="after")
    def _check(self) -> "OdeInitConfig":
        if self.ode_steps < 1:
            raise ValueError("ode_init.ode_steps must be >= 1")
        if not 0 <= self.on_policy <= 1:
            raise ValueError(f"ode_init.on_policy is a fraction of the steps: it must be in [0, 1], got {self.on_policy}")
        if self.first_block_weight <= 0:
            raise ValueError(f"ode_init.first_block_weight must be > 0 (1 weighs every block alike), got "
                             f"{self.first_block_weight}")
        return self


class EvaluationConfig(ConfigSection):
    """The exact held-out measures of a student (toyworld/evaluate.py): `prompts` scenes from seed `first_scene`,
    one clip per prompt and noise seed in `seeds`. With `around_train`, `launch.py train` measures the starting
    student (checkpoint.generator) before the job and the exported one after it, and prints both."""

    prompts: int = 24
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    first_scene: int = 1_000_000
    around_train: bool = False

    @model_validator(mode="after")
    def _check(self) -> "EvaluationConfig":
        if self.prompts < 1 or not self.seeds:
            raise ValueError("evaluation.prompts must be >= 1 and evaluation.seeds not empty")
        return self


class WorldConfig(Config):
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    ode_init: OdeInitConfig = Field(default_factory=OdeInitConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)

    @model_validator(mode="after")
    def _ode_pairs_need_the_warped_list(self) -> "WorldConfig":
        """The ODE pairs keep the solve's states at the student's timesteps, so those must lie on its grid, which
        is the shifted table's."""
        if self.ode_init.pairs != "few_step" and not self.scheduler.warp_denoising_step:
            raise ValueError(f"ode_init.pairs={self.ode_init.pairs} keeps the teacher's ODE states at the student's "
                             "timesteps, which lie on the ODE's grid only when warped onto the shifted table: set "
                             "scheduler.warp_denoising_step=true, or use ode_init.pairs=few_step")
        return self


def load_world_config(path: str | Path | None = None, overrides: list[str] | None = None) -> WorldConfig:
    """A config (the embedded default when `path` is None) validated with the toy world's sections."""
    return load_config(path or DEFAULT_CONFIG, overrides, schema=WorldConfig)
