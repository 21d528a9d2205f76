"""threads="auto": fewer threads while other processes hold the cores, torch's count restored afterwards."""

import logging

import pytest
import torch

import pkfast
from pkfast.engine.resources import threads as th
from tests.models import mlp, random_trajectory


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _policy(monkeypatch, others, cores=2, setting="auto"):
    readings = iter(others)
    monkeypatch.setattr(th, "others_running", lambda: next(readings))
    p = th.ThreadPolicy(setting, "test")
    p.cores = cores
    return p


def test_auto_leaves_the_cores_others_hold(monkeypatch, two_threads):
    with _policy(monkeypatch, [4, 4, 4, 0, 0, 0, 0, 0, 0], cores=2) as p:
        assert torch.get_num_threads() == 1  # 2 cores, 4 others running: one thread (never zero)
        p.update()
        assert torch.get_num_threads() == 1  # the median of the window still says busy
        for _ in range(3):
            p.update()
        assert torch.get_num_threads() == 2  # the others stopped: back to torch's count, never above it
    assert torch.get_num_threads() == 2


def test_quiet_machine_keeps_torchs_count(monkeypatch, two_threads):
    with _policy(monkeypatch, [0, 1, 0], cores=4):
        assert torch.get_num_threads() == 2  # 3 free cores, but torch was set to 2


def test_all_and_integers_do_not_read_the_load(monkeypatch, two_threads):
    with _policy(monkeypatch, [], setting="all"):
        assert torch.get_num_threads() == 2
    with _policy(monkeypatch, [], setting=1) as p:
        assert torch.get_num_threads() == 1
        p.update()
    assert torch.get_num_threads() == 2


def test_unreadable_load_keeps_torchs_count(monkeypatch, two_threads):
    with _policy(monkeypatch, [None] * 9):
        assert torch.get_num_threads() == 2


def test_others_running_reads_this_machine():
    n = th.others_running()
    assert n is None or (isinstance(n, int) and n >= 0)


def test_check_threads(monkeypatch):
    assert th.check_threads("f", "auto") == "auto" and th.check_threads("f", 3) == 3
    monkeypatch.setenv("PKFAST_THREADS", "2")
    assert th.check_threads("f", None) == 2
    monkeypatch.delenv("PKFAST_THREADS")
    assert th.check_threads("f", None) == "auto"
    for bad in (0, -1, True, "some", 1.5):
        with pytest.raises(ValueError, match=r"f: threads must be 'auto' .* found"):
            th.check_threads("f", bad)


def test_gram_lowers_threads_under_load_and_restores_them(monkeypatch, two_threads, caplog):
    """The Gram runs with one thread while the (simulated) machine is oversubscribed, gives the same result as
    with torch's threads (to rounding), logs why, and restores torch's count."""
    net = mlp().double()
    traj = random_trajectory(net)
    X = torch.randn(12, 5, dtype=torch.float64)
    seen = []
    real = pkfast.engine.driver.GramJob.compute_tile

    def spy(self, *a, **k):
        seen.append(torch.get_num_threads())
        return real(self, *a, **k)

    monkeypatch.setattr(pkfast.engine.driver.GramJob, "compute_tile", spy)
    monkeypatch.setattr(th, "others_running", lambda: 6)
    with caplog.at_level(logging.INFO, logger="pkfast"):
        K1 = pkfast.gram(net, traj, X, dtype=torch.float64, progress=False, threads="auto", memory_budget=20_000)
    assert seen and set(seen) == {1} and torch.get_num_threads() == 2
    assert "1 thread(s) instead of 2: other processes hold 6 of the" in caplog.text
    seen.clear()
    K2 = pkfast.gram(net, traj, X, dtype=torch.float64, progress=False, threads="all", memory_budget=20_000)
    assert set(seen) == {2}
    assert torch.allclose(K1, K2, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="threads must be"):
        pkfast.gram(net, traj, X, progress=False, threads=0)


def test_nested_policies_decide_from_the_outermost_count(monkeypatch, two_threads):
    """The planning's policy lowers the count; the tile loop's (nested) policy may raise it back to torch's count
    when the load goes, never above; each restores what it found."""
    readings = iter([6, 6, 6] + [0] * 20)
    monkeypatch.setattr(th, "others_running", lambda: next(readings))
    with th.ThreadPolicy("auto", "outer"):
        assert torch.get_num_threads() == 1
        with th.ThreadPolicy("auto", "inner") as inner:
            for _ in range(3):
                inner.update()
            assert inner.base == 2 and torch.get_num_threads() == 2
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2 and th.ThreadPolicy._outer_base is None


def test_planning_runs_under_the_policy_too(monkeypatch, two_threads):
    """pkfast.plan's probes (discovery, the measured pass) run with the lowered count under load."""
    seen = []
    real = pkfast.engine.driver.GramJob.create.__func__

    def spy(cls, *a, **k):
        seen.append(torch.get_num_threads())
        return real(cls, *a, **k)

    monkeypatch.setattr(pkfast.engine.driver.GramJob, "create", classmethod(spy))
    monkeypatch.setattr(th, "others_running", lambda: 6)
    net = mlp()
    pkfast.plan(net, random_trajectory(net), torch.randn(6, 5), threads="auto")
    assert seen == [1] and torch.get_num_threads() == 2
