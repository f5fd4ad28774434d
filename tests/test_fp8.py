"""FP8 generators take weight updates: each float8 weight is quantised again from the new weights, in place.

torchao's float8 quantisation and matmul run on a CPU; only its hardware gate asks for an FP8 GPU, and the tests
open it (`fp8_on_cpu`)."""

from __future__ import annotations

import pytest
import torch

from core.config import StreamConfig, WanArchConfig
from core.model.fp8 import quantise_block_linears
from core.model.wan import CausalWanModel
from core.records.checkpoint import load_into

pytestmark = pytest.mark.usefixtures("no_grad")

CFG = WanArchConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, freq_dim=16, text_dim=16, text_len=8)


@pytest.fixture
def fp8_on_cpu(monkeypatch):
    from torchao.quantization import quant_api
    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)


def _weights(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = CausalWanModel(CFG, StreamConfig(num_frame_per_block=1))
    return {k: torch.randn_like(v) * 0.2 for k, v in model.state_dict().items()}


def _float8_model(weights: dict[str, torch.Tensor]) -> CausalWanModel:
    model = CausalWanModel(CFG, StreamConfig(num_frame_per_block=1)).to(torch.bfloat16).eval()
    load_into(model, weights)
    quantise_block_linears(model)
    return model


def _run(model: CausalWanModel) -> torch.Tensor:
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(1, 16, 3, 4, 4, generator=gen).bfloat16()
    ctx = torch.randn(1, CFG.text_len, CFG.text_dim, generator=gen).bfloat16()
    return model(x, torch.tensor([[900.0, 500.0, 100.0]]), ctx)


def _float8_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torchao.quantization import Float8Tensor
    return {k: v for k, v in model.state_dict().items() if isinstance(v, Float8Tensor)}


def test_a_float8_generator_loads_new_weights_as_one_quantised_from_them(fp8_on_cpu):
    model, fresh = _float8_model(_weights(0)), _float8_model(_weights(1))
    old = _float8_weights(model)
    assert len(old) == (4 + 4 + 2) * 2  # q k v o of both attentions and the FFN's two, in each of the two blocks
    storage = {k: (v.qdata.data_ptr(), v.scale.data_ptr()) for k, v in old.items()}
    assert not torch.equal(_run(model), _run(fresh))

    load_into(model, _weights(1))  # float32, as a weight update may arrive

    for k, new in _float8_weights(model).items():
        assert (new.qdata.data_ptr(), new.scale.data_ptr()) == storage[k], k  # in place: captured graphs see it
        assert torch.equal(new.scale, fresh.state_dict()[k].scale), k
        assert torch.equal(new.qdata.view(torch.uint8), fresh.state_dict()[k].qdata.view(torch.uint8)), k
    assert torch.equal(_run(model), _run(fresh))
