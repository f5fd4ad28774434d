"""Starting from a picture or a video, measured exactly on the toy world: student against the exact sampler.

What it measures
----------------
On --prompts held-out world scenes (scene seeds --first-scene..), each stream gets the scene's prompt and the first
frame of the scene's world clip (image), or its first block (block), or nothing (text, for reference), and makes a
clip of the world's length (9 frames on the embedded default). `toyworld.continuation` measures how often the clip
keeps the given shape, colour and place, moves as prompted, and how far it is from the world clip that continues
the given frames, for the student (`StreamSession(prefix=...)`, what `generate --image/--video` and the server run)
and for the exact sampler (the student's few-step sampler with the world's exact denoiser: the method at best), on
noise seeds 0..--seeds-1, mean ± std over the seeds. For the image, the student also runs two other ways to start:
the image written into the cache as a still block of context, and the image as a clean frame inside the first
block. --figure writes a contact sheet of the first scenes (noise seed 0): per scene the student from the image,
from the block, and the exact sampler from the image, each over the world clip.

    python benchmarks/toyworld_continuation.py --figure docs/image_to_video.png
    python benchmarks/toyworld_continuation.py --checkpoint runs/toyworld/export/generator.safetensors

CPU only, a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # run as a script from anywhere

from benchmarks.common import cpu_model, finish, load_1m, physical_cores  # noqa: E402

FIGURE_RUNS = ("image: student", "block: student", "image: exact sampler")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=None, help="YAML config (default: the embedded toy world)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument("--checkpoint", default=None, help="student weights (default: checkpoint.generator)")
    p.add_argument("--prompts", type=int, default=24, help="held-out scenes (default 24)")
    p.add_argument("--seeds", type=int, default=3, help="noise seeds 0..N-1 (default 3)")
    p.add_argument("--first-scene", type=int, default=1_000_000, help="first scene seed (default 1000000, held out)")
    p.add_argument("--figure", default=None, help="write a contact sheet PNG here")
    p.add_argument("--figure-scenes", type=int, default=3, help="scenes in the figure (default 3)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the toy model gains nothing "
                                                          "from more, and on a shared machine loses)")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from core.codecs.text_encoder import TextEncoder
    from core.codecs.video import build_codec
    from core.stream.pipeline import VideoPipeline, build_generator
    from toyworld.config import load_world_config
    from toyworld.continuation import evaluate_continuation, format_continuation
    from toyworld.evaluate import contact_sheet

    overrides = [*args.overrides, *([f"checkpoint.generator={json.dumps(args.checkpoint)}"] if args.checkpoint else [])]
    cfg = load_world_config(args.config, overrides)
    machine = {"cpu": cpu_model(), "physical_cores": physical_cores(), "logical_cpus": os.cpu_count(),
               "torch": torch.__version__, "loadavg_1m_at_start": load_1m()}
    print(f"machine: {machine['cpu']}, {machine['physical_cores']} physical cores; load avg "
          f"{machine['loadavg_1m_at_start']} at start; student {cfg.checkpoint.generator}", flush=True)
    pipe = VideoPipeline(cfg, build_generator(cfg, torch.device("cpu"), torch.float32),
                         TextEncoder.from_config(cfg, "cpu", torch.float32), build_codec(cfg), torch.device("cpu"))
    t0 = time.perf_counter()
    with torch.no_grad():
        result = evaluate_continuation(cfg, pipe, args.prompts, tuple(range(args.seeds)), args.first_scene)
    print(format_continuation(result))
    print(f"{time.perf_counter() - t0:.0f} s")
    if args.figure:
        n = args.figure_scenes
        videos = [result["figure"][name][i] for i in range(n) for name in FIGURE_RUNS]
        references = [result["reference"][i] for i in range(n) for _ in FIGURE_RUNS]
        contact_sheet(videos, references, args.figure)
        print(f"wrote {args.figure}: per scene, rows {', '.join(FIGURE_RUNS)} (noise seed 0), each over the world clip")
    measures = {k: v for k, v in result.items() if k not in ("figure", "reference")}  # not the clips
    finish({"machine": machine, "args": vars(args), **measures}, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
