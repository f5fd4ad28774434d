"""The DeepSpeed learner: exact replay, one optimizer step per update, exact resume, atomic checkpoints,
export, and two Ray Train workers (ZeRO-2) publishing weights that the rollout actors load."""

from __future__ import annotations

import dataclasses

import pytest
import ray
import torch

from actors.pool import RolloutPool
from core.algo.distill import ReDMD, build_score_models
from core.codecs.text_encoder import pad_context
from core.config import PLUMBING_CONFIG, ConfigError, load_config
from core.records.checkpoint import CheckpointError, load_wan_state_dict
from core.records.sample import from_record_batch, read_parquet, to_record_batch, write_parquet
from core.stream.pipeline import build_generator
from helpers import recorded_samples
from job.control import LearnerControl
from learner import checkpointing
from learner.loop import Learner
from learner.samples import ParquetSamples
from learner.trainer import build_trainer, negative_context

TINY = ["video.num_latent_frames=6"]

ROPE_VARIANTS = {
    "absolute-full-cache": ["stream.rope=absolute", "stream.sink_mode=static", "stream.local_attn_size=-1"],
    "absolute-sink-window": ["stream.rope=absolute", "stream.sink_mode=static", "stream.local_attn_size=6",
                             "stream.sink_size=3"],
    "window-ema-sink": ["stream.rope=window", "stream.sink_mode=ema", "stream.local_attn_size=6", "stream.sink_size=3",
                        "stream.compression_alpha=0.9"],
}


@pytest.mark.parametrize("variant", ROPE_VARIANTS, ids=list(ROPE_VARIANTS))
def test_learner_replay_equals_the_rollouts_clean_outputs(variant):
    """Unchanged weights: the learner's replay of an Arrow round-tripped sample, with the context rebuilt from the
    rows the sample carries, reproduces the actor's outputs."""
    cfg = load_config(PLUMBING_CONFIG, ["video.num_latent_frames=12", "runtime.dtype=float64", *ROPE_VARIANTS[variant]])
    sample = from_record_batch(to_record_batch(recorded_samples(cfg, 1, seed=3)))[0]
    generator = build_generator(cfg, torch.device("cpu")).requires_grad_(True)
    context = pad_context([sample.text_context], cfg.model.text_len)
    assert context.dtype == torch.float64
    x = ReDMD(cfg).replay(generator, sample.to_rollout_record(), context)
    assert x.requires_grad and x.dtype == torch.float64
    diff = (x.detach() - sample.clean).abs().max().item()
    assert diff <= 1e-9, f"{variant}: replay differs from the rollout by {diff:.2e}"
    x.sum().backward()
    assert all(p.grad is not None for p in generator.blocks[0].self_attn.parameters())


# ------------------------------------------------------------------------------------ in-process learner


@pytest.fixture(scope="module")
def samples_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("samples") / "samples.parquet"
    write_parquet(path, recorded_samples(load_config(PLUMBING_CONFIG, TINY), 4))
    return path


def learner_config(samples_file, out, max_steps: int, *extra: str):
    return load_config(PLUMBING_CONFIG, [*TINY, f"learner.samples_parquet={samples_file}", f"learner.output_dir={out}",
                              f"learner.max_steps={max_steps}", "learner.batch_size=2", "learner.dfake_gen_update_ratio=2",
                              "learner.checkpoint_every=3", "learner.keep_last=2", "learner.ema_start_step=2",
                              "learner.generator_lr=1e-3", "learner.critic_lr=1e-3", "learner.deterministic=true", *extra])


def run_learner(cfg, negative=None):
    learner = Learner(cfg, torch.device("cpu"), negative_context(cfg) if negative is None else negative)
    return learner, learner.run()


def weights(learner) -> dict[str, torch.Tensor]:
    m = learner.models
    return ({f"generator.{k}": v.detach().clone() for k, v in m.generator_module.state_dict().items()}
            | {f"critic.{k}": v.detach().clone() for k, v in m.critic_module.state_dict().items()}
            | {f"ema.{k}": v.clone() for k, v in learner.ema.shadow.items()})


def test_resumed_run_reaches_the_same_parameters_and_exports(one_rank, samples_file, tmp_path):
    straight, result = run_learner(learner_config(samples_file, tmp_path / "a", 6))
    assert result["step"] == 6 and result["version"] == 3 and result["resumed_from"] is None
    # exactly one optimizer step per update, with gradient accumulation over the batch of 2
    assert straight.models.generator.global_steps == 3 and straight.models.critic.global_steps == 6
    initial = build_generator(learner_config(samples_file, tmp_path / "x", 1), torch.device("cpu")).state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in straight.models.generator_module.state_dict().items())

    first, _ = run_learner(learner_config(samples_file, tmp_path / "b", 4))
    ckpts = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert ckpts == ["step_00000003", "step_00000004"]
    resumed, result = run_learner(learner_config(samples_file, tmp_path / "b", 6))
    assert result["resumed_from"].endswith("step_00000004") and result["step"] == 6
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), \
        [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step_00000004", "step_00000006"]

    # the export loads into `launch.py generate`'s generator: EMA in the safetensors, all three in the .pt
    export = result["export"]
    ema = load_wan_state_dict(export["safetensors"])
    assert all(torch.equal(ema[k], resumed.ema.shadow[k]) for k in ema)
    raw = load_wan_state_dict(export["self_forcing_pt"], role="generator")
    assert all(torch.equal(raw[k], v) for k, v in resumed.models.generator_module.state_dict().items())
    assert load_wan_state_dict(export["self_forcing_pt"], use_ema=True).keys() == ema.keys()
    cfg = load_config(PLUMBING_CONFIG, [*TINY, f"checkpoint.generator={export['safetensors']}"])
    assert torch.equal(build_generator(cfg, torch.device("cpu")).state_dict()["head.head.bias"], ema["head.head.bias"])


def test_a_resumed_run_applies_the_configs_learning_rates(one_rank, samples_file, tmp_path):
    """A checkpoint's optimizer settings do not outlive it: a run made at generator lr 0 and resumed at the config's
    lr moves the generator, and the change is reported for the driver to print."""
    frozen, _ = run_learner(learner_config(samples_file, tmp_path, 4, "learner.generator_lr=0"))
    at_checkpoint = frozen.models.generator_module.state_dict()
    resumed, result = run_learner(learner_config(samples_file, tmp_path, 8))
    assert result["resumed_from"].endswith("step_00000004")
    assert resumed.resume_changes == ["generator lr 0.0 -> 0.001"]
    assert all(g["lr"] == 1e-3 for g in resumed.models.generator.optimizer.param_groups)
    after = resumed.models.generator_module.state_dict()
    assert any(not torch.equal(at_checkpoint[k], v) for k, v in after.items())


def test_a_training_checkpoint_seeds_models_by_role(one_rank, samples_file, tmp_path):
    """A learner checkpoint folder is read wherever weights are: the generator (raw or its EMA) and the critic, each
    by its role, equal to what the learner held when it saved."""
    learner, _ = run_learner(learner_config(samples_file, tmp_path, 3, "learner.ema_start_step=0"))
    step = checkpointing.latest_checkpoint(checkpointing.checkpoint_dir(tmp_path))
    held = {"generator": learner.models.generator_module.state_dict(), "critic": learner.models.critic_module.state_dict()}
    for role, state in held.items():
        read = load_wan_state_dict(step, role)
        assert read.keys() == state.keys() and all(torch.equal(read[k], state[k]) for k in read), role
    ema = load_wan_state_dict(step, use_ema=True)
    assert all(torch.equal(ema[k], learner.ema.shadow[k]) for k in ema)
    cfg = load_config(PLUMBING_CONFIG, [*TINY, f"checkpoint.generator={step}", f"learner.critic_checkpoint={step}"])
    generator = build_generator(cfg, torch.device("cpu")).state_dict()
    assert all(torch.equal(generator[k], held["generator"][k]) for k in generator)
    _, critic = build_score_models(cfg)
    assert all(torch.equal(v, held["critic"][k]) for k, v in critic.state_dict().items())

    early, _ = run_learner(learner_config(samples_file, tmp_path / "early", 1, "learner.ema_start_step=5"))
    with pytest.raises(CheckpointError, match="no EMA of the generator yet.*use_ema=false"):
        load_wan_state_dict(checkpointing.latest_checkpoint(checkpointing.checkpoint_dir(tmp_path / "early")),
                            use_ema=True)


def test_learners_load_no_text_encoder(one_rank, samples_file, tmp_path):
    """With the text encoder's files pointing nowhere a learner builds and trains, to the same weights as with
    them: its contexts come from the samples and the job's negative-prompt rows, never from an encoder."""
    cfg = learner_config(samples_file, tmp_path / "a", 3)
    negative = negative_context(cfg)
    nowhere = learner_config(samples_file, tmp_path / "b", 3, f"text_encoder.checkpoint={tmp_path}/none/umt5.pth",
                             f"text_encoder.tokenizer={tmp_path}/none/tokenizer")
    without, result = run_learner(nowhere, negative)
    assert result["step"] == 3 and without.models.generator.global_steps == 2
    assert not hasattr(without, "text_encoder")
    with_files, _ = run_learner(cfg, negative)
    a, b = weights(with_files), weights(without)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert without.negative_context.shape == (1, cfg.model.text_len, cfg.model.text_dim)
    assert torch.equal(without.negative_context[0, :len(negative)], negative)
    assert not without.negative_context[0, len(negative):].any()


def test_a_crash_mid_save_leaves_the_last_checkpoint(one_rank, samples_file, tmp_path):
    run_learner(learner_config(samples_file, tmp_path, 3))
    root = checkpointing.checkpoint_dir(tmp_path)
    (root / ".tmp-step_00000006").mkdir()  # what a crash during the next save leaves behind
    (root / ".tmp-step_00000006" / "loop_state.pt").write_bytes(b"truncated")
    assert checkpointing.latest_checkpoint(root).name == "step_00000003"
    learner, result = run_learner(learner_config(samples_file, tmp_path, 4))
    assert result["resumed_from"].endswith("step_00000003") and learner.step == 4
    with pytest.raises(FileNotFoundError, match="not a learner checkpoint"):
        checkpointing.load(tmp_path, {})


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def generator_params(learner) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in learner.models.generator_module.named_parameters()}


def with_rewards(sample, **normalized: float):
    """`sample` with some normalised rewards replaced; everything else as recorded."""
    return dataclasses.replace(sample, rewards_normalized={**sample.rewards_normalized, **normalized})


def one_generator_update(samples_file, out, batch, *extra):
    """(the state before, the generator after) one generator update on `batch` by a freshly built, reseeded Learner."""
    cfg = learner_config(samples_file, out, 1, *extra)
    learner = Learner(cfg, torch.device("cpu"), negative_context(cfg))
    torch.manual_seed(cfg.runtime.seed)
    before = generator_params(learner) | {"critic": torch.cat([p.flatten() for p in learner.models.critic.parameters()]),
                                          "learner rng": learner.rng.get_state(), "torch rng": torch.get_rng_state()}
    learner.generator_update(batch)
    return before, generator_params(learner)


def test_the_generator_update_follows_the_rewards_on_the_reward_axis(one_rank, samples_file, tmp_path):
    """Re-DMD weights each video's loss by exp(beta * its reward on learner.reward_axis). From identical starting
    states, swapping two samples' rewards on that axis or reading another axis changes the update; changing an
    axis the learner does not read changes nothing (which also shows the updates are deterministic)."""
    a, b = read_parquet(samples_file)[:2]
    batch = [with_rewards(a, MQ=1.0, VQ=0.5), with_rewards(b, MQ=-1.0, VQ=0.5)]
    start, base = one_generator_update(samples_file, tmp_path / "base", batch, "learner.beta=2.0")
    assert not same({k: start[k] for k in base}, base)  # the update moved the generator
    runs = {  # name: (batch, axis read, whether the update differs from the base run's)
        "VQ changed, MQ read": ([with_rewards(a, MQ=1.0, VQ=3.0), with_rewards(b, MQ=-1.0, VQ=-3.0)], "MQ", False),
        "MQ swapped": ([with_rewards(a, MQ=-1.0, VQ=0.5), with_rewards(b, MQ=1.0, VQ=0.5)], "MQ", True),
        "VQ read": (batch, "VQ", True),
    }
    for name, (samples, axis, differs) in runs.items():
        before, after = one_generator_update(samples_file, tmp_path / name.replace(" ", "_"), samples,
                                             "learner.beta=2.0", f"learner.reward_axis={axis}")
        assert same(before, start), f"{name}: the run did not start from the base run's state"
        assert (not same(after, base)) == differs, f"{name}: the update {'equals' if differs else 'differs from'} the base run's"


class PublishRecorder:
    """Takes the place of the WeightPublisher, which needs Ray: keeps a copy of what each publish hands it."""

    def __init__(self):
        self.got: list[tuple[int, int, dict[str, torch.Tensor]]] = []

    def publish(self, version: int, weights: dict[str, torch.Tensor], step: int = 0) -> float:
        self.got.append((version, step, {k: v.clone() for k, v in weights.items()}))
        return 0.0


def test_the_ema_starts_at_ema_start_step_and_publish_weights_ema_publishes_it(one_rank, samples_file, tmp_path):
    """No EMA before learner.ema_start_step, created from the weights at it, updated after. With
    `publish_weights: ema` the actors get the raw weights until the EMA exists and the EMA's shadow from then
    on; with `raw`, the raw weights even once it exists."""
    cfg = learner_config(samples_file, tmp_path, 5, "learner.dfake_gen_update_ratio=1", "learner.ema_decay=0.5",
                         "learner.publish_weights=ema")
    assert cfg.learner.ema_start_step == 2
    learner = Learner(cfg, torch.device("cpu"), negative_context(cfg))
    learner.publisher = recorder = PublishRecorder()
    shadow = None
    for step in range(4):
        learner.iteration()
        raw = generator_params(learner)
        version, made_at, published = recorder.got[-1]
        assert (version, made_at, len(recorder.got)) == (step + 1, step + 1, step + 1)
        if step < 2:
            assert learner.ema is None and same(published, raw), f"step {step}"
            continue
        assert learner.ema is not None, f"step {step}"
        if step == 2:  # created from this step's weights
            assert same(learner.ema.shadow, raw) and same(published, raw)
        else:  # 0.5 * shadow + 0.5 * weights
            assert same(learner.ema.shadow, {k: 0.5 * shadow[k] + 0.5 * raw[k] for k in raw})
            assert same(published, learner.ema.shadow) and not same(published, raw)
        shadow = {k: v.clone() for k, v in learner.ema.shadow.items()}

    learner.learner.publish_weights = "raw"
    learner.iteration()
    raw, (version, _, published) = generator_params(learner), recorder.got[-1]
    assert version == 5 and same(published, raw) and not same(learner.ema.shadow, raw)


def test_parquet_samples_give_each_rank_its_own_consecutive_slice(samples_file, tmp_path):
    """Two ranks over one recorded file: in every step their samples are disjoint and together the next
    consecutive slice of the file (wrapping around); a rank resumed at a step reads what it would have read."""
    recorded = read_parquet(samples_file)
    path = write_parquet(tmp_path / "ten.parquet",
                         [dataclasses.replace(recorded[i % len(recorded)], sample_id=f"s{i}") for i in range(10)])
    ids, n = [f"s{i}" for i in range(10)], 3
    ranks = [ParquetSamples(str(path), rank, 2) for rank in (0, 1)]
    for step in range(5):  # 30 samples: the file three times over
        first, second = ([s.sample_id for s in r.next(step, n)] for r in ranks)
        assert not set(first) & set(second), f"step {step}: both ranks read {set(first) & set(second)}"
        assert first + second == [ids[(2 * n * step + i) % len(ids)] for i in range(2 * n)], f"step {step}"
    resumed = ParquetSamples(str(path), 1, 2)  # a restarted rank 1 that has read nothing before step 3
    assert [s.sample_id for s in resumed.next(3, n)] == [s.sample_id for s in ranks[1].next(3, n)]


def test_learner_config_errors():
    with pytest.raises(ConfigError, match="learner.zero_stage"):
        load_config(PLUMBING_CONFIG, ["learner.zero_stage=1"])
    with pytest.raises(ConfigError, match="teacher.arch must share"):
        load_config(PLUMBING_CONFIG, ["learner.teacher.arch={text_dim: 4096}"])
    with pytest.raises(ConfigError, match="reward_weight_clip"):
        load_config(PLUMBING_CONFIG, ["learner.reward_weight_clip=0.5"])
    assert load_config(PLUMBING_CONFIG, ["learner.generator_lr=2e-6"]).learner.generator_lr == 2e-6  # YAML 1.2 floats
    cfg = load_config(PLUMBING_CONFIG, ["learner.teacher.arch={dim: 128, ffn_dim: 128, num_heads: 2, num_layers: 1, "
                                        "freq_dim: 32, text_dim: 32, text_len: 16}"])
    with pytest.raises(ConfigError, match="critic_checkpoint is required"):
        build_score_models(cfg)


# ------------------------------------------------------------------------------------ Ray Train, two workers


@pytest.mark.job
def test_two_zero2_workers_train_and_actors_load_the_broadcast_weights(reward_app, tmp_path):
    cfg = load_config(PLUMBING_CONFIG, [*TINY, "actors.num_actors=2", "actors.num_cpus=0.25", f"actors.reward_app={reward_app}",
                             "actors.queue_size=4", "learner.num_workers=2", "learner.cpus_per_worker=0.5",
                             "learner.zero_stage=2", "learner.max_steps=4", "learner.dfake_gen_update_ratio=2",
                             "learner.generator_lr=1e-3", "learner.publish_backend=broadcast", f"learner.output_dir={tmp_path}"])
    pool = RolloutPool.options(name="learner-test-pool").remote(cfg, "learner-test-pool")
    control = LearnerControl.remote()
    try:
        assert build_trainer(cfg, pool, control).fit().error is None
        summary = ray.get(control.summary.remote())
        assert summary["step"] == 4 and summary["version"] == 2
        metrics = ray.get(pool.metrics.remote())
        assert metrics["version"] == 2 and metrics["delivered"] >= 8  # 2 workers x 4 steps x batch 1
        last = summary["last_metrics"]
        assert last["samples"] == 4 and torch.isfinite(torch.tensor([last["critic_loss"]])).all()

        # a sample made after training ran on version 2, and replaying it with the exported weights
        # reproduces it: the actor loaded exactly what the learner published
        sample = from_record_batch(ray.get(pool.get.remote(1, timeout_s=120))[0])[0]
        assert sample.weight_version == 2
        exported = load_config(PLUMBING_CONFIG, [*TINY, f"checkpoint.generator={summary['export']['safetensors']}"])
        generator = build_generator(exported, torch.device("cpu"))
        context = pad_context([sample.text_context], exported.model.text_len)
        with torch.no_grad():
            x = ReDMD(exported).replay(generator, sample.to_rollout_record(), context)
        assert (x - sample.clean).abs().max().item() < 1e-5
        assert (tmp_path / "checkpoints" / "step_00000004").is_dir()
    finally:
        ray.get(pool.stop.remote())
        ray.kill(pool)


@pytest.mark.job
def test_zero3_shards_and_trains_like_zero2(ray_instance, samples_file, tmp_path):
    """Two Ray Train workers on recorded samples: ZeRO-3 (sharded params, sharded frozen teacher) reaches the
    parameters ZeRO-2 reaches, and its checkpoint consolidates into the same export."""
    exported = {}
    for stage in (2, 3):
        cfg = learner_config(samples_file, tmp_path / f"zero{stage}", 3, "learner.num_workers=2",
                             "learner.cpus_per_worker=0.5", f"learner.zero_stage={stage}", "learner.batch_size=1")
        control = LearnerControl.remote()
        assert build_trainer(cfg, None, control).fit().error is None
        summary = ray.get(control.summary.remote())
        assert summary["step"] == 3 and summary["version"] == 2
        exported[stage] = load_wan_state_dict(summary["export"]["self_forcing_pt"], role="generator")
    initial = build_generator(load_config(PLUMBING_CONFIG, TINY), torch.device("cpu")).state_dict()
    assert any(not torch.allclose(initial[k], v) for k, v in exported[2].items())
    worst = max((exported[2][k] - exported[3][k]).abs().max().item() for k in exported[2])
    assert worst < 1e-6, f"ZeRO-3 differs from ZeRO-2 by {worst:.2e}"
