"""Float8 linear layers for the generator's transformer blocks, through torchao (optional extra `fp8`).

Activations and weights are quantized to float8 e4m3 with one scale per row, dynamically per call; the matmul runs on
the FP8 tensor cores of CUDA devices of compute capability 8.9 and up (Ada, Hopper). Embeddings, the head and every
norm stay in the model's dtype. What it costs in quality is measured on the toy world (BENCHMARKS.md).
"""

from __future__ import annotations

import torch
import torch.nn as nn


def float8_linears(model: nn.Module) -> int:
    """Swap the linear layers of the model's transformer blocks (`model.blocks`) for float8 ones in place; how many."""
    device = next(model.parameters()).device
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError(f"runtime.fp8 needs a CUDA GPU of compute capability 8.9 or higher (Ada, Hopper); the "
                         f"generator is on {device}: set runtime.fp8=false")
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_  # optional: FP8 only
    except ImportError as e:
        raise ValueError(f"runtime.fp8 needs torchao ({e}): pip install -e '.[fp8]', or set runtime.fp8=false") from None
    linears = sum(isinstance(m, nn.Linear) for m in model.blocks.modules())
    quantize_(model.blocks, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
              filter_fn=lambda module, fqn: isinstance(module, nn.Linear))
    return linears
