"""LoRA adapters: PEFT folders and LongLive-style lora.pt files merge, unmerge and hook exactly.

The reference is the real `peft` library: an adapter saved by `save_pretrained` must give, once
merged into our model (or applied with hooks), the outputs of the PEFT-wrapped model.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import get_peft_model_state_dict

from core.config import PLUMBING_CONFIG, load_config
from core.model.lora import LoraAdapter, LoraError, applied, merge, unmerge
from core.model.wan import CausalWanModel, WanModel
from helpers import assert_close, peft_adapter

ARCH = load_config(PLUMBING_CONFIG).model
ATOL = 1e-12  # float64: the merged weights differ from PEFT's two-matmul path by rounding only


def make_model(arch=ARCH, seed=0, cls=WanModel) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = cls(arch).to(torch.float64).eval()
    with torch.no_grad():  # non-trivial modulation and head (their init is near zero)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def inputs(arch=ARCH, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, arch.in_dim, 3, 4, 4, generator=g, dtype=torch.float64)
    ctx = torch.randn(1, 5, arch.text_dim, generator=g, dtype=torch.float64)
    return x, torch.tensor([700.0], dtype=torch.float64), ctx


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before) -> None:
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items()), "model weights changed"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("peft")
    base = make_model()
    wrapped = peft_adapter(base, folder)
    x = inputs()
    with torch.no_grad():
        expected, plain = wrapped(*x), base(*x)
    assert (expected - plain).abs().max() > 1e-3, "the adapter must change the outputs for the test to mean anything"
    return folder, wrapped, expected, x


@torch.no_grad()
def test_peft_merge_matches_peft_forward_and_unmerge_is_exact(setup):
    folder, _, expected, x = setup
    adapter = LoraAdapter.load(folder)
    assert adapter.scale == 2.0 and adapter.rank == 4 and len(adapter.layers) == 2 * ARCH.num_layers * 4
    assert "blocks.0.self_attn.q" in adapter.layers and "blocks.1.cross_attn.o" in adapter.layers
    model = make_model()
    before = snapshot(model)
    record = merge(model, adapter)
    assert_close(model(*x), expected, ATOL, "merged vs PEFT")
    unmerge(model, record)
    assert_unchanged(model, before)
    with pytest.raises(LoraError, match="already undone"):
        unmerge(model, record)


@torch.no_grad()
def test_applied_matches_merge_and_leaves_weights(setup):
    folder, _, expected, x = setup
    adapter = LoraAdapter.load(folder)
    model = make_model()
    before = snapshot(model)
    plain = model(*x)
    with applied(model, adapter):
        hooked = model(*x)
    assert_unchanged(model, before)
    assert_close(hooked, expected, ATOL, "hooks vs PEFT")
    assert_close(model(*x), plain, 0.0, "hooks removed on exit")
    record = merge(model, adapter, weight=0.5)
    merged_half = model(*x)
    unmerge(model, record)
    with applied(model, adapter, weight=0.5):
        assert_close(model(*x), merged_half, ATOL, "hooks vs merge at weight 0.5")
    with pytest.raises(RuntimeError, match="boom"), applied(model, adapter):
        raise RuntimeError("boom")
    assert_close(model(*x), plain, 0.0, "hooks removed after an exception")


@torch.no_grad()
def test_rslora_and_alpha_override(tmp_path):
    base = make_model()
    wrapped = peft_adapter(base, tmp_path, targets=("ffn.0", "ffn.2"), r=4, alpha=8, use_rslora=True)
    adapter = LoraAdapter.load(tmp_path)
    assert adapter.scale == 8 / 2 and set(adapter.layers) == {f"blocks.{i}.ffn.{j}" for i in (0, 1) for j in (0, 2)}
    x = inputs()
    with applied(base, adapter):
        assert_close(base(*x), wrapped(*x), ATOL, "rsLoRA ffn adapter vs PEFT")
    assert LoraAdapter.load(tmp_path, alpha=2.0).scale == 1.0


@torch.no_grad()
def test_longlive_lora_pt_loads_and_merges(setup, tmp_path):
    folder, wrapped, expected, x = setup
    sd = get_peft_model_state_dict(wrapped)  # base_model.model.blocks.0.self_attn.q.lora_A.weight
    path = tmp_path / "lora.pt"
    torch.save({"generator_lora": {"model." + k: v for k, v in sd.items()}, "step": 100}, path)
    default = LoraAdapter.load(path)
    assert default.scale == 1.0 and default.rank == 4  # no config: alpha defaults to the rank
    adapter = LoraAdapter.load(path, alpha=8)
    assert adapter.scale == 2.0 and adapter.source == str(path)
    model = make_model()
    record = merge(model, adapter)
    assert_close(model(*x), expected, ATOL, "lora.pt merged vs PEFT")
    unmerge(model, record)
    # a raw PEFT state dict (adapter name `.default.`, FSDP fragments) saved without the entry
    raw = {"_fsdp_wrapped_module." + k: v for k, v in wrapped.state_dict().items() if "lora_" in k}
    torch.save(raw, tmp_path / "raw.pt")
    with applied(model, LoraAdapter.load(tmp_path / "raw.pt", alpha=8)):
        assert_close(model(*x), expected, ATOL, "raw PEFT state dict vs PEFT")


@torch.no_grad()
def test_causal_model_takes_the_same_adapter(setup):
    folder, *_ = setup
    adapter = LoraAdapter.load(folder)
    model = make_model(cls=CausalWanModel)
    before = snapshot(model)
    x, _, ctx = inputs()
    t = torch.full((1, 3), 700.0, dtype=torch.float64)
    with applied(model, adapter):
        hooked = model(x, t, ctx)
    record = merge(model, adapter)
    assert_close(model(x, t, ctx), hooked, ATOL, "causal: merge vs hooks")
    unmerge(model, record)
    assert_unchanged(model, before)


@torch.no_grad()
def test_stacked_merges_unmerge_in_reverse_only(setup):
    folder, *_ = setup
    adapter = LoraAdapter.load(folder)
    model = make_model()
    before = snapshot(model)
    first = merge(model, adapter)
    second = merge(model, adapter, weight=-0.3)
    with pytest.raises(LoraError, match="modified after the merge"):
        unmerge(model, first)
    unmerge(model, second)
    unmerge(model, first)
    assert_unchanged(model, before)


@torch.no_grad()
def test_shape_mismatch_names_module_and_leaves_model_unchanged(tmp_path):
    small = ARCH.model_copy(update=dict(dim=32, ffn_dim=64))
    peft_adapter(make_model(small), tmp_path)
    adapter = LoraAdapter.load(tmp_path)
    model = make_model()
    before = snapshot(model)
    with pytest.raises(LoraError) as err:
        merge(model, adapter)
    msg = str(err.value)
    assert "blocks.0.cross_attn.k: model in=64 out=64, adapter A (4, 32) B (32, 4)" in msg
    assert "16 adapter layer(s)" in msg and "and 6 more" in msg  # at most 10 listed
    with pytest.raises(LoraError, match="do not fit"), applied(model, adapter):
        pass
    assert_unchanged(model, before)


@torch.no_grad()
def test_unmatched_modules_are_named_and_model_unchanged(tmp_path):
    deeper = ARCH.model_copy(update=dict(num_layers=3))
    peft_adapter(make_model(deeper), tmp_path)
    model = make_model()
    before = snapshot(model)
    with pytest.raises(LoraError, match=r"8 adapter module\(s\) match no Linear.*blocks\.2\.cross_attn\.k"):
        merge(model, LoraAdapter.load(tmp_path))
    assert_unchanged(model, before)
    # hand-written keys for a module the model does not have
    bogus = LoraAdapter.from_state_dict({"blocks.0.self_attn.qq.lora_A.weight": torch.zeros(2, 64),
                                         "blocks.0.self_attn.qq.lora_B.weight": torch.zeros(64, 2)})
    with pytest.raises(LoraError, match="blocks.0.self_attn.qq"):
        merge(model, bogus)
    assert_unchanged(model, before)


def test_file_and_layout_errors(tmp_path):
    with pytest.raises(LoraError, match="does not exist"):
        LoraAdapter.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoraError, match="is not a PEFT adapter"):
        LoraAdapter.load(tmp_path / "empty")
    torch.save({"generator": {"blocks.0.self_attn.q.weight": torch.zeros(2, 2)}}, tmp_path / "full.pt")
    with pytest.raises(LoraError, match="unrecognised layout.*generator"):
        LoraAdapter.load(tmp_path / "full.pt")
    torch.save({"blocks.0.self_attn.q.lora_A.weight": torch.zeros(2, 4),
                "blocks.0.self_attn.q.lora_magnitude_vector": torch.zeros(4)}, tmp_path / "dora.pt")
    with pytest.raises(LoraError, match="not LoRA A/B weights.*lora_magnitude_vector"):
        LoraAdapter.load(tmp_path / "dora.pt")
    torch.save({"blocks.0.self_attn.q.lora_A.weight": torch.zeros(2, 4)}, tmp_path / "half.pt")
    with pytest.raises(LoraError, match="lack their A or B"):
        LoraAdapter.load(tmp_path / "half.pt")
    (tmp_path / "odd.txt").write_text("x")
    with pytest.raises(LoraError, match="unknown suffix"):
        LoraAdapter.load(tmp_path / "odd.txt")
    peft_dir = tmp_path / "dora"
    peft_dir.mkdir()
    (peft_dir / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 2, "use_dora": True}))
    torch.save({}, peft_dir / "adapter_model.bin")
    with pytest.raises(LoraError, match="use_dora=True"):
        LoraAdapter.load(peft_dir)


def test_diffusers_module_names_are_mapped():
    adapter = LoraAdapter.from_state_dict({
        "transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 64),
        "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.zeros(64, 2),
        "transformer.blocks.1.ffn.net.0.proj.lora_A.weight": torch.zeros(2, 64),
        "transformer.blocks.1.ffn.net.0.proj.lora_B.weight": torch.zeros(128, 2)})
    assert set(adapter.layers) == {"blocks.0.self_attn.q", "blocks.1.ffn.0"}
    adapter.check(make_model())


@torch.no_grad()
def test_bfloat16_merge_sums_in_float32_and_unmerge_checks_the_model(setup):
    folder, *_ = setup
    adapter = LoraAdapter.load(folder)
    model = make_model().to(torch.bfloat16)
    w = model.blocks[0].self_attn.q.weight
    a, b = adapter.layers["blocks.0.self_attn.q"]
    expected = (w.float() + 0.7 * adapter.scale * (b.float() @ a.float())).to(torch.bfloat16)
    before = snapshot(model)
    record = merge(model, adapter, weight=0.7)
    assert torch.equal(w, expected) and record.originals["blocks.0.self_attn.q"].device.type == "cpu"
    with pytest.raises(LoraError, match="another model"):
        unmerge(make_model().to(torch.bfloat16), record)
    unmerge(model, record)
    assert_unchanged(model, before)
    x, t, ctx = inputs()
    with applied(model, adapter):  # the hook path runs in the model's dtype
        assert model(x.bfloat16(), t, ctx.bfloat16()).dtype == torch.bfloat16
