"""Adam for the stacked trainer: the kernel torch.optim.Adam(fused=True) runs, without torch.optim's wrapper.

Why not torch.optim.Adam itself: its constructor and every step() import torch._dynamo (for torch.compile's
sake), which costs about 1.5 s of a 15 s JSRT run on 2 cores and slows the interpreter's exit as much again. The
update is the same aten kernel (`torch._fused_adam_`: L2 weight decay, not AdamW) with the same state, so the
parameters are bit-for-bit those of torch.optim.Adam(fused=True) (tests/test_adam.py).
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch


class FusedAdam:
    """Adam over parameter groups ({'params', 'lr', 'weight_decay'}), betas (0.9, 0.999), eps 1e-8 (torch's
    defaults); one fused kernel call per group and step."""

    def __init__(self, groups: Sequence[Dict], betas=(0.9, 0.999), eps: float = 1e-8) -> None:
        self.groups = [{"params": list(g["params"]), "lr": float(g["lr"]),
                        "weight_decay": float(g.get("weight_decay", 0.0))} for g in groups]
        self.betas, self.eps = betas, eps
        self.state: Dict[torch.Tensor, Dict[str, torch.Tensor]] = {}

    def _new_state(self, p: torch.Tensor) -> Dict[str, torch.Tensor]:
        state = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                 "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                 "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
        self.state[p] = state
        return state

    def zero_grad(self) -> None:
        for group in self.groups:
            for p in group["params"]:
                p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for group in self.groups:
            params: List[torch.Tensor] = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self.state[p] if p in self.state else self._new_state(p) for p in params]
            steps = [s["step"] for s in states]
            torch._foreach_add_(steps, 1)
            torch._fused_adam_(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                               [s["exp_avg_sq"] for s in states], [], steps, amsgrad=False, lr=group["lr"],
                               beta1=self.betas[0], beta2=self.betas[1], weight_decay=group["weight_decay"],
                               eps=self.eps, maximize=False, grad_scale=None, found_inf=None)
