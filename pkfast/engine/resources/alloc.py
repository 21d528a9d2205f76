"""Keeps freed CPU memory for reuse while a Gram runs, so per-chunk Jacobians are not page-faulted in anew.

Why: ``vmap(jacrev)`` returns a fresh ``[chunk, C, P]`` tensor for every chunk. glibc serves allocations above
its mmap threshold (dynamic, at most 32 MiB) with a new ``mmap`` and unmaps them when freed, so every chunk of a
large model pays the kernel's page faults again: measured on the 2-core test machine, the digits MLP
(P = 85,002; 3.4 MB per sample) spent 1.0 ms/sample in Jacobians with glibc's defaults and 0.55 ms/sample with
freed memory kept; the wide MLP (P = 1.1 M; 45 MB per sample) 14 ms → 6.3 ms (see csrc/README.md).

:func:`reuse_freed_memory` raises glibc's mmap and trim thresholds for the duration of a computation (via
``mallopt``) and afterwards sets them to 32 MiB / 64 MiB — the values glibc's own dynamic thresholds reach in
any process that has freed a large tensor — and returns the retained memory with ``malloc_trim(0)``. It does
nothing off glibc, on non-CPU devices or when the environment variable ``PKFAST_MALLOC_TUNING=0`` is set.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import sys
import threading
from collections.abc import Iterator

log = logging.getLogger("pkfast")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Thresholds while a Gram runs: allocations below 1 GiB come from the heap and freed memory is kept.
_DURING = 1 << 30
#: Thresholds afterwards: glibc's dynamic maximum (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit) and twice it.
_AFTER_MMAP = 32 << 20
_AFTER_TRIM = 64 << 20

_lock = threading.Lock()
_depth = 0
_libc: ctypes.CDLL | None | bool = False  # False: not looked up yet


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is False:
        _libc = None
        if sys.platform.startswith("linux"):
            try:
                lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                lib.gnu_get_libc_version.restype = ctypes.c_char_p
                lib.gnu_get_libc_version()  # only glibc has it (musl does not)
                lib.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
                lib.malloc_trim.argtypes = (ctypes.c_size_t,)
                _libc = lib
            except (OSError, AttributeError):
                _libc = None
    return _libc  # type: ignore[return-value]


def enabled() -> bool:
    return os.environ.get("PKFAST_MALLOC_TUNING", "1") != "0" and _glibc() is not None


@contextlib.contextmanager
def reuse_freed_memory(active: bool = True) -> Iterator[None]:
    """Within the block, freed CPU memory below 1 GiB is kept by the allocator for reuse (see module doc)."""
    global _depth
    lib = _glibc() if active and enabled() else None
    if lib is None:
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            ok = lib.mallopt(_M_MMAP_THRESHOLD, _DURING) and lib.mallopt(_M_TRIM_THRESHOLD, _DURING)
            if not ok:
                log.debug("pkfast: mallopt refused the thresholds; glibc's defaults stay")
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                lib.mallopt(_M_MMAP_THRESHOLD, _AFTER_MMAP)
                lib.mallopt(_M_TRIM_THRESHOLD, _AFTER_TRIM)
                lib.malloc_trim(0)
