"""Toy-world teacher pretraining: the flow-matching loss is the Wan objective, it falls, and the command
writes a teacher folder the learner loads."""

from __future__ import annotations

import csv

import numpy as np
import torch

import launch
from core.algo.distill import build_score_models
from core.algo.scheduler import FlowMatchScheduler
from core.codecs.video import build_codec, to_uint8_frames
from core.model.wan import WanModel
from core.records.checkpoint import load_wan_state_dict
from helpers import TrueFlow
from toyworld.config import load_world_config
from toyworld.evaluate import evaluate_teacher
from toyworld.pretrain import pretrain_teacher
from toyworld.recipe import flow_matching_loss, world_latents
from toyworld.sampler import sample
from toyworld.world import Scene, render

SMALL = ["model.dim=32", "model.ffn_dim=64", "model.num_heads=2", "model.num_layers=1", "video.num_latent_frames=6"]


def test_world_latents_decode_to_the_world_clip_exactly():
    cfg = load_world_config()
    scene = Scene.from_seed(3)
    x0 = world_latents(build_codec(cfg), [scene], 6, 32, 32)
    assert x0.shape == (1, 6, 12, 16, 16)
    video = to_uint8_frames(build_codec(cfg).decode(x0.transpose(1, 2))).numpy()
    assert np.array_equal(video, render(scene, 6, 32, 32))


def test_flow_matching_loss_is_zero_for_the_true_flow():
    sched = FlowMatchScheduler()
    x0 = torch.randn(2, 3, 16, 4, 4, dtype=torch.float64)
    captured = {}

    def oracle(x_t, t, context):  # knows the noise: returns exactly noise - x0
        return (captured["noise"] - x0).transpose(1, 2)

    gen = torch.Generator().manual_seed(0)
    probe = torch.Generator().manual_seed(0)
    torch.randint(0, 1000, (2,), generator=probe)
    captured["noise"] = torch.randn(x0.shape, generator=probe).to(x0)
    assert flow_matching_loss(oracle, sched, x0, None, gen).item() < 1e-20


def test_pretrain_teacher_command_lowers_the_loss_and_writes_a_teacher(tmp_path, capsys):
    out = tmp_path / "teacher_run"
    args = ["pretrain-teacher", *SMALL, "pretrain.steps=30", "pretrain.batch_size=4", "pretrain.lr=3e-3",
            "pretrain.warmup_steps=1", f"pretrain.output={out}", "pretrain.num_clips=64", "pretrain.eval_clips=2",
            "pretrain.eval_steps=2"]
    assert launch.main(args) == 0
    rows = list(csv.DictReader((out / "loss.csv").open()))
    losses = [float(r["loss"]) for r in rows]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    teacher = load_wan_state_dict(out / "teacher")
    cfg = load_world_config(None, [*SMALL, "learner.teacher.kind=wan", "learner.critic_checkpoint=null",
                                   f"learner.teacher.checkpoint={out / 'teacher'}"])
    teacher_model, critic = build_score_models(cfg)
    assert torch.equal(teacher_model.state_dict()["head.head.bias"], teacher["head.head.bias"])
    printed = capsys.readouterr().out
    assert "loss" in printed and "prompt adherence on 2 held-out scenes" in printed and (out / "eval.json").is_file()


def test_euler_sampler_lands_on_x0_with_the_true_flow_and_evaluation_runs():
    x0 = torch.randn(1, 2, 16, 2, 2, dtype=torch.float64)
    out = sample(TrueFlow(x0), FlowMatchScheduler(), None, None, (1, 2, 16, 2, 2), steps=8)
    assert (out - x0).abs().max().item() < 1e-12
    cfg = load_world_config(None, SMALL)
    scores = evaluate_teacher(cfg, WanModel(cfg.model), num_clips=3, steps=2)
    assert set(scores) == {"colour", "direction", "colour_chance", "direction_chance"}
    assert 0 <= scores["colour"] <= 1 and scores["direction_chance"] == 0.2


def test_the_teacher_is_the_moving_average_of_its_weights():
    small = [*SMALL, "pretrain.steps=3", "pretrain.batch_size=1", "pretrain.lr=1e-2", "pretrain.warmup_steps=1"]
    last, _ = pretrain_teacher(load_world_config(None, [*small, "pretrain.ema_decay=0"]))
    averaged, _ = pretrain_teacher(load_world_config(None, [*small, "pretrain.ema_decay=0.9"]))
    cfg = load_world_config(None, small)
    torch.manual_seed(cfg.runtime.seed)
    init = WanModel(cfg.model)
    init.init_weights()
    start, end, ema = (dict(m.named_parameters())["blocks.0.ffn.0.weight"].detach() for m in (init, last, averaged))
    # three steps of decay 0.9 keep 0.9^3 of the start: ema = 0.729 start + (the steps' weights, weighted 0.271)
    assert (ema - start).norm() < 0.5 * (end - start).norm()
    assert not torch.equal(ema, start)
