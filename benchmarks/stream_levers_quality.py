"""What the streaming speed levers cost in quality, measured exactly on the toy world.

The shipped toy-world student (configs/tiny.yaml: assets/toyworld/ode_init.pt) makes the same held-out clips under
each variant, and `toyworld.evaluate.evaluate_student` measures them exactly (fidelity: distance to the prompt's
nearest world clip; adherence: the nearest clip's attributes; motion; block-boundary jumps); the table gives mean
± std over the noise seeds and each variant's change from the first (the reference, float32):

- bfloat16: the dtype the GPU configurations stream in;
- no context re-run (`stream.context_rerun=false`): a block's last denoising-step K/V stay in the cache instead of a
  fifth forward at t = 0, one forward fewer per block (x0.8 of the denoising work);
- FP8 (`runtime.fp8=true`, bf16 otherwise): the transformer blocks' linear layers in float8 through torchao; needs
  CUDA of compute capability 8.9+ and torchao, else the row says why it was skipped.

Compiled layers and CUDA graphs compute the same clips up to float reordering (benchmarks/stream_session.py compares
their frames with the eager path's), so they are not variants here.

    python benchmarks/stream_levers_quality.py                       # CPU: float32, bfloat16, no context re-run
    python benchmarks/stream_levers_quality.py --device cuda         # also FP8

Needs torch and this repository (no Ray).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import torch  # noqa: E402

from benchmarks.common import cpu_model, finish  # noqa: E402
from core.stream.pipeline import VideoPipeline  # noqa: E402
from toyworld.config import load_world_config  # noqa: E402
from toyworld.evaluate import REPORTED, evaluate_student  # noqa: E402

VARIANTS = {
    "float32": ["runtime.dtype=float32"],
    "bfloat16": ["runtime.dtype=bfloat16"],
    "no context re-run": ["runtime.dtype=float32", "stream.context_rerun=false"],
    "bfloat16 + FP8": ["runtime.dtype=bfloat16", "runtime.fp8=true"],
}
SHOWN = ("adherence_all", "adherence_colour", "drawn_colour", "adherence_direction", "visible_frames", "fidelity_rms",
         "displacement_px", "boundary_ratio", "first_boundary_ratio", "later_boundary_ratio")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated of: {', '.join(VARIANTS)}")
    ap.add_argument("--prompts", type=int, default=24, help="held-out world prompts (default 24)")
    ap.add_argument("--seeds", type=int, default=3, help="noise seeds 0..N-1 (default 3)")
    ap.add_argument("--first-scene", type=int, default=1_000_000, help="first held-out scene seed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    names = args.variants.split(",")
    if unknown := [n for n in names if n not in VARIANTS]:
        ap.error(f"unknown --variants {unknown}; choose from {', '.join(VARIANTS)}")
    torch.set_num_threads(args.threads)
    machine = {"cpu": cpu_model(), "torch": torch.__version__, "device": args.device}
    if args.device == "cuda":
        machine["gpu"] = torch.cuda.get_device_name()
    print(f"machine: {machine}; {args.prompts} held-out prompts (scenes from {args.first_scene}) x noise seeds "
          f"0..{args.seeds - 1}", flush=True)

    results: dict[str, dict] = {}
    for name in names:
        cfg = load_world_config(None, VARIANTS[name] + [f"runtime.device={args.device}"])
        t0 = time.perf_counter()
        try:
            pipe = VideoPipeline.from_config(cfg)
        except ValueError as e:  # FP8 without an FP8 GPU or torchao: say so, measure the rest
            results[name] = {"skipped": str(e)}
            print(f"{name}: skipped: {e}", flush=True)
            continue
        with torch.no_grad():
            result = evaluate_student(cfg, pipe, args.prompts, tuple(range(args.seeds)), args.first_scene, long_prompts=0)
        results[name] = {"measures": result["measures"], "seconds": time.perf_counter() - t0}
        print(f"{name}: evaluated in {results[name]['seconds']:.0f} s", flush=True)

    labels = {key: label for key, label, _ in REPORTED}
    measured = [n for n in names if "measures" in results[n]]
    reference = measured[0]
    print(f"\n{'measure':<40}" + "".join(f"{n:>26}" for n in measured) + f"{'world':>8}")
    for key in SHOWN:
        ref = results[reference]["measures"][key]
        row = f"{labels[key]:<40}"
        for n in measured:
            m = results[n]["measures"][key]
            change = "" if n == reference else f" ({m['mean'] - ref['mean']:+.3f})"
            row += f"{m['mean']:>10.3f} ± {m['std']:<5.3f}{change:>9}"
        print(row + f"{ref['world']:>8.3f}")
    for n in names:
        if "skipped" in results[n]:
            print(f"{n}: skipped: {results[n]['skipped']}")
    finish({"machine": machine, "args": vars(args), "reference": reference, "results": results}, args.json)


if __name__ == "__main__":
    main()
