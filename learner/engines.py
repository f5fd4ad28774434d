"""DeepSpeed engines for the generator and the critic, and the frozen teacher, on one learner worker.

The DeepSpeed config is built here from the `learner` section of our YAML (no hand-edited JSON):
ZeRO stage, bf16 on GPU / fp32 on CPU, gradient clipping, AdamW with the paper's betas, and
gradient accumulation over the worker's `batch_size` samples (micro batch 1), so each engine
takes exactly one optimizer step per update and clears what it accumulated.
"""

from __future__ import annotations

from dataclasses import dataclass

import deepspeed
import torch
import torch.distributed as dist

from core.algo.distill import build_score_models
from core.config import Config, LearnerConfig
from core.model.wan import CausalWanModel, WanModel
from core.stream.pipeline import build_generator


def use_bf16(learner: LearnerConfig, device: torch.device) -> bool:
    return learner.precision == "bf16" or (learner.precision == "auto" and device.type == "cuda")


def deepspeed_config(learner: LearnerConfig, lr: float, bf16: bool) -> dict:
    """The DeepSpeed config of one trainable model (generator or critic)."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": learner.batch_size,
        "gradient_clipping": learner.grad_clip,
        "zero_optimization": {"stage": learner.zero_stage},
        "bf16": {"enabled": bf16},
        # torch's AdamW: no DeepSpeed CUDA op has to be JIT-built on the nodes
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": list(learner.betas), "eps": 1e-8,
                                                  "weight_decay": learner.weight_decay, "torch_adam": True}},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


@dataclass
class Models:
    generator: deepspeed.DeepSpeedEngine
    critic: deepspeed.DeepSpeedEngine
    teacher: torch.nn.Module  # a plain frozen module, or a ZeRO-3 engine sharding a Wan teacher under stage 3
    device: torch.device
    dtype: torch.dtype

    @property
    def generator_module(self) -> CausalWanModel:
        return self.generator.module

    @property
    def critic_module(self) -> WanModel:
        return self.critic.module


def build_models(cfg: Config, device: torch.device) -> Models:
    """Generator and critic as DeepSpeed engines, the teacher frozen; all start from the same seed on every rank."""
    learner = cfg.learner
    bf16 = use_bf16(learner, device)
    dtype = torch.bfloat16 if bf16 else torch.float32
    generator = build_generator(cfg, torch.device("cpu"), torch.float32).train().requires_grad_(True)
    teacher, critic = build_score_models(cfg)
    for m in (generator, critic, teacher):
        m.gradient_checkpointing = learner.gradient_checkpointing
    engines = []
    for model, lr in ((generator, learner.generator_lr), (critic, learner.critic_lr)):
        engine, *_ = deepspeed.initialize(model=model.to(device), model_parameters=list(model.parameters()),
                                          config=deepspeed_config(learner, lr, bf16))
        engines.append(engine)
    if learner.zero_stage == 3 and any(True for _ in teacher.parameters()):  # a teacher with weights to shard
        teacher, *_ = deepspeed.initialize(model=teacher.to(device), config={
            "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "bf16": {"enabled": bf16},
            "steps_per_print": 2**62})
    else:
        teacher = teacher.to(device=device, dtype=dtype)
    return Models(engines[0], engines[1], teacher, device, dtype)


def full_weights(engine: deepspeed.DeepSpeedEngine, stage: int, rank0_only: bool = True) -> dict[str, torch.Tensor] | None:
    """The module's full parameters as CPU tensors (a collective under ZeRO-3: call it on every rank).

    Returns None on ranks other than 0 when `rank0_only`.
    """
    params = dict(engine.module.named_parameters())
    keep = not rank0_only or dist.get_rank() == 0
    if stage != 3:
        return {k: p.detach().cpu().clone() for k, p in params.items()} if keep else None
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        return {k: p.detach().cpu().clone() for k, p in params.items()} if keep else None
