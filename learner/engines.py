"""DeepSpeed engines for the generator and the critic, and the frozen teacher, on one learner worker.

The DeepSpeed config is built here from the `learner` section of our YAML (no hand-edited JSON):
ZeRO stage, bf16 on GPU / fp32 on CPU, gradient clipping, AdamW with the paper's betas, and
gradient accumulation over the worker's `batch_size` samples (micro batch 1), so each engine
takes exactly one optimizer step per update and clears what it accumulated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param

from core.algo.distill import build_score_models
from core.config import Config, LearnerConfig
from core.model.wan import CausalWanModel, WanModel
from core.records.checkpoint import CheckpointError, Reader, WanBuild, materialise, mismatch_report
from core.stream.pipeline import build_generator

Model = TypeVar("Model", bound=torch.nn.Module)


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


def zero3_build(cfg: Config, device: torch.device, dtype: torch.dtype, ds_config: dict) -> WanBuild:
    """Wan models built inside ZeRO-3's Init (each rank allocates only its shard), then filled one gathered
    parameter at a time from rank 0: the checkpoint, which only rank 0 reads (to the CPU, in `dtype`), or the
    seeded weights every other build gets."""

    def build(make: Callable[[], Model], read: Reader | None) -> Model:
        # the dtype comes from ds_config's bf16 flag (Init's dtype argument is ignored off fp16-capable devices)
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = make()
        source = None
        if dist.get_rank() == 0:
            if read is not None:
                source = read("cpu", dtype)
            else:
                torch.manual_seed(cfg.runtime.seed)
                source = {k: v.to(dtype) for k, v in model.initial_values()}
            report = mismatch_report({k: tuple(p.ds_shape) for k, p in model.named_parameters()}, source)
            if report:
                raise CheckpointError("checkpoint does not fit the model; nothing was loaded.\n  " + report)
        for name, param in model.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if source is not None:
                    param.data.copy_(source.pop(name))
        model.init_buffers(device)
        return model

    return build


def build_models(cfg: Config, device: torch.device) -> Models:
    """Generator and critic as DeepSpeed engines, the teacher frozen; all start from the same weights on every rank.

    Each Wan is built on the meta device and materialised once, in the training dtype on `device` (under ZeRO-3:
    sharded at construction): no float32 CPU copy, no random init before a checkpoint. Seeded random weights (no
    checkpoint) are those of a float32 CPU build, so learners and actors start from the same ones.
    """
    learner = cfg.learner
    bf16 = use_bf16(learner, device)
    dtype = torch.bfloat16 if bf16 else torch.float32
    configs = [deepspeed_config(learner, lr, bf16) for lr in (learner.generator_lr, learner.critic_lr)]
    teacher_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
                      "bf16": {"enabled": bf16}, "steps_per_print": 2**62}
    build = (zero3_build(cfg, device, dtype, teacher_config) if learner.zero_stage == 3
             else materialise(device, dtype, cfg.runtime.seed))
    generator = build_generator(cfg, device, dtype, build)
    teacher, critic = build_score_models(cfg, device, dtype, build)
    for m in (generator, critic, teacher):
        m.gradient_checkpointing = learner.gradient_checkpointing
    engines = []
    for model, config in zip((generator.train().requires_grad_(True), critic), configs):
        engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=config)
        engines.append(engine)
    if learner.zero_stage == 3 and any(True for _ in teacher.parameters()):  # a teacher with weights to shard
        teacher, *_ = deepspeed.initialize(model=teacher, config=teacher_config)
    return Models(engines[0], engines[1], teacher, device, dtype)


def full_weights(engine: deepspeed.DeepSpeedEngine, stage: int, rank0_only: bool = True) -> dict[str, torch.Tensor] | None:
    """The module's full parameters as float32 CPU tensors, taken from the optimizer's fp32 master weights.

    Under bf16 the module holds bf16 copies; an EMA or a publication read from them would average or send weights
    rounded to bf16 (at lr 2e-6 most updates are below bf16's resolution), so they are read from the masters
    (`safe_get_full_fp32_param`, ZeRO 1-3). Under fp32 the module's parameters are the masters. Every rank must
    call it (the masters are partitioned: one collective per parameter); ranks other than 0 get None when
    `rank0_only`. Callers cast once, to the receiver's dtype.
    """
    params = dict(engine.module.named_parameters())
    keep = not rank0_only or dist.get_rank() == 0
    if engine.bfloat16_enabled() or engine.fp16_enabled():
        out = {}
        for name, param in params.items():
            master = safe_get_full_fp32_param(param)
            if master is None:
                raise RuntimeError(f"DeepSpeed holds no fp32 master of {name!r}; full_weights reads trainable "
                                   "parameters of an engine with an optimizer")
            if keep:
                out[name] = master.detach().cpu()  # a fresh buffer gathered for this call
        return out if keep else None
    if stage != 3:
        return {k: p.detach().cpu().clone() for k, p in params.items()} if keep else None
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        return {k: p.detach().cpu().clone() for k, p in params.items()} if keep else None
