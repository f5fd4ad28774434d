"""Model building: every Wan is built on the meta device and materialised once, in its dtype on its device.

A checkpoint is read straight into the target dtype (peak memory about one copy of the weights, measured in a
fresh process); seeded random weights equal those of the float32 CPU construction whatever the dtype; the full
Wan2.1 1.3B and 14B architectures have Wan's parameter counts; and the learner takes its EMA and publications
from DeepSpeed's fp32 masters under bf16, not from the module's bf16 copies.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import deepspeed
import pytest
import torch
from safetensors.torch import save_file

from core.config import StreamConfig, WanArchConfig, load_config
from core.model.wan import CausalWanModel, WanModel, rope_tables
from core.records.checkpoint import WEIGHTS_FILE, build_wan, reader
from learner.engines import deepspeed_config, full_weights

REPO = Path(__file__).resolve().parents[1]
TINY = WanArchConfig(dim=16, ffn_dim=32, num_heads=2, num_layers=2, freq_dim=16, text_dim=8, text_len=4,
                     in_dim=4, out_dim=4)
# about 147 M parameters: 294 MB in bf16, large next to the ~300 MB the child's imports take
LARGE = WanArchConfig(dim=1024, ffn_dim=4096, num_heads=8, num_layers=8)
# The old path held float32 random weights + the loaded dict + the cast: about 3x. The bound sits between that and
# the one copy the new path holds, with room for the allocator's slack either way (no timing, no tight window).
MAX_PEAK_OVER_WEIGHTS = 2.0


def _make(kind: str, cfg: WanArchConfig):
    return (lambda: WanModel(cfg)) if kind == "wan" else (lambda: CausalWanModel(cfg, StreamConfig()))


@pytest.mark.parametrize("kind", ["wan", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_seeded_weights_are_those_of_a_float32_cpu_construction(kind, dtype):
    """Processes agree on seeded random weights (learners, actors, the float64 replay tests): a meta build gets,
    in any dtype, the float32 CPU construction's weights cast once, and leaves the generator where it left it."""
    torch.manual_seed(7)
    reference = _make(kind, TINY)()
    after_reference = torch.rand(4)
    model = build_wan(_make(kind, TINY), "cpu", dtype, None, seed=7)
    after = torch.rand(4)
    built = model.state_dict()
    assert set(built) == set(reference.state_dict())
    for k, v in reference.state_dict().items():
        assert built[k].dtype == dtype and torch.equal(built[k], v.to(dtype)), k
    assert torch.equal(model.rope, rope_tables(TINY.head_dim)) and model.rope.dtype == torch.float64
    assert torch.equal(after, after_reference)
    other = build_wan(_make(kind, TINY), "cpu", dtype, None, seed=8)
    assert not torch.equal(other.state_dict()["blocks.0.ffn.0.weight"], built["blocks.0.ffn.0.weight"])


def test_a_checkpoint_build_has_no_meta_tensor_left(tmp_path):
    torch.manual_seed(0)
    source = WanModel(TINY).double()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "w.safetensors"))
    model = build_wan(_make("wan", TINY), "cpu", torch.bfloat16, reader(tmp_path / "w.safetensors"), seed=0)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v.to(torch.bfloat16)), k
    x, t, ctx = torch.randn(1, 4, 2, 4, 4), torch.tensor([500.0]), torch.randn(1, 4, 8)
    out = model.float()(x, t, ctx)  # a working model: RoPE table present, float64
    assert torch.isfinite(out).all() and model.rope.dtype == torch.float64


# ------------------------------------------------------------------------------------------------ memory

# The peak is the kernel's high-water mark of this process's resident memory (VmHWM; ru_maxrss would carry over
# the forking pytest process's peak across exec).
_CHILD = """
import json, re, sys, torch
from core.config import WanArchConfig
from core.model.wan import WanModel
from core.records.checkpoint import build_wan, reader
def high_water():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
cfg = WanArchConfig.model_validate_json(sys.argv[2])
tiny = WanArchConfig(dim=16, ffn_dim=32, num_heads=2, num_layers=1)
build_wan(lambda: WanModel(tiny), "cpu", torch.bfloat16, None, seed=0)  # loads what torch imports lazily (~85 MB)
baseline = high_water()
model = build_wan(lambda: WanModel(cfg), "cpu", torch.bfloat16, reader(sys.argv[1]), seed=0)
peak = high_water()
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"baseline": baseline, "peak": peak, "weights": weights,
                  "dtypes": sorted({str(p.dtype) for p in model.parameters()})}))
"""


@pytest.fixture(scope="module")
def large_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A Wan folder in bfloat16 and a float32 safetensors file of the same random weights."""
    root = tmp_path_factory.mktemp("large")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WanModel(LARGE).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(shape, generator=gen, dtype=torch.bfloat16) for k, shape in shapes.items()}
    (root / "bf16").mkdir()
    save_file(sd, str(root / "bf16" / WEIGHTS_FILE))
    save_file({k: v.float() for k, v in sd.items()}, str(root / "fp32.safetensors"))
    return {"bf16": root / "bf16", "fp32": root / "fp32.safetensors"}


@pytest.mark.parametrize("stored", ["bf16", "fp32"])
def test_building_from_a_checkpoint_peaks_at_one_copy_of_the_weights(stored, large_checkpoints):
    """In a fresh process: the peak resident memory over the baseline after imports is about one bf16 copy of
    the weights, whether the file holds bf16 or float32 (which is cast tensor by tensor as it is read)."""
    result = subprocess.run([sys.executable, "-c", _CHILD, str(large_checkpoints[stored]), LARGE.model_dump_json()],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    m = json.loads(result.stdout.strip().splitlines()[-1])
    assert m["dtypes"] == ["torch.bfloat16"]
    assert m["weights"] > 250e6
    growth = m["peak"] - m["baseline"]
    print(f"{stored} file: peak RSS over baseline {growth / 1e6:.0f} MB for {m['weights'] / 1e6:.0f} MB of weights "
          f"({growth / m['weights']:.2f}x)")
    assert 0.5 * m["weights"] <= growth <= MAX_PEAK_OVER_WEIGHTS * m["weights"]  # resident, and not the old 3x


# ------------------------------------------------------------------------------------------- architectures

def test_the_full_wan_architectures_have_wans_parameter_counts():
    """The 1.3B student/critic and the paper's 14B teacher (from configs/reward_forcing_1.3b.yaml), on meta."""
    cfg = load_config(REPO / "configs" / "reward_forcing_1.3b.yaml")
    counts = {}
    for name, arch in (("1.3B", cfg.model), ("14B", cfg.learner.teacher.arch)):
        for make in (lambda: WanModel(arch), lambda: CausalWanModel(arch, cfg.stream)):
            with torch.device("meta"):
                model = make()
            assert all(p.is_meta for p in model.parameters())
            counts.setdefault(name, set()).add((sum(p.numel() for p in model.parameters()),
                                                len(model.state_dict())))
    assert counts == {"1.3B": {(1_418_996_800, 825)}, "14B": {(14_288_491_584, 1095)}}


# ------------------------------------------------------------------------------------------ fp32 masters

def _masters(engine, stage: int) -> dict[str, torch.Tensor]:
    """The fp32 masters read from the optimizer's own flat partitions (one rank: a partition is the whole)."""
    names = {id(p): n for n, p in engine.module.named_parameters()}
    opt, out = engine.optimizer, {}
    if stage == 2:
        groups = zip(opt.round_robin_bit16_groups, opt.single_partition_of_fp32_groups)
    else:
        groups = zip(opt.fp16_groups, opt.fp32_partitioned_groups_flat)
    for params, flat in groups:
        offset = 0
        for p in params:
            numel = p.numel() if stage == 2 else p.ds_tensor.numel()
            shape = p.shape if stage == 2 else p.ds_shape
            out[names[id(p)]] = flat[offset:offset + numel][:shape.numel()].view(shape)
            offset += numel
    return out


@pytest.mark.parametrize("stage", [2, 3])
def test_full_weights_are_the_fp32_masters_under_bf16(one_rank, stage):
    """After a step too small for bf16 to show, the EMA and the published weights (full_weights) are the
    optimizer's fp32 masters bit for bit, and differ from the module's bf16 copies."""
    learner = load_config(REPO / "configs" / "plumbing.yaml", [f"learner.zero_stage={stage}", "learner.batch_size=1"]).learner
    config = deepspeed_config(learner, 1e-4, bf16=True)
    if stage == 3:
        with deepspeed.zero.Init(config_dict_or_path=config):
            model = WanModel(TINY)
    else:
        model = build_wan(_make("wan", TINY), "cpu", torch.bfloat16, None, seed=0)
    model.init_buffers("cpu")
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=config)
    gen = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 2, 4, 4, generator=gen), torch.randn(1, 4, 8, generator=gen)
    loss = engine(x.bfloat16(), torch.tensor([500.0]), ctx.bfloat16()).float().pow(2).mean()
    engine.backward(loss)
    engine.step()
    weights = full_weights(engine, stage)
    masters = _masters(engine, stage)
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=stage == 3):
        copies = {k: p.detach().clone() for k, p in params.items()}
    assert set(weights) == set(masters) == set(copies)
    for k, w in weights.items():
        assert w.dtype == torch.float32 and w.device.type == "cpu"
        assert torch.equal(w, masters[k]), k
        assert torch.equal(w.to(torch.bfloat16), copies[k]), k  # the bf16 copy is the master rounded
    moved_below_bf16 = sum(int((w != copies[k].float()).sum()) for k, w in weights.items())
    assert moved_below_bf16 > 0.5 * sum(w.numel() for w in weights.values())
