"""Res-MTNet's head (paper section 3), with M independent copies stacked on a leading axis.

    shared:   h = Dropout(ReLU(W_in x + b_in))                 (the shared FC layer)
    residual: h = h + F(h),  F = Linear -> ReLU -> Dropout -> Linear   (y = F(x) + x), `blocks` times
    heads:    one linear output per task, concatenated (task slices are cut by the caller)

Stacking lets one set of batched matrix products train many configurations or folds at once; a single
model is the M = 1 case, so training, sweeps and `predict` share one implementation.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import torch
from torch import nn


def _uniform(generator: torch.Generator, shape: Sequence[int], fan_in: int) -> torch.Tensor:
    """nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases."""
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(*shape, generator=generator) * 2 - 1) * bound


class ResMTNet(nn.Module):
    def __init__(self, in_dim: int, hidden: int, blocks: int, out_dim: int, seeds: Sequence[int],
                 n_tasks: int = 0):
        super().__init__()
        self.in_dim, self.hidden, self.blocks, self.out_dim = in_dim, hidden, blocks, out_dim
        members = len(seeds)
        self.w_in = nn.Parameter(torch.empty(members, in_dim, hidden))
        self.b_in = nn.Parameter(torch.empty(members, hidden))
        self.w_a = nn.Parameter(torch.empty(members, blocks, hidden, hidden))
        self.b_a = nn.Parameter(torch.empty(members, blocks, hidden))
        self.w_b = nn.Parameter(torch.empty(members, blocks, hidden, hidden))
        self.b_b = nn.Parameter(torch.empty(members, blocks, hidden))
        self.w_out = nn.Parameter(torch.empty(members, hidden, out_dim))
        self.b_out = nn.Parameter(torch.empty(members, out_dim))
        # log variances of Kendall et al.'s uncertainty weighting (unused with fixed lambdas)
        self.log_vars = nn.Parameter(torch.zeros(members, max(n_tasks, 1)))
        self.reset(seeds)

    @property
    def members(self) -> int:
        return self.w_in.shape[0]

    @torch.no_grad()
    def reset(self, seeds: Sequence[int]) -> None:
        """Initialise member m from seeds[m] alone: equal seeds give equal starting weights."""
        made: Dict[int, Dict[str, torch.Tensor]] = {}
        for m, seed in enumerate(seeds):
            if seed not in made:
                g = torch.Generator().manual_seed(int(seed))
                h, d, o, k = self.hidden, self.in_dim, self.out_dim, self.blocks
                made[seed] = {"w_in": _uniform(g, (d, h), d), "b_in": _uniform(g, (h,), d),
                              "w_a": _uniform(g, (k, h, h), h), "b_a": _uniform(g, (k, h), h),
                              "w_b": _uniform(g, (k, h, h), h), "b_b": _uniform(g, (k, h), h),
                              "w_out": _uniform(g, (h, o), h), "b_out": _uniform(g, (o,), h)}
            for name, value in made[seed].items():
                getattr(self, name)[m].copy_(value)
        self.log_vars.zero_()

    def forward(self, x: torch.Tensor, dropout: Optional[torch.Tensor] = None,
                noise: Optional[Sequence[torch.Tensor]] = None, members: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (M, B, D) -> (M, B, out_dim); with `members`, only those members' weights are used.

        dropout: (M,) drop probabilities, applied only when `noise` is given: one uniform tensor (M, B, H) per
        dropout site (1 + blocks), so members can share random numbers (common random numbers).
        """
        def w(param: torch.Tensor) -> torch.Tensor:
            return param if members is None else param[members]

        h = torch.relu(torch.baddbmm(w(self.b_in).unsqueeze(1), x, w(self.w_in)))
        if noise is not None:
            h = _drop(h, noise[0], dropout)
        w_a, b_a, w_b, b_b = w(self.w_a), w(self.b_a), w(self.w_b), w(self.b_b)
        for k in range(self.blocks):
            f = torch.relu(torch.baddbmm(b_a[:, k].unsqueeze(1), h, w_a[:, k]))
            if noise is not None:
                f = _drop(f, noise[k + 1], dropout)
            h = h + torch.baddbmm(b_b[:, k].unsqueeze(1), f, w_b[:, k])
        return torch.baddbmm(w(self.b_out).unsqueeze(1), h, w(self.w_out))

    def member_state(self, m: int) -> Dict[str, torch.Tensor]:
        """Member m as a stand-alone M = 1 state dict (what is exported)."""
        return {k: v[m:m + 1].detach().clone().contiguous() for k, v in self.state_dict().items()}


def _drop(h: torch.Tensor, uniform: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    keep = 1.0 - p.view(-1, 1, 1)
    return h * (uniform < keep) / keep.clamp_min(1e-6)
