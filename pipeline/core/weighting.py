"""Loss weighting: how the per-task losses of a multi-task head become one loss.

Each scheme is one class registered in `WEIGHTINGS` (pipeline.plugins), built from the configured per-task
weights and the head's config section (it reads its own keys). The trainer calls `forward` every step (with the
family's last shared parameter where `needs_shared`), `after_step` after each optimiser step, and `end_epoch` with
the epoch's mean task losses. Parameters of a scheme get their own optimiser group: their own learning rate
(the section's `weighting_lr`), no weight decay. Everything is stacked over M members, like the heads: tensors are
(M, T), members never mix. To add a scheme, write one class (here, or in a plugin's module) registered with
`@WEIGHTINGS.register(name)`, with the config keys it reads in `settings`: the trainer stacks together only
configurations equal in them.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.plugins import WEIGHTINGS


@WEIGHTINGS.register("fixed")
class Weighting(nn.Module):
    """Base: fixed weights. lambdas (M, T) are the configured per-task weights (the section's lambdas)."""

    name = "fixed"
    needs_shared = False  # forward wants the head's last shared parameter (GradNorm)
    # the config keys the scheme reads (weighting_lr: the trainer's, for a scheme with parameters); two
    # configurations that differ in one never share a stack (tests/test_registries.py checks every scheme)
    settings: Tuple[str, ...] = ()

    def __init__(self, lambdas: torch.Tensor, cfg: Any = None):
        super().__init__()
        self.register_buffer("lambdas", lambdas.clone())

    def forward(self, per_task: torch.Tensor, shared: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(M, T) task losses -> (M,) the training objective of each member."""
        return (self.weights() * per_task).sum(dim=1)

    def weights(self) -> torch.Tensor:
        """(M, T) the multiplier of each task's loss now."""
        return self.lambdas

    def at_bound(self) -> torch.Tensor:
        """(M, T) whether a task's weight is held at a bound of the scheme (so it says less than it seems)."""
        return torch.zeros_like(self.lambdas, dtype=torch.bool)

    def unconverged(self) -> torch.Tensor:
        """(M, T) whether a learnt weight is still far (over 1.5x) from the optimum the last epoch's losses set."""
        return torch.zeros_like(self.lambdas, dtype=torch.bool)

    def after_step(self) -> None:
        """Called after every optimiser step."""

    def end_epoch(self, mean_losses: torch.Tensor) -> None:
        """Called with each epoch's mean task losses (M, T) on the training rows."""


@WEIGHTINGS.register("uncertainty")
class Uncertainty(Weighting):
    """Kendall, Gal and Cipolla (2018): sum_k lambda_k (0.5 exp(-s_k) L_k + r(s_k)), s_k = log sigma_k^2 learnt.

    r is Kendall's 0.5 s_k ('kendall') or Liebel and Koerner's (2018) log(1 + exp(s_k)) ('log1p', always
    positive). The optimum weight 0.5 exp(-s_k) is 0.5 / L_k for 'kendall' (2.5 for a loss of 0.2): tasks can be
    up-weighted as well as down-weighted. s_k is kept >= the section's uncertainty_min_log_var (projected after each
    step) so that a task being memorised (L_k -> 0) cannot drive its weight, and with 'kendall' the total loss,
    without bound; a weight is therefore at most lambda_k * 0.5 exp(-min_log_var), and tasks held there, or whose
    optimum at the last epoch's loss lies beyond it, are reported (`at_bound`). s_k moves by about
    the section's weighting_lr per step, so early stopping can end training before it reaches its optimum:
    `unconverged` says so.
    """

    name = "uncertainty"
    settings = ("uncertainty_min_log_var", "uncertainty_regulariser", "weighting_lr")

    def __init__(self, lambdas: torch.Tensor, cfg: Any = None):
        super().__init__(lambdas)
        self.floor = float(getattr(cfg, "uncertainty_min_log_var", -3.0))
        self.regulariser = str(getattr(cfg, "uncertainty_regulariser", "kendall"))
        self.log_vars = nn.Parameter(torch.zeros_like(lambdas))
        self.register_buffer("recent", torch.full_like(lambdas, float("nan")))  # the last epoch's mean losses

    def forward(self, per_task: torch.Tensor, shared: Optional[torch.Tensor] = None) -> torch.Tensor:
        s = self.log_vars
        reg = F.softplus(s) if self.regulariser == "log1p" else 0.5 * s
        return (self.lambdas * (0.5 * torch.exp(-s) * per_task + reg)).sum(dim=1)

    def weights(self) -> torch.Tensor:
        return self.lambdas * 0.5 * torch.exp(-self.log_vars.detach())

    def optimum(self) -> torch.Tensor:
        """(M, T) the log-variance s_k that minimises the objective at the last epoch's loss L_k: log L_k
        ('kendall'); for 'log1p', exp(-s) = (sqrt(L^2 / 4 + 2 L) - L / 2) / L. NaN before an epoch, and for a task
        without loss (no labels in the split: its weight has nothing to converge to)."""
        loss = torch.where(self.recent > 0, self.recent, torch.full_like(self.recent, float("nan")))
        if self.regulariser == "log1p":
            return -torch.log((torch.sqrt(loss ** 2 / 4 + 2 * loss) - loss / 2) / loss)
        return torch.log(loss)

    def at_bound(self) -> torch.Tensor:
        s = self.log_vars.detach()
        return (s <= self.floor + 1e-4) | (self.optimum() < self.floor)  # held there, or would be

    def unconverged(self) -> torch.Tensor:
        gap = (self.log_vars.detach() - self.optimum().clamp_min(self.floor)).abs()
        return gap > torch.log(torch.tensor(1.5))

    @torch.no_grad()
    def after_step(self) -> None:
        self.log_vars.clamp_(min=self.floor)

    @torch.no_grad()
    def end_epoch(self, mean_losses: torch.Tensor) -> None:
        self.recent.copy_(mean_losses)


@WEIGHTINGS.register("dwa")
class DynamicWeightAverage(Weighting):
    """Liu, Johns and Davison (2019): w_k(t) = K softmax_k(r_k / T), r_k = L_k(t-1) / L_k(t-2) (epoch means).

    A task whose loss falls more slowly than the others' gets more weight; the first two epochs weigh 1.
    """

    name = "dwa"
    settings = ("dwa_temperature",)

    def __init__(self, lambdas: torch.Tensor, cfg: Any = None):
        super().__init__(lambdas)
        self.temperature = float(getattr(cfg, "dwa_temperature", 2.0))
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


@WEIGHTINGS.register("gradnorm")
class GradNorm(Weighting):
    """Chen, Badrinarayanan, Lee and Rabinovich (2018): weights w_k learnt so that each task's gradient norm on
    the last shared layer, G_k = ||grad_W w_k L_k||, tracks the mean norm times r_k^alpha, r_k = (L_k / L_k(0))
    relative to the tasks' mean (a task that trains more slowly gets a larger gradient). The weights' own loss
    sum_k |G_k - target_k| (target held constant) trains them in their optimiser group; after each step they
    are renormalised to sum to T. The total loss is sum_k lambda_k w_k L_k (w_k held constant in it), so the
    configured lambdas keep their ratios on top of the balancing.
    """

    name = "gradnorm"
    needs_shared = True
    settings = ("gradnorm_alpha", "weighting_lr")

    def __init__(self, lambdas: torch.Tensor, cfg: Any = None):
        super().__init__(lambdas)
        self.alpha = float(getattr(cfg, "gradnorm_alpha", 1.5))
        self.w = nn.Parameter(torch.ones_like(lambdas))
        self.register_buffer("initial", torch.full_like(lambdas, float("nan")))

    def forward(self, per_task: torch.Tensor, shared: Optional[torch.Tensor] = None) -> torch.Tensor:
        total = (self.weights() * per_task).sum(dim=1)
        if not (torch.is_grad_enabled() and per_task.requires_grad and shared is not None):
            return total
        m, t = per_task.shape
        with torch.no_grad():
            self.initial.copy_(torch.where(torch.isnan(self.initial), per_task.detach(), self.initial))
        # `shared` is the parameter, or (parameter, index of the last shared layer's part of it): a head whose
        # residual blocks are stacked in one tensor names the last block alone
        param, part = shared if isinstance(shared, tuple) else (shared, ...)
        norms = []
        for k in range(t):
            (g,) = torch.autograd.grad(per_task[:, k].sum(), param, retain_graph=True, allow_unused=True)
            norms.append(torch.zeros(m, device=per_task.device) if g is None else g[part].reshape(m, -1).norm(dim=1))
        stacked = torch.stack(norms, dim=1)
        self.last_norms = stacked.detach()  # (M, T), the balanced quantity (diagnostics)
        grad_norm = self.w * stacked  # (M, T); differentiable in w only
        with torch.no_grad():
            relative = torch.where(self.initial > 1e-12, per_task / self.initial.clamp_min(1e-12),
                                   torch.ones_like(per_task))
            rate = relative / relative.mean(dim=1, keepdim=True).clamp_min(1e-12)
            target = grad_norm.mean(dim=1, keepdim=True) * rate ** self.alpha
        return total + (grad_norm - target).abs().sum(dim=1)

    def weights(self) -> torch.Tensor:
        return self.lambdas * self.w.detach()

    @torch.no_grad()
    def after_step(self) -> None:
        self.w.clamp_(min=1e-3)
        self.w.mul_(self.w.shape[1] / self.w.sum(dim=1, keepdim=True))
