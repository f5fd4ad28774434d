"""Flow-matching schedule (docs/reference.md).

x_t = (1 - sigma) x0 + sigma eps; the model predicts the flow v = eps - x0.
The tables are float32 like the reference's, and timesteps map to sigmas by
nearest table entry, so the warped 4-step list is exactly
[1000, 937.5, 833.3333129882812, 625].
"""

from __future__ import annotations

import torch

from core.config import SchedulerConfig


class FlowMatchScheduler:
    def __init__(self, shift: float = 5.0, num_train_timesteps: int = 1000):
        self.shift = shift
        self.num_train_timesteps = n = num_train_timesteps
        sigmas = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float32)[:-1]
        self.sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        self.timesteps = self.sigmas * n
        bell = torch.exp(-2 * ((self.timesteps - n / 2) / n) ** 2)
        bell = bell - bell.min()
        self.linear_timesteps_weights = bell * (n / bell.sum())
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigmas, timesteps) on `device`, copied there once: a per-call host-to-device copy would synchronise
        every step, and cannot be captured in a CUDA graph."""
        if device not in self._on_device:
            self._on_device[device] = (self.sigmas.to(device), self.timesteps.to(device))
        return self._on_device[device]

    @classmethod
    def from_config(cls, cfg: SchedulerConfig) -> "FlowMatchScheduler":
        return cls(cfg.shift, cfg.num_train_timesteps)

    def denoising_timesteps(self, steps: list[int], warp: bool = True) -> torch.Tensor:
        """float32 timesteps of the few-step list; warped onto the shifted table when `warp`."""
        steps_t = torch.tensor(steps, dtype=torch.int64)
        if not warp:
            return steps_t.to(torch.float32)
        table = torch.cat([self.timesteps, torch.zeros(1, dtype=torch.float32)])
        return table[self.num_train_timesteps - steps_t]

    def table_index(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(torch.float32).flatten()
        return torch.argmin((self._tables(t.device)[1][None, :] - t[:, None]).abs(), dim=1)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """float32 sigma of the nearest table entry for each timestep."""
        return self._tables(t.device)[0][self.table_index(t)]

    @staticmethod
    def _per_sample(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return s.reshape(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t for x0 [N, ...] at timesteps t [N]; (1 - sigma) is formed in float32 as in the reference."""
        sigma = self._per_sample(self.sigma(t), x0)
        return ((1 - sigma) * x0 + sigma * noise).type_as(noise)

    def x0_from_flow(self, flow: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = self._per_sample(self.sigma(t).double(), flow)
        return (xt.double() - sigma * flow.double()).to(flow.dtype)

    def flow_from_x0(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = self._per_sample(self.sigma(t).double(), x0)
        return ((xt.double() - x0.double()) / sigma).to(x0.dtype)

    def shift_training_timesteps(self, t_raw: torch.Tensor, min_t: int = 20, max_t: int = 980) -> torch.Tensor:
        """DMD / critic timesteps: integer draws in [0, 1000) shifted in float32, then clamped."""
        u = t_raw / self.num_train_timesteps
        shifted = self.shift * u / (1 + (self.shift - 1) * u) * self.num_train_timesteps
        return shifted.to(torch.float32).clamp(min_t, max_t)
