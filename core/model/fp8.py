"""Float8 linear layers for the generator's transformer blocks, through torchao (optional extra `fp8`).

Activations and weights are quantized to float8 e4m3 with one scale per row, dynamically per call; the matmul runs on
the FP8 tensor cores of CUDA devices of compute capability 8.9 and up (Ada, Hopper). Embeddings, the head and every
norm stay unquantised (the time embedding and the head compute in float32). What it costs in quality is measured on the toy world (BENCHMARKS.md).

New weights (a rollout actor's weight updates) are quantised again on load (`requantise_float8`): torchao's float8
weight holds data and a scale computed from the old weights, so neither may be kept.
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn

StateDict = dict[str, torch.Tensor]


def float8_linears(model: nn.Module) -> int:
    """Swap the linear layers of the model's transformer blocks (`model.blocks`) for float8 ones in place; how many."""
    device = next(model.parameters()).device
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError(f"runtime.fp8 needs a CUDA GPU of compute capability 8.9 or higher (Ada, Hopper); the "
                         f"generator is on {device}: set runtime.fp8=false")
    try:
        import torchao  # noqa: F401  optional: FP8 only
    except ImportError as e:
        raise ValueError(f"runtime.fp8 needs torchao ({e}): pip install -e '.[fp8]', or set runtime.fp8=false") from None
    return quantise_block_linears(model)


def quantise_block_linears(model: nn.Module) -> int:
    """`float8_linears` without its device check; torchao's own check still refuses a GPU without FP8."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_  # optional: FP8 only
    linears = sum(isinstance(m, nn.Linear) for m in model.blocks.modules())
    quantize_(model.blocks, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
              filter_fn=lambda module, fqn: isinstance(module, nn.Linear))
    return linears


def _float8_tensor_type() -> type | None:
    """torchao's float8 weight type when torchao is loaded: a model holds float8 weights only then."""
    return getattr(sys.modules.get("torchao.quantization"), "Float8Tensor", None)


def requantise_float8(expected: StateDict, state_dict: StateDict) -> StateDict:
    """`state_dict` with each tensor whose counterpart in `expected` (the model's state dict) is a float8 weight
    quantised the way that one is, so that loading copies new data and new scales into it in place (its storage, which
    a captured CUDA graph reads, stays); a plain tensor cannot be copied into a float8 one."""
    float8 = _float8_tensor_type()
    if float8 is None:
        return state_dict
    return {k: _quantised_like(expected[k], v) if isinstance(expected[k], float8) else v for k, v in state_dict.items()}


def _quantised_like(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    from torchao.quantization import PerRow  # optional: FP8 only
    return type(old).from_hp(new.to(device=old.device, dtype=old.dtype), float8_dtype=old.qdata.dtype,
                             granularity=PerRow(), mm_config=old.mm_config, kernel_preference=old.kernel_preference,
                             act_quant_kwargs=old.act_quant_kwargs)
