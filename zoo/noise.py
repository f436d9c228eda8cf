"""Noise schedules of masked (absorbing-state) diffusion: ``alpha_t``, the probability that a token is still unmasked at
time ``t`` in [0, 1] (``alpha_0 = 1``, ``alpha_1 = eps``), and its time derivative. ``diffusion.schedule`` in a recipe
takes one of the names of :data:`SCHEDULES`.

- ``loglinear``: ``alpha_t = 1 - (1 - eps) t`` (MDLM's default; the total noise ``-log alpha_t`` is a log of a linear function)
- ``linear``: ``alpha_t = eps^t`` (total noise ``sigma_t = -t log eps`` linear in t, MDLM's LinearNoise from 0)
- ``cosine``: ``alpha_t = eps + (1 - eps) cos(pi t / 2)``
"""
from __future__ import annotations

import math
from typing import Callable, Literal

import torch

Alpha = Callable[[torch.Tensor, float], torch.Tensor]

# name -> (alpha_t, d alpha_t / dt), each a function of (t, eps)
SCHEDULES: dict[str, tuple[Alpha, Alpha]] = {
    "loglinear": (lambda t, eps: 1 - (1 - eps) * t, lambda t, eps: torch.full_like(t, -(1 - eps))),
    "linear": (lambda t, eps: torch.exp(t * math.log(eps)), lambda t, eps: math.log(eps) * torch.exp(t * math.log(eps))),
    "cosine": (
        lambda t, eps: eps + (1 - eps) * torch.cos(0.5 * math.pi * t),
        lambda t, eps: -(1 - eps) * 0.5 * math.pi * torch.sin(0.5 * math.pi * t),
    ),
}
ScheduleName = Literal[tuple(SCHEDULES)]


class NoiseSchedule:
    """The schedule ``name`` (a key of :data:`SCHEDULES`) with ``alpha_1 = eps``."""

    def __init__(self, name: str = "loglinear", eps: float = 1e-3):
        if name not in SCHEDULES:
            raise ValueError(f"unknown noise schedule '{name}'; choose one of {', '.join(SCHEDULES)}")
        self.name = name
        self.eps = eps
        self._alpha, self._derivative = SCHEDULES[name]

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return self._alpha(torch.as_tensor(t, dtype=torch.float64 if not torch.is_tensor(t) else None), self.eps)

    def alpha_derivative(self, t: torch.Tensor) -> torch.Tensor:
        """``d alpha_t / dt`` (negative: tokens only get masked as t grows)."""
        return self._derivative(torch.as_tensor(t), self.eps)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """The NELBO weight ``-alpha'_t / (1 - alpha_t)`` of a masked position's cross-entropy (``1/t`` for loglinear)."""
        return -self.alpha_derivative(t) / (1 - self.alpha(t))
