"""Streams started from given world frames, measured exactly: does the continuation keep what it was given, move as
prompted, and how far is it from the world clip that continues the given frames?

On held-out scenes (seeds from `first_scene`) each stream is given the first frame of the scene's world clip
(`image`) or its first block (`block`; `text` gives nothing, for reference) with the scene's prompt, and makes a
clip of the world's length. Each clip is measured against the world (toyworld/exact.py):
- kept: the nearest world clip of any prompt has the given shape, colour, and place (the scene's start and size),
  with the shape visible in every frame; `kept_all` when all three are;
- moves as prompted: that clip's direction and speed are the prompt's;
- distance to the continuation: RMS (pixels in [-1, 1]) of the frames after the given ones from the scene's own
  clip, the one world clip that the prompt and the given frames fix (the first frame fixes shape, colour, size and
  place; the prompt the motion); and the distance to the nearest clip of the prompt, anywhere, as `evaluate` reports.
The student streams through `StreamSession(prefix=...)`, the path `generate` and the server use: the image held
clean inside the first block (core/stream/prefix.py). The exact sampler (the student's few-step sampler with the
world's exact denoiser, `ExactSampler`) runs the same method: what it gives at best; with a clean frame that is the
exact conditional given it. For the image, two other ways to start are measured (`IMAGE_METHODS`): the image
noised to each step's level inside the block (one timestep for the block), on both, and on the student the image
written into the cache as a still block of context (shown once).
"""

from __future__ import annotations

import numpy as np
import torch

from core.codecs.video import from_uint8_frames
from core.stream.pipeline import VideoPipeline
from core.stream.prefix import hold
from core.stream.session import StreamSession
from toyworld.config import WorldConfig
from toyworld.evaluate import ExactSampler, decode_videos
from toyworld.exact import WorldClips
from toyworld.sampler import block_x0
from toyworld.world import Scene, foreground, parse_prompt, render

STARTS = ("image", "block", "text")
IMAGE_METHODS = ("clean", "noised", "still block")  # the first is what the stream does


def given_frames(start: str, frames_per_block: int) -> int:
    """Video frames given for a start (the patch codec: one per latent frame)."""
    return {"image": 1, "block": frames_per_block, "text": 0}[start]


# ------------------------------------------------------------------------------------------------ makers


def student_clip(pipe: VideoPipeline, scene: Scene, clip: np.ndarray, given: int, seed: int,
                 method: str = "clean") -> np.ndarray:
    """The student's clip of `len(clip)` frames for `scene`, started from the clip's first `given` frames."""
    frames, fpb = len(clip), pipe.cfg.stream.num_frame_per_block
    if method == "noised":
        return _noised_frame_clip(pipe, scene.prompt, clip[:1], seed, frames)
    if method == "still block":  # the image repeated into a whole block of context; shown once
        session = StreamSession(pipe, scene.prompt, seed, prefix=np.repeat(clip[:1], fpb, axis=0))
        out = torch.cat([c.frames for c in session.chunks(frames + fpb - 1 + (-(frames - 1) % fpb))])
        return torch.cat([out[:1], out[fpb:fpb + frames - 1]]).numpy()
    session = StreamSession(pipe, scene.prompt, seed, prefix=clip[:given] if given else None)
    return torch.cat([c.frames for c in session.chunks(frames)]).numpy()


@torch.no_grad()
def _noised_frame_clip(pipe: VideoPipeline, prompt: str, image: np.ndarray, seed: int, frames: int) -> np.ndarray:
    """The image noised to each step's level inside the first block (one timestep for the block): it enters the
    first step as the block's noise at sigma 1, and each step's prediction there is replaced by it before
    re-noising."""
    rollout, fpb = pipe.rollout, pipe.cfg.stream.num_frame_per_block
    context = pipe.encode([prompt])
    held = pipe.vae.encode(from_uint8_frames(image)).transpose(1, 2).to(pipe.dtype)
    noise = pipe.noise(1, torch.Generator().manual_seed(seed))
    cache = pipe.generator.init_cache(1, pipe.cfg.video.latent_hw)
    timesteps = rollout.timesteps.tolist()
    x = noise(0, -1)
    x = hold(x, rollout.renoise(held, x[:, :1], timesteps[0]))
    for i, t in enumerate(timesteps):
        x0 = hold(rollout.predict_x0(x, t, context, cache, 0), held)
        if i + 1 < len(timesteps):
            x = rollout.renoise(x0, noise(0, i), timesteps[i + 1])
    rollout.write_cache(x0, context, cache, 0)
    rest = rollout.generate(context, cache, noise, -(-frames // fpb) - 1)
    return decode_videos(pipe.vae, torch.cat([x0, rest], dim=1))[0][:frames]


def exact_clips(sampler: ExactSampler, scenes: list[Scene], clips: list[np.ndarray], given: int,
                seed: int, method: str = "clean") -> list[np.ndarray]:
    """The exact sampler's clips, started like the student's: the given whole blocks clean in the past, and a
    leftover held inside the next block, clean (timestep 0) in every step of it (`clean`: the exact conditional
    given the frames), or `noised` to each step's level and replacing each step's x0 there before re-noising."""
    fpb, frames = sampler.frames_per_block, len(clips[0])
    prompts = [s.prompt for s in scenes]
    shape = (len(scenes), frames, *sampler.latent_shape)
    rng = torch.Generator().manual_seed(seed)
    noise = torch.randn(shape, generator=rng, dtype=torch.float64)
    clean = torch.zeros(shape, dtype=torch.float64)
    if given:
        latents = torch.cat([sampler.vae.encode(from_uint8_frames(c[:given])) for c in clips]).transpose(1, 2)
        clean[:, :given] = latents.double()
    whole, held = given // fpb * fpb, clean[:, given // fpb * fpb:given]
    timesteps = sampler.timesteps.tolist()
    for start in range(whole, frames, fpb):
        block = slice(start, start + fpb)
        keep = held if start == whole and held.shape[1] else None
        past = clean[:, :start]
        if keep is not None and method == "clean":  # the exact teacher takes a timestep per frame, no blocks
            block, past, keep = slice(start + keep.shape[1], block.stop), clean[:, :start + keep.shape[1]], None
        x = noise[:, block]
        if keep is not None:
            x = hold(x, sampler.sched.add_noise(keep.flatten(0, 1), x[:, :keep.shape[1]].flatten(0, 1),
                                                torch.full((keep.shape[0] * keep.shape[1],), timesteps[0]))
                     .unflatten(0, keep.shape[:2]))
        for i, t in enumerate(timesteps):
            x0 = block_x0(sampler.teacher, sampler.sched, prompts, past, x, noise[:, block.stop:], t)
            x0 = hold(x0, keep) if keep is not None else x0
            if i + 1 < len(timesteps):
                fresh = torch.randn(x0.shape, generator=rng, dtype=torch.float64)
                x = sampler.sched.add_noise(x0.flatten(0, 1), fresh.flatten(0, 1),
                                            torch.full((x0.numel() // x0[0, 0].numel(),), timesteps[i + 1])
                                            ).unflatten(0, x0.shape[:2])
        clean[:, block] = x0
    return decode_videos(sampler.vae, clean.float())


# ------------------------------------------------------------------------------------------------ measures


def measure_continuation(video: np.ndarray, scene: Scene, world: np.ndarray, given: int,
                         clips: WorldClips) -> dict[str, float]:
    """The module docstring's measures of one clip started from `world`'s first `given` frames."""
    pixels = from_uint8_frames(video, torch.float64)[0]
    near = clips.nearest(pixels)
    shown = bool(foreground(video).any(axis=(1, 2)).all())
    attrs = parse_prompt(scene.prompt)
    height, width = video.shape[1:3]
    place = (round(scene.x0 * width), round(scene.y0 * height))
    kept = {"kept_shape": near.attributes.shape == scene.shape, "kept_colour": near.attributes.colour == scene.colour,
            "kept_place": near.start == place and near.size == scene.size}
    out = {k: float(shown and v) for k, v in kept.items()}
    out["kept_all"] = float(shown and all(kept.values()))
    out["moves_as_prompted"] = float(shown and near.attributes.motion == attrs.motion)
    after = slice(max(given, 1), None)  # the image start holds frame 0; text has no continuation to compare
    diff = (video[after].astype(np.float64) - world[after].astype(np.float64)) / 127.5
    out["continuation_rms"] = float(np.sqrt(np.mean(diff ** 2)))
    out["fidelity_rms"] = clips.nearest(pixels, [attrs]).rms
    out["given_exact"] = float(np.array_equal(video[:given], world[:given]))
    return out


def evaluate_continuation(cfg: WorldConfig, pipe: VideoPipeline, num_prompts: int = 24,
                          seeds: tuple[int, ...] = (0, 1, 2), first_scene: int = 1_000_000,
                          image_methods: tuple[str, ...] = IMAGE_METHODS) -> dict:
    """Every start (and the image's other methods) for the student and the exact sampler (which has no cache, so
    no still block):
    {"rows": {name: {measure: {"mean", "std"}}}, "world": {measure: value}, "figure": {name: [clips of seed 0]}}."""
    fpb, frames = cfg.stream.num_frame_per_block, cfg.video.num_latent_frames
    scenes = [Scene.from_seed(first_scene + i) for i in range(num_prompts)]
    world = [render(s, frames, cfg.video.height, cfg.video.width) for s in scenes]
    clips = WorldClips(frames, cfg.video.height, cfg.video.width)
    sampler = ExactSampler(cfg)
    runs: dict[str, list[list[np.ndarray]]] = {}
    for start in STARTS:
        given = given_frames(start, fpb)
        methods = image_methods if start == "image" else IMAGE_METHODS[:1]
        for method in methods:
            name = f"{start}: student" + (f" ({method})" if method != IMAGE_METHODS[0] else "")
            runs[name] = [[student_clip(pipe, s, w, given, 1000 * seed + i, method)
                           for i, (s, w) in enumerate(zip(scenes, world))] for seed in seeds]
        for method in methods:
            if method != "still block":
                name = f"{start}: exact sampler" + (f" ({method})" if method != IMAGE_METHODS[0] else "")
                runs[name] = [exact_clips(sampler, scenes, world, given, seed, method) for seed in seeds]
    rows = {}
    for name, per_seed in runs.items():
        given = given_frames(name.split(":")[0], fpb)
        means = [_mean([measure_continuation(v, s, w, given, clips) for v, s, w in zip(videos, scenes, world)])
                 for videos in per_seed]
        rows[name] = {k: {"mean": float(np.mean([m[k] for m in means])), "std": float(np.std([m[k] for m in means]))}
                      for k in means[0]}
    world_row = _mean([measure_continuation(w, s, w, 0, clips) for s, w in zip(scenes, world)])
    return {"prompts": num_prompts, "seeds": list(seeds), "first_scene": first_scene, "rows": rows,
            "world": world_row, "figure": {name: per_seed[0] for name, per_seed in runs.items()}, "reference": world}


def _mean(measures: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([m[k] for m in measures])) for k in measures[0]}


REPORTED = (("kept_all", "keeps shape, colour and place"), ("kept_shape", "  keeps the shape"),
            ("kept_colour", "  keeps the colour"), ("kept_place", "  keeps the place (start and size)"),
            ("moves_as_prompted", "moves as prompted (direction and speed)"),
            ("continuation_rms", "distance to the clip continuing the given frames"),
            ("fidelity_rms", "distance to the prompt's nearest clip"),
            ("given_exact", "starts with the given frames exactly"))


def format_continuation(result: dict) -> str:
    """`evaluate_continuation` as a table: a column per run (mean ± std over the noise seeds), and the world's."""
    names = list(result["rows"])
    seeds = ", ".join(map(str, result["seeds"]))
    lines = [f"{result['prompts']} held-out scenes (from {result['first_scene']}), noise seeds {seeds}; "
             "image: the world clip's first frame given, block: its first block, text: nothing given",
             f"{'measure':<50}" + "".join(f"{n:>{max(len(n), 15) + 2}}" for n in names) + f"{'world':>8}"]
    for key, label in REPORTED:
        cells = "".join(f"{_cell(result['rows'][n][key]):>{max(len(n), 15) + 2}}" for n in names)
        lines.append(f"{label:<50}{cells}{result['world'][key]:>8.3f}")
    return "\n".join(lines)


def _cell(m: dict[str, float]) -> str:
    return f"{m['mean']:.3f} ± {m['std']:.3f}"
