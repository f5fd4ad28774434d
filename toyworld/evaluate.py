"""Toy-world evaluation of a causal student, exact where the world allows it: what `launch.py evaluate`, the
training job's start and end figures and the benchmarks report.

On held-out world scenes (seeds from `first_scene`) the student makes one clip per prompt for each noise seed,
and each clip is measured with the world's exact machinery (toyworld/exact.py):
- fidelity: the RMS distance (pixels in [-1, 1]) to the nearest world clip of its own prompt, at any size and
  position (0 for a world clip);
- adherence: the colour, shape, background, direction and speed of the nearest world clip of any prompt,
  counted only when the shape is visible in every frame (a shape that fades or vanishes does not adhere);
  `all` when every attribute does;
- colour as drawn: the palette colour that each block's pixels are blends of over the background (`colour_of`),
  the prompted one in every block, with the shape visible in every frame. The nearest clip misreads colour when
  the shape is softer or smaller than the world's: under RMS, a dim white blob on black is nearer a purple
  clip than a white one, because purple is darker;
- motion: the shape's mean displacement per frame, and its distance from the prompted speed;
- block boundaries: the mean frame-to-frame change across the student's block boundaries over the mean change
  within blocks (1 for world clips); also for the first boundary alone, where the stream's first block, drawn
  from pure noise with nothing before it, hands over to a block that has a past, and for the later ones;
- the motion scorer's MQ (core/reward/motion.py): motion that looks large and smooth, whose optimum lies off the
  world (world clips score below the shipped student); the world reward (toyworld/reward.py) measures motion
  against the prompt instead;
- long rollouts (`long_frames` latent frames, past the attention window): initial-frame copy, and fidelity and
  adherence of the first and the last clip-length window.
With `denoiser_error` (`launch.py evaluate --denoiser-error`), also where the student falls short of its
sampler's best: its x0 against the exact denoiser's at the states its own rollout reaches, per step and block.
Each is the mean over noise seeds with its standard deviation, next to the world clips of the same scenes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from core.algo.distill import teacher_context
from core.algo.rollout import SelfForcedRollout, gaussian_noise
from core.algo.scheduler import FlowMatchScheduler
from core.codecs.text_encoder import TextEncoder
from core.codecs.video import Codec, build_codec, from_uint8_frames, to_uint8_frames
from core.model.wan import CausalWanModel
from core.reward.base import VideoInput
from core.reward.motion import MotionScorer
from core.stream.pipeline import VideoPipeline, build_generator
from toyworld.config import WorldConfig
from toyworld.exact import ExactWorldTeacher, WorldClips
from toyworld.ode_init import student_timesteps, teacher_x0_at_exit
from toyworld.sampler import few_step_trajectory, sample
from toyworld.world import (
    COLOURS,
    DIRECTIONS,
    SPEEDS,
    Scene,
    colour_of,
    foreground,
    initial_frame_similarity,
    parse_prompt,
    render,
    velocity_of,
)

ATTRIBUTES = ("colour", "shape", "background", "direction", "speed")


def decode_videos(codec: Codec, latents: torch.Tensor) -> list[np.ndarray]:
    """uint8 [T, H, W, 3] videos of latents [B, F, C, H, W]."""
    return [to_uint8_frames(v).numpy() for v in codec.decode(latents.transpose(1, 2).float())]


def measure_clip(video: np.ndarray, prompt: str, clips: WorldClips, frames_per_block: int) -> dict[str, float]:
    """The exact measures of the module docstring for one clip (uint8 [T, H, W, 3]) made for `prompt`."""
    attrs = parse_prompt(prompt)
    pixels = from_uint8_frames(video, torch.float64)[0]
    visible = foreground(video).any(axis=(1, 2))
    near = clips.nearest(pixels)
    shown = visible.all()
    out = {"fidelity_rms": clips.nearest(pixels, [attrs]).rms, "visible_frames": float(visible.mean())}
    for name in ATTRIBUTES:
        out[f"adherence_{name}"] = float(shown and getattr(near.attributes, name) == getattr(attrs, name))
    out["adherence_all"] = float(shown and near.attributes == attrs)
    blocks = range(0, len(video), frames_per_block)
    out["drawn_colour"] = float(shown and all(colour_of(video[b:b + frames_per_block]) == attrs.colour for b in blocks))
    velocity = velocity_of(video)
    moved = float(np.hypot(*velocity)) if velocity is not None else 0.0
    prompted = SPEEDS[attrs.speed] * video.shape[2] / 32 if attrs.speed else 0.0
    out.update(displacement_px=moved, speed_error_px=abs(moved - prompted))
    steps = np.abs(np.diff(video.astype(np.float64), axis=0)).mean(axis=(1, 2, 3)) / 255  # [T - 1]
    at_boundary = (np.arange(1, len(video)) % frames_per_block) == 0
    out.update(boundary_step=float(steps[at_boundary].mean()), within_step=float(steps[~at_boundary].mean()))
    if at_boundary.any():
        out["first_boundary_step"] = float(steps[frames_per_block - 1])
    if at_boundary.sum() > 1:
        out["later_boundary_step"] = float(steps[frames_per_block:][at_boundary[frames_per_block:]].mean())
    return out


def _mean_measures(videos: list[np.ndarray], prompts: list[str], clips: WorldClips, cfg: WorldConfig) -> dict[str, float]:
    per_clip = [measure_clip(v, p, clips, cfg.stream.num_frame_per_block) for v, p in zip(videos, prompts)]
    out = {k: float(np.mean([m[k] for m in per_clip])) for k in per_clip[0]}
    for kind in ("", "first_", "later_"):
        if f"{kind}boundary_step" in out:
            out[f"{kind}boundary_ratio"] = out[f"{kind}boundary_step"] / max(out["within_step"], 1e-12)
    out["motion_reward"] = float(np.mean(motion_rewards(cfg, videos, prompts)))
    return out


def _long_measures(videos: list[np.ndarray], prompts: list[str], clips: WorldClips, cfg: WorldConfig) -> dict[str, float]:
    """Long rollouts: how much the end copies the start, and the fidelity and adherence of the first and the last
    clip-length window (does the picture hold up over time?)."""
    fpb, n = cfg.stream.num_frame_per_block, clips.frames
    first = [measure_clip(v[:n], p, clips, fpb) for v, p in zip(videos, prompts)]
    last = [measure_clip(v[-n:], p, clips, fpb) for v, p in zip(videos, prompts)]
    return {"initial_frame_copy": float(np.mean([initial_frame_similarity(v) for v in videos])),
            "long_fidelity_start": float(np.mean([m["fidelity_rms"] for m in first])),
            "long_fidelity_end": float(np.mean([m["fidelity_rms"] for m in last])),
            "long_adherence_end": float(np.mean([m["adherence_all"] for m in last]))}


def motion_rewards(cfg: WorldConfig, videos: list[np.ndarray], prompts: list[str]) -> list[float]:
    """The motion scorer's normalised `learner.reward_axis`, one per video."""
    scores = MotionScorer().score_batch([VideoInput(v, float(cfg.video.fps), p) for v, p in zip(videos, prompts)])
    return [s.normalized[cfg.learner.reward_axis] for s in scores]


def evaluate_student(cfg: WorldConfig, pipe: VideoPipeline | ExactSampler, num_prompts: int = 24,
                     seeds: tuple[int, ...] = (0, 1, 2), first_scene: int = 1_000_000, long_frames: int = 63, long_prompts: int = 8,
                     figure: str | Path | None = None, figure_prompts: int = 6) -> dict:
    """Every measure of the module docstring for the pipeline's generator on scenes `first_scene`.. , one clip per
    prompt and noise seed: {"measures": {name: {"mean", "std", "world"}}, "prompts", "seeds", "first_scene"}.
    With `figure`, also a contact sheet there: the first `figure_prompts` clips of the first seed over the world's."""
    video = cfg.video
    scenes = [Scene.from_seed(first_scene + i) for i in range(num_prompts)]
    prompts = [s.prompt for s in scenes]
    context = pipe.encode(prompts)
    clips = WorldClips(video.num_latent_frames, video.height, video.width)
    made = {seed: decode_videos(pipe.vae, pipe.generate(context, seed, video.num_latent_frames)) for seed in seeds}
    world_clips = [render(s, video.num_latent_frames, video.height, video.width) for s in scenes]
    runs = [_mean_measures(made[seed], prompts, clips, cfg) for seed in seeds]
    world = _mean_measures(world_clips, prompts, clips, cfg)
    if figure is not None:
        contact_sheet(made[seeds[0]][:figure_prompts], world_clips[:figure_prompts], figure)
    if long_prompts:
        for run, seed in zip(runs, seeds):
            run.update(_long_measures(decode_videos(pipe.vae, pipe.generate(context[:long_prompts], seed + 1,
                                                                            long_frames)), prompts, clips, cfg))
        world.update(_long_measures([render(s, long_frames, video.height, video.width) for s in scenes[:long_prompts]],
                                    prompts, clips, cfg))
    measures = {k: {"mean": float(np.mean([r[k] for r in runs])), "std": float(np.std([r[k] for r in runs])),
                    "world": world[k]} for k in runs[0]}
    return {"prompts": num_prompts, "seeds": list(seeds), "first_scene": first_scene, "long_frames": long_frames,
            "measures": measures}


class ExactSampler:
    """The student's own few-step sampler with the exact denoiser in the student's place (`few_step_trajectory`),
    behind the part of `VideoPipeline` that `evaluate_student` uses: what that sampler reaches at best, measured
    as a student is."""

    def __init__(self, cfg: WorldConfig):
        self.teacher = ExactWorldTeacher(cfg)
        self.vae = build_codec(cfg)
        self.sched = FlowMatchScheduler.from_config(cfg.scheduler)
        self.timesteps = student_timesteps(cfg)
        self.frames_per_block = cfg.stream.num_frame_per_block
        self.latent_shape = (cfg.model.in_dim, *cfg.video.latent_hw)

    def encode(self, prompts: list[str]) -> list[str]:
        return list(prompts)  # the exact teacher reads the prompts themselves

    def generate(self, prompts: list[str], seed: int, latent_frames: int) -> torch.Tensor:
        shape = (len(prompts), latent_frames, *self.latent_shape)
        return few_step_trajectory(self.teacher, self.sched, prompts, shape, self.frames_per_block, self.timesteps,
                                   torch.Generator().manual_seed(seed))[2]


def evaluate_config(cfg: WorldConfig, generator: CausalWanModel | None = None, num_prompts: int = 24,
                    seeds: tuple[int, ...] = (0, 1, 2), first_scene: int = 1_000_000, long_frames: int = 63,
                    long_prompts: int = 8, figure: str | Path | None = None) -> dict:
    """`evaluate_student` with everything built from `cfg` on the CPU in float32: the generator from
    checkpoint.generator unless given, the text encoder and the codec."""
    if generator is None:
        generator = build_generator(cfg, torch.device("cpu"), torch.float32)
    pipe = VideoPipeline(cfg, generator.float().eval(), TextEncoder.from_config(cfg, "cpu", torch.float32),
                         build_codec(cfg), torch.device("cpu"))
    return evaluate_student(cfg, pipe, num_prompts, seeds, first_scene, long_frames, long_prompts, figure)


def denoiser_error(cfg: WorldConfig, generator: CausalWanModel, encoder: TextEncoder, num_prompts: int = 24,
                   seeds: tuple[int, ...] = (0, 1, 2), first_scene: int = 1_000_000) -> dict:
    """Where the student falls short of the exact sampler: the mse between its x0 and the exact denoiser's at the
    states its own rollout reaches, per denoising step and block, in codec latents (the sampler with the exact
    denoiser in the student's place has 0 at every one). Each step is its own rollout, stopped there, as in
    DAgger. {"timesteps": [per step], "mse": [seed][step][block]}."""
    teacher = ExactWorldTeacher(cfg)
    sched = FlowMatchScheduler.from_config(cfg.scheduler)
    timesteps = student_timesteps(cfg)
    prompts = [Scene.from_seed(first_scene + i).prompt for i in range(num_prompts)]
    context = encoder.encode(prompts)
    fpb = cfg.stream.num_frame_per_block
    blocks = cfg.video.num_latent_frames // fpb
    shape = (num_prompts, fpb, cfg.model.in_dim, *cfg.video.latent_hw)
    rollout = SelfForcedRollout(generator, sched, timesteps, cfg.scheduler.context_noise)
    runs = []
    for seed in seeds:
        rng = torch.Generator().manual_seed(seed)
        per_step = []
        for exit_index in range(len(timesteps)):
            cache = generator.init_cache(num_prompts, cfg.video.latent_hw, device="cpu", dtype=torch.float32)
            record = rollout.training_rollout(context, cache, gaussian_noise(shape, rng, torch.float32, "cpu"),
                                              blocks, exit_index)
            exact = teacher_x0_at_exit(teacher, sched, record, prompts, rng)
            made = torch.cat([b.clean for b in record.blocks], dim=1)
            per_frame = (made.double() - exact.double()).square().mean(dim=(0, 2, 3, 4))
            per_step.append([float(per_frame[b * fpb:(b + 1) * fpb].mean()) for b in range(blocks)])
        runs.append(per_step)
    return {"timesteps": [float(t) for t in timesteps], "mse": runs, "prompts": num_prompts, "seeds": list(seeds)}


def format_denoiser_error(result: dict) -> str:
    """`denoiser_error` as a table: a row per step, a column per block, mean ± std over the noise seeds."""
    mse = np.asarray(result["mse"])  # [seed, step, block]
    blocks = mse.shape[2]
    lines = [f"the student's x0 against the exact denoiser's at its own rollout states (latent mse; the exact "
             f"sampler: 0), {result['prompts']} prompts x noise seeds {', '.join(map(str, result['seeds']))}",
             f"{'step at t':<12}" + "".join(f"{f'block {b + 1}':>19}" for b in range(blocks))]
    for i, t in enumerate(result["timesteps"]):
        cells = "".join(f"{mse[:, i, b].mean():>10.4f} ± {mse[:, i, b].std():<6.4f}" for b in range(blocks))
        lines.append(f"{t:<12.0f}{cells}")
    return "\n".join(lines)


# what the table shows, in order: (key, label, which way is better)
REPORTED = (("adherence_all", "adherence: every attribute", "higher"),
            ("adherence_colour", "adherence: colour of the nearest clip", "higher"),
            ("drawn_colour", "adherence: colour drawn in every block", "higher"),
            ("adherence_shape", "adherence: shape", "higher"),
            ("adherence_direction", "adherence: direction", "higher"), ("adherence_speed", "adherence: speed", "higher"),
            ("visible_frames", "frames showing the shape", "higher"),
            ("fidelity_rms", "distance to the prompt's nearest clip", "lower"),
            ("displacement_px", "displacement per frame (px)", "as world"),
            ("speed_error_px", "error from the prompted speed (px)", "lower"),
            ("boundary_ratio", "block-boundary / within-block change", "as world"),
            ("first_boundary_ratio", "  the first boundary (after block 1)", "as world"),
            ("later_boundary_ratio", "  the later boundaries", "as world"),
            ("motion_reward", "motion scorer's MQ", "higher"),
            ("initial_frame_copy", "long rollouts: initial-frame copy", "as world"),
            ("long_fidelity_start", "long rollouts: distance, first window", "lower"),
            ("long_fidelity_end", "long rollouts: distance, last window", "lower"),
            ("long_adherence_end", "long rollouts: every attribute, last", "higher"))


def format_measures(result: dict) -> str:
    """`evaluate_student`'s result as a table: mean ± std over the noise seeds, and the world clips' value."""
    seeds = ", ".join(map(str, result["seeds"]))
    lines = [f"{result['prompts']} held-out prompts (scenes from {result['first_scene']}), noise seeds {seeds}",
             f"{'measure':<40} {'student':>17} {'world':>8}  better"]
    for key, label, better in REPORTED:
        if key in result["measures"]:
            m = result["measures"][key]
            lines.append(f"{label:<40} {m['mean']:>8.3f} ± {m['std']:<6.3f} {m['world']:>8.3f}  {better}")
    return "\n".join(lines)


def format_change(before: dict, after: dict) -> str:
    """Two `evaluate_student` results on the same prompts and seeds, side by side: what training changed."""
    lines = [f"exact measures, {after['prompts']} held-out prompts x noise seeds {', '.join(map(str, after['seeds']))}"
             f" (mean ± std over seeds)", f"{'measure':<40} {'start':>15} {'trained':>15} {'world':>8}  better"]
    for key, label, better in REPORTED:
        if key in after["measures"]:
            b, a = before["measures"][key], after["measures"][key]
            lines.append(f"{label:<40} {b['mean']:>7.3f} ± {b['std']:<5.3f} {a['mean']:>7.3f} ± {a['std']:<5.3f} "
                         f"{a['world']:>8.3f}  {better}")
    return "\n".join(lines)


def contact_sheet(videos: list[np.ndarray], references: list[np.ndarray], path: str | Path, scale: int = 4,
                  gap: int = 2) -> None:
    """A PNG of clips over their references, every frame side by side: for each clip a row of its frames and
    under it a row of the reference's, scaled up `scale` times without smoothing (what the eye should check)."""
    t, h, w = videos[0].shape[:3]
    sheet = np.full((len(videos) * (2 * h + 3 * gap), t * (w + gap), 3), 255, dtype=np.uint8)
    for i, (video, reference) in enumerate(zip(videos, references)):
        top = i * (2 * h + 3 * gap)
        for row, clip in ((top, video), (top + h + gap, reference)):
            for f in range(t):
                sheet[row:row + h, f * (w + gap):f * (w + gap) + w] = clip[f]
    image = Image.fromarray(sheet)
    image.resize((image.width * scale, image.height * scale), Image.NEAREST).save(path)


def evaluate_teacher(cfg: WorldConfig, model: torch.nn.Module, num_clips: int = 24, steps: int = 20,
                     guidance: float = 3.0, seed: int = 1_000_000) -> dict[str, float]:
    """Prompt adherence of teacher samples on held-out world scenes (seeds from `seed`), measured exactly as
    for students (`measure_clip`): the fraction whose colour and whose direction the nearest world clip
    shows, with the shape visible throughout, against chance (1/6 and 1/5)."""
    scenes = [Scene.from_seed(seed + i) for i in range(num_clips)]
    prompts = [s.prompt for s in scenes]
    encoder = TextEncoder.from_config(cfg, "cpu", torch.float32)
    context = teacher_context(model, encoder.encode(prompts), prompts)
    uncond = None if guidance == 1 else teacher_context(model, encoder.encode([""] * num_clips), [""] * num_clips)
    lh, lw = cfg.video.latent_hw
    x0 = sample(model, FlowMatchScheduler.from_config(cfg.scheduler), context, uncond,
                (num_clips, cfg.video.num_latent_frames, cfg.model.in_dim, lh, lw), steps, guidance,
                torch.Generator().manual_seed(seed))
    clips = WorldClips(cfg.video.num_latent_frames, cfg.video.height, cfg.video.width)
    measured = [measure_clip(v, p, clips, cfg.stream.num_frame_per_block)
                for v, p in zip(decode_videos(build_codec(cfg), x0), prompts)]
    return {"colour": float(np.mean([m["adherence_colour"] for m in measured])),
            "direction": float(np.mean([m["adherence_direction"] for m in measured])),
            "colour_chance": 1 / len(COLOURS), "direction_chance": 1 / len(DIRECTIONS)}
