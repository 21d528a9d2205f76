"""The per-sample pass's memory is measured, and the measurement follows what the pass allocates."""

import torch

import pkfast
from pkfast.engine.resources.meter import PassCost, PeakMeter
from tests.models import random_trajectory


def test_peak_meter_counts_storages_until_freed_and_under_vmap():
    with PeakMeter() as m:
        a = torch.ones(1000, dtype=torch.float64)
        v = a[:10]  # a view: no storage
        del a, v
        # the input (4·50·8 = 1,600 bytes) and its outer products (4·50·50·8 = 80,000), then the input is freed
        b = torch.vmap(lambda x: x.outer(x))(torch.ones(4, 50, dtype=torch.float64))
    assert m.peak == 81_600 and m.live == 80_000
    del b


def _plan_pass(C: int) -> PassCost:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, C))
    traj = random_trajectory(net, steps=1)
    return pkfast.plan(net, traj, torch.randn(16, 8), method="jacobian", memory_budget="1GiB", head=None).tiles  # every output's gradient


def test_measured_pass_grows_with_the_outputs():
    """A vmap(jacrev) pass holds C cotangents and C parameter-sized gradients per sample: its measured cost per
    sample grows about linearly in C (and is at least one sample's Jacobian panel, C·P floats)."""
    small, large = _plan_pass(10), _plan_pass(200)
    P10, P200 = 8 * 32 + 32 + 32 * 10 + 10, 8 * 32 + 32 + 32 * 200 + 200
    per = lambda t: t.pass_bytes / t.chunk  # noqa: E731
    assert per(large) >= 200 * P200 * 4  # at least the sample's C × P float32 gradients
    assert per(large) / per(small) > 0.5 * (200 * P200) / (10 * P10)
