"""Parity with the reference code's golden tensors (transformer, causal rollouts, scheduler).

Everything about a case (architecture, windows, variants, seeds, call order) is read from the
golden set's manifest, so the tests run unchanged on any set produced the same way.
"""

from __future__ import annotations

import pytest
import torch

from core.config import StreamConfig, WanArchConfig
from core.rollout import SelfForcedRollout
from core.scheduler import FlowMatchScheduler
from core.wan.model import CausalWanModel, WanModel
from helpers import assert_close

pytestmark = pytest.mark.usefixtures("no_grad")

# Which KV-cache convention each reference implements (REFERENCE.md section 2).
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



@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_wan_bidirectional(golden, backend):
    case, t = golden.case("wan_bidirectional"), golden.tensors("wan_bidirectional")
    model = load_weights(WanModel(arch_from(case["config"])), t)
    model.attention_backend = backend
    contexts = [t[k] for k in sorted(k for k in t if k.startswith("in.context_") and k[len("in.context_"):].isdigit())]
    out = model(t["in.x"], t["in.t"], contexts)
    assert_close(out, t["out.output"], golden.atol("wan_bidirectional"), "WanModel output")
    # the pre-padded copy of the contexts gives the same result
    padded = model(t["in.x"], t["in.t"], t["in.context_padded"])
    assert_close(padded, t["out.output"], golden.atol("wan_bidirectional"), "padded context")


def rollout_variants(golden, case_name: str):
    """(variant name, stream settings, num_blocks, tensor prefix) for each variant of a rollout case."""
    case = golden.case(case_name)
    cfg = case["config"]
    repo = case["sources"][0]["repo"]
    conv = CACHE_CONVENTIONS[repo]
    if case.get("variants"):
        for name, v in case["variants"].items():
            yield name, dict(conv, local_attn_size=v["local_attn_size"], sink_size=v["sink_size"]), v["num_blocks"]
    else:
        for name, v in cfg["variants"].items():
            yield name, dict(conv, local_attn_size=cfg["local_attn_size"], sink_size=cfg["sink_size"], **v), cfg["num_blocks"]


ROLLOUT_CASES = ["self_forcing_causal_rollout", "reward_forcing_ema_sink_rollout"]


@pytest.mark.parametrize("case_name", ROLLOUT_CASES)
def test_causal_rollout(golden, case_name):
    case, t = golden.case(case_name), golden.tensors(case_name)
    cfg = case["config"]
    atol = golden.atol(case_name)
    arch = arch_from(cfg)
    sched = FlowMatchScheduler(shift=cfg["timestep_shift"])
    timesteps = sched.denoising_timesteps(cfg["denoising_step_list"], warp=cfg["warp_denoising_step"])
    if "out.denoising_step_list" in t:
        assert torch.equal(timesteps, t["out.denoising_step_list"].float())
    fpb = cfg["num_frame_per_block"]
    checked = 0
    for variant, stream_kwargs, num_blocks in rollout_variants(golden, case_name):
        def get(kind: str, name: str) -> torch.Tensor:
            key = f"{kind}.{variant}.{name}"
            return t[key] if key in t else t[f"{kind}.{name}"]

        stream = StreamConfig(num_frame_per_block=fpb, **stream_kwargs)
        model = load_weights(CausalWanModel(arch, stream), t)
        noise, renoise = get("in", "noise"), get("in", "renoise")
        prompt = get("in", "prompt_embeds")

        def noise_fn(block, step):
            if step == -1:
                return noise[:, fpb * block: fpb * (block + 1)]
            return renoise[block, step].unsqueeze(0)

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

        what = f"{case_name}/{variant}"
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
    assert checked > 0


def test_flow_match_scheduler(golden):
    case, t = golden.case("flow_match_scheduler"), golden.tensors("flow_match_scheduler")
    atol = golden.atol("flow_match_scheduler")
    cfg = case["config"]
    sched = FlowMatchScheduler(shift=cfg["shift"], num_train_timesteps=cfg["set_timesteps"]["num_inference_steps"])
    for name in ("sigmas", "timesteps", "linear_timesteps_weights"):
        assert torch.equal(getattr(sched, name), t[f"out.{name}"]), name
    warped = sched.denoising_timesteps(t["in.denoising_step_list"].tolist())
    assert torch.equal(warped, t["out.warped_denoising_step_list"])
    ts = t["in.timestep"]
    assert torch.equal(sched.table_index(ts), t["out.add_noise_timestep_index"])
    assert torch.equal(sched.sigma(ts), t["out.add_noise_sigma"])
    xt = sched.add_noise(t["in.x0"], t["in.noise"], ts)
    assert_close(xt, t["out.add_noise_xt"], atol, "add_noise")
    xt_ref = t["out.add_noise_xt"]
    assert_close(sched.x0_from_flow(t["in.flow_pred"], xt_ref, ts), t["out.x0_from_flow_pred"], atol, "x0 from flow")
    assert_close(sched.flow_from_x0(t["in.x0"], xt_ref, ts), t["out.flow_pred_from_x0"], atol, "flow from x0")
    shifted = sched.shift_training_timesteps(t["in.dmd_t_raw"], min_t=0, max_t=sched.num_train_timesteps)
    assert torch.equal(shifted, t["out.dmd_t_shifted"])
    clamped = sched.shift_training_timesteps(t["in.dmd_t_raw"])
    assert torch.equal(clamped, t["out.dmd_t_shifted_clamped"])
    assert torch.equal(sched.sigma(clamped), t["out.dmd_sigma_lookup"])
