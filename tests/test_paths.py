"""Where weights come from: relative paths resolve under paths.root, a command names every missing file it needs
in one message before Ray starts, a real-size generator with no weights is refused for streaming, and Ray's
working-dir package leaves weights and outputs out. In-process: nothing here starts Ray."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import ray
import yaml
from ray._private.runtime_env.packaging import create_package
from ray.serve import Application

import launch
from core.config import PLUMBING_CONFIG, REPO_ROOT, ConfigError, load_config
from serve.app import app_builder
from toyworld.config import load_world_config

PAPER = REPO_ROOT / "configs" / "reward_forcing_1.3b.yaml"
SERVE_1_3B = REPO_ROOT / "configs" / "serve_1.3b.yaml"
# (key, path under paths.root, words of what it is): every file the paper's training run reads
PAPER_FILES = [
    ("checkpoint.generator", "checkpoints/ode_init.pt", "gdhe17/Self-Forcing"),
    ("text_encoder.checkpoint", "checkpoints/Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth", "umT5-XXL encoder"),
    ("text_encoder.tokenizer", "checkpoints/Wan2.1-T2V-1.3B/google/umt5-xxl", "umT5 tokenizer"),
    ("vae.checkpoint", "checkpoints/Wan2.1-T2V-1.3B/Wan2.1_VAE.pth", "Wan VAE"),
    ("reward.checkpoint", "checkpoints/VideoReward", "KlingTeam/VideoReward"),
    ("actors.prompts", "data/vidprom_filtered_extended.txt", "vidprom_filtered_extended.txt of gdhe17/Self-Forcing"),
    ("learner.teacher.checkpoint", "checkpoints/Wan2.1-T2V-14B", "Wan-AI/Wan2.1-T2V-14B"),
    ("learner.critic_checkpoint", "checkpoints/Wan2.1-T2V-1.3B", "Wan-AI/Wan2.1-T2V-1.3B"),
]
STREAM_KEYS = ("checkpoint.generator", "text_encoder.checkpoint", "text_encoder.tokenizer", "vae.checkpoint")


def test_relative_paths_resolve_under_paths_root_wherever_the_process_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # as a Ray Train worker or the job's unpacked working dir: not the repository
    cfg = load_config(PLUMBING_CONFIG, [f"paths.root={tmp_path / 'share'}", "learner.teacher.checkpoint=/abs/teacher",
                                        "checkpoint.generator=ckpt/gen.pt", "learner.samples_parquet=s.parquet",
                                        "serve.lora=[{path: lora/a.pt, weight: 0.5}]", "serve.lora_adapters={b: lora/b}"])
    share = tmp_path / "share"
    assert cfg.checkpoint.generator == str(share / "ckpt" / "gen.pt")
    assert cfg.actors.prompts == str(share / "prompts" / "tiny.txt") and cfg.learner.output_dir == str(share / "runs/tiny")
    assert cfg.learner.samples_parquet == str(share / "s.parquet") and cfg.learner.teacher.checkpoint == "/abs/teacher"
    assert cfg.serve.lora == [{"path": str(share / "lora" / "a.pt"), "weight": 0.5}]
    assert cfg.serve.lora_adapters == {"b": str(share / "lora" / "b")}
    # unset, the root is the repository's: the toy world's shipped files are found from any working directory
    world = load_world_config()
    assert world.checkpoint.generator == str(REPO_ROOT / "assets" / "toyworld" / "ode_init.pt")
    assert world.text_encoder.tokenizer == str(REPO_ROOT / "assets" / "toyworld" / "tokenizer")
    world.check_paths()
    # resolving twice changes nothing (configs travel to actors and workers and are validated again there)
    assert type(cfg).model_validate(cfg.model_dump()) == cfg
    random = load_config(PLUMBING_CONFIG, ["checkpoint.generator=random"])
    assert random.checkpoint.generator == "random" and random.checkpoint.generator_path is None
    with pytest.raises(ConfigError, match="paths.root must be an absolute folder"):
        load_config(PLUMBING_CONFIG, ["paths.root=weights"])


def test_train_names_every_missing_file_in_one_message_before_ray(tmp_path):
    """The paper's run on a machine without its files: one error naming each (key, resolved path, what it is and
    where it comes from), exit 2, no traceback, and Ray never started."""
    root = tmp_path / "share"
    # in a process of its own: this test session has a Ray of its own already
    run = subprocess.run([sys.executable, "-c", "import sys, launch, ray; status = launch.main(sys.argv[1:]); "
                          "print('ray initialized:', ray.is_initialized()); sys.exit(status)",
                          "train", "--config", str(PAPER), f"paths.root={root}"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    err = run.stderr
    assert run.returncode == 2 and "ray initialized: False" in run.stdout, run.stdout + err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert f"{len(PAPER_FILES)} of the files this command needs are missing" in err and f"paths.root ({root})" in err
    for key, path, what in PAPER_FILES:
        assert f"  {key}: {root / path}\n" in err and what in err, key
    assert "learner.output_dir" not in err  # an output: made by the run


def test_each_command_names_only_the_files_it_uses(tmp_path, capsys):
    root = tmp_path / "share"
    ray_before = ray.is_initialized()
    for argv in (["generate", "--config", str(PAPER), "--prompt", "x"], ["serve", "--config", str(SERVE_1_3B)]):
        assert launch.main([*argv, f"paths.root={root}"]) == 2
        err = capsys.readouterr().err
        assert re.findall(r"^  (\S+): ", err, re.MULTILINE) == list(STREAM_KEYS), argv
    assert ray.is_initialized() == ray_before  # refused before any Ray call


def test_streaming_refuses_a_real_size_generator_without_weights(tmp_path, capsys):
    """`serve` and `generate` of a 1.3B model with no generator checkpoint would play random weights as if they were
    a broken checkpoint: refused unless `random` is said outright; the tiny configs keep working without one."""
    ray_before = ray.is_initialized()
    for argv in (["serve", "--config", str(SERVE_1_3B)], ["generate", "--config", str(PAPER), "--prompt", "x"]):
        assert launch.main([*argv, "checkpoint.generator=null"]) == 2
        err = capsys.readouterr().err
        assert "checkpoint.generator is not set" in err and "checkpoint.generator=random" in err, argv
        assert launch.main([*argv, "checkpoint.generator=random", f"paths.root={tmp_path}"]) == 2
        err = capsys.readouterr().err  # past the refusal, on to the files it still needs
        assert "is not set" not in err and "checkpoint.generator" not in err and "vae.checkpoint" in err
    assert ray.is_initialized() == ray_before
    for cfg in (load_config(PLUMBING_CONFIG), load_config(REPO_ROOT / "configs" / "serve.yaml"), load_world_config()):
        cfg.check_generator_weights()  # dims 64 and 128: plumbing serves without files, the world its shipped student
    load_config(PLUMBING_CONFIG, ["model.dim=1024", "model.num_heads=8", "checkpoint.generator=random"]).check_generator_weights()
    with pytest.raises(ConfigError, match="model.dim 1024"):
        load_config(PLUMBING_CONFIG, ["model.dim=1024", "model.num_heads=8"]).check_generator_weights()


def test_the_serve_deploy_app_builder_checks_like_launch_serve(tmp_path):
    """`serve deploy deploy/serve_stream.yaml` builds through app_builder: the same refusal and the same one message
    naming every missing file, before a replica is deployed."""
    ray_before = ray.is_initialized()
    args = yaml.safe_load((REPO_ROOT / "deploy" / "serve_stream.yaml").read_text())["applications"][0]["args"]
    config = str(REPO_ROOT / args["config"])
    assert args["overrides"] == ["paths.root=/mnt/shared/reward-forcing"]
    with pytest.raises(ConfigError) as missing:
        app_builder({"config": config, "overrides": [*args["overrides"], f"paths.root={tmp_path}"]})
    assert f"checkpoint.generator: {tmp_path / 'checkpoints/Reward-Forcing-T2V-1.3B/rewardforcing.pt'}" in str(missing.value)
    assert all(f"  {key}: " in str(missing.value) for key in STREAM_KEYS)
    with pytest.raises(ConfigError, match="checkpoint.generator is not set"):
        app_builder({"config": config, "overrides": ["checkpoint.generator=null"]})
    assert isinstance(app_builder({"config": str(REPO_ROOT / "configs" / "serve.yaml")}), Application)
    assert ray.is_initialized() == ray_before


@pytest.mark.parametrize("ignore_file", [".rayignore", ".gitignore"])
def test_the_working_dir_package_leaves_weights_data_and_outputs_out(tmp_path, ignore_file):
    """What `ray job submit --working-dir .` uploads, made by Ray's own packager: each ignore file alone keeps the
    weights, prompts, runs and local environments out (Ray skips .gitignore with RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1,
    never .rayignore)."""
    repo = tmp_path / "repo"
    kept = ["configs/a.yaml", "assets/toyworld/ode_init.pt", "prompts/tiny.txt", "core/x.py"]
    left = ["checkpoints/ode_init.pt", "data/vidprom_filtered_extended.txt", "runs/tiny/metrics.csv",
            "outputs/video.mp4", ".whl/av.whl", ".venv/bin/python"]
    for name in kept + left:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text("x")
    shutil.copy(REPO_ROOT / ignore_file, repo / ignore_file)
    create_package(str(repo), tmp_path / "package.zip", include_gitignore=ignore_file == ".gitignore")
    packaged = {name for name in zipfile.ZipFile(tmp_path / "package.zip").namelist() if not name.endswith("/")}
    assert set(kept) <= packaged and not packaged & set(left), packaged
