"""mtg-train's 8-bit AdamW: bitsandbytes' update, one host sync per step instead of one per tensor."""

import bitsandbytes as bnb
import bitsandbytes.optim.optimizer as bnb_optimizer
import pytest
import torch

from mtg_core.optim import one_sync_per_step


def steps(optimizer_cls, monkeypatch, count=3):
    """Parameters after `count` steps, and the host syncs (bitsandbytes' sync_gpu calls) of each step."""
    calls = []
    monkeypatch.setattr(bnb_optimizer, "sync_gpu", lambda t: calls.append(t))
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=generator)) for n in (5000, 300, 8192, 64)]  # 8-bit and 32-bit state
    optimizer = optimizer_cls(params, lr=1e-2)
    syncs = []
    for _ in range(count):
        for param in params[:3]:  # the last one has no gradient: skipped, as bitsandbytes skips it
            param.grad = torch.randn(param.shape, generator=generator)
        calls.clear()
        optimizer.step()
        syncs.append(len(calls))
    return [p.detach().clone() for p in params], syncs, optimizer


@pytest.mark.parametrize("kind", [bnb.optim.AdamW8bit, bnb.optim.PagedAdamW8bit])
def test_one_sync_per_step_and_the_same_update_as_bitsandbytes(kind, monkeypatch):
    theirs, their_syncs, _ = steps(kind, monkeypatch)
    ours, our_syncs, optimizer = steps(one_sync_per_step(kind), monkeypatch)
    paged = kind is bnb.optim.PagedAdamW8bit
    assert their_syncs == [3 + paged] * 3  # one per tensor with a gradient, and a paged optimizer's final one
    assert our_syncs == [1, 1, 1]
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert optimizer.state[optimizer.param_groups[0]["params"][0]]["state1"].dtype == torch.uint8  # 8-bit state kept
