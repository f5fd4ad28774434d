"""The config schema: YAML + overrides, and clear errors that name the key."""

from __future__ import annotations

from importlib.metadata import version

import pytest
import ray
import torch
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from core.config import PLUMBING_CONFIG, ConfigError, VideoRewardConfig, load_config
from core.config import REPO_ROOT as REPO
from toyworld.config import DEFAULT_CONFIG, WorldConfig, load_world_config


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    load_world_config(path)  # what launch.py does


def test_the_core_schema_leaves_the_toy_worlds_sections_to_it():
    with pytest.raises(ConfigError, match="pretrain: unknown key"):
        load_config(DEFAULT_CONFIG)
    cfg = load_world_config()
    assert isinstance(cfg, WorldConfig) and cfg.pretrain.steps == 6000 and cfg.ode_init.ode_steps == 12


def test_reward_section_is_the_named_backends_own():
    cfg = load_config(PLUMBING_CONFIG, ["reward.backend=videoreward", "reward.checkpoint=ckpt", "reward.device=cpu"])
    assert isinstance(cfg.reward, VideoRewardConfig) and cfg.reward.dtype == "bfloat16"
    assert cfg.model_dump()["reward"] == {"backend": "videoreward", "checkpoint": str(REPO / "ckpt"),
                                          "dtype": "bfloat16", "device": "cpu"}  # under paths.root
    assert load_config(PLUMBING_CONFIG).model_dump()["reward"] == {"backend": "motion"}
    for overrides, words in ((["reward.backend=videoreward"], "needs reward.checkpoint"),
                             (["reward.device=cpu"], "reward: device: unknown key"),
                             (["reward.backend=vlm_judge", "reward.checkpoint=m", "reward.max_new_tokens=8"], ">= 32"),
                             (["reward.backend=clip"], "'clip' is not a reward backend; choose one of motion")):
        with pytest.raises(ConfigError, match=words):
            load_config(PLUMBING_CONFIG, overrides)


def test_default_is_the_toy_world_on_plumbing_and_tokens_per_frame_derived():
    cfg = load_world_config()
    assert cfg.vae.kind == "patch" and cfg.model.in_dim == 12 and cfg.tokens_per_frame == 64  # 32x32 -> 8x8 tokens
    assert cfg.learner.teacher.kind == "exact_world" and cfg.checkpoint.generator  # the exact teacher, the shipped student
    assert cfg.learner.critic_checkpoint and cfg.learner.guidance_scale == 0 and cfg.ode_init.pairs == "few_step"
    plumbing = load_config(PLUMBING_CONFIG)
    assert plumbing.model.dim == 64 and plumbing.tokens_per_frame == 16 and plumbing.checkpoint.generator is None
    big = load_config(REPO / "configs" / "reward_forcing_1.3b_stream.yaml")
    assert big.tokens_per_frame == 1560  # 480x832 -> latent 60x104 -> 30x52 tokens


def test_overrides_are_typed():
    cfg = load_world_config(None, ["stream.sink_size=2", "stream.compression_alpha=0.9", "runtime.dtype=float64",
                             "scheduler.denoising_step_list=[1000, 500]"])
    assert cfg.stream.sink_size == 2 and cfg.stream.compression_alpha == 0.9
    assert cfg.runtime.dtype == "float64" and cfg.scheduler.denoising_step_list == [1000, 500]


@pytest.mark.parametrize("override, key, words", [
    ("stream.sink_sise=3", "stream.sink_sise", "unknown key"),
    ("bogus.x=1", "bogus", "unknown key"),
    ("stream.sink_size=three", "stream.sink_size", "integer"),
    ("model.qk_norm=1", "model.qk_norm", "boolean"),
    ("stream.rope=relative", "stream.rope", "'absolute' or 'window'"),
    ("stream.local_attn_size=5", "stream", "must hold the sink plus one block"),
    ("stream.rope=absolute", "stream", "set stream.rope=window"),
    ("stream.compression_alpha=1.5", "stream", "[0, 1]"),
    ("stream.ema_sink_accumulator=bfloat16", "stream.ema_sink_accumulator", "'float32' or 'cache'"),
    ("video.height=33", "video", "multiple of the VAE stride"),
    ("video.num_latent_frames=20", "video.num_latent_frames (20)", "multiple of stream.num_frame_per_block"),
    ("model.num_heads=3", "model", "divisible"),
])
def test_bad_values_name_the_key(override, key, words):
    with pytest.raises(ConfigError) as err:
        load_world_config(None, [override])
    msg = str(err.value)
    assert key in msg and words in msg, msg


def test_bad_override_syntax_and_files(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_world_config(None, ["stream.sink_size"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_missing_weight_paths_are_listed_by_key(tmp_path):
    cfg = load_config(REPO / "configs" / "reward_forcing_1.3b_stream.yaml", [f"vae.checkpoint={tmp_path}"])
    with pytest.raises(ConfigError) as err:
        cfg.check_paths()
    msg = str(err.value)
    assert f"text_encoder.checkpoint: {REPO / 'checkpoints/Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth'}" in msg
    assert "text_encoder.tokenizer:" in msg and "vae.checkpoint" not in msg  # tmp_path exists
    load_world_config().check_paths()  # the embedded default's weights are in the repository
    load_config(PLUMBING_CONFIG).check_paths()  # plumbing needs no files


def test_cluster_yaml_is_a_valid_ray_cluster_config():
    deepspeed_version = version("deepspeed")
    config = prepare_config(yaml.safe_load((REPO / "cluster.yaml").read_text()))
    validate_config(config)  # Ray's own cluster schema (ray-schema.json) and its node-type checks
    assert config["available_node_types"]["gpu_worker"]["node_config"]["InstanceType"].startswith("p5")
    setup = config["setup_commands"]
    # pinned to what the tests run; a client must match the cluster's Ray
    torch_version = torch.__version__.split("+")[0]
    assert any(f'"torch=={torch_version}"' in c for c in setup)
    assert any(f'"deepspeed=={deepspeed_version}"' in c and f'"ray[serve,train]=={ray.__version__}"' in c for c in setup)
    # flash-attn builds against the installed torch (its build imports torch), after it
    flash = next(i for i, c in enumerate(setup) if "flash-attn" in c)
    assert "--no-build-isolation" in setup[flash] and flash > next(i for i, c in enumerate(setup) if '"torch==' in c)
    # weights stay out of the rsync (they live on the shared mount); the token comes from the user's own file
    assert "~/reward-forcing/checkpoints" not in config["file_mounts"] and "**/checkpoints" in config["rsync_exclude"]
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert not any("0.0.0.0" in c for c in starts)  # the dashboard stays on 127.0.0.1: `ray dashboard` tunnels it
