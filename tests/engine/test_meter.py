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
    """The measured per-sample pass of a plan's route (the measurement the plan's tiling used)."""
    from pkfast.engine.resources.meter import pass_cost

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, C))
    traj = random_trajectory(net, steps=1)
    job = pkfast.plan(net, traj, torch.randn(16, 8), method="jacobian", memory_budget="1GiB", head=None).job
    return pass_cost(job.route, job.data, job.quadrature_terms[0].left[0][0])  # (head=None: every output's gradient)


def test_measured_pass_grows_with_the_outputs():
    """A vmap(jacrev) pass holds C cotangents and C parameter-sized gradients per sample: its measured cost per
    sample grows about linearly in C (and is at least one sample's Jacobian panel, C·P floats)."""
    small, large = _plan_pass(10), _plan_pass(200)
    P10, P200 = 8 * 32 + 32 + 32 * 10 + 10, 8 * 32 + 32 + 32 * 200 + 200
    assert large.per_sample >= 200 * P200 * 4  # at least the sample's C × P float32 gradients
    assert large.per_sample / small.per_sample > 0.5 * (200 * P200) / (10 * P10)


def test_measuring_the_pass_does_not_shrink_the_chunk():
    """The measurement runs the route on 4 samples (its begin takes that as the chunk); the plan's chunk is still
    the route's own, as many samples as the chunk budget holds (it was left at 4: every pass took 4 samples)."""
    from pkfast.engine.costs import chunk_for

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    traj = random_trajectory(net, steps=1)
    for method in ("materialized", "jacobian"):
        job = pkfast.plan(net, traj, torch.randn(300, 8), method=method).job
        assert job.tiling.pass_bytes > 0  # (the pass was measured)
        want = chunk_for(job.route.bytes_per_sample) if method != "jacobian" else job.route.fm.default_chunk()
        assert job.route.chunk == want and job.tiling.chunk == min(300, want) > 4, (method, job.route.chunk,
                                                                                    job.tiling)
