"""Loss weighting: how the per-task losses of a multi-task head become one loss.

Each scheme is one class registered in `WEIGHTINGS`; the trainer calls `forward` every step, `after_step`
after each optimiser step, and `end_epoch` with the epoch's mean task losses. Parameters of a scheme (the
uncertainty weighting's log variances) get their own optimiser group: their own learning rate
(`train.weighting_lr`), no weight decay. Everything is stacked over M members, like the heads: tensors are
(M, T), members never mix. To add a scheme, write one class here and add it to WEIGHTINGS.
"""
from __future__ import annotations

from typing import Dict, Type

import torch
from torch import nn


class Weighting(nn.Module):
    """Base: fixed weights. lambdas (M, T) are the configured per-task weights (train.lambdas)."""

    name = "fixed"

    def __init__(self, lambdas: torch.Tensor, temperature: float = 2.0):
        super().__init__()
        self.register_buffer("lambdas", lambdas.clone())

    def forward(self, per_task: torch.Tensor) -> torch.Tensor:
        """(M, T) task losses -> (M,) one loss per member."""
        return (self.weights() * per_task).sum(dim=1)

    def weights(self) -> torch.Tensor:
        """(M, T) the multiplier of each task's loss now."""
        return self.lambdas

    def after_step(self) -> None:
        """Called after every optimiser step."""

    def end_epoch(self, mean_losses: torch.Tensor) -> None:
        """Called with each epoch's mean task losses (M, T) on the training rows."""


class Uncertainty(Weighting):
    """Kendall, Gal and Cipolla (2018): sum_k lambda_k (0.5 exp(-s_k) L_k + 0.5 s_k), s_k learnt.

    s_k is kept >= 0 (projected after each step), so no task's term can go negative and drive the total
    loss to minus infinity by shrinking s_k on a task that is being memorised; a weight is therefore at
    most lambda_k / 2, and tasks with large losses are down-weighted.
    """

    name = "uncertainty"

    def __init__(self, lambdas: torch.Tensor, temperature: float = 2.0):
        super().__init__(lambdas)
        self.log_vars = nn.Parameter(torch.zeros_like(lambdas))

    def forward(self, per_task: torch.Tensor) -> torch.Tensor:
        s = self.log_vars
        return (self.lambdas * (0.5 * torch.exp(-s) * per_task + 0.5 * s)).sum(dim=1)

    def weights(self) -> torch.Tensor:
        return self.lambdas * 0.5 * torch.exp(-self.log_vars.detach())

    @torch.no_grad()
    def after_step(self) -> None:
        self.log_vars.clamp_(min=0.0)


class DynamicWeightAverage(Weighting):
    """Liu, Johns and Davison (2019): w_k(t) = K softmax_k(r_k / T), r_k = L_k(t-1) / L_k(t-2) (epoch means).

    A task whose loss falls more slowly than the others' gets more weight; the first two epochs weigh 1.
    """

    name = "dwa"

    def __init__(self, lambdas: torch.Tensor, temperature: float = 2.0):
        super().__init__(lambdas)
        self.temperature = float(temperature)
        self.register_buffer("dynamic", torch.ones_like(lambdas))
        self.register_buffer("previous", torch.full_like(lambdas, float("nan")))

    def weights(self) -> torch.Tensor:
        return self.lambdas * self.dynamic

    @torch.no_grad()
    def end_epoch(self, mean_losses: torch.Tensor) -> None:
        if not torch.isnan(self.previous).any():
            ratio = mean_losses / self.previous.clamp_min(1e-12)
            ratio = torch.where(self.previous > 1e-12, ratio, torch.ones_like(ratio))  # unlabelled task: neutral
            k = ratio.shape[1]
            self.dynamic.copy_(k * torch.softmax(ratio / self.temperature, dim=1))
        self.previous.copy_(mean_losses)


WEIGHTINGS: Dict[str, Type[Weighting]] = {w.name: w for w in (Weighting, Uncertainty, DynamicWeightAverage)}
