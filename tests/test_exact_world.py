"""The toy world's exact teacher (toyworld/exact.py): the closed-form E[x0 | x_t, prompt] equals brute-force
enumeration of the world's clips, returns world clips at small noise, and its ODE samples are world clips
that read back as prompted; behind the learner's teacher interface, with the learned critic."""

from __future__ import annotations

import json
import math

import pytest
import torch

import launch
from core.algo.distill import ReDMD, build_score_models, build_teacher, teacher_context
from core.algo.scheduler import FlowMatchScheduler
from core.codecs.video import build_codec, from_uint8_frames
from core.config import ConfigError
from core.model.wan import WanModel
from toyworld.config import load_world_config
from toyworld.exact import ExactWorldTeacher, WorldClips
from toyworld.ode_init import student_timesteps
from toyworld.sampler import causal_ode_trajectory, few_step_trajectory, sample
from toyworld.world import SIZES, Scene, parse_prompt, render

EXACT = ["learner.teacher.kind=exact_world", "learner.teacher.checkpoint=null"]


def pixels(scene: Scene, frames: int) -> torch.Tensor:
    """A world clip as the codecs see it: [3, F, H, W] in [-1, 1], float64."""
    return from_uint8_frames(render(scene, frames), torch.float64)[0]


def brute_force_mean(x: torch.Tensor, sigma: torch.Tensor, scene: Scene, frames: int) -> torch.Tensor:
    """E[x0 | x] by rendering every clip of the scene's prompt (every size and grid position) and weighting it."""
    attrs = parse_prompt(scene.prompt)
    candidates = torch.stack([pixels(Scene(attrs.shape, attrs.colour, attrs.background, attrs.direction,
                                           attrs.speed or "slowly", x0 / 32, y0 / 32, size), frames)
                              for size in SIZES for y0 in range(32) for x0 in range(32)])
    a, s = (1 - sigma)[None, None, :, None, None], sigma[None, None, :, None, None]
    logits = -((x[None] - a * candidates) ** 2 / (2 * s ** 2)).sum(dim=(1, 2, 3, 4))
    return (torch.softmax(logits, 0)[:, None, None, None, None] * candidates).sum(0)


@pytest.fixture(scope="module")
def clips3() -> WorldClips:
    return WorldClips(3, 32, 32)


@pytest.mark.parametrize("sigma, pinned", [([0.3, 0.3, 0.3], True), ([0.8, 0.8, 0.8], False),
                                           ([0.97, 0.97, 0.97], False),
                                           ([0.05, 0.9, 0.9], True)])  # a nearly clean first frame fixes the clip
def test_the_closed_form_equals_brute_force_enumeration(clips3, sigma, pinned):
    scene = Scene.from_seed(5)
    x0 = pixels(scene, 3)
    sigma = torch.tensor(sigma, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = (1 - sigma)[None, :, None, None] * x0 + sigma[None, :, None, None] * noise
    exact = clips3.posterior_mean(x, sigma, [parse_prompt(scene.prompt)])
    assert (exact - brute_force_mean(x, sigma, scene, 3)).abs().max().item() < 1e-10
    assert ((exact - x0).abs().max().item() < 1e-6) == pinned  # else a blend of the prompt's clips


@pytest.mark.parametrize("seed", range(6))
def test_at_small_noise_it_returns_the_world_clip_with_and_without_the_prompt(clips3, seed):
    scene = Scene.from_seed(seed)
    x0 = pixels(scene, 3)
    sigma = torch.full((3,), 0.02, dtype=torch.float64)
    x = 0.98 * x0 + 0.02 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assert (clips3.posterior_mean(x, sigma, [parse_prompt(scene.prompt)]) - x0).abs().max().item() < 1e-9
    attrs, log_prior = clips3.log_prior()
    assert (clips3.posterior_mean(x, sigma, attrs, log_prior) - x0).abs().max().item() < 1e-9
    near = clips3.nearest(x0)
    assert near.rms < 1e-12 and near.attributes == parse_prompt(scene.prompt) and near.size == scene.size
    assert near.start == (round(scene.x0 * 32), round(scene.y0 * 32))


def test_ode_samples_are_world_clips_that_read_back_as_prompted():
    cfg = load_world_config(None, EXACT)
    teacher = build_teacher(cfg)
    assert isinstance(teacher, ExactWorldTeacher)
    scenes = [Scene.from_seed(1_000_000 + i) for i in range(12)]
    frames = cfg.video.num_latent_frames
    shape = (len(scenes), frames, cfg.model.in_dim, *cfg.video.latent_hw)
    x0 = sample(teacher, FlowMatchScheduler.from_config(cfg.scheduler), [s.prompt for s in scenes], None, shape,
                steps=12, guidance=1.0, rng=torch.Generator().manual_seed(0))
    videos = build_codec(cfg, dtype=torch.float64).decode(x0.transpose(1, 2).double())
    clips = teacher.clips(frames)
    for scene, video in zip(scenes, videos):
        near = clips.nearest(video)
        assert near.attributes == parse_prompt(scene.prompt), (scene.prompt, near)
        assert near.rms < 1e-3, near  # a world clip, not a blend


def test_causal_ode_pairs_end_on_world_clips_and_each_block_ignores_the_future():
    """The autoregressive exact teacher: block by block, each block's ODE sees the clean past and no future, so
    its end is a world clip of the prompt and changing a later block's noise leaves the earlier blocks alone."""
    cfg = load_world_config(None, EXACT)
    teacher = build_teacher(cfg)
    sched = FlowMatchScheduler.from_config(cfg.scheduler)
    scenes = [Scene.from_seed(2_000_000 + i) for i in range(4)]
    shape = (4, 9, cfg.model.in_dim, *cfg.video.latent_hw)
    keep = (1000.0, 625.0)
    first, *_, x0 = causal_ode_trajectory(teacher, sched, [s.prompt for s in scenes], shape, 3, 12,
                                          torch.Generator().manual_seed(0), keep)
    assert torch.equal(first, torch.randn(shape, generator=torch.Generator().manual_seed(0)))  # sigma 1: the noise
    videos = build_codec(cfg, dtype=torch.float64).decode(x0.transpose(1, 2).double())
    for scene, video in zip(scenes, videos):
        near = teacher.clips(9).nearest(video)
        assert near.attributes == parse_prompt(scene.prompt) and near.rms < 1e-6, (scene.prompt, near)

    # what makes it causal: frames at sigma 1 carry no information, so the posterior ignores what they hold
    clips, attrs = teacher.clips(9), [parse_prompt(scenes[0].prompt)]
    sigma = torch.tensor([1e-4] * 3 + [0.7] * 3 + [1.0] * 3, dtype=torch.float64)
    x = videos[0].clone()
    x[:, 3:6] = 0.3 * x[:, 3:6] + 0.7 * torch.randn(x[:, 3:6].shape, dtype=torch.float64)
    other = x.clone()
    other[:, 6:] = torch.randn(other[:, 6:].shape, dtype=torch.float64)
    assert (clips.posterior_mean(x, sigma, attrs) - clips.posterior_mean(other, sigma, attrs)).abs().max() < 1e-12


def test_the_students_sampler_with_the_exact_denoiser_makes_world_clips_as_prompted():
    """The student's own 4-step sampler (re-noising between steps, block by block) with the exact denoiser in its
    place: its clips are world clips of their prompts, so a student that learns those x0s can make them too."""
    cfg = load_world_config(None, EXACT)
    teacher, sched = build_teacher(cfg), FlowMatchScheduler.from_config(cfg.scheduler)
    scenes = [Scene.from_seed(1_000_000 + i) for i in range(8)]
    shape = (len(scenes), 9, cfg.model.in_dim, *cfg.video.latent_hw)
    timesteps = student_timesteps(cfg)
    states, x0s, clean = few_step_trajectory(teacher, sched, [s.prompt for s in scenes], shape, 3, timesteps,
                                             torch.Generator().manual_seed(0))
    assert states.shape == x0s.shape == (4, *shape) and torch.equal(x0s[-1], clean)
    for k in range(3):  # each state is the last x0 re-noised to the next timestep
        sigma = float(timesteps[k + 1]) / 1000
        assert ((states[k + 1] - (1 - sigma) * x0s[k]) / sigma).std().item() == pytest.approx(1.0, abs=0.02)
    videos = build_codec(cfg, dtype=torch.float64).decode(clean.transpose(1, 2).double())
    for scene, video in zip(scenes, videos):
        near = teacher.clips(9).nearest(video)
        assert near.attributes == parse_prompt(scene.prompt) and near.rms < 0.05, (scene.prompt, near)


def test_evaluate_measures_the_exact_sampler_as_it_measures_a_student(tmp_path):
    """`launch.py evaluate --exact-sampler`: the same measures for the exact denoiser in the student's sampler. On
    the embedded default's unwarped schedule (last step at sigma 0.25) its clips are world clips: full adherence,
    every block boundary as smooth as the world's, the first one too."""
    report = tmp_path / "exact.json"
    assert launch.main(["evaluate", "--exact-sampler", "--prompts", "3", "--seeds", "1", "--long-prompts", "0",
                        "--out", str(report)]) == 0
    measures = json.loads(report.read_text())["measures"]
    assert measures["adherence_all"]["mean"] == 1.0
    assert measures["fidelity_rms"]["mean"] < 0.005  # measured 0.001; warped onto the shift-5 table: 0.018
    assert measures["first_boundary_ratio"]["mean"] == pytest.approx(1.0, abs=0.05)  # warped: 1.48
    assert measures["later_boundary_ratio"]["mean"] == pytest.approx(1.0, abs=0.05)


def test_behind_the_teacher_interface_with_the_learned_critic():
    cfg = load_world_config(None, EXACT)  # the embedded default: the exact teacher, the learned critic
    teacher, critic = build_score_models(cfg)
    assert teacher.conditions_on == "prompts" and isinstance(critic, WanModel)
    scene = Scene.from_seed(3)
    clean = build_codec(cfg).encode(from_uint8_frames(render(scene, cfg.video.num_latent_frames))).transpose(1, 2)
    sched = FlowMatchScheduler.from_config(cfg.scheduler)
    t = torch.full((1, clean.shape[1]), float(sched.timesteps[990]))  # sigma about 0.05
    x_t = sched.add_noise(clean[0], torch.randn(clean[0].shape, generator=torch.Generator().manual_seed(0)),
                          t[0]).unsqueeze(0)
    flow = teacher(x_t.transpose(1, 2), t, [scene.prompt]).transpose(1, 2)
    x0 = x_t - (t / 1000)[..., None, None, None] * flow
    assert (x0 - clean).abs().max().item() < 1e-4  # the clip, through the latent space of the patch codec
    assert teacher_context(teacher, torch.zeros(1), ["p"]) == ["p"] and torch.equal(
        teacher_context(critic, torch.ones(1), ["p"]), torch.ones(1))
    # one Re-DMD generator loss with the exact teacher (guidance 0: the teacher runs once) and the learned critic
    x = clean.clone().requires_grad_(True)
    loss, stats = ReDMD(cfg).generator_loss(x, critic, teacher, torch.zeros(1, 4, cfg.model.text_dim), None,
                                            torch.ones(1, dtype=torch.float64), torch.Generator().manual_seed(0),
                                            [scene.prompt])
    loss.backward()
    assert math.isfinite(loss.item()) and x.grad.abs().sum() > 0 and stats["dmd_grad_norm"] > 0
    with pytest.raises(TypeError, match="list of one prompt per video"):
        teacher(x_t.transpose(1, 2), t, torch.zeros(1, 4, 64))
    with pytest.raises(ValueError, match="not a prompt of the toy world"):
        teacher(x_t.transpose(1, 2), t, ["a corgi on a beach"])


def test_the_world_diagnostics_point_at_the_world_clip_and_draw_world_clips():
    """What the learner logs with this teacher: the nearest world clip of a sample, the cosine of a gradient with the
    way back to it, and true clips of a prompt that the exact teacher fits perfectly at low noise."""
    cfg = load_world_config(None, EXACT)
    teacher = ExactWorldTeacher(cfg)
    codec = build_codec(cfg, dtype=torch.float64)
    frames = cfg.video.num_latent_frames
    scene = Scene.from_seed(5)
    clean = codec.encode(pixels(scene, frames)[None]).transpose(1, 2)
    off = clean + 0.05 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.allclose(teacher.nearest_world(off, [scene.prompt]), clean, atol=1e-6)  # the clip it came from
    away = off - clean
    cosines = teacher.world_cosine(torch.cat([off, off]), torch.cat([away, -away]), [scene.prompt] * 2)
    assert torch.allclose(cosines, torch.tensor([1.0, -1.0], dtype=torch.float64), atol=1e-6)
    true = teacher.true_samples([scene.prompt, Scene.from_seed(6).prompt], frames, torch.Generator().manual_seed(0))
    clips = teacher.clips(frames)
    for video, prompt in zip(codec.decode(true.transpose(1, 2)), [scene.prompt, Scene.from_seed(6).prompt]):
        near = clips.nearest(video, [parse_prompt(prompt)])
        assert near.rms < 1e-6 and near.attributes == parse_prompt(prompt)
    cfg_low = load_world_config(None, [*EXACT, "learner.max_timestep=300"])  # below sigma 0.6 a clip is certain
    _, critic = build_score_models(cfg_low)
    fit = ReDMD(cfg_low).critic_fit(critic, teacher, off.float(), torch.zeros(1, 4, cfg.model.text_dim),
                                    [scene.prompt], torch.Generator().manual_seed(0))
    assert fit["teacher_fit_true"] < 1e-6 < fit["critic_fit_true"] and fit["teacher_fit_student"] > 1e-3


def test_config_errors():
    with pytest.raises(ConfigError, match="has no weights: unset learner.teacher.arch and learner.teacher.checkpoint"):
        load_world_config(None, ["learner.teacher.checkpoint=assets/toyworld/teacher"])  # the world's teacher is exact
    with pytest.raises(ConfigError, match="'nope' is not a teacher; choose one of exact_world, wan"):
        load_world_config(None, ["learner.teacher.kind=nope"])
    with pytest.raises(ConfigError, match="needs vae.kind: patch"):
        ExactWorldTeacher(load_world_config("configs/plumbing.yaml"))
    with pytest.raises(ConfigError, match="critic_checkpoint is required"):
        build_score_models(load_world_config(None, [*EXACT, "learner.critic_checkpoint=null"]))
    with pytest.raises(ConfigError, match="ode_init.pairs=few_step runs the conditional teacher unguided"):
        load_world_config(None, ["ode_init.guidance=3"])
