"""One typed config schema for every role (rollout, learner, reward, serving).

A run is described by one YAML file plus `key=value` command-line overrides
(dotted keys, values parsed as YAML scalars). Unknown keys and wrong types are
errors that name the offending key. The toy world's recipes add their sections
in a subclass of `Config` (toyworld/config.py); `load_config` takes the schema.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

REPO_ROOT = Path(__file__).resolve().parent.parent
PLUMBING_CONFIG = REPO_ROOT / "configs" / "plumbing.yaml"  # random tiny weights, no files: tests and speed benchmarks


class _YAMLLoader(yaml.SafeLoader):
    """YAML 1.2 floats: `2e-6` is a number (PyYAML's YAML 1.1 rules would make it a string)."""


_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|[0-9][0-9_]*[eE][-+]?[0-9]+|\.(?:inf|Inf|INF)|[-+]\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YAMLLoader)


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and the fix."""


class ConfigSection(BaseModel):
    """A config section: unknown keys and loose types are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


@dataclass(frozen=True)
class LocalPath:
    """Marks a key naming a local file or folder (or, in a list, dicts with a `path`; in a mapping, the values):
    it is resolved against paths.root when the config is loaded and, unless it is an `output`, checked by
    `Config.check_paths` for the commands that use its `role` (PATH_ROLES). `what` says what the file is and
    where it comes from, for the message naming it missing; `literals` are values that are not paths."""

    role: str
    what: str
    output: bool = False
    literals: tuple[str, ...] = ()


# the roles a command uses: generator (generate, serve, evaluate, rollouts), serve, reward, train
PATH_ROLES = ("generator", "serve", "reward", "train")
RANDOM_WEIGHTS = "random"  # checkpoint.generator: seeded random weights, asked for outright
# from this model.dim on, serving a generator with no weights is refused unless checkpoint.generator is
# RANDOM_WEIGHTS: Wan's released widths are 1536 (1.3B) and 5120 (14B), the plumbing and toy-world models 64 and 128
REAL_SIZE_DIM = 1024


class PathsConfig(ConfigSection):
    """Where the config's relative paths point.

    `root`: an absolute folder that every relative weight, data and output path of the config (the keys marked
    LocalPath) is resolved against when the config is loaded; absolute paths stay as they are. Unset, it is the
    repository root, where the toy world's shipped assets/ and prompts/ are. Put weights, prompt files and run
    outputs outside the repository and name their folder here, in the config or as `paths.root=/mnt/shared/x`
    on the command line: `ray job submit --working-dir .` uploads the repository without checkpoints/, data/ and
    runs/ (.rayignore) and unpacks it in a folder of its own on each node, where a path relative to the
    repository would find nothing. A config key rather than an environment variable, so the config alone says
    where the files are: the resolved paths travel with it to every actor and worker, and a run's config.yaml
    records them."""

    root: str | None = None

    @field_validator("root")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).expanduser().is_absolute():
            raise ValueError(f"paths.root must be an absolute folder, got {value!r}")
        return value


class WanArchConfig(ConfigSection):
    """Wan2.1 DiT architecture. Defaults are Wan2.1-T2V-1.3B."""

    dim: int = 1536  # hidden width of the DiT (head_dim = dim / num_heads)
    ffn_dim: int = 8960  # hidden width of each block's feed-forward layer
    num_heads: int = 12  # attention heads per layer; head_dim (dim / num_heads) must be even, for RoPE
    num_layers: int = 30  # transformer blocks
    freq_dim: int = 256  # width of the sinusoidal timestep embedding
    text_dim: int = 4096  # width of the text encoder's embeddings (umT5-XXL: 4096); the text encoder must output it
    text_len: int = 512  # prompt tokens: contexts are zero-padded to this length (unmasked), longer prompts cut with a warning
    in_dim: int = 16  # latent channels in (Wan's VAE: 16; vae.kind patch needs `3*s*s <= in_dim`)
    out_dim: int = 16  # latent channels of the predicted flow
    # [t, h, w] latent cells per token (patch embedding and unpatchify)
    patch_size: list[int] = Field(default_factory=lambda: [1, 2, 2])
    eps: float = 1e-6  # epsilon of the LayerNorms and of the q/k RMSNorms
    qk_norm: bool = True  # RMSNorm on queries and keys (over the full dim, before the head split) in self- and cross-attention
    cross_attn_norm: bool = True  # affine LayerNorm (norm3) before cross-attention; false: none

    @model_validator(mode="after")
    def _check(self) -> "WanArchConfig":
        if self.dim % self.num_heads:
            raise ValueError(f"model.dim ({self.dim}) must be divisible by model.num_heads ({self.num_heads})")
        if (self.dim // self.num_heads) % 2:
            raise ValueError("model.dim / model.num_heads (head_dim) must be even for RoPE")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"model.patch_size must be three positive ints (t, h, w), got {self.patch_size}")
        return self

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


WAN_1_3B = WanArchConfig()
WAN_14B = WanArchConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)


class VideoConfig(ConfigSection):
    """Pixel size and length of generated videos; the latent grid is derived from these."""

    height: int = 480  # frame height in pixels, a multiple of vae_stride[1]; the latent height is height / vae_stride[1]
    width: int = 832  # frame width in pixels, a multiple of vae_stride[2]; the latent width is width / vae_stride[2]
    # latent frames of a training rollout and of `launch.py generate` by default, a multiple of stream.num_frame_per_block
    # (Wan's VAE decodes n to 1 + 4(n - 1) frames: 21 -> 81)
    num_latent_frames: int = 21
    # [t, h, w] video pixels per latent cell of the codec: [4, 8, 8] for Wan's VAE, [1, s, s] for vae.kind patch
    vae_stride: list[int] = Field(default_factory=lambda: [4, 8, 8])
    fps: int = 16  # frame rate of written MP4s and streams, and the rate passed to the reward with each rollout

    @model_validator(mode="after")
    def _check(self) -> "VideoConfig":
        if len(self.vae_stride) != 3 or min(self.vae_stride) < 1:
            raise ValueError(f"video.vae_stride must be three positive ints (t, h, w), got {self.vae_stride}")
        for name, size, stride in (("height", self.height, self.vae_stride[1]), ("width", self.width, self.vae_stride[2])):
            if size <= 0 or size % stride:
                raise ValueError(f"video.{name} ({size}) must be a positive multiple of the VAE stride {stride}")
        if self.num_latent_frames < 1:
            raise ValueError("video.num_latent_frames must be >= 1")
        if not 1 <= self.fps <= 240:
            raise ValueError(f"video.fps must be in [1, 240], got {self.fps}")
        return self

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.height // self.vae_stride[1], self.width // self.vae_stride[2]


class StreamConfig(ConfigSection):
    """Block-wise causal generation and its KV cache (docs/reference.md).

    `local_attn_size` and `sink_size` count latent frames; -1 means no window
    (the cache then holds `max_cache_frames` frames and generation stops there).
    `rope`: "absolute" caches rotated keys at absolute frame positions (Self
    Forcing / LongLive, limited to the RoPE table length); "window" caches keys
    before RoPE and rotates them by window position on every call (Reward
    Forcing, unbounded). `sink_mode` "ema" fuses evicted frames into the sink
    with `compression_alpha`; "static" keeps the first frames as they were.
    `ema_sink_accumulator`: where that average is kept for a 16-bit cache.
    "float32" keeps it in a float32 copy of the sink and writes its cast into the
    cache: in bf16 an update of (1 - 0.999) of the difference is mostly below
    half a step and rounds away, so the sink would hardly move. "cache" averages
    in the cache's own dtype, as the reference does (to reproduce its
    checkpoints' behaviour). float32 and float64 caches average in place either way.
    """

    # latent frames per block, denoised together (bidirectional within a block, causal across blocks)
    num_frame_per_block: int = 3
    local_attn_size: int = -1
    sink_size: int = 0
    rope: Literal["absolute", "window"] = "absolute"
    sink_mode: Literal["static", "ema"] = "static"
    compression_alpha: float = 0.999
    ema_sink_accumulator: Literal["float32", "cache"] = "float32"
    max_cache_frames: int = 21
    context_rerun: bool = True  # streaming: False keeps a block's last denoising-step K/V (one forward fewer per block)

    @model_validator(mode="after")
    def _check(self) -> "StreamConfig":
        if self.num_frame_per_block < 1:
            raise ValueError("stream.num_frame_per_block must be >= 1")
        if self.sink_size < 0:
            raise ValueError("stream.sink_size must be >= 0")
        if self.local_attn_size != -1:
            need = self.sink_size + self.num_frame_per_block
            if self.local_attn_size < need:
                raise ValueError(
                    f"stream.local_attn_size ({self.local_attn_size}) must hold the sink plus one block "
                    f"(sink_size {self.sink_size} + num_frame_per_block {self.num_frame_per_block} = {need}); "
                    "raise local_attn_size or set it to -1 for no window")
        elif self.max_cache_frames < self.num_frame_per_block:
            raise ValueError("stream.max_cache_frames must hold at least one block")
        if not 0.0 <= self.compression_alpha <= 1.0:
            raise ValueError(f"stream.compression_alpha must be in [0, 1], got {self.compression_alpha}")
        if self.sink_mode == "ema":
            if self.sink_size == 0:
                raise ValueError("stream.sink_mode 'ema' needs stream.sink_size > 0")
            if self.rope != "window":
                raise ValueError(
                    "stream.sink_mode 'ema' averages keys across frames, which is only meaningful for keys "
                    "cached before RoPE: set stream.rope=window (Reward Forcing) or stream.sink_mode=static")
        return self

    @property
    def cache_frames(self) -> int:
        return self.max_cache_frames if self.local_attn_size == -1 else self.local_attn_size


class SchedulerConfig(ConfigSection):
    """Flow-matching schedule and the few-step denoising list (docs/reference.md)."""

    # sigma shift of the flow-matching table, `shift*s / (1 + (shift - 1)*s)`; also shifts the DMD / critic timesteps
    shift: float = 5.0
    num_train_timesteps: int = 1000  # entries of the flow-matching timestep table; timestep num_train_timesteps is pure noise
    # the few-step sampler's timesteps, strictly decreasing in (0, num_train_timesteps]: one generator call each per block
    denoising_step_list: list[int] = Field(default_factory=lambda: [1000, 750, 500, 250])
    # map step s to the shifted table's entry [num_train_timesteps - s] ([1000, 750, 500, 250] -> [1000, 937.5, 833.3, 625]);
    # false: use the steps as timesteps
    warp_denoising_step: bool = True
    # timestep at which a finished block runs again to write its K/V to the cache: 0 on its clean prediction, > 0 re-noised to it
    context_noise: int = 0

    @model_validator(mode="after")
    def _check(self) -> "SchedulerConfig":
        steps = self.denoising_step_list
        if not steps or any(not 0 < s <= self.num_train_timesteps for s in steps):
            raise ValueError(f"scheduler.denoising_step_list values must be in (0, {self.num_train_timesteps}], got {steps}")
        if any(a <= b for a, b in zip(steps, steps[1:])):
            raise ValueError(f"scheduler.denoising_step_list must be strictly decreasing, got {steps}")
        return self


class RuntimeConfig(ConfigSection):
    """Where and how the models run. The streaming fast path (core/stream/block_step.py, docs/streaming.md):
    `compile` puts the DiT's transformer blocks through torch.compile, `cuda_graphs` replays each stream block from a
    captured CUDA graph (CUDA only; a pipeline then serves at most serve.max_sessions streams, warmed at start),
    `overlap_decode` denoises the next block while this one decodes (a switch then applies one block later), `fp8`
    runs the transformer blocks' linear layers in float8 through torchao (optional extra `fp8`, CUDA sm89+)."""

    # where actors, streaming replicas and commands run the models: auto = CUDA when visible, else CPU (learner: use_gpu)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # dtype of generator, text encoder and VAE outside the learner, and of published weights (training: learner.precision)
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = "float32"
    # attention kernel: auto = flash-attn for 16-bit CUDA calls when installed, else PyTorch SDPA, and flex_attention for masked
    # calls on CUDA; flash, sdpa or flex ask for one (flash's masked calls use flex); math is the explicit reference kernel
    attention_backend: Literal["auto", "flash", "sdpa", "flex", "math"] = "auto"
    # seed of random weights (no checkpoint), the learner's noise and timestep draws and toy-world recipes (rollouts:
    # actors.prompt_seed)
    seed: int = 0
    compile: bool = False
    cuda_graphs: bool = False
    overlap_decode: bool = False
    fp8: bool = False


class TextEncoderConfig(ConfigSection):
    """umT5 text encoder (docs/reference.md).

    `checkpoint`: Wan's `models_t5_umt5-xxl-enc-bf16.pth` or a Hugging Face UMT5 folder;
    `tokenizer`: a local tokenizer folder (google/umt5-xxl's files). With no checkpoint, a small
    randomly initialised UMT5 encoder of width model.text_dim (with a byte-level tokenizer unless
    `tokenizer` is set; the embedded default: no files needed), its weights drawn from `tiny_seed`: they
    are part of the model a generator was trained with, not a run's randomness, so `runtime.seed` does
    not change them. Prompts are padded to model.text_len tokens.
    """

    checkpoint: Annotated[str | None, LocalPath(
        "generator", "umT5-XXL encoder: models_t5_umt5-xxl-enc-bf16.pth of Wan-AI/Wan2.1-T2V-1.3B")] = None
    tokenizer: Annotated[str | None, LocalPath(
        "generator", "umT5 tokenizer folder: google/umt5-xxl/ of Wan-AI/Wan2.1-T2V-1.3B")] = None
    tiny_layers: int = 2  # layers of the random UMT5 built when checkpoint is null
    tiny_heads: int = 2  # attention heads of the random UMT5 (must divide model.text_dim)
    tiny_ffn_dim: int = 64  # feed-forward width of the random UMT5
    tiny_seed: int = 0
    cache_size: int = 1024  # prompts whose embeddings an LRU cache keeps (0: no cache)


class VAEConfig(ConfigSection):
    """The video codec between pixels and the DiT's latents.

    `kind` "wan": the Wan2.1 VAE (docs/reference.md); `checkpoint` is `Wan2.1_VAE.pth` or a
    diffusers AutoencoderKLWan folder; None builds a randomly initialised VAE of width `base_dim`
    (the embedded default; Wan's real VAE has base_dim 96).
    `kind` "patch": the exact pixel-space codec of core/codecs/patch.py (no weights): one latent frame
    per video frame, each latent cell the s x s RGB patch under it as 3*s*s channels; needs
    video.vae_stride [1, s, s] with 3*s*s <= model.in_dim (e.g. [1, 2, 2]) and no checkpoint.
    """

    kind: Literal["wan", "patch"] = "wan"
    checkpoint: Annotated[str | None, LocalPath("generator", "Wan VAE: Wan2.1_VAE.pth of Wan-AI/Wan2.1-T2V-1.3B")] = None
    base_dim: int = 96


class RewardBackendConfig(ConfigSection):
    """The `reward:` section: `backend` names a registered reward backend, and each backend has a section
    class of its own (a subclass of this one) with its keys. Built-in: `motion` (deterministic scores from
    pixels, the embedded default), `videoreward` (VideoReward / VideoAlign) and `vlm_judge` (a VLM through
    vLLM). A new backend is one module with its section class and its scorer, registered with
    `core.reward.registry.register_backend` (docs/reference.md; docs/reward-service.md)."""

    backend: str


class MotionRewardConfig(RewardBackendConfig):
    """`motion`: deterministic VQ / MQ scores computed from pixels (core/reward/motion.py); no settings, no weights."""

    backend: Literal["motion"] = "motion"


class _LocalModelConfig(RewardBackendConfig):
    checkpoint: Annotated[str, LocalPath("reward", "the reward model's local folder")]  # nothing is downloaded
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"  # dtype the reward model runs in (vlm_judge: vLLM's dtype)

    @model_validator(mode="before")
    @classmethod
    def _needs_checkpoint(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("checkpoint"):
            backend = cls.model_fields["backend"].default
            raise ValueError(f"reward.backend {backend!r} needs reward.checkpoint (a local model folder; nothing is "
                             "downloaded at run time), or use reward.backend=motion")
        return data


class VideoRewardConfig(_LocalModelConfig):
    """`videoreward`: VideoReward (VideoAlign, Qwen2-VL-2B + rm_head) from the released folder `checkpoint`
    (model_config.json + checkpoint-*/), on `device`."""

    backend: Literal["videoreward"] = "videoreward"
    checkpoint: Annotated[str, LocalPath(
        "reward", "VideoReward: the folder of KlingTeam/VideoReward (model_config.json + checkpoint-*/)")]
    device: Literal["auto", "cpu", "cuda"] = "auto"


class VLMJudgeConfig(_LocalModelConfig):
    """`vlm_judge`: a VLM from the local model folder `checkpoint` through vLLM (the `vllm` extra), shown
    `max_frames` frames and asked a rubric answered as JSON in at most `max_new_tokens` tokens."""

    backend: Literal["vlm_judge"] = "vlm_judge"
    max_frames: int = 8
    max_new_tokens: int = 256

    @model_validator(mode="after")
    def _check(self) -> "VLMJudgeConfig":
        if self.max_frames < 1:
            raise ValueError(f"reward.max_frames must be >= 1, got {self.max_frames}")
        if self.max_new_tokens < 32:
            raise ValueError(f"reward.max_new_tokens must be >= 32 to hold the JSON answer, got {self.max_new_tokens}")
        return self


# backend name -> its section class; core.reward.registry.register_backend adds more
REWARD_BACKENDS: dict[str, type[RewardBackendConfig]] = {
    cls.model_fields["backend"].default: cls for cls in (MotionRewardConfig, VideoRewardConfig, VLMJudgeConfig)}


def reward_section(data: Any) -> RewardBackendConfig:
    """The `reward:` section as the section class of the backend it names (motion when it names none)."""
    if isinstance(data, RewardBackendConfig):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"reward must be a mapping with a 'backend' key, got {type(data).__name__}")
    name = data.get("backend", "motion")
    if name not in REWARD_BACKENDS:
        raise ValueError(f"reward.backend {name!r} is not a reward backend; choose one of {', '.join(REWARD_BACKENDS)} "
                         "(or register one with core.reward.registry.register_backend)")
    try:
        return REWARD_BACKENDS[name].model_validate({"backend": name, **data})
    except ValidationError as e:
        raise ValueError("; ".join(_error_lines(e))) from None


class RewardServiceConfig(ConfigSection):
    """The Ray Serve reward deployment: HTTP, batching, back-pressure, limits and auth."""

    # address Serve's HTTP proxy binds (one proxy per Ray cluster: a training job's streaming app shares it)
    host: str = "127.0.0.1"
    port: int = 8000  # HTTP port of Serve's proxy
    app_name: str = "reward"  # Serve application name for `launch.py reward-server` (a training job names it actors.reward_app)
    max_batch_size: int = 8  # most videos scored together in one backend batch (@serve.batch)
    batch_wait_timeout_s: float = 0.02  # seconds a batch waits for more requests before it is scored
    max_ongoing_requests: int = 16  # requests one replica handles at once; more wait in the queue
    # requests that may wait for a replica at each caller (proxy or handle); past that, new ones get 503 with Retry-After
    max_queued_requests: int = 32
    retry_after_s: float = 1.0  # Retry-After seconds of an overload 503
    # seconds Serve's HTTP proxy allows one request (`train --serve` raises it to cover serve.stream_timeout_s)
    request_timeout_s: float = 60.0
    min_replicas: int = 1  # replicas at start; with max_replicas higher, Serve autoscales between the two
    max_replicas: int = 1  # most replicas autoscaling may run (on target_ongoing_requests)
    # ongoing requests per replica autoscaling aims for (only when max_replicas > min_replicas)
    target_ongoing_requests: float = 4.0
    num_cpus: float = 1.0  # Ray CPUs per replica
    num_gpus: float = 0.0  # Ray GPUs per replica (a fraction shares a GPU)
    # environment variable holding the bearer token (read where the app is built, before auth_token_file); both null: no auth
    auth_token_env: str | None = None
    auth_token_file: Annotated[str | None, LocalPath("reward", "the reward service's bearer token file")] = None
    max_body_mb: float = 64.0  # largest request body in MiB (413 above)
    max_frames: int = 1024  # most frames of a scored video (413 above)
    max_pixels: int = 1920 * 1080  # most pixels per frame, height x width (413 above)
    max_duration_s: float = 120.0  # longest video in seconds, frames / fps (413 above)
    client_timeout_s: float = 60.0  # seconds per HTTP request of `launch.py score`
    client_retries: int = 3  # retries of `launch.py score` after a transport error or a 429, 502, 503 or 504

    @model_validator(mode="after")
    def _check(self) -> "RewardServiceConfig":
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError("need 1 <= reward_service.min_replicas <= reward_service.max_replicas")
        if self.max_batch_size < 1 or self.max_ongoing_requests < 1:
            raise ValueError("reward_service.max_batch_size and max_ongoing_requests must be >= 1")
        return self


class ActorsConfig(ConfigSection):
    """Rollout actors and the bounded sample queue between them and the learner.

    Each actor holds a generator replica, the text encoder and the VAE; `num_cpus` /
    `num_gpus` are its Ray resources (fractional CPUs on the embedded default, one GPU each
    on a cluster). At most `queue_size` samples exist at once (queued or being made): when
    the learner falls behind, actors wait instead of dropping. Samples more than
    `max_staleness` weight versions old when consumed are dropped and counted (0 = strictly
    on-policy). `prompts` is a text file (one per line) or a Parquet file (column `prompt`).
    """

    num_actors: int = 2  # rollout actors, each with a generator replica, text encoder and VAE
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    max_restarts: int = 3  # Ray restarts of a dead actor (its rollout is handed out again); one dying past them is retired
    queue_size: int = 8
    max_staleness: int = 0
    prompts: Annotated[str, LocalPath(
        "train", "training prompts, one per line (or Parquet, column prompt): Self Forcing's "
                 "vidprom_filtered_extended.txt of gdhe17/Self-Forcing")] = "prompts/tiny.txt"
    prompt_seed: int = 0  # seed of the prompt order (a new permutation each epoch) and of each rollout's noise seed
    # the Serve app actors score through by handle; a training job deploys the reward service under this name (route `/<name>`)
    reward_app: str = "reward"
    score_timeout_s: float = 60.0  # seconds one scoring attempt may take
    # retries of a scoring call after overload, a timeout or a lost replica; then the sample is dropped and counted
    score_retries: int = 2

    @model_validator(mode="after")
    def _check(self) -> "ActorsConfig":
        if self.num_actors < 1 or self.queue_size < 1:
            raise ValueError("actors.num_actors and actors.queue_size must be >= 1")
        if self.max_staleness < 0 or self.max_restarts < 0:
            raise ValueError("actors.max_staleness and actors.max_restarts must be >= 0")
        return self


class CheckpointConfig(ConfigSection):
    """The generator's weights, from a local path (nothing is downloaded at run time): a Wan2.1 or diffusers folder,
    a .safetensors file, or a Self-Forcing / Reward-Forcing .pt. None, or "random" said outright, is seeded random
    weights; `launch.py serve` and `generate` refuse None for a real-size model (model.dim >= REAL_SIZE_DIM),
    where random weights would pass for a broken checkpoint."""

    generator: Annotated[str | None, LocalPath(
        "generator", "the generator's weights: rewardforcing.pt of JaydenLu666/Reward-Forcing-T2V-1.3B to serve, "
                     "ode_init.pt of gdhe17/Self-Forcing to start training", literals=(RANDOM_WEIGHTS,))] = None
    # load a Self-Forcing .pt's `generator_ema` entry instead of `generator` (an error for a file holding one state dict)
    use_ema: bool = False

    @property
    def generator_path(self) -> str | None:
        """The file to load; None for seeded random weights."""
        return None if self.generator == RANDOM_WEIGHTS else self.generator


WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，"
    "杂乱的背景，三条腿，背景人很多，倒着走")


# teacher kinds: "wan", and those a recipe registers with core.algo.distill.register_teacher
TEACHER_KINDS: set[str] = {"wan"}


class TeacherConfig(ConfigSection):
    """The frozen real-score model. `kind` "wan": a bidirectional Wan DiT, `arch` None meaning the student's
    `model` architecture (the paper uses Wan2.1-T2V-14B: set `arch` to its sizes) and `checkpoint` None seeded
    random weights (tiny configs only). Other kinds are registered by recipes and have no weights: the toy
    world's `exact_world` is its closed-form optimal denoiser (toyworld/exact.py)."""

    kind: str = "wan"
    arch: WanArchConfig | None = None
    checkpoint: Annotated[str | None, LocalPath(
        "train", "the teacher (real score), a Wan folder: Wan-AI/Wan2.1-T2V-14B for the paper's run")] = None

    @model_validator(mode="after")
    def _check(self) -> "TeacherConfig":
        if self.kind not in TEACHER_KINDS:
            raise ValueError(f"learner.teacher.kind {self.kind!r} is not a teacher; choose one of "
                             f"{', '.join(sorted(TEACHER_KINDS))} (exact_world comes with the toy world's config)")
        if self.kind != "wan" and (self.arch is not None or self.checkpoint is not None):
            raise ValueError(f"learner.teacher.kind {self.kind!r} has no weights: unset learner.teacher.arch and "
                             "learner.teacher.checkpoint")
        return self


class LearnerConfig(ConfigSection):
    """The DeepSpeed learner on Ray Train (docs/reference.md; docs/architecture.md).

    One iteration = one critic update on `batch_size` samples per worker; every
    `dfake_gen_update_ratio`-th iteration (starting with the first) is also a generator update
    (replay of the samples' exit steps, Re-DMD), after which the weights are published to the
    actors as a new version. `max_steps` counts iterations. The critic (fake score) starts from
    `critic_checkpoint`, or from the teacher's weights when it is a Wan of the student's architecture.
    """

    num_workers: int = 1  # Ray Train workers: data-parallel DeepSpeed ranks, each training on batch_size samples
    use_gpu: bool = False  # one GPU per learner worker (NCCL); false trains on CPUs (gloo)
    cpus_per_worker: float = 1.0  # Ray CPUs per learner worker (also its torch threads)
    zero_stage: Literal[2, 3] = 2  # DeepSpeed ZeRO stage of generator and critic; 3 also shards the parameters, and a Wan teacher
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    gradient_checkpointing: bool = False  # recompute each DiT block's activations in the backward pass: less memory, more compute
    batch_size: int = 1
    max_steps: int = 600
    generator_lr: float = 2e-6  # AdamW learning rate of the generator
    critic_lr: float = 4e-7  # AdamW learning rate of the critic (fake score)
    betas: list[float] = Field(default_factory=lambda: [0.0, 0.999])  # AdamW (beta1, beta2) of generator and critic
    weight_decay: float = 0.01  # AdamW weight decay of generator and critic
    grad_clip: float = 10.0  # gradient-norm clip of generator and critic (DeepSpeed gradient_clipping)
    dfake_gen_update_ratio: int = 5
    ema_decay: float = 0.99  # decay of the generator's float32 EMA, updated after each generator update
    ema_start_step: int = 200  # iteration from which the EMA is kept: it starts from the first generator update at or after it
    # teacher CFG scale of the DMD real score, cond + scale * (cond - uncond); 0 runs the teacher once, unguided
    guidance_scale: float = 3.0
    negative_prompt: str = WAN_NEGATIVE_PROMPT  # the teacher's unconditional prompt for CFG (Wan's standard negative prompt)
    beta: float = 2.0  # Re-DMD weight exp(beta * reward) per video; 0 is plain DMD
    # normalised reward axis that weights the generator loss (and is logged as `reward`)
    reward_axis: Literal["VQ", "MQ", "TA"] = "MQ"
    reward_weight_clip: float | None = None  # clamp each reward weight to [1/clip, clip]; null: no clamp
    reward_weight_normalize: bool = False  # divide the reward weights by their mean over the worker's batch
    # lowest DMD / critic training timestep (the shifted draws are clamped to [min_timestep, max_timestep])
    min_timestep: int = 20
    max_timestep: int = 980  # highest DMD / critic training timestep
    # shift of the DMD / critic timestep draws (t = 1000 * shift u / (1 + (shift - 1) u), u uniform); null: the
    # scheduler's shift, as the reference. A large shift puts most draws at noise levels where little is visible
    timestep_shift: float | None = None
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    critic_checkpoint: Annotated[str | None, LocalPath(
        "train", "the critic's (fake score's) starting weights, a Wan folder: Wan-AI/Wan2.1-T2V-1.3B for the "
                 "paper's run")] = None
    # what actors get after each generator update: the raw weights, or ema (the EMA once it exists, raw before)
    publish_weights: Literal["raw", "ema"] = "raw"
    publish_backend: Literal["object_store", "broadcast"] = "object_store"  # broadcast: NCCL/gloo group (weight_sync.py)
    # seconds each wait of the broadcast group may take (publish_backend broadcast); past it the version goes by object store
    broadcast_timeout_s: float = 600.0
    sample_timeout_s: float = 600.0  # seconds an iteration waits for its samples from the actor pool before the learner fails
    samples_parquet: Annotated[str | None, LocalPath("train", "recorded rollout samples to train on")] = None
    deterministic: bool = False  # torch.use_deterministic_algorithms(True) on every learner worker
    # checkpoints/, export/, metrics.csv|parquet, tensorboard/, videos/; on storage every learner node shares
    output_dir: Annotated[str, LocalPath("train", "the run's folder", output=True)] = "runs/default"
    video_every: int = 10  # write one rollout's video every N steps (0: never)
    checkpoint_every: int = 50  # save a checkpoint every N iterations (and at the end)
    keep_last: int = 3  # checkpoints kept under output_dir/checkpoints; older ones are deleted
    # continue from the latest checkpoint in output_dir (weights, optimizers, EMA, RNG, prompt cursor); false starts at step 0
    resume: bool = True
    max_failures: int = 0  # worker-group restarts Ray Train may do; each resumes from the last checkpoint

    @model_validator(mode="after")
    def _check(self) -> "LearnerConfig":
        if self.num_workers < 1 or self.batch_size < 1 or self.max_steps < 1:
            raise ValueError("learner.num_workers, learner.batch_size and learner.max_steps must be >= 1")
        if self.dfake_gen_update_ratio < 1:
            raise ValueError("learner.dfake_gen_update_ratio must be >= 1")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"learner.betas must be two floats in [0, 1), got {self.betas}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"learner.ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.min_timestep < self.max_timestep <= 1000:
            raise ValueError("need 0 <= learner.min_timestep < learner.max_timestep <= 1000")
        if self.timestep_shift is not None and self.timestep_shift <= 0:
            raise ValueError(f"learner.timestep_shift must be > 0 (or null: the scheduler's shift), got "
                             f"{self.timestep_shift}")
        if self.checkpoint_every < 1 or self.keep_last < 1:
            raise ValueError("learner.checkpoint_every and learner.keep_last must be >= 1")
        if self.reward_weight_clip is not None and self.reward_weight_clip <= 1.0:
            raise ValueError("learner.reward_weight_clip bounds the weight to [1/clip, clip]: it must be > 1 (or null)")
        return self


class ServeConfig(ConfigSection):
    """The streaming inference deployment (serve/app.py, `launch.py serve`).

    Each replica holds one pipeline and at most `max_sessions` streams (one per GPU replica);
    a session beyond that is refused with 503 and Retry-After. `presets` name the offered
    resolutions as [height, width]; each must fit the model's video geometry (`preset_problems`),
    checked when the app is built. `lora` adapters are merged into the generator at startup;
    `lora_adapters` are named adapters a session may ask for (applied for that session only).
    `max_session_frames` 0 means streams unbounded in frames; every request is still bounded in
    time: `generate_timeout_s` per POST /v1/generate (arrival to last byte), `stream_timeout_s` per
    WebSocket session (accept to close), `start_timeout_s` for a session's first valid `start`.
    `drain_check_s`: how often a replica holding sessions asks Serve whether its application is
    being deleted, to close them with 1001 before the replica is stopped.
    """

    host: str = "127.0.0.1"  # address Serve's HTTP proxy binds for `launch.py serve` (`train --serve` uses reward_service's)
    port: int = 8000  # HTTP port of Serve's proxy for `launch.py serve` (`train --serve` uses reward_service's)
    app_name: str = "stream"  # Serve application name
    route_prefix: str = "/"  # URL path the app is mounted at
    max_sessions: int = 1
    min_replicas: int = 1  # replicas at start; with max_replicas higher, Serve autoscales on sessions (max_sessions each)
    max_replicas: int = 1  # most replicas autoscaling may run
    num_cpus: float = 1.0  # Ray CPUs per replica
    num_gpus: float = 0.0  # Ray GPUs per replica (0: the generator runs on the CPU)
    retry_after_s: float = 2.0  # Retry-After seconds of a 503 (rounded to whole seconds, at least 1)
    presets: dict[str, list[int]] = Field(default_factory=lambda: {"480p": [480, 832], "480p-portrait": [832, 480]})
    default_preset: str = "480p"  # the preset of a request that names none (a key of presets)
    max_session_frames: int = 0
    max_generate_frames: int = 481  # most video frames one POST /v1/generate may ask for (413 above)
    jpeg_quality: int = 85  # JPEG quality (1-100) of the frames a WebSocket stream sends
    max_image_bytes: int = 4 * 1024 * 1024  # most bytes of one PNG or JPEG frame a stream or generate call starts from (413 above)
    max_prefix_frames: int = 33  # most frames a start may carry: one starts from an image, more continue a video (413 above)
    start_timeout_s: float = 60.0
    generate_timeout_s: float = 300.0
    stream_timeout_s: float = 3600.0
    drain_check_s: float = 1.0
    # environment variable holding the bearer token (read where the app is built, before auth_token_file); both null: no auth
    auth_token_env: str | None = None
    auth_token_file: Annotated[str | None, LocalPath("serve", "the streaming service's bearer token file")] = None
    lora: Annotated[list[dict[str, Any]], LocalPath("serve", "a LoRA adapter merged at startup")] = Field(
        default_factory=list)  # [{path, weight?, alpha?}]
    lora_adapters: Annotated[dict[str, str], LocalPath("serve", "a LoRA adapter sessions may ask for")] = Field(
        default_factory=dict)  # name -> local path

    @model_validator(mode="after")
    def _check(self) -> "ServeConfig":
        timeouts = {k: getattr(self, k) for k in ("start_timeout_s", "generate_timeout_s", "stream_timeout_s",
                                                  "drain_check_s")}
        if bad := {k: v for k, v in timeouts.items() if not 0 < v < float("inf")}:  # NaN fails too
            raise ValueError(f"serve timeouts must be finite numbers of seconds > 0, got {bad}")
        if self.max_sessions < 1 or not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError("need serve.max_sessions >= 1 and 1 <= serve.min_replicas <= serve.max_replicas")
        if self.default_preset not in self.presets:
            raise ValueError(f"serve.default_preset {self.default_preset!r} is not one of serve.presets {sorted(self.presets)}")
        bad = {k: v for k, v in self.presets.items() if len(v) != 2 or min(v) < 1}
        if bad:
            raise ValueError(f"serve.presets must map names to [height, width], got {bad}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError("serve.jpeg_quality must be in [1, 100]")
        if self.max_image_bytes < 1 or self.max_prefix_frames < 1:
            raise ValueError("serve.max_image_bytes and serve.max_prefix_frames must be >= 1")
        return self

    def preset_problems(self, video: VideoConfig, patch_size: list[int]) -> list[str]:
        """Why presets do not fit the model's video geometry (empty when all do).

        A preset fits when each side is a multiple of VAE stride x patch size (the codec and the patch embedding
        tile it exactly; StreamSession refuses anything else) and it has at most the tokens per frame of
        `video.height x video.width`, the size the model, its KV cache and its cost per block are configured for
        (the transposed or another aspect ratio of no more tokens fits; a larger frame multiplies every block's
        attention cost by the square of the ratio: 480x832 on the toy world's 32x32 model is 390x the tokens)."""
        tile_h, tile_w = video.vae_stride[1] * patch_size[1], video.vae_stride[2] * patch_size[2]
        budget = (video.height // tile_h) * (video.width // tile_w)
        problems = []
        for name, (height, width) in self.presets.items():
            if height % tile_h or width % tile_w:
                why = f"its sides are not multiples of {tile_h}x{tile_w} (video.vae_stride x model.patch_size)"
            elif (tokens := (height // tile_h) * (width // tile_w)) > budget:
                why = f"it has {tokens} tokens per frame, above the model's {budget}"
            else:
                continue
            problems.append(f"serve.presets.{name} is {height}x{width} (height x width) but the model's video geometry "
                            f"is {video.height}x{video.width} (video.height x video.width): {why}")
        return problems


class Config(ConfigSection):
    paths: PathsConfig = Field(default_factory=PathsConfig)
    model: WanArchConfig = Field(default_factory=WanArchConfig)
    video: VideoConfig = Field(default_factory=VideoConfig)
    stream: StreamConfig = Field(default_factory=StreamConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    text_encoder: TextEncoderConfig = Field(default_factory=TextEncoderConfig)
    vae: VAEConfig = Field(default_factory=VAEConfig)
    reward: SerializeAsAny[RewardBackendConfig] = Field(default_factory=MotionRewardConfig)
    reward_service: RewardServiceConfig = Field(default_factory=RewardServiceConfig)
    actors: ActorsConfig = Field(default_factory=ActorsConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @field_validator("reward", mode="before")
    @classmethod
    def _reward_backend(cls, value: Any) -> RewardBackendConfig:
        return reward_section(value)

    @model_validator(mode="after")
    def _check(self) -> "Config":
        if self.vae.kind == "patch":
            self._check_patch_codec()
        lh, lw = self.video.latent_hw
        _, ph, pw = self.model.patch_size
        if lh % ph or lw % pw:
            raise ValueError(f"latent grid {lh}x{lw} (video size / vae_stride) must be divisible by the patch {ph}x{pw}")
        if self.video.num_latent_frames % self.stream.num_frame_per_block:
            raise ValueError(
                f"video.num_latent_frames ({self.video.num_latent_frames}) must be a multiple of "
                f"stream.num_frame_per_block ({self.stream.num_frame_per_block})")
        teacher = self.learner.teacher.arch
        if teacher is not None:
            shared = ("in_dim", "out_dim", "text_dim", "text_len", "patch_size")
            differ = [f"{k} (model {getattr(self.model, k)}, teacher {getattr(teacher, k)})"
                      for k in shared if getattr(teacher, k) != getattr(self.model, k)]
            if differ:
                raise ValueError("learner.teacher.arch must share the student's latent, text and patch sizes: "
                                 + ", ".join(differ))
        for _, section, name, marker in _local_paths(self):
            value = getattr(section, name)
            if (resolved := _resolve(value, self.root_dir, marker)) != value:
                setattr(section, name, resolved)
        return self

    @property
    def root_dir(self) -> Path:
        """paths.root, or the repository root when it is unset."""
        return Path(self.paths.root).expanduser() if self.paths.root else REPO_ROOT

    def _check_patch_codec(self) -> None:
        st, sh, sw = self.video.vae_stride
        if st != 1:
            raise ValueError(f"vae.kind 'patch' maps each latent frame to one video frame: it needs "
                             f"video.vae_stride[0] = 1, got video.vae_stride {self.video.vae_stride}")
        if sh != sw:
            raise ValueError(f"vae.kind 'patch' needs square patches, video.vae_stride[1] = video.vae_stride[2], "
                             f"got video.vae_stride {self.video.vae_stride}")
        if 3 * sh * sh > self.model.in_dim:
            raise ValueError(f"vae.kind 'patch' stores each {sh}x{sh} RGB patch in 3 * {sh} * {sh} = {3 * sh * sh} "
                             f"latent channels, more than model.in_dim ({self.model.in_dim}): lower "
                             "video.vae_stride (e.g. [1, 2, 2]) or raise model.in_dim")
        if self.vae.checkpoint:
            raise ValueError(f"vae.kind 'patch' has no weights: unset vae.checkpoint (got {self.vae.checkpoint!r})")

    def check_paths(self, *roles: str) -> None:
        """Fail before anything starts when files of `roles` (PATH_ROLES; every role when none is given) do not
        exist: one message naming each, with its key, the path it resolved to and what it is."""
        if unknown := set(roles) - set(PATH_ROLES):
            raise ValueError(f"unknown path roles {sorted(unknown)}; choose from {PATH_ROLES}")
        missing = [f"  {item}: {path}\n      {marker.what}"
                   for key, section, name, marker in _local_paths(self)
                   if not marker.output and (not roles or marker.role in roles)
                   for item, path in _path_items(key, getattr(section, name), marker) if not Path(path).exists()]
        if missing:
            raise ConfigError(
                f"{len(missing)} of the files this command needs {'are' if len(missing) > 1 else 'is'} missing. "
                "Nothing is downloaded at run time: fetch them first (docs/weights.md lists each file and "
                f"where it comes from). Relative paths resolve against paths.root ({self.root_dir}): set "
                "paths.root=DIR to the folder that holds them, or fix the keys:\n" + "\n".join(missing))

    def check_generator_weights(self) -> None:
        """Refuse to stream from a real-size generator with no weights: seeded random weights make noise that looks
        like a broken checkpoint, so they must be asked for outright."""
        if self.checkpoint.generator is None and self.model.dim >= REAL_SIZE_DIM:
            raise ConfigError(
                f"checkpoint.generator is not set, so this model (model.dim {self.model.dim}, a real size) would run "
                "on seeded random weights: set checkpoint.generator=PATH (e.g. checkpoints/Reward-Forcing-T2V-1.3B/"
                f"rewardforcing.pt; docs/weights.md), or checkpoint.generator={RANDOM_WEIGHTS} to run random "
                "weights on purpose (e.g. to measure speed)")

    @property
    def tokens_per_frame(self) -> int:
        lh, lw = self.video.latent_hw
        return (lh // self.model.patch_size[1]) * (lw // self.model.patch_size[2])


def _local_paths(section: BaseModel, prefix: str = "") -> Iterator[tuple[str, BaseModel, str, LocalPath]]:
    """(key, section, field name, marker) of every LocalPath key in `section` and the sections below it."""
    for name, info in type(section).model_fields.items():
        value = getattr(section, name)
        if isinstance(value, BaseModel):
            yield from _local_paths(value, f"{prefix}{name}.")
        elif marker := next((m for m in info.metadata if isinstance(m, LocalPath)), None):
            yield f"{prefix}{name}", section, name, marker


def _path_items(key: str, value: Any, marker: LocalPath) -> Iterator[tuple[str, str]]:
    """(key, path) of each path a LocalPath key holds: its string, its list's `path`s or its mapping's values."""
    if isinstance(value, str):
        if value and value not in marker.literals:
            yield key, value
    elif isinstance(value, list):
        yield from ((f"{key}[{i}].path", spec["path"]) for i, spec in enumerate(value)
                    if isinstance(spec, dict) and isinstance(spec.get("path"), str) and spec["path"])
    elif isinstance(value, dict):
        yield from ((f"{key}.{name}", path) for name, path in value.items() if isinstance(path, str) and path)


def _resolve(value: Any, root: Path, marker: LocalPath) -> Any:
    """`value` of a LocalPath key with its relative paths made absolute under `root`."""
    def under(path: str) -> str:
        return str(root / Path(path).expanduser()) if path and path not in marker.literals else path
    if isinstance(value, str):
        return under(value)
    if isinstance(value, list):
        return [spec | {"path": under(spec["path"])} if isinstance(spec, dict) and isinstance(spec.get("path"), str)
                else spec for spec in value]
    if isinstance(value, dict):
        return {name: under(path) if isinstance(path, str) else path for name, path in value.items()}
    return value


def load_bearer_token(section: str, env: str | None, file: str | None) -> str | None:
    """The bearer token a service section names by `auth_token_env` or `auth_token_file`; None turns auth off."""
    if env:
        token = os.environ.get(env, "").strip()
        if not token:
            raise ConfigError(f"{section}.auth_token_env is {env!r} but that variable is unset or empty")
        return token
    if file:
        token = Path(file).read_text().strip()
        if not token:
            raise ConfigError(f"{section}.auth_token_file {file} is empty")
        return token
    return None


def _error_lines(err: ValidationError) -> list[str]:
    """One 'key: message' line per error (just the message for an error of the whole section)."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see core/config.py for the schema)"
        got = "" if e["type"] in ("extra_forbidden", "value_error", "missing") else f" (got {e['input']!r})"
        lines.append(f"{key}: {msg}{got}" if key else f"{msg}{got}")
    return lines


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (values parsed as YAML) to a nested dict."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. stream.sink_size=3)")
        parts = key.split(".")
        node = data
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {p!r} is a value, not a section")
            node = child
        node[parts[-1]] = _yaml(raw) if raw else None
    return data


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config_data(path: Path) -> dict[str, Any]:
    """The raw mapping of a YAML config, its `include:` base merged in."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (configs live in {REPO_ROOT / 'configs'})")
    try:
        data = _yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    if "include" in data:  # a base file (relative to this one) that this file's sections refine
        base = path.parent / str(data.pop("include"))
        data = _deep_merge(load_config_data(base), data)
    return data


SchemaT = TypeVar("SchemaT", bound=Config)


def load_config(path: str | Path, overrides: list[str] | None = None, schema: type[SchemaT] = Config) -> SchemaT:
    """Load a YAML config, apply `key=value` overrides and validate it against `schema` (Config, or a subclass
    with more sections, such as the toy world's recipe sections)."""
    path = Path(path)
    data = apply_overrides(load_config_data(path), overrides or [])
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{path}: invalid config:\n  " + "\n  ".join(_error_lines(e))) from None
