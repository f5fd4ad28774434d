"""What distillation does on the toy world: Re-DMD vs DMD, the EMA sink vs a plain sink, rollout staleness.

What it measures
----------------
Every run is the real job, `python launch.py train` on the embedded default (the world's exact teacher, the
ODE-initialised student, the motion reward), for --steps learner steps from the same start, followed by the
exact measures of `toyworld.evaluate` on the exported student over --prompts held-out world prompts (scene
seeds 1000000..) and --eval-noise noise seeds, using the raw generator weights (a short run's EMA would mostly
hold the weights at ema_start_step):

--study reward: Re-DMD (learner.beta=2) against vanilla DMD (learner.beta=0). The paper's claim is more
  motion at equal fidelity: compare the motion reward (the MQ axis the learner weights by) and the
  displacement per frame with the fidelity and adherence columns.
--study sink: the student trained and rolled out with an EMA sink of alpha 0.999, 0.99 and 0.9, a plain
  (static) sink, and no sink (the window alone), each measured on --long-frames latent frames (past the
  12-frame window) by the initial-frame copy measure (how much the last quarter of a long video looks like
  its first frames; lower: less copying) and the fidelity and adherence of the last window, next to the
  same measures on true world clips.
--study staleness: actors.max_staleness 0, 1 and 2; the table adds each run's wall time and the samples
  the actors made (used or dropped as stale), for quality per minute and per sample.

Each setting runs once per seed in --seeds (the seed sets runtime.seed and actors.prompt_seed), and the
table gives mean and standard deviation over seeds, plus the starting student's numbers for reference.
With --steps 0 nothing is trained: each setting is evaluated on the starting student, and a seed s moves
the held-out scenes (and their noise) to --eval-seed + 10000 s. That is the sink study's fair form when
training rollouts are shorter than the attention window (the embedded default's 9 frames in a 12-frame
window never evict, so the sink setting cannot change what is learnt, only how long rollouts run).
The numbers are what they are: BENCHMARKS.md records them with the machine and the command.

    python benchmarks/toyworld_learning.py --study reward --steps 40 --seeds 0,1,2,3,4
    python benchmarks/toyworld_learning.py --study sink --steps 0 --seeds 0,1,2,3 --json sink.json
    python benchmarks/toyworld_learning.py --study staleness --steps 80 --seeds 0,1,2,3,4
    python benchmarks/toyworld_learning.py learner.generator_lr=1e-5   # overrides for every run

Needs what `launch.py train` needs (Ray with Serve and Train, DeepSpeed, torch).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # run as a script from anywhere

from benchmarks.common import cpu_model, finish, free_port, load_1m, physical_cores  # noqa: E402

STUDIES = {
    "reward": {"Re-DMD (beta 2)": ["learner.beta=2.0"], "DMD (beta 0)": ["learner.beta=0.0"]},
    "sink": {**{f"EMA sink {a}": ["stream.sink_mode=ema", f"stream.compression_alpha={a}"] for a in (0.999, 0.99, 0.9)},
             "plain sink": ["stream.sink_mode=static"],
             "no sink": ["stream.sink_mode=static", "stream.sink_size=0"]},
    "staleness": {f"max_staleness {k}": [f"actors.max_staleness={k}"] for k in (0, 1, 2)},
}
MEASURES = ("adherence_all", "adherence_colour", "drawn_colour", "adherence_direction", "fidelity_rms", "displacement_px",
            "boundary_ratio", "first_boundary_ratio", "later_boundary_ratio", "motion_reward", "initial_frame_copy",
            "long_fidelity_end", "long_adherence_end")


def train(overrides: list[str], seed: int, args, out: Path) -> tuple[Path, float, int]:
    """One `launch.py train` run; returns its export (reward_forcing.pt), the wall time and the samples the
    actors made (delivered to the learner plus dropped, e.g. as stale)."""
    cmd = [sys.executable, "launch.py", "train", "--config", args.config, "--address", "local", *overrides,
           f"runtime.seed={seed}",
           f"actors.prompt_seed={seed}", f"learner.max_steps={args.steps}", f"learner.output_dir={out}",
           "learner.video_every=0", "learner.checkpoint_every=100000", f"reward_service.port={free_port()}"]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=args.run_timeout)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.splitlines()[-40:])
        raise RuntimeError(f"`{' '.join(cmd)}` exited with {proc.returncode}; stderr tail:\n{tail}")
    summary = json.loads((out / "summary.json").read_text())
    made = int(summary["samples_delivered"]) + sum((summary.get("drops") or {}).values())
    return Path(summary["export"]["self_forcing_pt"]), time.perf_counter() - t0, made


def evaluate(overrides: list[str], checkpoint: str, args, eval_seed: int | None = None) -> dict:
    """The exact measures of the student in `checkpoint`, each the mean over --eval-noise noise seeds; plus the
    world clips' values under "world"."""
    from toyworld.config import load_world_config
    from toyworld.evaluate import evaluate_config

    cfg = load_world_config(args.config, [*overrides, f"checkpoint.generator={json.dumps(checkpoint)}",
                                          "checkpoint.use_ema=false"])
    result = evaluate_config(cfg, None, args.prompts, tuple(range(args.eval_noise)),
                             args.eval_seed if eval_seed is None else eval_seed, args.long_frames, args.long_prompts)
    return {k: m["mean"] for k, m in result["measures"].items()} | {"world": {k: m["world"] for k, m in
                                                                              result["measures"].items()}}


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{mean:.3f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--study", choices=sorted(STUDIES), default="reward")
    p.add_argument("--config", default="configs/tiny.yaml", help="YAML config (default: the embedded toy world)")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every run, e.g. learner.generator_lr=1e-5")
    p.add_argument("--steps", type=int, default=40, help="learner.max_steps per run (default 40; 0: evaluate the start)")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds, one run per setting each (default 0,1)")
    p.add_argument("--prompts", type=int, default=24, help="held-out evaluation prompts (default 24)")
    p.add_argument("--eval-noise", type=int, default=2, help="noise seeds per evaluated student (default 2)")
    p.add_argument("--eval-seed", type=int, default=1_000_000, help="first held-out scene seed (default 1000000)")
    p.add_argument("--long-frames", type=int, default=120, help="latent frames of the long rollouts (default 120)")
    p.add_argument("--long-prompts", type=int, default=8, help="prompts rolled out long (default 8)")
    p.add_argument("--run-timeout", type=float, default=1800.0, help="seconds per training run (default 1800)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not seeds or args.steps < 0:
        p.error("--seeds needs at least one seed and --steps must be >= 0")

    import torch

    machine = {"cpu": cpu_model(), "physical_cores": physical_cores(), "logical_cpus": os.cpu_count(),
               "torch": torch.__version__, "loadavg_1m_at_start": load_1m()}
    print(f"machine: {machine['cpu']}, {machine['physical_cores']} physical cores; load avg "
          f"{machine['loadavg_1m_at_start']} at start", flush=True)
    settings = STUDIES[args.study]
    results: dict = {"machine": machine, "args": vars(args), "runs": []}
    settings = {name: [*args.overrides, *overrides] for name, overrides in settings.items()}
    start_overrides = next(iter(settings.values()))
    from toyworld.config import load_world_config

    start = load_world_config(args.config, args.overrides).checkpoint.generator
    results["start"] = evaluate(start_overrides, start, args)
    measures = [k for k in MEASURES if k in results["start"]]  # the long-rollout ones only with --long-prompts
    print(f"start ({start}): " + ", ".join(f"{k} {results['start'][k]:.3f}" for k in measures), flush=True)
    with tempfile.TemporaryDirectory(prefix="toyworld_bench_") as tmp:
        for seed in seeds:
            for name, overrides in settings.items():
                if args.steps == 0:
                    export, wall, samples, eval_seed = start, 0.0, 0, args.eval_seed + 10_000 * seed
                else:
                    export, wall, samples = train(overrides, seed, args, Path(tmp) / f"{name.replace(' ', '_')}_{seed}")
                    eval_seed = args.eval_seed
                scores = evaluate(overrides, str(export), args, eval_seed)
                results["runs"].append({"setting": name, "seed": seed, "train_s": wall, "samples": samples, **scores})
                print(f"  {name}, seed {seed} ({wall:.0f} s): " + ", ".join(f"{k} {scores[k]:.3f}" for k in measures),
                      flush=True)

    print(f"\n{args.study} study: {args.steps} learner steps from the ODE-init student, seeds {seeds}, "
          f"{args.prompts} held-out prompts, copy measure on {args.long_frames} latent frames (mean ± std over seeds)")
    print(f"{'setting':<18}" + "".join(f"{k:>22}" for k in (*measures, "train_s", "samples")))
    print(f"{'start':<18}" + "".join(f"{results['start'][k]:>22.3f}" for k in measures))
    results["summary"] = {}
    for name in settings:
        runs = [r for r in results["runs"] if r["setting"] == name]
        results["summary"][name] = {k: [r[k] for r in runs] for k in (*measures, "train_s", "samples")}
        print(f"{name:<18}" + "".join(f"{spread([r[k] for r in runs]):>22}" for k in (*measures, "train_s", "samples")))
    print(f"{'world clips':<18}" + "".join(f"{results['start']['world'][k]:>22.3f}" for k in measures))
    finish(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
