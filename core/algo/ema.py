"""Exponential moving average of the generator's weights, kept in float32 whatever the training dtype."""

from __future__ import annotations

import torch


class EMA:
    def __init__(self, weights: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().to(torch.float32).clone() for k, v in weights.items()}

    @torch.no_grad()
    def update(self, weights: dict[str, torch.Tensor]) -> None:
        """shadow <- decay * shadow + (1 - decay) * weights (Self Forcing's update, in float32)."""
        for k, v in weights.items():
            self.shadow[k].mul_(self.decay).add_(v.detach().to(self.shadow[k].device, torch.float32),
                                                alpha=1 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": {k: v.cpu() for k, v in self.shadow.items()}}

    @classmethod
    def from_state_dict(cls, state: dict) -> "EMA":
        return cls(state["shadow"], state["decay"])
