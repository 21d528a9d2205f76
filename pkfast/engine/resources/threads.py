"""threads: how many CPU threads a computation uses — torch's count, lowered while other processes keep the
machine's cores busy.

A per-sample pass is many small operations, each an OpenMP parallel region that ends at a barrier. When other
processes hold the cores, one of the region's threads is often descheduled and the others wait (spinning) for
it, a scheduler time slice per region: on 2 cores with two 2-thread matmul loops running, a ResNet trace Gram
took 40–50 s with torch's 2 threads and 5 s with 1 (quiet: 1.05 s; ``benchmarks/under_load.py``). So before a
computation and at each tile, ``threads="auto"`` counts the other runnable threads on the machine
(``/proc/loadavg``'s running entities less this process's own running threads) and runs with at most the cores
they leave free (at least 1, at most torch's count, which is restored afterwards). Elsewhere than Linux, or with
``threads="all"``, torch's count is used unchanged; an integer pins it. The environment variable
``PKFAST_THREADS`` (``auto``, ``all`` or an integer) sets the default.

Results do not depend on the thread count beyond rounding (a parallel reduction may sum in another order), so
a run that must be bitwise reproducible pins ``threads``.
"""

from __future__ import annotations

import functools
import logging
import numbers
import os
import statistics
from pathlib import Path
from typing import Any

import torch

__all__ = ["THREADS", "check_threads", "others_running", "ThreadPolicy", "fitted_threads"]

log = logging.getLogger("pkfast")

#: ``threads=`` choices besides an integer.
THREADS = ("auto", "all")
#: Readings of the others' load kept: the median of the last few decides (one reading is a snapshot).
WINDOW = 5


def check_threads(fn: str, value: Any) -> str | int:
    """``value`` (None: the ``PKFAST_THREADS`` environment variable, else "auto") validated."""
    if value is None:
        value = os.environ.get("PKFAST_THREADS", "auto")
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
    if isinstance(value, str) and value in THREADS:
        return value
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1:
        return int(value)
    raise ValueError(f"{fn}: threads must be 'auto' (fewer threads while other processes hold the cores), 'all' "
                     f"(torch's thread count) or an integer ≥ 1; found {value!r}")


def _own_running() -> int:
    n = 0
    for t in os.scandir("/proc/self/task"):
        try:
            stat = Path(t.path, "stat").read_text()
        except OSError:  # a thread that ended meanwhile
            continue
        n += stat[stat.rindex(")") + 2] == "R"
    return n


def others_running() -> int | None:
    """Runnable threads of other processes on the machine now, or None where this cannot be read."""
    try:
        total = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
        return max(0, total - _own_running())
    except (OSError, ValueError, IndexError):
        return None


class ThreadPolicy:
    """Sets torch's thread count for a computation (a context manager); :meth:`update` re-decides between
    pieces of work (tiles), from the median of the last :data:`WINDOW` readings."""

    #: torch's thread count before the outermost active policy (a nested one, e.g. the tile loop inside a
    #: planned call, decides from it, not from the count an outer policy lowered)
    _outer_base: int | None = None

    def __init__(self, setting: str | int = "auto", fn: str = "pkfast") -> None:
        self.setting, self.fn = setting, fn
        self.cores = os.cpu_count() or 1
        self._readings: list[int] = []

    def __enter__(self) -> "ThreadPolicy":
        self.entry = torch.get_num_threads()
        self.outermost = ThreadPolicy._outer_base is None
        if self.outermost:
            ThreadPolicy._outer_base = self.entry
        self.base, self.current = ThreadPolicy._outer_base, self.entry
        if self.setting == "auto":
            for _ in range(3):
                self._read()
        self._apply(self.decide())
        return self

    def __exit__(self, *exc: Any) -> None:
        if torch.get_num_threads() != self.entry:
            torch.set_num_threads(self.entry)
        if self.outermost:
            ThreadPolicy._outer_base = None

    def _read(self) -> None:
        r = others_running()
        if r is not None:
            self._readings = (self._readings + [r])[-WINDOW:]

    def decide(self) -> int:
        """The thread count for the next piece of work."""
        if isinstance(self.setting, int):
            return self.setting
        if self.setting == "all" or not self._readings:
            return self.base
        free = self.cores - int(statistics.median(self._readings))
        return max(1, min(self.base, free))

    def update(self) -> None:
        """Read the load once more and change the thread count if it should."""
        if self.setting == "auto":
            self._read()
            self._apply(self.decide())

    def _apply(self, n: int) -> None:
        if n != self.current:
            log.info("%s: %d thread(s) instead of %d: other processes hold %s of the %d cores (threads='all' keeps "
                     "torch's count)", self.fn, n, self.current, statistics.median(self._readings or [0]), self.cores)
            torch.set_num_threads(n)
            self.current = n


def fitted_threads(fn: str):
    """Decorator: run the function under the default :class:`ThreadPolicy` (``PKFAST_THREADS``, else "auto")."""
    def wrap(f):
        @functools.wraps(f)
        def run(*args: Any, **kwargs: Any) -> Any:
            with ThreadPolicy(check_threads(fn, None), fn):
                return f(*args, **kwargs)
        return run
    return wrap
