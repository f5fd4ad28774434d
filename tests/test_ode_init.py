"""ODE-regression init and toy-world evaluation: the trajectory states are the right ones, the regression
learns through the learner's replay path, and the commands write what the learner and `evaluate` load."""

from __future__ import annotations

import csv
import json

import pytest
import torch

import launch
from core.algo.distill import build_teacher
from core.algo.rollout import SelfForcedRollout, gaussian_noise
from core.algo.scheduler import FlowMatchScheduler
from core.codecs.text_encoder import TextEncoder
from core.config import ConfigError
from core.model.wan import CausalWanModel, WanModel
from core.records.checkpoint import load_wan_state_dict, save_wan_folder
from core.stream.pipeline import build_generator
from helpers import TrueFlow
from toyworld.config import load_world_config
from toyworld.ode_init import (
    block_weighted_mse,
    ode_regression_loss,
    on_policy_loss,
    regression_record,
    student_timesteps,
    teacher_trajectories,
    teacher_x0_at_exit,
)
from toyworld.sampler import ode_trajectory

SMALL = ["model.dim=32", "model.ffn_dim=64", "model.num_heads=2", "model.num_layers=1", "video.num_latent_frames=6",
         "checkpoint.generator=null", "ode_init.init=null"]
LEARNED = ["learner.teacher.kind=wan", "learner.critic_checkpoint=null"]  # a Wan teacher instead of the exact one
WARPED = ["scheduler.warp_denoising_step=true"]  # the student's steps on the shifted table, where the ODE's grid is


def test_trajectory_states_at_the_student_timesteps_are_exact_with_the_true_flow():
    cfg = load_world_config(None, WARPED)
    keep = tuple(student_timesteps(cfg).tolist())
    shape = (2, 6, 16, 2, 2)
    x0 = torch.randn(shape, dtype=torch.float64)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(7)).double()
    *states, end = ode_trajectory(TrueFlow(x0), FlowMatchScheduler(cfg.scheduler.shift), None, None, shape, 12,
                                  rng=torch.Generator().manual_seed(7), keep=keep)
    assert len(states) == 4 and (end - x0).abs().max().item() < 1e-12
    for t, state in zip(keep, states):  # the timesteps are float32: sigma = t / 1000 up to float32 rounding
        sigma = t / 1000
        assert (state - ((1 - sigma) * x0 + sigma * noise)).abs().max().item() < 1e-7, t
    with pytest.raises(ValueError, match="not on the 10-step ODE grid"):
        ode_trajectory(TrueFlow(x0), FlowMatchScheduler(cfg.scheduler.shift), None, None, shape, 10, keep=keep)


def test_ode_pairs_on_the_unwarped_list_are_refused_at_load_with_the_fix():
    """The embedded default's unwarped steps (sigma 0.75, 0.5, 0.25) are off the ODE's shifted grid."""
    with pytest.raises(ConfigError, match="set scheduler.warp_denoising_step=true, or use ode_init.pairs=few_step"):
        load_world_config(None, ["ode_init.pairs=causal_ode"])
    assert load_world_config(None, ["ode_init.pairs=causal_ode", *WARPED]).ode_init.pairs == "causal_ode"


def test_regression_record_slices_blocks_at_the_exit_step():
    states, clean = torch.randn(2, 4, 6, 16, 2, 2), torch.randn(2, 6, 16, 2, 2)
    record = regression_record(states, clean, 2, 500.0, frames_per_block=3)
    assert [b.start_frame for b in record.blocks] == [0, 3] and record.exit_timestep == 500.0
    assert torch.equal(record.blocks[1].noisy, states[:, 2, 3:6]) and torch.equal(record.blocks[1].clean, clean[:, 3:6])


def test_regression_through_the_replay_path_fits_teacher_trajectories():
    cfg = load_world_config(None, [*SMALL, *LEARNED, "ode_init.num_clips=2", "ode_init.ode_steps=4",
                                   "ode_init.batch_size=2", "ode_init.pairs=ode", *WARPED])
    torch.manual_seed(0)
    teacher = WanModel(cfg.model).eval()
    encoder = TextEncoder.from_config(cfg, "cpu", torch.float32)
    prompts = ["a red circle moves left across a gray background", "a white square stays still on a black background"]
    pairs = teacher_trajectories(cfg, teacher, encoder, prompts, seed=0)
    assert pairs.states.shape == pairs.targets.shape == (2, 4, 6, 12, 16, 16) and pairs.clean.shape == (2, 6, 12, 16, 16)
    assert torch.equal(pairs.targets[:, 2], pairs.clean)  # every state of an ODE regresses its end
    student = CausalWanModel(cfg.model, cfg.stream)
    student.load_state_dict(teacher.state_dict())
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    sched, timesteps, context = FlowMatchScheduler.from_config(cfg.scheduler), student_timesteps(cfg), encoder.encode(prompts)
    losses = []
    for _ in range(15):
        loss = ode_regression_loss(student, sched, timesteps, pairs.states, pairs.targets, pairs.clean, context,
                                   exit_index=1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_on_policy_targets_are_the_teachers_x0_at_the_students_own_states():
    """DAgger: the student's rollout picks the states; the target of each block is the exact teacher's x0 there,
    given the student's earlier blocks as the clean past and no future; the loss trains through the replay. On
    the warped list, whose timesteps are table entries, so sigma is exactly t / 1000 on both sides."""
    cfg = load_world_config(None, [*SMALL, *WARPED])
    torch.manual_seed(0)
    student, teacher = CausalWanModel(cfg.model, cfg.stream), build_teacher(cfg)
    sched, timesteps = FlowMatchScheduler.from_config(cfg.scheduler), student_timesteps(cfg)
    prompts = ["a red circle moves quickly left across a gray background",
               "a white square stays still on a black background"]
    context = TextEncoder.from_config(cfg, "cpu", torch.float32).encode(prompts)
    shape = (2, 6, cfg.model.in_dim, *cfg.video.latent_hw)
    rng = torch.Generator().manual_seed(0)
    with torch.no_grad():
        record = SelfForcedRollout(student, sched, timesteps).training_rollout(
            context, student.init_cache(2, shape[-2:]), gaussian_noise((2, 3, *shape[2:]), rng, torch.float32, "cpu"),
            2, exit_index=2)
    targets = teacher_x0_at_exit(teacher, sched, record, prompts, rng)
    sigma = torch.tensor([0.0] * 3 + [record.exit_timestep / 1000] * 3)
    frames = torch.cat([record.blocks[0].clean, record.blocks[1].noisy], dim=1).transpose(1, 2).double()
    direct = teacher.codec.encode(teacher.denoise(teacher.codec.decode(frames), sigma.expand(2, 6), prompts))
    assert (targets[:, 3:] - direct.transpose(1, 2)[:, 3:]).abs().max().item() < 1e-4

    loss = on_policy_loss(student, teacher, sched, timesteps, context, prompts, shape, 1, rng)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in student.parameters() if p.requires_grad)


def test_first_block_weight_scales_only_the_first_blocks_error():
    pred, target = torch.zeros(2, 6, 4), torch.zeros(2, 6, 4)
    target[:, :3] = 1.0  # all the error in the first block of 3 frames
    assert block_weighted_mse(pred, target, 3).item() == pytest.approx(torch.nn.functional.mse_loss(pred, target).item())
    assert block_weighted_mse(pred, target, 3, 3.0).item() == pytest.approx(3 / 4)  # 3 * 1 / (3 + 1)
    assert block_weighted_mse(target, target, 3, 3.0).item() == 0.0
    with pytest.raises(ConfigError, match="first_block_weight must be > 0"):
        load_world_config(None, ["ode_init.first_block_weight=0"])


def test_ode_init_and_evaluate_commands_write_what_the_learner_and_evaluation_load(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = load_world_config(None, [*SMALL, *LEARNED])
    save_wan_folder(tmp_path / "teacher", WanModel(cfg.model))
    out = tmp_path / "ode"
    args = ["ode-init", *SMALL, *LEARNED, f"learner.teacher.checkpoint={tmp_path / 'teacher'}", "ode_init.num_clips=3",
            "ode_init.ode_steps=4", "ode_init.steps=4", "ode_init.batch_size=2", "ode_init.eval_clips=2",
            "ode_init.on_policy=0.5", f"ode_init.output={out}"]
    assert launch.main(args) == 0
    assert len(list(csv.DictReader((out / "loss.csv").open()))) == 4
    saved = load_wan_state_dict(out / "ode_init.pt")
    generator = build_generator(load_world_config(None, [*SMALL, f"checkpoint.generator={out / 'ode_init.pt'}"]), "cpu")
    assert all(torch.equal(generator.state_dict()[k], v) for k, v in saved.items())
    assert json.loads((out / "eval.json").read_text())["prompts"] == 2

    report = tmp_path / "eval.json"
    args = ["evaluate", *SMALL, f"checkpoint.generator={out / 'ode_init.pt'}", "--prompts", "3", "--seeds", "2",
            "--long-frames", "12", "--long-prompts", "2", "--denoiser-error", "--out", str(report)]
    assert launch.main(args) == 0
    result = json.loads(report.read_text())
    errors = result["denoiser_error"]  # [seed][step][block] against the exact denoiser at the student's own states
    assert len(errors["mse"]) == 2 and all(len(steps) == len(errors["timesteps"]) for steps in errors["mse"])
    assert all(e > 0 for steps in errors["mse"] for blocks in steps for e in blocks)
    measures = result["measures"]
    assert {"adherence_all", "adherence_colour", "fidelity_rms", "visible_frames", "displacement_px", "boundary_ratio",
            "motion_reward", "initial_frame_copy"} <= set(measures) and result["seeds"] == [0, 1] and result["long_frames"] == 12
    assert all(0 <= measures[f"adherence_{a}"]["mean"] <= 1 for a in ("all", "colour", "shape", "direction", "speed"))
    world = {k: m["world"] for k, m in measures.items()}  # the exact measures on the world's own clips
    assert world["adherence_all"] == world["visible_frames"] == 1.0 and world["fidelity_rms"] < 1e-9
    assert world["speed_error_px"] < 0.05 and abs(world["boundary_ratio"] - 1) < 0.15
    printed = capsys.readouterr().out
    assert "adherence: every attribute" in printed and "long rollouts: initial-frame copy" in printed
    assert "against the exact denoiser's at its own rollout states" in printed
    assert world["long_fidelity_end"] < 1e-6 and world["long_adherence_end"] == 1.0


def test_ode_init_refuses_a_wan_teacher_without_weights():
    assert launch.main(["ode-init", *SMALL, *LEARNED, "learner.teacher.checkpoint=null"]) == 2
