"""The stacked trainer's Adam against torch.optim.Adam(fused=True): the same kernel, so the same parameters."""
import torch

from pipeline.core.adam import FusedAdam


def _params(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(7, 5, generator=g, requires_grad=True), torch.randn(5, generator=g, requires_grad=True),
            torch.randn(3, generator=g, requires_grad=True)]


def _run(make, steps=25):
    params = _params(0)
    groups = [{"params": params[:2], "lr": 1e-2, "weight_decay": 1e-3},
              {"params": params[2:], "lr": 3e-2, "weight_decay": 0.0}]
    opt = make(groups)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 7, generator=g)
    for step in range(steps):
        loss = ((x @ params[0] + params[1]).tanh().sum(1) - x[:, 0]).pow(2).mean() + params[2].pow(2).sum()
        if step % 5 == 4:  # a step where one group has no gradient: its parameters and state must stay put
            loss = ((x @ params[0] + params[1]).tanh().sum(1) - x[:, 0]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [p.detach().clone() for p in params]


def test_equals_torch_fused_adam_bit_for_bit():
    ours = _run(FusedAdam)
    theirs = _run(lambda groups: torch.optim.Adam(groups, fused=True))
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    assert not torch.equal(ours[0], _params(0)[0])  # it moved
