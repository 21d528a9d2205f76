"""pkfast.engine.resources.alloc: freed memory is kept for reuse inside a Gram and glibc's usual thresholds come back after."""

import pytest
import torch

from pkfast.engine.resources import alloc as _alloc

from tests.models import mlp, random_trajectory

glibc = pytest.mark.skipif(not _alloc.enabled(), reason="needs glibc (and PKFAST_MALLOC_TUNING not 0)")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _retained_after_free(nbytes: int) -> int:
    """Resident bytes still held after a touched tensor of ``nbytes`` is freed."""
    before = _rss()
    t = torch.ones(nbytes // 4, dtype=torch.float32)
    del t
    return _rss() - before


@glibc
def test_freed_memory_is_kept_inside_and_returned_at_exit():
    n = 256 << 20  # far above glibc's largest dynamic mmap threshold (32 MiB)
    base = _rss()
    with _alloc.reuse_freed_memory():
        assert _retained_after_free(n) > n // 2  # kept for the next chunk: no page faults on reuse
    assert _rss() - base < n // 4  # malloc_trim gave it back


@glibc
def test_nested_contexts_return_memory_only_at_the_outermost_exit():
    n = 256 << 20
    base = _rss()
    with _alloc.reuse_freed_memory():
        with _alloc.reuse_freed_memory():
            assert _retained_after_free(n) > n // 2
        assert _rss() - base > n // 2  # still inside the outer block: still kept
    assert _rss() - base < n // 4


def test_disabled_by_environment_variable(monkeypatch):
    monkeypatch.setenv("PKFAST_MALLOC_TUNING", "0")
    assert not _alloc.enabled()
    with _alloc.reuse_freed_memory():  # a no-op, but still a working context manager
        pass


def test_gram_is_the_same_with_and_without_tuning(monkeypatch):
    import pkfast

    model = mlp(5, 7, 3).double()
    traj = random_trajectory(model, steps=3, seed=1)
    X = torch.randn(9, 5, dtype=torch.float64)
    K1 = pkfast.gram(model, traj, X, progress=False)
    monkeypatch.setenv("PKFAST_MALLOC_TUNING", "0")
    K0 = pkfast.gram(model, traj, X, progress=False)
    assert torch.equal(K0, K1)
