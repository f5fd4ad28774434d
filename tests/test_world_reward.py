"""The toy world's exact reward (`reward.backend: world`): world clips score the best on every axis, each axis falls
with the error it names, and the reward service serves it over HTTP like every backend (launch.py score too)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from ray import serve

import launch
from core.records.video_io import write_mp4
from core.reward.base import VideoInput
from reward_service.app import build_app
from toyworld.config import load_world_config
from toyworld.reward import MISSING_MOTION, WorldReward, WorldRewardConfig
from toyworld.world import BACKGROUNDS, Scene, render

SCENES = [Scene.from_seed(1_000_000 + i) for i in range(12)]


def raw(frames: np.ndarray, prompt: str) -> dict[str, float]:
    return WorldReward().raw(VideoInput(frames, 8.0, prompt))


@pytest.mark.parametrize("scene", SCENES, ids=lambda s: s.prompt)
def test_world_clips_score_the_best_on_every_axis(scene):
    scores = raw(render(scene, 9), scene.prompt)
    assert scores["VQ"] == pytest.approx(0, abs=1e-6) and scores["MQ"] == pytest.approx(0, abs=1e-9)
    assert scores["TA"] == 1.0


def test_each_axis_falls_with_the_error_it_names():
    scene = Scene("circle", "red", "gray", "right", "quickly", 0.25, 0.5, 0.1875)
    clip = render(scene, 9)
    other_colour = replace(scene, colour="blue")
    assert raw(render(other_colour, 9), scene.prompt)["TA"] == pytest.approx(0.8)  # 4 of 5 attributes
    still = render(replace(scene, direction="static"), 9)
    assert raw(still, scene.prompt)["MQ"] == pytest.approx(-1.5)  # 1.5 px a frame short of "quickly"
    assert raw(still, scene.prompt)["VQ"] == pytest.approx(0, abs=1e-6)  # a still world clip is still world-like
    empty = np.broadcast_to(np.array(BACKGROUNDS["gray"], dtype=np.uint8), clip.shape).copy()
    assert raw(empty, scene.prompt)["MQ"] == -MISSING_MOTION
    faded = ((clip.astype(np.float64) + np.array(BACKGROUNDS["gray"])) / 2).astype(np.uint8)  # a half-coverage ghost
    assert raw(faded, scene.prompt)["VQ"] < -0.05
    scores = WorldReward().score_batch([VideoInput(clip, 8.0, scene.prompt), VideoInput(faded, 8.0, scene.prompt)])
    assert scores[0].normalized["VQ"] > scores[1].normalized["VQ"]


def test_bad_input_is_refused_with_what_to_do():
    clip = render(SCENES[0], 9)
    with pytest.raises(ValueError, match="not a prompt of the toy world"):
        raw(clip, "a corgi surfing")
    with pytest.raises(ValueError, match="multiples of 32"):
        raw(clip[:, :20, :20], SCENES[0].prompt)


def test_the_embedded_default_trains_with_the_world_reward():
    cfg = load_world_config()
    assert isinstance(cfg.reward, WorldRewardConfig) and cfg.learner.reward_axis == "MQ"
    assert load_world_config(None, ["reward.backend=motion"]).reward.backend == "motion"  # still there


def test_served_over_http_and_by_the_score_command(serve_instance, tmp_path, capsys):
    cfg = load_world_config(None, ["reward_service.app_name=world_reward", "reward_service.num_cpus=0.1"])
    serve.run(build_app(cfg), name="world_reward", route_prefix="/world_reward")
    try:
        scene = SCENES[1]
        path = tmp_path / "clip.mp4"
        write_mp4(path, render(scene, 9), fps=8)
        url = f"{serve_instance}/world_reward"
        assert launch.main(["score", str(path), "--prompt", scene.prompt, "--url", url]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["backend"] == "world" and result["raw"]["TA"] == 1.0  # H.264 blurs edges, not the attributes
        assert result["raw"]["MQ"] > -0.1 and result["raw"]["VQ"] > -0.05
    finally:
        serve.delete("world_reward")
