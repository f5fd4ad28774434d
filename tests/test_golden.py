"""Parity with the public reference code: every case of the golden set (tests/golden, or --golden-dir).

One test per case the manifest lists. A case is checked by what it exercises, read off the manifest: the
reference file its first source names (Wan's bidirectional model, the causal model's chunk-wise rollout,
the flow-matching scheduler, the DMD losses, the VAE, the umT5 encoder). Architectures, variants, seeds,
call orders and tolerances all come from the manifest, so another set made the same way runs unchanged; a
case exercising any other file fails, naming it, rather than going unchecked. float64 results are compared
at the manifest's tolerance; a float32 table computed through `exp` within 3 ulp of its largest entry (CPUs
differ in exp's last bit).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import UMT5EncoderModel

from core.algo.losses import critic_loss, dmd_gradient, dmd_loss, noisy_latent, redmd_loss_first_video, training_timesteps
from core.algo.rollout import SelfForcedRollout
from core.algo.scheduler import FlowMatchScheduler
from core.codecs.text_encoder import ByteTokenizer, TextEncoder, load_umt5, to_wan_state_dict, umt5_config
from core.codecs.wan_vae import WanVAE
from core.config import StreamConfig, WanArchConfig
from core.model.wan import CausalWanModel, WanModel
from helpers import assert_close, assert_close_ulp

pytestmark = pytest.mark.usefixtures("no_grad")

# Which KV-cache convention each reference repository implements (docs/reference.md).
CACHE_CONVENTIONS = {
    "guandeh17/Self-Forcing": dict(rope="absolute", sink_mode="static"),
    "JaydenLyh/Reward-Forcing": dict(rope="window", sink_mode="ema"),
}


def arch_from(case_config: dict) -> WanArchConfig:
    fields = WanArchConfig.model_fields
    return WanArchConfig(**{k: v for k, v in case_config.items() if k in fields})


def load_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    sd = {k[3:]: v.double() for k, v in tensors.items() if k.startswith("sd.")}
    model.double().load_state_dict(sd, strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------- checks


def check_wan_bidirectional(golden, name: str, case: dict, t: dict, tmp_path) -> None:
    """WanModel forward (both attention kernels; pre-padded contexts give the same result)."""
    model = load_weights(WanModel(arch_from(case["config"])), t)
    contexts = [t[k] for k in sorted(k for k in t if k.startswith("in.context_") and k[len("in.context_"):].isdigit())]
    for backend in ("sdpa", "math"):
        model.attention_backend = backend
        assert_close(model(t["in.x"], t["in.t"], contexts), t["out.output"], golden.atol(name), f"{backend} output")
        assert_close(model(t["in.x"], t["in.t"], t["in.context_padded"]), t["out.output"], golden.atol(name),
                     f"{backend} padded context")


def _rollout_variants(case: dict):
    """(variant name, stream settings, num_blocks) for each variant of a rollout case."""
    cfg = case["config"]
    repo = case["sources"][0]["repo"]
    assert repo in CACHE_CONVENTIONS, f"no known KV-cache convention for the reference repository {repo!r}"
    conv = CACHE_CONVENTIONS[repo]
    if case.get("variants"):
        for name, v in case["variants"].items():
            yield name, dict(conv, local_attn_size=v["local_attn_size"], sink_size=v["sink_size"]), v["num_blocks"]
    else:
        for name, v in cfg["variants"].items():
            yield name, dict(conv, local_attn_size=cfg["local_attn_size"], sink_size=cfg["sink_size"], **v), cfg["num_blocks"]


def check_causal_rollout(golden, name: str, case: dict, t: dict, tmp_path) -> None:
    """Every generator call of the chunk-wise rollout (input, flow, timestep, cache pointers), the outputs and,
    where recorded, the final sink K/V, for every variant."""
    cfg, atol = case["config"], golden.atol(name)
    sched = FlowMatchScheduler(shift=cfg["timestep_shift"])
    timesteps = sched.denoising_timesteps(cfg["denoising_step_list"], warp=cfg["warp_denoising_step"])
    if "out.denoising_step_list" in t:
        assert torch.equal(timesteps, t["out.denoising_step_list"].float())
    fpb = cfg["num_frame_per_block"]
    checked = 0
    for variant, stream_kwargs, num_blocks in _rollout_variants(case):
        def get(kind: str, key: str) -> torch.Tensor:
            full = f"{kind}.{variant}.{key}"
            return t[full] if full in t else t[f"{kind}.{key}"]

        model = load_weights(CausalWanModel(arch_from(cfg), StreamConfig(num_frame_per_block=fpb, **stream_kwargs)), t)
        noise, renoise, prompt = get("in", "noise"), get("in", "renoise"), get("in", "prompt_embeds")

        def noise_fn(block, step):
            return noise[:, fpb * block: fpb * (block + 1)] if step == -1 else renoise[block, step].unsqueeze(0)

        calls = []

        def record(module, args, kwargs, output):
            c = kwargs["cache"].layers[0]
            calls.append(dict(input=args[0].transpose(1, 2).clone(), flow=output.transpose(1, 2).clone(),
                              timestep=args[1].clone(), start=kwargs["start_frame"] * kwargs["cache"].tokens_per_frame,
                              local_end=c.local_end, global_end=c.global_end))

        handle = model.register_forward_hook(record, with_kwargs=True)
        cache = model.init_cache(1, tuple(noise.shape[-2:]))
        out = SelfForcedRollout(model, sched, timesteps, cfg["context_noise"]).generate(prompt, cache, noise_fn, num_blocks)
        handle.remove()

        what = f"{name}/{variant}"
        assert_close(out, get("out", "output"), atol, f"{what} output")
        assert len(calls) == get("out", "calls.input").shape[0], f"{what}: number of generator calls"
        assert_close(torch.stack([c["input"] for c in calls]), get("out", "calls.input"), atol, f"{what} call inputs")
        assert_close(torch.stack([c["flow"] for c in calls]), get("out", "calls.flow_pred"), atol, f"{what} flow preds")
        assert_close(torch.stack([c["timestep"] for c in calls]), get("out", "calls.timestep"), 0.0, f"{what} timesteps")
        for field, key in (("start", "calls.current_start"), ("local_end", "calls.kv_local_end_index_after"),
                           ("global_end", "calls.kv_global_end_index_after")):
            assert [c[field] for c in calls] == get("out", key).tolist(), f"{what} {key}"
        for kv in ("k", "v"):
            key = f"out.{variant}.final_kv_cache_layer0_sink_{kv}"
            if key in t:
                sink = getattr(cache.layers[0], kv)[:, :t[key].shape[1]]
                assert_close(sink, t[key], atol, f"{what} final sink {kv}")
        checked += 1
    assert checked > 0, f"{name} has no variants"


def check_flow_match_scheduler(golden, name: str, case: dict, t: dict, tmp_path) -> None:
    """The float32 tables (exact where + x / are; 3 ulp for the exp-based weights), the warped step list,
    add_noise, the x0 / flow conversions and the DMD timestep shift and clamp."""
    atol, cfg = golden.atol(name), case["config"]
    sched = FlowMatchScheduler(shift=cfg["shift"], num_train_timesteps=cfg["set_timesteps"]["num_inference_steps"])
    assert torch.equal(sched.sigmas, t["out.sigmas"]) and torch.equal(sched.timesteps, t["out.timesteps"])
    # exp's last bit differs between CPUs (1 ulp of its output moves the normalised weights by up to ~1.3 ulp of
    # their largest entry, plus the rounding of each entry): 3 ulp of the largest entry
    assert_close_ulp(sched.linear_timesteps_weights, t["out.linear_timesteps_weights"], 3, "linear_timesteps_weights")
    assert torch.equal(sched.denoising_timesteps(t["in.denoising_step_list"].tolist()), t["out.warped_denoising_step_list"])
    ts = t["in.timestep"]
    assert torch.equal(sched.table_index(ts), t["out.add_noise_timestep_index"])
    assert torch.equal(sched.sigma(ts), t["out.add_noise_sigma"])
    assert_close(sched.add_noise(t["in.x0"], t["in.noise"], ts), t["out.add_noise_xt"], atol, "add_noise")
    xt = t["out.add_noise_xt"]
    assert_close(sched.x0_from_flow(t["in.flow_pred"], xt, ts), t["out.x0_from_flow_pred"], atol, "x0 from flow")
    assert_close(sched.flow_from_x0(t["in.x0"], xt, ts), t["out.flow_pred_from_x0"], atol, "flow from x0")
    shifted = sched.shift_training_timesteps(t["in.dmd_t_raw"], min_t=0, max_t=sched.num_train_timesteps)
    assert torch.equal(shifted, t["out.dmd_t_shifted"])
    clamped = sched.shift_training_timesteps(t["in.dmd_t_raw"])
    assert torch.equal(clamped, t["out.dmd_t_shifted_clamped"])
    assert torch.equal(sched.sigma(clamped), t["out.dmd_sigma_lookup"])


def check_dmd_losses(golden, name: str, case: dict, t: dict, tmp_path) -> None:
    """DMD timesteps, noisy latent, gradient and loss; the reference's Re-DMD (first video's reward); the critic."""
    cfg, atol = case["config"], golden.atol(name)
    sched = FlowMatchScheduler(shift=cfg["timestep_shift"], num_train_timesteps=cfg["num_train_timestep"])
    x, frames = t["in.x"], t["in.x"].shape[1]
    bounds = dict(min_t=cfg["min_step"], max_t=cfg["max_step"])
    timestep = training_timesteps(sched, t["in.t_raw"], frames, **bounds)
    assert torch.equal(timestep, t["out.dmd_timestep"])
    assert_close(noisy_latent(sched, x, t["in.noise"], timestep), t["out.dmd_noisy_latent"], atol, "DMD noisy latent")
    grad = dmd_gradient(x, t["in.pred_fake"], t["in.pred_real_cond"], t["in.pred_real_uncond"], float(t["in.guidance_scale"]))
    assert_close(grad, t["out.dmd_grad"], atol, "DMD gradient")
    assert_close(grad.abs().mean(), t["out.dmd_log_gradient_norm"], atol, "gradient norm")
    assert_close(dmd_loss(x, grad), t["out.dmd_loss"], atol, "DMD loss")
    beta, mq = float(t["in.beta"]), t["in.reward_mq"]
    assert_close(redmd_loss_first_video(x, grad, mq[:1], beta), t["out.redmd_loss"], atol, "Re-DMD loss")
    assert_close(redmd_loss_first_video(x, grad, mq, beta), t["out.redmd_loss_mq_vector"], atol, "Re-DMD per reward")
    critic_t = training_timesteps(sched, t["in.critic_t_raw"], frames, **bounds)
    assert torch.equal(critic_t, t["out.critic_timestep"])
    assert_close(noisy_latent(sched, x, t["in.critic_noise"], critic_t), t["out.critic_noisy_latent"], atol, "critic x_t")
    loss = critic_loss(sched, x, t["in.critic_noise"], critic_t, t["in.critic_pred_fake"])
    assert_close(loss, t["out.critic_loss"], atol, "critic loss")


def check_wan_vae(golden, name: str, case: dict, t: dict, tmp_path) -> None:
    """Original-key weights through the loader, float64: encode (raw and normalised), full decode and the
    reference's chunk-wise cached decode; the default latent constants are the reference wrapper's."""
    atol = golden.atol(name)
    sd = {k[3:]: v for k, v in t.items() if k.startswith("sd.")}
    arch = {("base_dim" if k == "dim" else k): v for k, v in case["config"].items()}
    model = WanVAE.from_wan_state_dict(sd).double().model
    for key, value in arch.items():
        assert model.config[key] == value, f"architecture read off the state dict: {key}"
    assert set(WanVAE(model).wan_state_dict()) == set(sd), "inverse key mapping"

    scale_mean, scale_std = t["in.scale_mean"], 1 / t["in.scale_inv_std"]
    raw = WanVAE(model, torch.zeros(16), torch.ones(16))
    vae = WanVAE(model, scale_mean, scale_std)
    assert_close(raw.encode(t["in.video"]), t["out.mu_raw"], atol, "mu_raw")
    assert_close(vae.encode(t["in.video"]), t["out.mu_normalized"], atol, "mu_normalized")
    assert_close(vae.decode(t["out.mu_normalized"]), t["out.decoded_full"], atol, "decoded_full")
    # chunk i is decoded after the earlier ones with the cache kept; its latent frames follow from its
    # output frames (first latent -> 1 frame, every later one -> 4)
    chunks = sorted((k for k in t if k.startswith("out.decoded_chunk_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    assert chunks, "golden set has no chunk-wise decode"
    decoder, start = vae.stream_decoder(), 0
    for i, key in enumerate(chunks):
        frames = t[key].shape[2]
        n = 1 + (frames - 1) // 4 if i == 0 else frames // 4
        assert_close(decoder.decode(t["out.mu_normalized"][:, :, start:start + n]), t[key], atol, key)
        start += n
    assert start == t["out.mu_normalized"].shape[2]
    default = WanVAE.random(base_dim=8)  # diffusers' latents_mean / latents_std: the reference wrapper's constants
    assert torch.equal(default.latents_mean.flatten(), t["in.scale_mean"])
    assert_close(1 / default.latents_std.flatten(), t["in.scale_inv_std"], 1e-15, "1/std")


def check_umt5_encoder(golden, name: str, case: dict, t: dict, tmp_path) -> None:
    """Wan's umT5 file through load_umt5 (both attention kernels), the pad-zeroed wrapper output, the
    relative-position buckets, and the HF -> Wan key names."""
    cfg, atol = case["config"], golden.atol(name)
    assert not cfg["shared_pos"] and cfg["dropout"] == 0.0, "the golden set must use per-layer relative bias"
    sd = {k[3:]: v for k, v in t.items() if k.startswith("sd.")}
    torch.save(sd, tmp_path / "umt5.pth")
    model = load_umt5(tmp_path / "umt5.pth", torch.float64)
    c = model.config
    assert (c.vocab_size, c.d_model, c.num_heads * c.d_kv, c.d_ff, c.num_heads, c.num_layers,
            c.relative_attention_num_buckets) == (cfg["vocab_size"], cfg["dim"], cfg["dim_attn"], cfg["dim_ffn"],
                                                  cfg["num_heads"], cfg["encoder_layers"], cfg["num_buckets"])
    ids, mask = t["in.ids"], t["in.mask"]
    for attn in ("sdpa", "eager"):
        model.set_attn_implementation(attn)
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert_close(out, t["out.encoder_output"], atol, f"{attn} encoder output")
        encoder = TextEncoder(model, ByteTokenizer(), text_len=ids.shape[1])
        assert_close(encoder.encode_tokens(ids, mask), t["out.encoder_output_pad_zeroed"], atol, f"{attn} pad-zeroed")
    buckets = t["out.relative_position_bucket"]
    positions = torch.arange(buckets.shape[0])
    for block in model.encoder.block:
        attention = block.layer[0].SelfAttention
        assert torch.equal(attention._relative_position_bucket(positions[None, :] - positions[:, None]), buckets)
    config = umt5_config(cfg["vocab_size"], cfg["dim"], cfg["dim_ffn"], cfg["encoder_layers"], cfg["num_heads"],
                         d_kv=cfg["dim_attn"] // cfg["num_heads"], num_buckets=cfg["num_buckets"])
    wan = to_wan_state_dict(UMT5EncoderModel(config))
    assert sorted(wan) == sorted(sd) and all(wan[k].shape == sd[k].shape for k in wan), "HF -> Wan key names"


# what a case exercises (the reference file its first source names) -> the check of our implementation
CHECKS: dict[str, Callable] = {
    "wan/modules/model.py": check_wan_bidirectional,
    "wan/modules/causal_model.py": check_causal_rollout,
    "utils/scheduler.py": check_flow_match_scheduler,
    "model/dmd.py": check_dmd_losses,
    "wan/modules/vae.py": check_wan_vae,
    "wan/modules/t5.py": check_umt5_encoder,
}


def test_golden_case(golden, golden_case, tmp_path):
    case = golden.cases[golden_case]
    exercised = case["sources"][0]["file"]
    assert exercised in CHECKS, (f"golden case {golden_case!r} exercises {exercised}, which no check covers: add one "
                                 "to tests/test_golden.py")
    CHECKS[exercised](golden, golden_case, case, golden.tensors(golden_case), tmp_path)


def test_an_incomplete_golden_set_fails_the_suite(golden, tmp_path):
    """A golden file gone missing (or altered) is a failure of every golden test, never a skip."""
    broken = tmp_path / "golden"
    shutil.copytree(golden.root, broken)
    missing = golden.cases["wan_vae"]["file"]
    (broken / missing).unlink()
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)),
                          "-k", "test_golden_case", f"--golden-dir={broken}"], capture_output=True, text=True,
                         timeout=600, cwd=Path(__file__).parent.parent)
    assert run.returncode == 1, run.stdout[-2000:]
    assert f"case wan_vae: {missing} is missing" in run.stdout and " skipped" not in run.stdout, run.stdout[-2000:]
