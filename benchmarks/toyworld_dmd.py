"""Why DMD moves the toy world's student, and whether a recipe makes it better: the learner's iteration in one process.

What it measures
----------------
Each run is the learner's Re-DMD iteration (`core.algo.distill.ReDMD`: the replay of a self-forced rollout's exit
steps, the DMD loss against the exact teacher, the critic's flow loss, one generator update every
`learner.dfake_gen_update_ratio` iterations, `learner.batch_size` rollouts per iteration), sequenced in one process
with torch AdamW at the learner's settings instead of Ray actors and DeepSpeed: strictly on-policy, as the job with
`actors.max_staleness=0`, and fast enough for many seeds. From the shipped student, for --steps iterations per seed,
it logs the learner's world diagnostics (`dmd_world_cosine` by noise band, the critic's and the exact teacher's flow
losses on fresh student samples and on world clips), and measures the student before and after with the exact
held-out measures of `toyworld.evaluate` (--prompts scenes from 1000000, noise seeds --eval-noise): the raw weights,
and with --ema the learner's EMA (`learner.ema_decay` from `learner.ema_start_step`), which is what the job exports.
Rewards (Re-DMD, learner.beta != 0) come from the config's reward backend, scored in process.

    python benchmarks/toyworld_dmd.py --steps 200 --seeds 0,1,2                       # the embedded default
    python benchmarks/toyworld_dmd.py --steps 600 --seeds 0,1,2 learner.generator_lr=1e-4   # overrides for every run
    python benchmarks/toyworld_dmd.py --steps 600 --seeds 0,1,2,3,4 --ema learner.beta=0 --json dmd.json
    python benchmarks/toyworld_dmd.py --probe 24 learner.beta=0 learner.generator_lr=1e-4   # single updates, measured

Needs torch (no Ray, no DeepSpeed). Each run prints one JSON line; the table gives mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # run as a script from anywhere

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import cpu_model, physical_cores  # noqa: E402
from core.algo.distill import DIAGNOSTICS, ReDMD, build_score_models  # noqa: E402
from core.algo.ema import EMA  # noqa: E402
from core.algo.losses import dmd_gradient, reward_weights, weighted_dmd_loss  # noqa: E402
from core.codecs.text_encoder import TextEncoder  # noqa: E402
from core.codecs.video import build_codec  # noqa: E402
from core.records.checkpoint import save_self_forcing  # noqa: E402
from core.records.prompts import load_prompts  # noqa: E402
from core.reward.base import VideoInput  # noqa: E402
from core.reward.registry import build_backend  # noqa: E402
from core.stream.pipeline import VideoPipeline, build_generator  # noqa: E402
from toyworld.config import WorldConfig, load_world_config  # noqa: E402
from toyworld.evaluate import decode_videos, evaluate_student  # noqa: E402
from toyworld.exact import WorldClips  # noqa: E402
from toyworld.world import parse_prompt  # noqa: E402

MEASURES = ("fidelity_rms", "adherence_all", "adherence_shape", "adherence_colour", "adherence_direction",
            "adherence_speed", "boundary_ratio", "displacement_px")
# which way is better (+1 higher, -1 lower) where it is one way; the displacement is better nearer the world's
BETTER = {"fidelity_rms": -1, "boundary_ratio": -1, **{k: 1 for k in MEASURES if k.startswith("adherence")}}


class InProcessLearner:
    """The learner's models and the iteration's order (learner/loop.py) without Ray or DeepSpeed."""

    def __init__(self, cfg: WorldConfig, seed: int, oracle: bool = False):
        self.cfg, self.learner, self.oracle = cfg, cfg.learner, oracle
        torch.manual_seed(seed)
        self.generator = build_generator(cfg, "cpu", torch.float32).train().requires_grad_(True)
        self.teacher, self.critic = build_score_models(cfg, "cpu", torch.float32)
        self.encoder = TextEncoder.from_config(cfg, "cpu", torch.float32)
        self.pipe = VideoPipeline(cfg, self.generator, self.encoder, build_codec(cfg), torch.device("cpu"))
        self.distill = ReDMD(cfg)
        self.reward = build_backend(cfg.reward) if self.learner.beta else None
        self.negative = self.encoder.encode([self.learner.negative_prompt])
        self.prompts = load_prompts(cfg.actors.prompts)[1]
        self.optimizers = {name: torch.optim.AdamW(model.parameters(), lr=lr, betas=tuple(self.learner.betas), eps=1e-8,
                                                   weight_decay=self.learner.weight_decay)
                           for name, model, lr in (("generator", self.generator, self.learner.generator_lr),
                                                   ("critic", self.critic, self.learner.critic_lr))}
        self.rng = torch.Generator().manual_seed(seed * 1_000_003)
        self.prompt_rng = np.random.default_rng(seed)
        self.sample_seed = seed * 1_000_000
        self.ema: EMA | None = None

    def samples(self) -> list[tuple[str, object, float]]:
        """`batch_size` (prompt, rollout record, normalised reward) made by the current weights."""
        out = []
        for _ in range(self.learner.batch_size):
            prompt = self.prompts[self.prompt_rng.integers(len(self.prompts))]
            with torch.no_grad():
                record = self.pipe.training_rollout(prompt, self.sample_seed)
            self.sample_seed += 1
            reward = 0.0
            if self.reward is not None:
                frames = decode_videos(self.pipe.vae, record.clean_latents())[0]
                video = VideoInput(frames, float(self.cfg.video.fps), prompt)
                reward = self.reward.score_batch([video])[0].normalized[self.learner.reward_axis]
            out.append((prompt, record, reward))
        return out

    def _step(self, name: str, model: torch.nn.Module) -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), self.learner.grad_clip)
        self.optimizers[name].step()
        self.optimizers[name].zero_grad(set_to_none=True)

    def iteration(self, step: int) -> dict[str, float]:
        batch = self.samples()
        row: dict[str, float] = {"step": step, "reward": float(np.mean([r for _, _, r in batch]))}
        if step % self.learner.dfake_gen_update_ratio == 0:
            weights = reward_weights(torch.tensor([r for _, _, r in batch], dtype=torch.float64), self.learner.beta,
                                     self.learner.reward_weight_clip, self.learner.reward_weight_normalize)
            stats = []
            for i, (prompt, record, _) in enumerate(batch):
                context = self.encoder.encode([prompt])
                measured = self.distill.critic_fit(self.critic, self.teacher, record.clean_latents(), context, [prompt],
                                                   self.rng)
                x = self.distill.replay(self.generator, record, context)
                if self.oracle:  # the exact way to the world, normalised as DMD's, in place of critic minus teacher
                    target = self.teacher.nearest_world(x.detach(), [prompt]).to(x.dtype)
                    loss, dmd = weighted_dmd_loss(x, dmd_gradient(x.detach(), x.detach(), target, target, 0.0),
                                                  weights[i:i + 1]), {}
                else:
                    loss, dmd = self.distill.generator_loss(x, self.critic, self.teacher, context, self.negative,
                                                            weights[i:i + 1], self.rng, [prompt])
                (loss / len(batch)).backward()  # DeepSpeed's gradient accumulation over the batch
                stats.append(measured | dmd)
            self._step("generator", self.generator)
            if step >= self.learner.ema_start_step:
                weights_now = {k: v.detach() for k, v in self.generator.state_dict().items()}
                if self.ema is None:
                    self.ema = EMA(weights_now, self.learner.ema_decay)
                else:
                    self.ema.update(weights_now)
            row |= {k: float(np.mean([s[k] for s in stats if k in s])) for k in {k for s in stats for k in s}}
        losses = []
        for prompt, record, _ in batch:
            loss, _ = self.distill.critic_loss(self.critic, record.clean_latents(), self.encoder.encode([prompt]),
                                               self.rng)
            (loss / len(batch)).backward()
            losses.append(loss.item())
        self._step("critic", self.critic)
        row["critic_loss"] = float(np.mean(losses))
        return row

    def measure(self, prompts: int, noise_seeds: tuple[int, ...], weights: dict | None = None) -> dict[str, float]:
        """The exact held-out measures of the generator (or of `weights` loaded into it for the measurement)."""
        saved = None
        if weights is not None:
            saved = {k: v.detach().clone() for k, v in self.generator.state_dict().items()}
            self.generator.load_state_dict(weights)
        self.generator.eval()
        result = evaluate_student(self.cfg, self.pipe, prompts, noise_seeds, long_prompts=0)["measures"]
        self.generator.train()
        if saved is not None:
            self.generator.load_state_dict(saved)
        return {k: result[k]["mean"] for k in MEASURES}


def run(cfg: WorldConfig, seed: int, args) -> dict:
    learner = InProcessLearner(cfg, seed, args.oracle)
    noise_seeds = tuple(range(args.eval_noise))
    start = learner.measure(args.prompts, noise_seeds)
    t0 = time.perf_counter()
    log = [learner.iteration(step) for step in range(args.steps)]
    train_s = time.perf_counter() - t0
    out = {"seed": seed, "train_s": train_s, "start": start, "end": learner.measure(args.prompts, noise_seeds)}
    if args.ema and learner.ema is not None:
        out["end_ema"] = learner.measure(args.prompts, noise_seeds, learner.ema.shadow)
    if args.save:  # the trained generator (and its EMA) in the layout checkpoint.generator reads
        save_self_forcing(Path(args.save) / f"seed{seed}.pt", learner.generator.state_dict(),
                          generator_ema=learner.ema.shadow if learner.ema else None)
    updates = [r for r in log if "dmd_world_cosine" in r]
    half = len(updates) // 2
    for key in DIAGNOSTICS:  # the first and the second half of the run's generator updates
        out[key] = [float(np.mean([r[key] for r in part if key in r])) if any(key in r for r in part) else None
                    for part in (updates[:half], updates[half:])]
    out["critic_loss"] = [float(np.mean([r["critic_loss"] for r in part])) for part in (log[:len(log) // 2],
                                                                                        log[len(log) // 2:])]
    return out


def probe(cfg: WorldConfig, updates: int) -> dict:
    """Does one generator update move its own sample toward the world, and what does it do to other prompts? For each
    of `updates` updates (no critic updates, so the critic stays as it started): the distance to the nearest world clip
    of its prompt of the sample's full rollout, made again with the same noise after the update minus before, and
    the mean distance of 8 other prompts' rollouts before the first and after the last update."""
    learner = InProcessLearner(cfg, 0)
    clips = WorldClips(cfg.video.num_latent_frames, cfg.video.height, cfg.video.width)

    def distances(prompts: list[str], seed: int) -> list[float]:
        with torch.no_grad():
            made = learner.pipe.generate(learner.encoder.encode(prompts), seed, cfg.video.num_latent_frames)
        pixels = learner.pipe.vae.decode(made.transpose(1, 2).double())
        return [clips.nearest(v, [parse_prompt(p)]).rms for v, p in zip(pixels, prompts)]

    others = learner.prompts[:8]
    before_others = float(np.mean(distances(others, 123)))
    moved = []
    for i in range(updates):
        prompt = learner.prompts[learner.prompt_rng.integers(len(learner.prompts))]
        seed = 777 + i
        with torch.no_grad():
            record = learner.pipe.training_rollout(prompt, seed)
        before = distances([prompt], seed)[0]
        context = learner.encoder.encode([prompt])
        x = learner.distill.replay(learner.generator, record, context)
        loss, _ = learner.distill.generator_loss(x, learner.critic, learner.teacher, context, learner.negative,
                                                 torch.ones(1, dtype=torch.float64), learner.rng, [prompt])
        loss.backward()
        learner._step("generator", learner.generator)
        moved.append(distances([prompt], seed)[0] - before)
    return {"own_sample_change": float(np.mean(moved)), "own_sample_closer": sum(m < 0 for m in moved),
            "updates": updates, "others_before": before_others, "others_after": float(np.mean(distances(others, 123)))}


def spread(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def table(runs: list[dict]) -> str:
    ends = ["end", *(["end_ema"] if "end_ema" in runs[0] else [])]
    last = ends[-1]
    lines = [f"{'measure':<22}{'start':>16}" + "".join(f"{e:>16}" for e in ends) + f"   better ({last}) on seeds"]
    for key in MEASURES:
        cells = "".join(f"{spread([r[e][key] for r in runs]):>16}" for e in ends)
        count = ""
        if key in BETTER:
            better = sum(BETTER[key] * (r[last][key] - r["start"][key]) > 0 for r in runs)
            same = sum(r[last][key] == r["start"][key] for r in runs)
            count = f"{better}/{len(runs)}" + (f" ({same} equal)" if same else "")
        lines.append(f"{key:<22}{spread([r['start'][key] for r in runs]):>16}{cells}   {count}")
    lines.append("diagnostics, first half -> second half of the generator updates:")
    for key in (*DIAGNOSTICS, "critic_loss"):
        halves = [[r[key][i] for r in runs if r[key][i] is not None] for i in (0, 1)]
        if all(halves):
            lines.append(f"  {key:<28}{spread(halves[0]):>16} -> {spread(halves[1])}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("overrides", nargs="*", help="key=value overrides for every run, e.g. learner.generator_lr=1e-4")
    p.add_argument("--config", default=None, help="YAML config (default: the embedded toy world)")
    p.add_argument("--steps", type=int, default=200, help="learner iterations per run (default 200)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, one run each (default 0,1,2)")
    p.add_argument("--prompts", type=int, default=24, help="held-out evaluation prompts (default 24)")
    p.add_argument("--eval-noise", type=int, default=2, help="noise seeds per measurement (default 2)")
    p.add_argument("--ema", action="store_true", help="also measure the learner's EMA of the generator")
    p.add_argument("--json", default=None, help="also write every run to this file")
    p.add_argument("--probe", type=int, default=0, help="instead: N single updates, each measured on its own sample")
    p.add_argument("--oracle", action="store_true",
                   help="the generator follows the exact way to the world (its sample minus the nearest world clip of "
                        "its prompt) instead of the DMD gradient: what DMD's best low-noise gradient does at this size")
    p.add_argument("--save", default=None, help="also write each seed's trained generator to DIR/seed<N>.pt")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not seeds or args.steps < 1:
        p.error("--seeds needs at least one seed and --steps must be >= 1")
    cfg = load_world_config(args.config, args.overrides)
    if args.probe:
        print(json.dumps(probe(cfg, args.probe)))
        return 0
    print(f"machine: {cpu_model()}, {physical_cores()} physical cores, torch threads {torch.get_num_threads()}; "
          f"{args.steps} iterations per seed, overrides: {' '.join(args.overrides) or 'none'}", flush=True)
    runs = []
    for seed in seeds:
        runs.append(run(cfg, seed, args))
        print(json.dumps(runs[-1]), flush=True)
    print(table(runs))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "machine": cpu_model(), "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
