"""Toy-world evaluation of a causal student: the numbers `launch.py evaluate` and the benchmarks report.

On a fixed set of held-out world scenes (seeds from `seed`) the student generates one video per prompt,
and the measures are:
- motion reward: the reward axis the learner trains on, from the motion scorer (core/reward/motion.py);
- fidelity, two ways: the teacher's flow-matching loss on the student's latents (same timesteps and noise as
  on the true world clips of the same scenes, so the two are comparable), and the Fréchet distance between
  simple clip features of the student's videos and of those world clips;
- prompt adherence: the fraction whose colour and direction the exact world classifiers read back;
- initial-frame copy on long rollouts (`long_frames` latent frames, past the attention window): how much the
  last quarter of the video looks like its first frames, next to the same measure on world clips.
"""

from __future__ import annotations

import numpy as np
import torch

from core.algo.scheduler import FlowMatchScheduler
from core.codecs.text_encoder import TextEncoder
from core.codecs.video import Codec, build_codec, to_uint8_frames
from core.model.wan import CausalWanModel, WanModel
from core.records.checkpoint import load_into, load_wan_state_dict
from core.reward.base import VideoInput
from core.reward.motion import MotionScorer
from core.stream.pipeline import VideoPipeline, build_generator
from toyworld.config import WorldConfig
from toyworld.recipe import flow_matching_loss, world_latents
from toyworld.sampler import sample
from toyworld.world import COLOURS, DIRECTIONS, Scene, feature_distance, initial_frame_similarity, prompt_adherence, render


def decode_videos(codec: Codec, latents: torch.Tensor) -> list[np.ndarray]:
    """uint8 [T, H, W, 3] videos of latents [B, F, C, H, W]."""
    return [to_uint8_frames(v).numpy() for v in codec.decode(latents.transpose(1, 2).float())]


@torch.no_grad()
def teacher_loss(cfg: WorldConfig, teacher: WanModel, latents: torch.Tensor, context: torch.Tensor, seed: int) -> float:
    """The teacher's flow-matching loss on `latents` at seeded timesteps and noise (lower: more like its data)."""
    sched = FlowMatchScheduler(cfg.pretrain.shift, cfg.scheduler.num_train_timesteps)
    rng = torch.Generator().manual_seed(seed)
    return float(np.mean([flow_matching_loss(teacher, sched, latents[i:i + 1], context[i:i + 1], rng).item()
                          for i in range(latents.shape[0])]))


def motion_rewards(cfg: WorldConfig, videos: list[np.ndarray], prompts: list[str]) -> list[float]:
    """The learner's reward axis (normalised) from the motion scorer, one per video."""
    scores = MotionScorer().score_batch([VideoInput(v, float(cfg.video.fps), p) for v, p in zip(videos, prompts)])
    return [s.normalized[cfg.learner.reward_axis] for s in scores]


def evaluate_student(cfg: WorldConfig, pipe: VideoPipeline, teacher: WanModel | None, num_prompts: int = 32,
                     seed: int = 1_000_000, long_frames: int = 63, long_prompts: int = 8) -> dict[str, float]:
    """All measures of the module docstring for the pipeline's generator on scenes `seed`.. `seed + num_prompts - 1`."""
    video = cfg.video
    scenes = [Scene.from_seed(seed + i) for i in range(num_prompts)]
    prompts = [s.prompt for s in scenes]
    context = pipe.encode(prompts)
    latents = pipe.generate(context, seed, video.num_latent_frames)
    videos = decode_videos(pipe.vae, latents)
    world = [render(s, len(videos[0]), video.height, video.width) for s in scenes]
    hits = [prompt_adherence(v, s) for v, s in zip(videos, scenes)]
    world_hits = [prompt_adherence(v, s) for v, s in zip(world, scenes)]
    rewards = motion_rewards(cfg, videos, prompts)
    out = {"prompts": num_prompts, "seed": seed,
           "motion_reward": float(np.mean(rewards)), "motion_reward_world": float(np.mean(motion_rewards(cfg, world, prompts))),
           "colour_adherence": float(np.mean([h["colour"] for h in hits])),
           "direction_adherence": float(np.mean([h["direction"] for h in hits])),
           "colour_adherence_world": float(np.mean([h["colour"] for h in world_hits])),
           "direction_adherence_world": float(np.mean([h["direction"] for h in world_hits])),
           "feature_distance": feature_distance(videos, world)}
    if teacher is not None:
        world_x0 = world_latents(pipe.vae, scenes, video.num_latent_frames, video.height, video.width)
        out["teacher_loss"] = teacher_loss(cfg, teacher, latents, context, seed)
        out["teacher_loss_world"] = teacher_loss(cfg, teacher, world_x0.to(latents), context, seed)
    if long_prompts:
        long_scenes = scenes[:long_prompts]
        long_videos = decode_videos(pipe.vae, pipe.generate(context[:long_prompts], seed + 1, long_frames))
        long_world = [render(s, len(long_videos[0]), video.height, video.width) for s in long_scenes]
        out.update(long_frames=long_frames,
                   initial_frame_copy=float(np.mean([initial_frame_similarity(v) for v in long_videos])),
                   initial_frame_copy_world=float(np.mean([initial_frame_similarity(v) for v in long_world])))
    return out


def evaluate_config(cfg: WorldConfig, generator: CausalWanModel | None = None, num_prompts: int = 32, seed: int = 1_000_000,
                    long_frames: int = 63, long_prompts: int = 8) -> dict[str, float]:
    """`evaluate_student` with everything built from `cfg` on the CPU in float32: the generator from
    checkpoint.generator unless given, the teacher from learner.teacher.checkpoint (no teacher loss without one),
    the text encoder and the codec."""
    if generator is None:
        generator = build_generator(cfg, torch.device("cpu"), torch.float32)
    teacher = None
    if cfg.learner.teacher.checkpoint:
        teacher = load_into(WanModel(cfg.learner.teacher.arch or cfg.model),
                            load_wan_state_dict(cfg.learner.teacher.checkpoint)).eval()
    pipe = VideoPipeline(cfg, generator.float().eval(), TextEncoder.from_config(cfg, "cpu", torch.float32),
                         build_codec(cfg), torch.device("cpu"))
    return evaluate_student(cfg, pipe, teacher, num_prompts, seed, long_frames, long_prompts)


def evaluate_teacher(cfg: WorldConfig, model: WanModel, num_clips: int = 24, steps: int = 20, guidance: float = 3.0,
                     seed: int = 1_000_000) -> dict[str, float]:
    """Prompt adherence of teacher samples on held-out world scenes (seeds from `seed`): the fraction whose
    colour and whose direction the exact world classifiers read back, against chance (1/6 and 1/5)."""
    scenes = [Scene.from_seed(seed + i) for i in range(num_clips)]
    encoder = TextEncoder.from_config(cfg, "cpu", torch.float32)
    context, uncond = encoder.encode([s.prompt for s in scenes]), encoder.encode([""] * num_clips)
    lh, lw = cfg.video.latent_hw
    x0 = sample(model, FlowMatchScheduler.from_config(cfg.scheduler), context, uncond,
                (num_clips, cfg.video.num_latent_frames, cfg.model.in_dim, lh, lw), steps, guidance,
                torch.Generator().manual_seed(seed))
    videos = decode_videos(build_codec(cfg), x0)
    hits = [prompt_adherence(v, s) for v, s in zip(videos, scenes)]
    return {"colour": float(np.mean([h["colour"] for h in hits])),
            "direction": float(np.mean([h["direction"] for h in hits])),
            "colour_chance": 1 / len(COLOURS), "direction_chance": 1 / len(DIRECTIONS)}
