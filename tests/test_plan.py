"""`launch.py plan`: the meta-device model sizes, the activation estimate against bytes measured on CPU, the KV
cache a checkpointed replay pins, DeepSpeed's fp32 gradients, the knob it suggests when a config does not fit,
and the CLI (table and JSON) in a subprocess.

Measured on configs/plumbing.yaml (CPU), estimate vs bytes the forward left alive (replay + Re-DMD loss, with
the KV cache it pins; critic forward + flow loss), measured / estimated: float32 replay 0.97 without and 1.03
with gradient checkpointing, critic 0.96 and 1.10; bfloat16 0.98 / 1.03 and 0.97 / 1.09; the peak of the
teacher's forward without grad 0.83 (float32) and 0.99 (bfloat16). The tests hold them to +-30%.
"""

from __future__ import annotations

import gc
import json
import math
import subprocess
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from core.algo.distill import ReDMD
from core.algo.rollout import RolloutRecord, SelfForcedRollout, gaussian_noise
from core.config import PLUMBING_CONFIG, REPO_ROOT, Config, WanArchConfig, load_config
from core.model.wan import CausalWanModel, WanModel
from core.plan import (
    GB,
    SUB_GROUP_ELEMENTS,
    build_plan,
    critic_bytes,
    fp32_grad_bytes,
    generator_step_bytes,
    kv_cache_bytes,
    learner_role,
    model_sizes,
    nograd_forward_bytes,
    pinned_cache_bytes,
)
from launch import main
from learner.engines import deepspeed_config

PAPER = REPO_ROOT / "configs" / "reward_forcing_1.3b.yaml"
MARGIN = 0.30
TINY = WanArchConfig(dim=16, ffn_dim=32, num_heads=2, num_layers=2, freq_dim=16, text_dim=8, text_len=4, in_dim=4,
                     out_dim=4)


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages that operators created and that are still alive (each storage once), ignoring the
    storages in `ignore` (parameters, buffers, inputs): what a forward leaves for its backward."""

    def __init__(self, ignore: set[int]):
        super().__init__()
        self.ignore, self.live, self.current, self.peak = ignore, {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in self.live or key in self.ignore or storage.nbytes() == 0:
                continue
            self.live[key] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)


def _storages(*tensors: torch.Tensor) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


def test_meta_build_of_the_paper_config_counts_the_real_models():
    sizes = model_sizes(load_config(PAPER))
    assert sizes.generator == sizes.critic == 1_418_996_800  # Wan2.1-T2V-1.3B (docs/reference.md)
    assert 1.4e10 < sizes.teacher < 1.45e10  # Wan2.1-T2V-14B
    assert 5.6e9 < sizes.text_encoder < 5.8e9  # umT5-XXL encoder
    assert 2.1e9 < sizes.reward < 2.3e9  # Qwen2-VL-2B + rm_head


@dataclass
class Plumbing:
    """plumbing.yaml's three models in one dtype and a recorded training rollout, ready for the learner's step."""

    cfg: Config
    p: int
    generator: CausalWanModel
    critic: WanModel
    teacher: WanModel
    distill: ReDMD
    context: torch.Tensor
    record: RolloutRecord
    clean: torch.Tensor  # the record's clean latents, held: a freed storage's address could be a new one's

    @property
    def ignore(self) -> set[int]:
        """Storages that exist before the step: weights, buffers, the scheduler's tables, the context and the
        recorded latents."""
        models = (self.generator, self.critic, self.teacher)
        tables = [t for t in vars(self.distill.scheduler).values() if isinstance(t, torch.Tensor)]
        return _storages(self.context, self.clean, *tables,
                         *[t for b in self.record.blocks for t in (b.noisy, b.clean)],
                         *[t for m in models for t in (*m.parameters(), *m.buffers())])


def _plumbing(dtype: torch.dtype, checkpointing: bool) -> Plumbing:
    cfg = load_config(PLUMBING_CONFIG)
    torch.manual_seed(0)
    generator = CausalWanModel(cfg.model, cfg.stream).to(dtype).train().requires_grad_(True)
    critic = WanModel(cfg.model).to(dtype).train().requires_grad_(True)
    teacher = WanModel(cfg.model).to(dtype).eval().requires_grad_(False)
    distill = ReDMD(cfg)
    context = torch.randn(1, 10, cfg.model.text_dim, dtype=dtype)
    rollout = SelfForcedRollout(generator, distill.scheduler, distill.rollout_timesteps)
    fpb, (lh, lw) = cfg.stream.num_frame_per_block, cfg.video.latent_hw
    p = torch.finfo(dtype).bits // 8
    with torch.no_grad():
        cache = generator.init_cache(1, (lh, lw))
        noise = gaussian_noise((1, fpb, cfg.model.in_dim, lh, lw), torch.Generator().manual_seed(0), dtype, "cpu")
        record = rollout.training_rollout(context, cache, noise, cfg.video.num_latent_frames // fpb, exit_index=1)
    assert cache.nbytes() == kv_cache_bytes(cfg, 1, p)  # the plan's KV cache is the cache's buffers, exactly
    for model in (generator, critic):
        model.gradient_checkpointing = checkpointing
    return Plumbing(cfg, p, generator, critic, teacher, distill, context, record, record.clean_latents())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
def test_activation_estimate_matches_the_bytes_measured_on_plumbing(checkpointing, dtype):
    """The real replay + Re-DMD loss and the critic's forward + loss on plumbing.yaml (its 12-frame window evicts
    during the 21-frame replay), measured with a dispatch mode that tracks every storage operators create. What
    the generator's step leaves alive is the plan's whole figure: the replay's activations and the KV cache
    they pin."""
    run = _plumbing(dtype, checkpointing)
    cfg, p, distill, context, ignore = run.cfg, run.p, run.distill, run.context, run.ignore
    tracked = LiveBytes(ignore)
    with tracked:
        x = distill.replay(run.generator, run.record, context)
        loss, _ = distill.generator_loss(x, run.critic, run.teacher, context, context, torch.ones(1),
                                         torch.Generator().manual_seed(0), ["a prompt"])
    gc.collect()
    step = tracked.current / generator_step_bytes(cfg, p, checkpointing).live
    del x, loss
    gc.collect()

    tracked = LiveBytes(ignore)
    with tracked:
        loss, _ = distill.critic_loss(run.critic, run.clean, context, torch.Generator().manual_seed(0))
    gc.collect()
    critic_ratio = tracked.current / critic_bytes(cfg, p, checkpointing).retained
    del loss

    tracked = LiveBytes(ignore)
    with torch.no_grad(), tracked:
        run.teacher(run.clean.transpose(1, 2), torch.full((1,), 500.0), context)
    nograd = tracked.peak / nograd_forward_bytes(cfg.model, cfg.video.num_latent_frames * cfg.tokens_per_frame, p)
    for what, ratio in (("replay + loss (with the pinned KV cache)", step), ("critic forward + loss", critic_ratio),
                        ("teacher forward without grad (peak)", nograd)):
        assert abs(ratio - 1) <= MARGIN, f"{what}: measured / estimated = {ratio:.2f}, outside 1 +- {MARGIN}"


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
def test_a_checkpointed_replay_pins_its_whole_kv_cache_until_the_backward(checkpointing):
    """Dropping the replay's cache frees exactly what the plan does not count as pinned: nothing once checkpointed
    blocks hold it for their recompute, all its buffers otherwise; after the backward nothing the replay made
    is left."""
    run = _plumbing(torch.float32, checkpointing)
    noisy = run.record.blocks[0].noisy
    rollout = SelfForcedRollout(run.generator, run.distill.scheduler, run.distill.rollout_timesteps)
    tracked = LiveBytes(run.ignore)
    with tracked:  # what ReDMD.replay does, keeping the cache to drop it here
        cache = run.generator.init_cache(1, tuple(noisy.shape[-2:]), dtype=noisy.dtype)
        x = rollout.replay_exit_steps(run.record, run.context, cache)
    held = tracked.current
    del cache
    gc.collect()
    assert held - tracked.current == kv_cache_bytes(run.cfg, 1, run.p) - pinned_cache_bytes(run.cfg, run.p,
                                                                                              checkpointing)
    x.square().mean().backward()
    del x
    gc.collect()
    assert tracked.current == 0


def test_the_learner_counts_the_pinned_kv_cache_and_deepspeeds_fp32_grads():
    """The paper's learner (checkpointed, bf16, ZeRO-2) beside the stage-3 and unpinned variants: the pinned cache
    is the replay's whole KV cache, and each engine's fp32 grads are 4P/N (stage 3: one 1e9-element sub-group)."""
    cfg = load_config(PAPER)
    sizes = model_sizes(cfg)
    n = sizes.generator
    for world, stage, fp32_grads in ((32, 2, 4 * math.ceil(n / 32)), (1, 2, 4 * n), (1, 3, 4 * SUB_GROUP_ELEMENTS),
                                     (32, 3, 4 * math.ceil(n / 32))):
        items = {i.name: i.bytes for i in learner_role(load_config(PAPER, [f"learner.num_workers={world}"]), sizes,
                                                       stage=stage).items}
        assert items["generator fp32 grads"] == items["critic fp32 grads"] == fp32_grads, (world, stage)
    items = {i.name: i.bytes for i in learner_role(cfg, sizes).items}
    assert items["replay KV cache (pinned)"] == kv_cache_bytes(cfg, 1, 2) > 5 * GB
    step = generator_step_bytes(cfg, 2, True)
    assert items["replay activations"] + items["replay KV cache (pinned)"] == step.live
    assert items["replay peak extra"] == step.extra
    unpinned = {i.name: i.bytes for i in learner_role(cfg, sizes, checkpointing=False).items}
    assert "replay KV cache (pinned)" not in unpinned and "critic activations" not in unpinned
    assert unpinned["replay peak extra"] >= kv_cache_bytes(cfg, 1, 2)  # alive during the replay only


@pytest.mark.parametrize(("stage", "bf16"), [(2, True), (2, False), (3, True)], ids=["zero2-bf16", "zero2-fp32",
                                                                                     "zero3-bf16"])
def test_deepspeeds_step_hands_adamw_the_fp32_grads_the_plan_counts(one_rank, stage, bf16):
    """The installed DeepSpeed, one rank: the fp32 gradients on the masters when its step() calls AdamW."""
    learner = load_config(PLUMBING_CONFIG, [f"learner.zero_stage={stage}", "learner.batch_size=1"]).learner
    config = deepspeed_config(learner, 1e-4, bf16=bf16)
    dtype = torch.bfloat16 if bf16 else torch.float32
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=config, enabled=stage == 3):  # stage 3: sharded, in bf16
        model = WanModel(TINY)
    if stage != 3:
        model = model.to(dtype)
    model.init_buffers("cpu")
    params = sum(p.ds_numel if stage == 3 else p.numel() for p in model.parameters())
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=config)
    adamw, seen = engine.optimizer.optimizer, []
    step = adamw.step

    def recording_step(*args, **kwargs):
        seen.append(sum(p.grad.nbytes for g in adamw.param_groups for p in g["params"] if p.grad is not None))
        assert all(p.grad.dtype == torch.float32 for g in adamw.param_groups for p in g["params"] if p.grad is not None)
        return step(*args, **kwargs)

    adamw.step = recording_step
    gen = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 2, 4, 4, generator=gen), torch.randn(1, 4, 8, generator=gen)
    engine.backward(engine(x.to(dtype), torch.tensor([500.0]), ctx.to(dtype)).float().square().mean())
    engine.step()
    assert seen and max(seen) == fp32_grad_bytes(params, stage, 1)


def test_a_config_that_does_not_fit_is_flagged_with_the_knob():
    cfg = load_config(PAPER, ["learner.gradient_checkpointing=false"])
    plan = build_plan(cfg, str(PAPER), gpu_gb=80)
    learner = plan.roles[0]
    assert plan.fits(learner) is False and learner.per_gpu > 80 * GB
    assert any(p.startswith("learner worker") for p in plan.problems)
    assert any("learner.gradient_checkpointing: true" in s and s.endswith("fits)") for s in learner.suggestions)
    small = build_plan(load_config(PAPER), str(PAPER), gpu_gb=40)  # checkpointing on, but the 14B teacher replicated
    assert any(s.startswith("raise learner.zero_stage to 3") for s in small.roles[0].suggestions)
    assert build_plan(load_config(PAPER), str(PAPER), gpu_gb=80).problems == []


def test_cli_prints_the_plan_as_json_and_as_a_table(tmp_path: Path):
    run = subprocess.run([sys.executable, "launch.py", "plan", "--config", str(PAPER), "--gpu-gb", "80", "--json"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    plan = json.loads(run.stdout)  # nothing else on stdout (DeepSpeed's accelerator line is silenced), so it pipes
    roles = {r["role"]: r for r in plan["roles"]}
    assert set(roles) == {"learner worker", "rollout actor", "reward replica", "streaming replica"}
    learner = roles["learner worker"]
    assert learner["fits"] is True and 0 < learner["per_gpu_bytes"] < 80 * GB
    assert {i["name"] for i in learner["items"]} >= {"generator params", "generator grads", "generator optimizer",
                                                     "teacher"}
    assert plan["models"]["generator"] == 1_418_996_800 and plan["resources"]["train job (learner + actors + reward)"][
        "gpus"] == 64
    assert main(["plan", "--config", str(PLUMBING_CONFIG)]) == 0
    assert main(["plan", "--config", str(PAPER), "--gpu-gb", "24"]) == 3  # a role does not fit: a CI step can stop


def test_bad_input_gets_a_clear_error(capsys):
    assert main(["plan", "--config", "configs/no_such.yaml"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--gpu-gb", "-3"])
    assert exit_info.value.code == 2
    assert "--gpu-gb: must be a positive, finite number of GB" in capsys.readouterr().err
    assert main(["plan", "--config", str(PLUMBING_CONFIG), "--cluster", "no_cluster.yaml"]) == 2
    assert "--cluster no_cluster.yaml does not exist" in capsys.readouterr().err
