"""The one command line: `python launch.py <command> [--config FILE] [key=value ...]`.

Commands:
  train          the distillation job: reward service + rollout actors + DeepSpeed learner on Ray,
                 to learner.max_steps, with checkpoints, metrics, TensorBoard and sample videos.
  serve          streaming inference on Ray Serve: a WebSocket stream of JPEG frames, MP4 generation and a
                 web page to watch it (local Ray, or --address to join).
  pretrain-teacher
                 flow-matching pretraining of the toy world's small teacher (the embedded default's).
  ode-init       regression of the causal student on teacher trajectories (ode_init.pairs: ODE pairs, or the
                 teacher's x0s on the student's own few-step sampler; ode_init.on_policy: DAgger steps), Self
                 Forcing's ode_init.pt.
  evaluate       exact toy-world measures of a student: prompt adherence, fidelity to the world, motion,
                 block-boundary jumps, motion reward, initial-frame copying on long rollouts.
  generate       text to MP4: stream the causal generator block by block, decode each block as
                 soon as it exists and append it to the video; prints denoising and decoding speed.
                 --image / --video: start from a picture, or continue a video.
  reward-server  the reward-scoring HTTP service on Ray Serve (local Ray, or --address to join).
  score          score a video file with a running reward service (HTTP client).
  plan           will it fit: memory per GPU for every role (learner worker, rollout actor, reward and streaming
                 replica) and the resources they ask Ray for, from the config alone (meta device, no GPU, no Ray).

With no --config, every command but reward-server and score uses the embedded default (configs/tiny.yaml):
the toy world with its shipped teacher and student, CPU, no downloads; reward-server and score default to
configs/reward_service.yaml. configs/plumbing.yaml is the same machinery with random tiny weights.
`python launch.py <command> --help` lists each command's most-used keys and its outputs.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
import traceback
from pathlib import Path

import torch

# Without a GPU, DeepSpeed's accelerator detection logs "Setting accelerator to CPU" to stdout on import: it would
# precede `plan --json`'s JSON and every command's output. Naming the accelerator it would detect silences it; a
# local Ray started below inherits the same setting.
os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")

import ray
from ray import serve
from tqdm import tqdm

from core.codecs.text_encoder import TextEncoder
from core.codecs.video import codec_class, latent_frames_for, video_frames_for
from core.config import ConfigError
from core.model.kv_cache import StreamLimitError
from core.plan import build_plan
from core.records.checkpoint import CheckpointError, save_self_forcing, save_wan_folder
from core.records.video_io import MP4Writer, read_video_file
from core.stream.pipeline import VideoPipeline, build_generator
from core.stream.prefix import check_frames, read_prefix_image, usable_frames
from core.stream.session import StreamSession, warm_up
from job.cluster import start_ray, start_serve
from job.signals import StopSignal
from job.train import finished_run, print_summary, run, set_aside
from learner.samples import SampleTimeoutError
from reward_service.app import build_app as build_reward_app
from reward_service.client import RewardError, RewardHTTPClient
from serve.app import build_app as build_stream_app
from serve.follow import CheckpointVersions
from toyworld.config import WorldConfig, load_world_config
from toyworld.evaluate import (
    ExactSampler,
    denoiser_error,
    evaluate_config,
    evaluate_student,
    evaluate_teacher,
    format_change,
    format_denoiser_error,
    format_measures,
)
from toyworld.ode_init import ode_init
from toyworld.pretrain import pretrain_teacher

TRAIN_HELP = """\
most-used keys (key=value after the options):
  learner.max_steps=40          iterations to reach (a rerun with a higher value continues the run)
  learner.output_dir=runs/toyworld
  learner.checkpoint_every=20   learner.keep_last=2   learner.video_every=10
  learner.max_failures=0        worker-group restarts Ray Train may make (each resumes the last checkpoint)
  learner.num_workers=1         learner.batch_size=1   learner.beta=2.0   (Re-DMD reward weight; 0 is DMD)
  actors.num_actors=2           actors.max_staleness=0
  evaluation.around_train=true  (toy world: the exact held-out measures before and after)
  paths.root=/mnt/shared/reward-forcing   the folder relative weight, prompt and output paths resolve against
                                (default: the repository; docs/weights.md)

outputs, in learner.output_dir:
  checkpoints/step_N/   export/reward_forcing.pt, export/generator.safetensors   metrics.csv, metrics.parquet,
  tensorboard/   videos/step_N_vV.mp4 (+ .json: prompt, seed, version)   summary.json (every run in the folder)

runs resume: a second `train` with the same learner.output_dir continues from its last complete checkpoint;
one already at learner.max_steps says so and exits (--fresh starts over). Ctrl-C or SIGTERM checkpoints at
the end of the current iteration, exports and exits 0; a second one abandons the run (exit 130).
"""

SERVE_HELP = """\
most-used keys: serve.port=8000 serve.host=127.0.0.1 serve.max_sessions=1 serve.presets / serve.default_preset
  checkpoint.generator=PATH (or --config with your own weights; a real-size model needs it, or =random for seeded
  random weights)   paths.root=DIR (where relative weight paths resolve; default: the repository)
routes: GET / (web page), WebSocket /v1/stream, POST /v1/generate, GET /v1/info, /v1/metrics, /healthz, /docs.
Ctrl-C or SIGTERM: open streams get a close frame, Serve and Ray shut down, exit 0.
"""

REWARD_SERVER_HELP = """\
most-used keys: reward.backend=motion|videoreward|vlm_judge  reward_service.port=8000  reward_service.max_replicas=1
routes: POST /v1/score (multipart video + prompt, or a raw body), GET /v1/info, /healthz, /docs.
Ctrl-C or SIGTERM: Serve and Ray shut down, exit 0.
"""

PLAN_HELP = """\
per role: parameters, gradients and optimizer state per GPU for learner.zero_stage over learner.num_workers,
the teacher, the KV cache, the replay's and the critic's activations (with and without
learner.gradient_checkpointing), text encoder and VAE, the total against --gpu-gb, and what to change when
it does not fit. Nothing is loaded: models are built on the meta device; the activations are estimates
(formula in core/plan.py, checked against measured bytes by tests/test_plan.py).
  python launch.py plan --config configs/reward_forcing_1.3b.yaml --gpu-gb 80
  python launch.py plan --config configs/serve_1.3b.yaml --cluster cluster.yaml --json
"""


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of GB, got {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive, finite number of GB, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


MAX_IMAGE_BYTES = 64 << 20  # --image: a picture at the model's size is far smaller


def _read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    path = Path(args.prompts_file)
    if not path.is_file():
        raise ConfigError(f"--prompts-file {path} does not exist")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"--prompts-file {path} holds no prompts (one per line expected)")
    return prompts


def _output_paths(out: str, prompts: list[str], from_file: bool) -> list[Path]:
    """--prompt: `out` itself. --prompts-file: `out` is a folder of NNN_<slug>.mp4 files."""
    if not from_file:
        return [Path(out)]
    folder = Path(out).with_suffix("") if Path(out).suffix == ".mp4" else Path(out)
    return [folder / f"{i:03d}_{re.sub(r'[^a-z0-9]+', '_', p.lower())[:48].strip('_')}.mp4" for i, p in enumerate(prompts)]


def _read_prefix(args: argparse.Namespace, cfg: WorldConfig):
    """The frames of --image or --video (uint8 [T, H, W, 3] at the config's size), or None; a ConfigError names
    the file and what is wrong with it."""
    option, path = ("--image", args.image) if args.image else ("--video", args.video)
    if path is None:
        return None
    height, width = cfg.video.height, cfg.video.width
    try:
        if args.image:
            if not Path(path).is_file():
                raise ValueError("no such file")
            return read_prefix_image(Path(path).read_bytes(), height, width, MAX_IMAGE_BYTES)
        return check_frames(read_video_file(path).frames, height, width).numpy()
    except (ValueError, OSError) as e:
        raise ConfigError(f"{option} {path}: {e}") from None


def cmd_generate(cfg: WorldConfig, args: argparse.Namespace) -> None:
    cfg.check_generator_weights()
    prompts = _read_prompts(args)
    prefix = _read_prefix(args, cfg)
    fpb = cfg.stream.num_frame_per_block
    used = 0 if prefix is None else usable_frames(len(prefix), codec_class(cfg).temporal_stride)
    default_frames = video_frames_for(cfg.video.num_latent_frames, cfg)
    video_frames = args.frames if args.frames is not None else default_frames + (used if args.video else 0)
    if video_frames <= used:
        raise ConfigError(f"--frames {video_frames} leaves nothing to generate after the {used} given frames: "
                          "ask for more")
    latent_frames = latent_frames_for(video_frames, cfg)
    pipe = VideoPipeline.from_config(cfg)
    if warmed := warm_up(pipe):
        print(f"stream fast path ({pipe.block_step.mode}) warmed up in {warmed:.1f} s")
    print(f"generator on {pipe.device} ({cfg.runtime.dtype}); {latent_frames} latent frames -> "
          f"{video_frames} video frames at {cfg.video.width}x{cfg.video.height}, {cfg.video.fps} fps")
    if prefix is not None:
        dropped = f" (the codec encodes 1 + {codec_class(cfg).temporal_stride}k frames; the last " \
                  f"{len(prefix) - used} dropped)" if used < len(prefix) else ""
        print(f"starting from {args.image or args.video}: {used} given frame{'s' * (used > 1)}{dropped}")
    for i, (prompt, path) in enumerate(zip(prompts, _output_paths(args.out, prompts, args.prompts_file is not None))):
        path.parent.mkdir(parents=True, exist_ok=True)
        seed = args.seed + i
        pipe.encode([prompt])  # encoded (and cached) before the bar, so a prompt warning is not drawn over by it
        written, made, denoise_s, decode_s, wall_s = 0, 0, 0.0, 0.0, 0.0
        bar = tqdm(total=latent_frames // fpb, unit="block", desc=f"[{i + 1}/{len(prompts)}] {prompt[:40]}")
        with bar, MP4Writer(path, width=cfg.video.width, height=cfg.video.height, fps=cfg.video.fps) as writer, \
                StreamSession(pipe, prompt, seed, prefix=prefix) as session:
            for chunk in session.chunks(latent_frames):
                frames = chunk.frames[: video_frames - written]
                writer.write(frames)
                written += len(frames)
                if chunk.given_frames < len(chunk.frames):  # a block the generator made (the given ones only decode)
                    made += len(frames) - chunk.given_frames
                    denoise_s += chunk.denoise_s
                    decode_s += chunk.decode_s
                    wall_s += chunk.wall_s
                bar.update(1)
                if denoise_s:
                    bar.set_postfix(frames=written, denoise_fps=f"{made / denoise_s:.1f}")
        start = f", the first {session.given_frames} from {args.image or args.video}" if prefix is not None else ""
        print(f"wrote {path}: {written} frames {cfg.video.width}x{cfg.video.height} @ {cfg.video.fps} fps, "
              f"seed {seed}{start}")
        print(f"  denoising {denoise_s:.2f}s ({made / denoise_s:.1f} frames/s), decoding {decode_s:.2f}s "
              f"({made / decode_s:.1f} frames/s), end to end {made / wall_s:.1f} frames/s (per block, the wall "
              "time the stream waited: denoise + decode, or their overlap; text encoding and MP4 writing excluded"
              f"{'; generated frames only' if prefix is not None else ''})")
    hits, misses = pipe.text_encoder.cache_hits, pipe.text_encoder.cache_misses
    print(f"text encoder cache: {hits} hits, {misses} misses")


def cmd_train(cfg: WorldConfig, args: argparse.Namespace) -> None:
    cfg.check_paths("generator", "reward", "train", *(["serve"] if args.serve else []))
    if args.fresh and (aside := set_aside(cfg.learner.output_dir)) is not None:
        print(f"--fresh: moved the earlier run to {aside}")
    if (done := finished_run(cfg)) is not None:
        print(done)
        return
    ev = cfg.evaluation
    if ev.around_train:  # the toy world: the exact figure of the starting student, then of the trained one
        print("measuring the starting student (checkpoint.generator) on held-out prompts ...", flush=True)
        before = evaluate_config(cfg, None, ev.prompts, tuple(ev.seeds), ev.first_scene, long_prompts=0)
    summary = run(cfg, args.address, args.wait_for_resources, args.config, serve_stream=args.serve)
    if summary is None:
        print("stopped during start-up: nothing was trained, everything started was shut down")
        return
    print_summary(summary)
    if ev.around_train:
        trained = cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(
            update={"generator": summary["export"]["safetensors"], "use_ema": False})})
        after = evaluate_config(trained, None, ev.prompts, tuple(ev.seeds), ev.first_scene, long_prompts=0)
        print(format_change(before, after))
        out = Path(cfg.learner.output_dir) / "evaluation.json"
        out.write_text(json.dumps({"start": before, "trained": after}, indent=1))
        print(f"both measurements: {out}")


def _serve_until_stopped(what: str, app_name: str) -> None:
    """Block until Ctrl-C or SIGTERM, then shut Serve and Ray down. The app goes first: its replicas see it
    deleting and close open streams with 1001 (Serve's shutdown takes the HTTP proxy down before any replica
    hears of it, which would drop them without a close frame)."""
    stop = StopSignal(f"stopping the {what}").install()
    while not stop.wait(1.0):
        pass
    serve.delete(app_name)
    serve.shutdown()
    ray.shutdown()
    print(f"{what} stopped", flush=True)


def cmd_serve(cfg: WorldConfig, args: argparse.Namespace) -> None:
    svc = cfg.serve
    cfg.check_generator_weights()
    cfg.check_paths("generator", "serve")
    follow = CheckpointVersions(args.follow) if args.follow else None
    app = build_stream_app(cfg, follow)
    start_ray(args.address)
    url = start_serve(svc.host, svc.port, section="serve") + svc.route_prefix.rstrip("/")
    serve.run(app, name=svc.app_name, route_prefix=svc.route_prefix)
    print(f"streaming generation ready: open {url}/  (WebSocket {url.replace('http', 'ws', 1)}/v1/stream, "
          f"POST {url}/v1/generate, docs {url}/docs); Ctrl-C or SIGTERM stops it", flush=True)
    _serve_until_stopped("streaming service", svc.app_name)


class _LossLog:
    """loss.csv in `out` plus a tqdm bar with the latest loss, for the toy-world training commands."""

    def __init__(self, out: Path, total: int, desc: str, log_every: int):
        out.mkdir(parents=True, exist_ok=True)
        self.file = (out / "loss.csv").open("w", newline="")
        self.csv = csv.writer(self.file)
        self.csv.writerow(["step", "loss"])
        self.bar, self.log_every, self.step = tqdm(total=total, unit="step", desc=desc), log_every, 0

    def __call__(self, step: int, loss: float) -> None:
        self.step = step
        self.csv.writerow([step, f"{loss:.6f}"])
        self.bar.update(1)
        if step % self.log_every == 0:
            self.file.flush()
            self.bar.set_postfix(loss=f"{loss:.4f}")

    def close(self, losses: list[float]) -> str:
        self.bar.close()
        self.file.close()
        head, tail = losses[: max(1, len(losses) // 10)], losses[-max(1, len(losses) // 10):]
        return f"loss {sum(head) / len(head):.4f} (first 10%) -> {sum(tail) / len(tail):.4f} (last 10%)"


def cmd_pretrain_teacher(cfg: WorldConfig, args: argparse.Namespace) -> None:
    p = cfg.pretrain
    out = Path(p.output)
    log = _LossLog(out, p.steps, "pretrain-teacher", p.log_every)
    model, losses = pretrain_teacher(cfg, log)
    summary = log.close(losses)
    save_wan_folder(out / "teacher", model)
    print(f"wrote {out / 'teacher'} (Wan folder: config.json + safetensors) and {out / 'loss.csv'}; {summary}")
    if p.eval_clips:
        scores = evaluate_teacher(cfg, model, p.eval_clips, p.eval_steps, p.eval_guidance)
        (out / "eval.json").write_text(json.dumps(scores, indent=2))
        print(f"prompt adherence on {p.eval_clips} held-out scenes ({p.eval_steps} Euler steps, CFG {p.eval_guidance}): "
              f"colour {scores['colour']:.2f} (chance {scores['colour_chance']:.2f}), "
              f"direction {scores['direction']:.2f} (chance {scores['direction_chance']:.2f})")


def cmd_ode_init(cfg: WorldConfig, args: argparse.Namespace) -> None:
    o = cfg.ode_init
    out = Path(o.output)
    stages: dict = {}

    def on_stage(name: str, total: int) -> None:
        if "bar" in stages:
            stages.pop("bar").close()
        if name == "regression":
            stages["log"] = _LossLog(out, total, "ode-init: regression", o.log_every)
        else:
            stages["bar"] = tqdm(total=total, unit="clip", desc=f"ode-init: teacher {name}")

    def on_step(n: int, loss: float | None) -> None:
        if loss is None:
            stages["bar"].update(n)
        else:
            stages["log"](stages["log"].step + 1, loss)

    student, losses = ode_init(cfg, on_stage, on_step)
    summary = stages["log"].close(losses)
    save_self_forcing(out / "ode_init.pt", student.state_dict())
    print(f"wrote {out / 'ode_init.pt'} (checkpoint.generator loads it) and {out / 'loss.csv'}; {summary}")
    if o.eval_clips:
        scores = _evaluate(cfg, student, o.eval_clips, long_prompts=0)
        (out / "eval.json").write_text(json.dumps(scores, indent=2))


def _evaluate(cfg: WorldConfig, generator=None, prompts: int = 24, seeds: tuple[int, ...] = (0, 1, 2),
              first_scene: int = 1_000_000, long_frames: int = 63, long_prompts: int = 8,
              figure: str | None = None) -> dict:
    """toyworld.evaluate on `generator` (default: checkpoint.generator), printed as a table."""
    result = evaluate_config(cfg, generator, prompts, seeds, first_scene, long_frames, long_prompts, figure)
    print(format_measures(result))
    return result


def cmd_evaluate(cfg: WorldConfig, args: argparse.Namespace) -> None:
    cfg.check_paths("generator")
    if args.exact_sampler:
        scores = evaluate_student(cfg, ExactSampler(cfg), args.prompts, tuple(range(args.seeds)), args.first_scene,
                                  args.long_frames, args.long_prompts, args.figure)
        print("the exact denoiser in the student's sampler (the student column), no student weights")
        print(format_measures(scores))
    else:
        generator = build_generator(cfg, torch.device("cpu"), torch.float32).eval()
        scores = _evaluate(cfg, generator, args.prompts, tuple(range(args.seeds)), args.first_scene, args.long_frames,
                           args.long_prompts, args.figure)
        if args.denoiser_error:
            scores["denoiser_error"] = denoiser_error(cfg, generator, TextEncoder.from_config(cfg, "cpu", torch.float32),
                                                      args.prompts, tuple(range(args.seeds)), args.first_scene)
            print(format_denoiser_error(scores["denoiser_error"]))
    if args.figure:
        print(f"wrote {args.figure}: the first prompts' clips (noise seed 0), each over the world clip of its scene")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(scores, indent=2))
        print(f"wrote {args.out}")


def cmd_reward_server(cfg: WorldConfig, args: argparse.Namespace) -> None:
    svc = cfg.reward_service
    cfg.check_paths("reward")
    app = build_reward_app(cfg)
    start_ray(args.address)
    url = start_serve(svc.host, svc.port, svc.request_timeout_s, section="reward_service")
    serve.run(app, name=svc.app_name, route_prefix="/")
    print(f"reward service ({cfg.reward.backend}) ready at {url}  (POST {url}/v1/score, docs {url}/docs); Ctrl-C or SIGTERM "
          "stops it", flush=True)
    _serve_until_stopped("reward service", svc.app_name)


def cmd_score(cfg: WorldConfig, args: argparse.Namespace) -> None:
    url = args.url or f"http://{cfg.reward_service.host}:{cfg.reward_service.port}"
    with RewardHTTPClient(url, token=args.token, timeout_s=cfg.reward_service.client_timeout_s,
                          retries=cfg.reward_service.client_retries) as client:
        print(json.dumps(client.score_file(args.video, args.prompt), indent=2))


def cmd_plan(cfg: WorldConfig, args: argparse.Namespace) -> int:
    """Exit status 3 when a role does not fit, so a CI step or a launch script can stop on it."""
    plan = build_plan(cfg, args.config or "configs/tiny.yaml", args.gpu_gb, args.cluster)
    print(plan.to_json() if args.json else plan.table())
    return 3 if plan.problems else 0


def build_parser() -> argparse.ArgumentParser:
    """The whole command line, built without running anything (tests/test_docs.py checks documented commands)."""
    parser = argparse.ArgumentParser(prog="launch.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, default_config: str | None = None, epilog: str | None = None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", default=default_config, help=f"YAML config (default: {default_config or 'configs/tiny.yaml'})")
        p.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. stream.sink_size=3")
        return p

    p = command("train", "the Reward Forcing distillation job (embedded default: the toy world on CPU)", epilog=TRAIN_HELP)
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (default: RAY_ADDRESS, as under `ray job submit`, else a new local Ray)")
    p.add_argument("--wait-for-resources", action="store_true",
                   help="skip the up-front resource check (an autoscaling cluster adds the nodes the job asks for)")
    p.add_argument("--fresh", action="store_true",
                   help="start a new run: an existing learner.output_dir is renamed to <name>.<time> first")
    p.add_argument("--serve", action="store_true",
                   help="also deploy the streaming app (the serve section) in the job's cluster, on the reward "
                        "service's HTTP address: its page plays each weight version as training publishes it")

    p = command("generate", "text to MP4 with the streaming generator")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the text prompt")
    what.add_argument("--prompts-file", help="a text file with one prompt per line (one video each)")
    p.add_argument("--frames", type=_positive_int, default=None,
                   help="video frames to write (default: what video.num_latent_frames decode to: 81 for 21 "
                        "latents with the Wan VAE, 1 + 4 per later latent; one per latent with vae.kind=patch), "
                        "the given --image or --video frames included")
    p.add_argument("--out", default="outputs/video.mp4", help="MP4 path (a folder for --prompts-file)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (prompt i of a file uses seed + i)")
    p.add_argument("--checkpoint", default=None, help="generator weights (sets checkpoint.generator)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--image", default=None, metavar="PNG",
                       help="start from this picture (PNG or JPEG at video.width x video.height): the video's first "
                            "frame, held fixed while the first block is generated around it")
    start.add_argument("--video", default=None, metavar="MP4",
                       help="continue this video (MP4 or WebM at video.width x video.height): it is written into the "
                            "cache as clean context and the output starts with it (with the Wan VAE, its first "
                            "1 + 4k frames); --frames then counts it too (default: it plus one default-length clip)")

    p = command("serve", "streaming inference on Ray Serve with a web page (default: the shipped world student)",
                epilog=SERVE_HELP)
    p.add_argument("--address", default=None, help="Ray cluster to join (default: start a local Ray)")
    p.add_argument("--follow", default=None, metavar="OUTPUT_DIR",
                   help="play each new checkpoint of the training run writing to this learner.output_dir as it "
                        "lands (its EMA generator once the EMA has started); the starting weights stay for comparison")

    command("pretrain-teacher", "train the toy-world teacher with flow matching")
    command("ode-init", "initialise the causal student by regression on teacher trajectories (ode_init.pairs)")

    p = command("evaluate", "exact toy-world measures of a student: adherence, fidelity, motion, block boundaries, copying")
    p.add_argument("--checkpoint", default=None, help="student weights (sets checkpoint.generator)")
    p.add_argument("--prompts", type=_positive_int, default=24, help="held-out world prompts (default 24)")
    p.add_argument("--seeds", type=_positive_int, default=3, help="noise seeds 0..N-1 (default 3): mean ± std over them")
    p.add_argument("--first-scene", type=int, default=1_000_000, help="first scene seed (default 1000000, held out)")
    p.add_argument("--long-frames", type=_positive_int, default=63, help="latent frames of the long rollouts")
    p.add_argument("--long-prompts", type=int, default=8, help="prompts rolled out long (0: skip)")
    p.add_argument("--out", default=None, help="write the measures as JSON here")
    p.add_argument("--figure", default=None, help="write a PNG of the first 6 prompts' clips over the world's here")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--exact-sampler", action="store_true",
                       help="measure the student's few-step sampler with the world's exact denoiser in the student's "
                            "place instead of a student: the best that sampler can do")
    which.add_argument("--denoiser-error", action="store_true",
                       help="also the student's x0 error against the exact denoiser's at its own rollout states, per "
                            "step and block: where it falls short of the exact sampler")

    p = command("reward-server", "serve reward scoring over HTTP with Ray Serve", "configs/reward_service.yaml",
                epilog=REWARD_SERVER_HELP)
    p.add_argument("--address", default=None, help="Ray cluster to join (default: start a local Ray)")

    p = command("score", "score a video file with a running reward service", "configs/reward_service.yaml")
    p.add_argument("video", help="MP4 or WebM file")
    p.add_argument("--prompt", required=True, help="the prompt the video was generated from")
    p.add_argument("--url", default=None, help="service URL (default: http://reward_service.host:port)")
    p.add_argument("--token", default=None, help="bearer token, when the service requires one")

    p = command("plan", "memory per GPU and resources per role, from the config alone (no GPU, no Ray)",
                epilog=PLAN_HELP)
    p.add_argument("--gpu-gb", type=_positive_float, default=None,
                   help="GB of memory per GPU (default: the --cluster file's GPUs, else 80)")
    p.add_argument("--cluster", default=None, help="a Ray cluster launcher file (e.g. cluster.yaml) to check the "
                                                   "roles' CPU and GPU requests against")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    return parser


def config_overrides(args: argparse.Namespace) -> list[str]:
    """The command's `key=value` overrides, with those its options stand for (--checkpoint)."""
    overrides = list(args.overrides)
    if getattr(args, "checkpoint", None):
        overrides.append(f"checkpoint.generator={json.dumps(args.checkpoint)}")
    return overrides


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = config_overrides(args)
    commands = {"train": cmd_train, "serve": cmd_serve, "generate": cmd_generate, "reward-server": cmd_reward_server,
                "score": cmd_score, "pretrain-teacher": cmd_pretrain_teacher, "ode-init": cmd_ode_init,
                "evaluate": cmd_evaluate, "plan": cmd_plan}
    try:
        cfg = load_world_config(args.config, overrides)
        status = commands[args.command](cfg, args)
    except (ConfigError, CheckpointError, StreamLimitError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (RewardError, SampleTimeoutError) as e:  # failures we word ourselves, with what to check
        print(f"error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # unexpected (CUDA out of memory, NCCL, a library's own error): where it came from
        traceback.print_exc()
        print(f"\nerror: {str(e).splitlines()[0] if str(e) else type(e).__name__} (traceback above)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C or SIGTERM (the first asks for a clean stop), or Ctrl-C before Ray
        print(f"\n{args.command}: abandoned (Ctrl-C or SIGTERM); a train run resumes from its last complete "
              "checkpoint", file=sys.stderr)
        return 130
    return status or 0


if __name__ == "__main__":
    status = main()
    if status == 130:  # abandoned: a learner thread may still be inside a Ray call, and meeting the interpreter's
        sys.stdout.flush()  # teardown there can crash the process (SIGSEGV) after the clean message; leave at once
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
