"""Will it fit? Memory per GPU and resources per role, from a config alone (`launch.py plan`).

Nothing is loaded and nothing runs: every model the config names is built on the meta device, so parameter
counts are the real classes' (CausalWanModel, WanModel, umT5, the Wan VAE, VideoReward's Qwen2-VL), and the
rest is arithmetic over the architecture and the config. It lives in `core` because it is model-sizing
arithmetic shared by no Ray code: `core` imports no Ray (tests/test_layout.py), so the plan cannot start one.

Per learner GPU (ZeRO stage s, world size N = learner.num_workers, P parameters of an engine, p bytes of the
module dtype: 2 under bf16, 4 in fp32). DeepSpeed keeps an fp32 master partition (4P/N) in both precisions
(stage_1_and_2.py clones it), AdamW's m and v in fp32 (8P/N), the module's params (P*p, or P*p/N under
stage 3) and their grads (P*p/N under stages 2 and 3), plus a reduce bucket of min(P, 5e8) elements (its
default reduce_bucket_size; learner/engines.py sets none) and, under stage 3, up to min(P, 1e9) gathered
parameters (stage3_max_live_parameters). Its step() then builds an fp32 copy of the grad partition for AdamW:
4P/N under stages 1 and 2 (stage_1_and_2.py, DeepSpeedZeroOptimizer.step: the flattened partition `.to` fp32,
set as `single_partition_of_fp32_groups[i].grad`), and under stage 3 one sub-group's at a time,
4*min(P/N, 1e9) (stage3.py, DeepSpeedZeroOptimizer_Stage3._prepare_fp32_grad_for_sub_group, freed by
_release_sub_group; sub_group_size defaults to 1e9). Both precisions get it: in fp32 the flattening is the
copy. (bf16_optimizer.py's BF16_Optimizer, whose fp32 grads are a whole 4P, serves only stage 1 with an fp32
data_types.grad_accum_dtype, which engines.py never sets.) That copy lives only in step(), after the backward
has freed the activations it is summed with here; so does AdamW's foreach temporary sqrt(v), another 4P/N that
is not counted. The frozen teacher is P_t*p, or P_t*p/N when stage 3 shards it. Per GPU:

    params + grads + 12P/N optimizer + 4P/N fp32 grads (stage 3: 4*min(P/N, 1e9)) + bucket   per engine
    + teacher + max(generator step, critic step) + the negative prompt's context

where the generator step is its replay's activations, the KV cache they pin (below) and the largest transient
on top (the score models' forwards without grad, a layer's recompute), and the critic step its forward's.

Activations (`forward_bytes`): what autograd keeps from a Wan forward with grad, counted op by op in
core/model/wan.py, per layer for L query tokens, K key tokens, T = model.text_len text tokens, dim d, FFN
width f, h heads of hd, module dtype p and the norms' compute dtype c (4, or 8 in float64):

    L*d*(17p + 6c)     residual-stream tensors: 3 LayerNorm inputs (c), 3 RMSNorm float inputs (c) and their
                       normalised outputs (p), the modulated norm outputs, linear inputs, SDPA's q and output
                       (self and cross), the flattened attention outputs, the gated branch outputs
    + L*f*2p           FFN: GELU input and output
    + K*d*2p           self-attention keys and values as SDPA keeps them (the cache's context included)
    + T*d*(c + 3p)     cross-attention: k's RMSNorm input and output, k and v
    + (L+K)*hd*c       RoPE cos/sin tables (2L*hd*c when keys are rotated before caching, and bidirectional)
    + L*(8h + 9c)      logsumexps, RMSNorm rsqrt, LayerNorm mean/rstd

plus, once per forward, the text embedding T*(text_dim + 3d)*p, the head L*d*(2c + p) (it computes in c), the
time MLP's weights upcast to c when p < c, (freq_dim*d + 7d^2)*c, and a few latent-size tensors (per-frame
modulation terms, frames x dim, are left out). With gradient checkpointing a layer keeps
only its input L*d*p and the text K/V computed outside it, T*d*(c + 3p); the backward then recomputes one
layer at a time, so one layer's full set is added to the peak. The generator's replay
(core.algo.rollout.replay_exit_steps) is one such forward per block with L = frames per block x tokens per
frame and K = min(block end, window) frames; the critic's update is one forward over the whole clip (K = L).
A checkpointed replay also keeps its KV cache (`kv_cache_bytes`) alive through the loss and the backward: each
block's recompute holds the cache and views of the window it read (core/model/kv_cache.py CheckpointedCache),
and a write over a pinned window first moves the layer to fresh buffers, so an evicting replay's older buffers
(in `replay_bytes`) stay too. Without checkpointing the cache dies with the replay: the window reaches
autograd only through a copy. tests/test_plan.py measures these on configs/plumbing.yaml and states the
ratio. A forward without grad (the teacher and critic inside the generator loss, the actors' rollout) holds
one layer's working set at a time, estimated as L*(5d*p + 4d*c + 2f*p) plus its text embedding (the norms'
float copies count in bf16).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from diffusers import AutoencoderKLWan
from transformers import Qwen2VLConfig, UMT5EncoderModel

from core.codecs.text_encoder import ByteTokenizer, umt5_config
from core.config import Config, ConfigError, WanArchConfig
from core.model.wan import CausalWanModel, WanModel
from core.records.sample import text_context_bytes
from core.reward.videoreward import QWEN2_VL_2B_INSTRUCT_CONFIG, VideoRewardNet
from core.runtime import resolve_dtype

GB = 1e9
REDUCE_BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's default zero_optimization.reduce_bucket_size
MAX_LIVE_PARAMETERS = 1_000_000_000  # DeepSpeed's default stage3_max_live_parameters
SUB_GROUP_ELEMENTS = 1_000_000_000  # DeepSpeed's default zero_optimization.sub_group_size (stage 3)
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_ff=10240, num_layers=24, num_heads=64)  # docs/reference.md
# Resources of the instance types cluster.yaml names, for node types that declare no `resources:` (the Ray
# autoscaler fills these in from the cloud's catalogue itself): vCPUs, GPUs, GB per GPU.
INSTANCE_RESOURCES = {"p5.48xlarge": (192, 8, 80.0), "p4de.24xlarge": (96, 8, 80.0), "p4d.24xlarge": (96, 8, 40.0),
                      "m6i.4xlarge": (16, 0, 0.0)}


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class ModelSizes:
    """Parameter counts of every model the config names, from meta-device builds (0: no such model)."""

    generator: int
    critic: int
    teacher: int
    teacher_name: str
    text_encoder: int
    text_encoder_name: str
    vae: int
    vae_name: str
    reward: int
    reward_name: str


def model_sizes(cfg: Config) -> ModelSizes:
    """Build each model on the meta device (no memory, no weights) and count its parameters."""
    teacher_cfg = cfg.learner.teacher
    with torch.device("meta"):
        generator = param_count(CausalWanModel(cfg.model, cfg.stream))
        critic = param_count(WanModel(cfg.model))
        if teacher_cfg.kind == "wan":
            arch = teacher_cfg.arch or cfg.model
            teacher, teacher_name = param_count(WanModel(arch)), f"WanModel dim {arch.dim} x {arch.num_layers} layers"
        else:
            teacher, teacher_name = 0, f"{teacher_cfg.kind} (no weights)"
        te = cfg.text_encoder
        if te.checkpoint:
            text_config, text_name = umt5_config(**UMT5_XXL), "umT5-XXL encoder (text_encoder.checkpoint)"
        else:
            text_config = umt5_config(len(ByteTokenizer()), cfg.model.text_dim, te.tiny_ffn_dim, te.tiny_layers,
                                      te.tiny_heads)
            text_name = f"tiny umT5 ({te.tiny_layers} layers)"
        text_encoder = param_count(UMT5EncoderModel(text_config))
        if cfg.vae.kind == "patch":
            vae, vae_name = 0, "patch codec (no weights)"
        else:
            vae, vae_name = param_count(AutoencoderKLWan(base_dim=cfg.vae.base_dim)), f"Wan VAE base_dim {cfg.vae.base_dim}"
        if cfg.reward.backend == "videoreward":
            net = VideoRewardNet(Qwen2VLConfig.from_dict(QWEN2_VL_2B_INSTRUCT_CONFIG), 1)
            reward, reward_name = param_count(net), "VideoReward (Qwen2-VL-2B-Instruct + rm_head)"
        elif cfg.reward.backend == "motion":
            reward, reward_name = 0, "motion scorer (pixels only, no weights)"
        else:
            reward, reward_name = 0, f"{cfg.reward.backend} (not sized: its model comes from reward.checkpoint)"
    return ModelSizes(generator, critic, teacher, teacher_name, text_encoder, text_name, vae, vae_name,
                      reward, reward_name)


# ------------------------------------------------------------------------------------------------ activations


def _compute_bytes(p: int) -> int:
    """Bytes of the norms' and RoPE's compute dtype for a module of `p`-byte elements (core/model/wan.py)."""
    return 8 if p == 8 else 4


def layer_bytes(arch: WanArchConfig, queries: int, keys: int, rope_tokens: int, p: int) -> int:
    """Bytes autograd keeps for one WanBlock forward with grad (the formula in the module docstring)."""
    c, d, f, t = _compute_bytes(p), arch.dim, arch.ffn_dim, arch.text_len
    return (queries * d * (17 * p + 6 * c) + queries * f * 2 * p + keys * d * 2 * p + t * d * (c + 3 * p)
            + rope_tokens * arch.head_dim * c + queries * (8 * arch.num_heads + 9 * c))


@dataclass
class ForwardBytes:
    """One forward with grad: what it keeps until the backward, and the extra peak of the backward's recompute."""

    retained: int
    recompute: int

    @property
    def peak(self) -> int:
        return self.retained + self.recompute


def forward_bytes(arch: WanArchConfig, queries: int, keys: int, rope_tokens: int, p: int,
                  checkpointing: bool) -> ForwardBytes:
    """A Wan forward with grad over `queries` tokens attending to `keys` (its input latents not counted)."""
    c, d, t = _compute_bytes(p), arch.dim, arch.text_len
    upcast_time_weights = (arch.freq_dim * d + 7 * d * d) * c if c > p else 0  # kept for the backward
    once = t * (arch.text_dim + 3 * d) * p + queries * d * (2 * c + p) + upcast_time_weights
    if not checkpointing:
        return ForwardBytes(once + arch.num_layers * layer_bytes(arch, queries, keys, rope_tokens, p), 0)
    kept = arch.num_layers * (queries * d * p + t * d * (c + 3 * p))
    return ForwardBytes(once + kept, layer_bytes(arch, queries, keys, rope_tokens, p))


def nograd_forward_bytes(arch: WanArchConfig, tokens: int, p: int) -> int:
    """Working set of a forward without grad: one layer's tensors at a time, plus the embedded text."""
    d = arch.dim
    return tokens * (5 * d * p + 2 * arch.ffn_dim * p + 4 * d * _compute_bytes(p)) + arch.text_len * (arch.text_dim + 3 * d) * p


def replay_bytes(cfg: Config, p: int, checkpointing: bool) -> ForwardBytes:
    """The generator's replay with grad (one forward per block, all kept until the loss's backward) + the loss.

    Block b attends to min((b + 1) * frames per block, window) frames of keys. With checkpointing, a block whose
    first write evicts leaves the window the earlier blocks attended to alive (copy-on-write, kv_cache.py).
    """
    fpb, tpf, frames = cfg.stream.num_frame_per_block, cfg.tokens_per_frame, cfg.video.num_latent_frames
    queries = fpb * tpf
    retained, recompute, evictions = 0, 0, 0
    for block in range(frames // fpb):
        evictions += (block + 1) * fpb > cfg.stream.cache_frames
        keys = min((block + 1) * fpb, cfg.stream.cache_frames) * tpf
        rope = queries + keys if cfg.stream.rope == "window" else 2 * queries
        fb = forward_bytes(cfg.model, queries, keys, rope, p, checkpointing)
        retained, recompute = retained + fb.retained, max(recompute, fb.recompute)
    if checkpointing:
        m = cfg.model
        retained += evictions * m.num_layers * 2 * cfg.stream.cache_frames * tpf * m.dim * p
    latent = frames * cfg.model.in_dim * math.prod(cfg.video.latent_hw)
    return ForwardBytes(retained + latent * (p + 16), recompute)  # the output x, and the float64 loss's x and target


def critic_bytes(cfg: Config, p: int, checkpointing: bool) -> ForwardBytes:
    """The critic's update: one bidirectional forward with grad over the whole clip, and its flow loss."""
    tokens = cfg.video.num_latent_frames * cfg.tokens_per_frame
    latent = cfg.video.num_latent_frames * cfg.model.in_dim * math.prod(cfg.video.latent_hw)
    fb = forward_bytes(cfg.model, tokens, tokens, 2 * tokens, p, checkpointing)
    return ForwardBytes(fb.retained + 2 * latent * p, fb.recompute)  # the noisy input and the squared error's base


def kv_cache_bytes(cfg: Config, batch: int, p: int) -> int:
    """KVCache's buffers (core/model/kv_cache.py): per layer k and v [B, cache_frames * tokens, heads, head_dim],
    the cross-attention k and v [B, text_len, heads, head_dim], and, for an EMA sink with a window in a 16-bit cache
    (stream.ema_sink_accumulator: float32), the sink's float32 accumulators k and v [B, sink_size * tokens, heads,
    head_dim]."""
    m, s = cfg.model, cfg.stream
    tokens = s.cache_frames * cfg.tokens_per_frame + m.text_len
    sink = s.sink_size * cfg.tokens_per_frame if s.local_attn_size != -1 else 0
    accumulators = 2 * sink * 4 if s.sink_mode == "ema" and s.ema_sink_accumulator == "float32" and p < 4 else 0
    return m.num_layers * batch * m.dim * (2 * tokens * p + accumulators)


def pinned_cache_bytes(cfg: Config, p: int, checkpointing: bool) -> int:
    """The replay's KV cache buffers alive from the generator's loss to its backward: all of them when checkpointed
    blocks hold the cache for their recompute, none otherwise (the module docstring)."""
    return kv_cache_bytes(cfg, 1, p) if checkpointing else 0


@dataclass
class StepBytes:
    """The generator's step on one sample: what lives from its loss to its backward, and the largest transient on
    top (the score models' forwards without grad, a layer's recompute, an unpinned cache during the replay)."""

    live: int
    extra: int

    @property
    def peak(self) -> int:
        return self.live + self.extra


def generator_step_bytes(cfg: Config, p: int, checkpointing: bool) -> StepBytes:
    """The replay's activations and the cache they pin, then the largest of: the teacher's and the critic's
    forwards without grad over the clip (the Re-DMD loss), the backward's recompute, an unpinned cache."""
    replay, pinned = replay_bytes(cfg, p, checkpointing), pinned_cache_bytes(cfg, p, checkpointing)
    tokens = cfg.video.num_latent_frames * cfg.tokens_per_frame
    teacher = cfg.learner.teacher
    scores = [cfg.model] + ([teacher.arch or cfg.model] if teacher.kind == "wan" else [])
    score_forward = max(nograd_forward_bytes(arch, tokens, p) for arch in scores)
    return StepBytes(replay.retained + pinned, max(score_forward, replay.recompute, kv_cache_bytes(cfg, 1, p) - pinned))


# ------------------------------------------------------------------------------------------------ the plan


@dataclass
class Item:
    name: str
    bytes: int
    note: str = ""


@dataclass
class RolePlan:
    """One role's memory on one replica, its resource request, and whether it fits the GPU it gets."""

    role: str
    count: int
    cpus: float
    gpus: float
    dtype: str
    items: list[Item]
    suggestions: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(i.bytes for i in self.items)

    @property
    def per_gpu_replicas(self) -> int:
        """Replicas Ray packs onto one GPU (fractional num_gpus); 0 for a CPU role."""
        return 0 if self.gpus <= 0 else max(1, math.floor(1 / self.gpus + 1e-9))

    @property
    def per_gpu(self) -> int:
        return self.total * self.per_gpu_replicas


@dataclass
class Plan:
    config: str
    gpu_gb: float
    gpu_gb_source: str
    models: ModelSizes
    roles: list[RolePlan]
    activations: dict[str, dict[str, int]]
    per_sample: dict[str, int]
    resources: dict[str, dict[str, float]]
    cluster: dict[str, float] | None
    problems: list[str]
    notes: list[str]

    def fits(self, role: RolePlan) -> bool | None:
        return None if role.gpus <= 0 else role.per_gpu <= self.gpu_gb * GB

    def to_dict(self) -> dict[str, Any]:
        roles = [{**asdict(r), "total_bytes": r.total, "per_gpu_bytes": r.per_gpu, "replicas_per_gpu": r.per_gpu_replicas,
                  "fits": self.fits(r)} for r in self.roles]
        return {"config": self.config, "gpu_gb": self.gpu_gb, "gpu_gb_source": self.gpu_gb_source,
                "models": asdict(self.models), "roles": roles, "activations": self.activations,
                "per_sample": self.per_sample, "resources": self.resources, "cluster": self.cluster,
                "problems": self.problems, "notes": self.notes}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        m = self.models
        out = [f"plan for {self.config}: {self.gpu_gb:g} GB per GPU ({self.gpu_gb_source})", "",
               "models (built on the meta device)                       parameters"]
        for name, n, what in (("generator", m.generator, "CausalWanModel"), ("critic", m.critic, "WanModel"),
                              ("teacher", m.teacher, m.teacher_name), ("text encoder", m.text_encoder, m.text_encoder_name),
                              ("VAE", m.vae, m.vae_name), ("reward model", m.reward, m.reward_name)):
            out.append(f"  {name:<13} {what:<41} {n:>15,}")
        for role in self.roles:
            where = f"{role.gpus:g} GPU" if role.gpus > 0 else "CPU only: host memory"
            head = f"{role.role} (x{role.count}; {role.cpus:g} CPU, {where}; {role.dtype})"
            out += ["", f"{head:<74} GB"]
            out += [f"  {i.name:<28} {i.note:<42} {i.bytes / GB:>7.2f}" for i in role.items]
            fits = self.fits(role)
            share = f" x {role.per_gpu_replicas} per GPU = {role.per_gpu / GB:.2f}" if role.per_gpu_replicas > 1 else ""
            verdict = "" if fits is None else (" fits" if fits else " DOES NOT FIT") + f" in {self.gpu_gb:g} GB"
            out.append(f"  {'total':<28} {'':<42} {role.total / GB:>7.2f}{share}{verdict}")
            out += [f"    -> {s}" for s in role.suggestions]
        out += ["", f"{'learner activations, micro batch 1':<56}{'retained GB':>12}{'recompute GB':>14}"]
        for name, a in self.activations.items():
            out.append(f"  {name:<54}{a['retained'] / GB:>12.2f}{a['recompute'] / GB:>14.2f}")
        out += ["", "per sample: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in self.per_sample.items())]
        out += ["", f"{'resources requested (Ray)':<42}{'count':>6}{'CPUs':>8}{'GPUs':>8}"]
        for name, r in self.resources.items():
            out.append(f"  {name:<40}{r['count']:>6g}{r['cpus']:>8g}{r['gpus']:>8g}")
        if self.cluster:
            out.append(f"  {'offered by ' + self.cluster['source']:<40}{'':>6}{self.cluster['cpus']:>8g}"
                       f"{self.cluster['gpus']:>8g}")
        out += [""] + ([f"DOES NOT FIT: {p}" for p in self.problems] or ["everything fits"])
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)


def _dtype_name(name: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}[name]


def learner_bf16(cfg: Config) -> bool:
    """learner.engines.use_bf16 on the device the learner gets: `auto` means bf16 on GPU workers."""
    return cfg.learner.precision == "bf16" or (cfg.learner.precision == "auto" and cfg.learner.use_gpu)


def fp32_grad_bytes(params: int, stage: int, world: int) -> int:
    """The fp32 copy of the grad partition DeepSpeed's step() hands AdamW: whole under stages 1 and 2, one
    sub-group at a time under stage 3 (the module docstring cites the source)."""
    partition = math.ceil(params / world)
    return 4 * (min(partition, SUB_GROUP_ELEMENTS) if stage == 3 else partition)


def _engine_items(name: str, params: int, p: int, stage: int, world: int) -> list[Item]:
    shard = f"1/{world} partition"
    fp32_grads = f"one sub-group (<=1e9), 1/{world}" if stage == 3 else f"fp32 copy of the {shard}"
    return [Item(f"{name} params", params * p // (world if stage == 3 else 1),
                 f"{'bf16' if p == 2 else 'fp32'}{', ZeRO-3 ' + shard if stage == 3 else ', replicated'}"),
            Item(f"{name} grads", params * p // world, f"ZeRO-{stage}: {shard}"),
            Item(f"{name} optimizer", params * 12 // world, f"fp32 master + AdamW m, v; {shard}"),
            Item(f"{name} fp32 grads", fp32_grad_bytes(params, stage, world), f"in step(): {fp32_grads}"),
            Item(f"{name} reduce bucket", min(params, REDUCE_BUCKET_ELEMENTS) * p, "DeepSpeed default 5e8 elements")]


def learner_role(cfg: Config, sizes: ModelSizes, checkpointing: bool | None = None, stage: int | None = None) -> RolePlan:
    """One learner worker: both engines, the teacher, the replay's KV cache and the peak activations."""
    lc = cfg.learner
    checkpointing = lc.gradient_checkpointing if checkpointing is None else checkpointing
    stage = lc.zero_stage if stage is None else stage
    world, p = lc.num_workers, 2 if learner_bf16(cfg) else 4
    items = _engine_items("generator", sizes.generator, p, stage, world) + _engine_items("critic", sizes.critic, p,
                                                                                          stage, world)
    teacher_note = "frozen" + (f", ZeRO-3 1/{world}" if stage == 3 else ", replicated")
    items.append(Item("teacher", sizes.teacher * p // (world if stage == 3 else 1), teacher_note))
    if stage == 3:
        gathered = max(min(n, MAX_LIVE_PARAMETERS) for n in (sizes.generator, sizes.critic, sizes.teacher))
        items.append(Item("ZeRO-3 gathered params", gathered * p, "up to stage3_max_live_parameters (1e9)"))
    replay, critic = replay_bytes(cfg, p, checkpointing), critic_bytes(cfg, p, checkpointing)
    step, pinned = generator_step_bytes(cfg, p, checkpointing), pinned_cache_bytes(cfg, p, checkpointing)
    tokens = cfg.video.num_latent_frames * cfg.tokens_per_frame
    ckpt = "with" if checkpointing else "without"
    if step.peak >= critic.peak:
        blocks = cfg.video.num_latent_frames // cfg.stream.num_frame_per_block
        items.append(Item("replay activations", replay.retained, f"{blocks} blocks, {ckpt} grad checkpointing"))
        if pinned:
            items.append(Item("replay KV cache (pinned)", pinned, "live until the backward (checkpointing)"))
        items.append(Item("replay peak extra", step.extra, "max: teacher fwd, recompute" if pinned
                          else "max: KV cache (replay only), teacher fwd"))
    else:
        items += [Item("critic activations", critic.retained, f"{tokens} tokens, {ckpt} grad checkpointing"),
                  Item("critic recompute", critic.recompute, "one layer, in the backward")]
    items.append(Item("negative prompt context", cfg.model.text_len * cfg.model.text_dim * p, "encoded once"))
    return RolePlan("learner worker", lc.num_workers, lc.cpus_per_worker, 1.0 if lc.use_gpu else 0.0,
                    f"ZeRO-{stage}, {'bf16' if p == 2 else 'fp32'}, world size {world}", items)


def _stream_items(cfg: Config, sizes: ModelSizes, p: int, batch: int) -> list[Item]:
    """What a replica streaming the causal generator holds: weights, text encoder, VAE, KV cache, a block's forward."""
    block_tokens = cfg.stream.num_frame_per_block * cfg.tokens_per_frame
    return [Item("generator", sizes.generator * p, "frozen"),
            Item("text encoder", sizes.text_encoder * p, sizes.text_encoder_name.split(" (")[0]),
            Item("VAE", sizes.vae * p, f"{sizes.vae_name} (decode not estimated)"),
            Item("KV cache", kv_cache_bytes(cfg, batch, p), f"{cfg.stream.cache_frames} frames x {cfg.tokens_per_frame} "
                 f"tokens, batch {batch}"),
            Item("block forward (no grad)", batch * nograd_forward_bytes(cfg.model, block_tokens, p),
                 f"{block_tokens} tokens")]


def actor_role(cfg: Config, sizes: ModelSizes) -> RolePlan:
    p = resolve_dtype(cfg.runtime.dtype).itemsize
    items = _stream_items(cfg, sizes, p, 1)
    if cfg.learner.publish_backend == "broadcast":
        items.append(Item("staged weights", sizes.generator * p, "broadcast buffer of the next version"))
    a = cfg.actors
    return RolePlan("rollout actor", a.num_actors, a.num_cpus, a.num_gpus, _dtype_name(cfg.runtime.dtype), items)


def reward_role(cfg: Config, sizes: ModelSizes) -> RolePlan:
    dtype = getattr(cfg.reward, "dtype", "float32")
    s = cfg.reward_service
    items = [Item("reward model", sizes.reward * resolve_dtype(dtype).itemsize, "weights only (activations not estimated)")]
    return RolePlan("reward replica", s.max_replicas, s.num_cpus, s.num_gpus, _dtype_name(dtype), items)


def serve_role(cfg: Config, sizes: ModelSizes) -> RolePlan:
    s = cfg.serve
    items = _stream_items(cfg, sizes, resolve_dtype(cfg.runtime.dtype).itemsize, s.max_sessions)
    return RolePlan("streaming replica", s.max_replicas, s.num_cpus, s.num_gpus, _dtype_name(cfg.runtime.dtype), items)


def read_cluster(path: str | Path) -> tuple[dict[str, float], float | None]:
    """CPUs and GPUs a Ray cluster launcher file offers at full scale (head + every node type at max_workers),
    and its GPUs' size in GB when its instance types say."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--cluster {path} does not exist (a Ray cluster launcher file such as cluster.yaml)")
    data = yaml.safe_load(path.read_text()) or {}
    types = data.get("available_node_types")
    if not isinstance(types, dict) or not types:
        raise ConfigError(f"--cluster {path} has no available_node_types: it is not a Ray cluster launcher file")
    cpus = gpus = 0.0
    gpu_gb: float | None = None
    for name, node in types.items():
        count = node.get("max_workers", 0) + (1 if name == data.get("head_node_type") else 0)
        declared = node.get("resources") or {}
        instance = (node.get("node_config") or {}).get("InstanceType")
        if "CPU" in declared or "GPU" in declared:
            n_cpu, n_gpu, size = float(declared.get("CPU", 0)), float(declared.get("GPU", 0)), None
        elif instance in INSTANCE_RESOURCES:
            n_cpu, n_gpu, size = INSTANCE_RESOURCES[instance]
        else:
            raise ConfigError(f"--cluster {path}: node type {name!r} declares no resources and its instance type "
                              f"{instance!r} is not one this plan knows; add `resources: {{CPU: n, GPU: m}}` to it")
        cpus, gpus = cpus + count * n_cpu, gpus + count * n_gpu
        if n_gpu and size:
            gpu_gb = size if gpu_gb is None else min(gpu_gb, size)
    return {"source": str(path), "cpus": cpus, "gpus": gpus}, gpu_gb


def _learner_suggestions(cfg: Config, sizes: ModelSizes, limit: float) -> list[str]:
    """Knobs that bring a learner worker under `limit` bytes, each with the total it would give."""
    lc, found = cfg.learner, []
    options = []
    if lc.zero_stage == 2:
        options.append(("raise learner.zero_stage to 3", dict(stage=3)))
    if not lc.gradient_checkpointing:
        options.append(("set learner.gradient_checkpointing: true", dict(checkpointing=True)))
    if lc.zero_stage == 2 and not lc.gradient_checkpointing:
        options.append(("raise learner.zero_stage to 3 and set learner.gradient_checkpointing: true",
                        dict(stage=3, checkpointing=True)))
    for text, change in options:
        total = learner_role(cfg, sizes, **change).total
        found.append(f"{text} ({total / GB:.1f} GB{', fits' if total <= limit else ', still too much'})")
    if not learner_bf16(cfg):
        found.append("set learner.precision: bf16 (halves params, grads and activations)")
    if not any(t.endswith("fits)") for t in found):
        found.append("lower video.num_latent_frames or video.height / video.width (activations grow with tokens)")
    return found


def _stream_suggestions(cfg: Config, role: RolePlan, gpus_key: str) -> list[str]:
    out = []
    if role.per_gpu_replicas > 1:
        out.append(f"raise {gpus_key} (now {role.gpus:g}: {role.per_gpu_replicas} replicas share a GPU)")
    if cfg.runtime.dtype in ("float32", "float64") and role.role != "reward replica":
        out.append("set runtime.dtype: bfloat16")
    if role.role != "reward replica":
        out.append("lower stream.local_attn_size (the KV cache holds that many frames)")
    return out


def build_plan(cfg: Config, config_name: str, gpu_gb: float | None = None, cluster: str | None = None) -> Plan:
    """The plan of `cfg`: per-role memory against `gpu_gb` GB GPUs (else the cluster file's, else 80) and the
    resources the roles ask Ray for against the cluster file's."""
    if gpu_gb is not None and not (math.isfinite(gpu_gb) and gpu_gb > 0):
        raise ConfigError(f"--gpu-gb must be a positive number of GB per GPU, got {gpu_gb}")
    cluster_info, cluster_gb = read_cluster(cluster) if cluster else (None, None)
    if gpu_gb is not None:
        size, source = gpu_gb, "--gpu-gb"
    elif cluster_gb is not None:
        size, source = cluster_gb, f"the GPUs of {cluster}"
    else:
        size, source = 80.0, "default; set --gpu-gb"
    sizes = model_sizes(cfg)
    roles = [learner_role(cfg, sizes), actor_role(cfg, sizes), reward_role(cfg, sizes), serve_role(cfg, sizes)]
    p = 2 if learner_bf16(cfg) else 4
    activations = {}
    for label, fn in (("generator replay + loss", replay_bytes), ("critic forward + loss", critic_bytes)):
        for ckpt in (False, True):
            fb = fn(cfg, p, ckpt)
            activations[f"{label}, {'with' if ckpt else 'without'} checkpointing"] = {"retained": fb.retained,
                                                                                    "recompute": fb.recompute}
    plan = Plan(config_name, size, source, sizes, roles, activations, _per_sample(cfg), _resources(roles),
                cluster_info, [], [])
    limit = size * GB
    for role in roles:
        if plan.fits(role) is False:
            plan.problems.append(f"{role.role}: {role.per_gpu / GB:.1f} GB per GPU > {size:g} GB")
            keys = {"rollout actor": "actors.num_gpus", "reward replica": "reward_service.num_gpus",
                    "streaming replica": "serve.num_gpus"}
            role.suggestions = (_learner_suggestions(cfg, sizes, limit) if role.role == "learner worker"
                                else _stream_suggestions(cfg, role, keys[role.role]))
    if cluster_info:
        for what in ("cpus", "gpus"):
            if plan.resources["all"][what] > cluster_info[what]:
                plan.problems.append(f"the roles ask for {plan.resources['all'][what]:g} {what.upper()[:-1]}s, the "
                                     f"cluster offers {cluster_info[what]:g}")
    plan.notes += [
        "learners hold no text encoder: actors ship each prompt's context with the sample",
        f"text context per sample is an upper bound: model.text_len ({cfg.model.text_len}) tokens; actors ship only the "
        "prompt's real length",
        "activations are estimates (core/plan.py); tests/test_plan.py checks them against measured bytes on "
        "configs/plumbing.yaml"]
    return plan


def _per_sample(cfg: Config) -> dict[str, int]:
    """Bytes one rollout sample carries to the learner, in the rollout dtype."""
    p = resolve_dtype(cfg.runtime.dtype).itemsize
    latent = cfg.video.num_latent_frames * cfg.model.in_dim * math.prod(cfg.video.latent_hw)
    copies = 3 if cfg.scheduler.context_noise else 2  # noisy exit-step inputs and clean outputs (+ context inputs)
    context = text_context_bytes(cfg.model.text_len, cfg.model.text_dim, resolve_dtype(cfg.runtime.dtype))
    return {"latents": copies * latent * p, "text context (<= text_len tokens)": context}


def _resources(roles: list[RolePlan]) -> dict[str, dict[str, float]]:
    """CPUs and GPUs each role asks Ray for, the training job's (learner, actors, reward) and everything's."""
    out = {r.role + "s": {"count": r.count, "cpus": r.count * r.cpus, "gpus": r.count * r.gpus} for r in roles}
    for name, members in (("train job (learner + actors + reward)", roles[:3]), ("all", roles)):
        out[name] = {"count": sum(r.count for r in members), "cpus": sum(r.count * r.cpus for r in members),
                     "gpus": sum(r.count * r.gpus for r in members)}
    return out
