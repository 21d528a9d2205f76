"""Shared test set-up: deterministic seeds, Triton's CPU interpreter when there is no GPU, tolerances."""

import os

import torch

# Triton kernels run on CPU tensors through the interpreter when no GPU is present. This must be set before
# anything imports triton (pkfast imports it lazily, only for backend="triton").
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# torch's thread count in every test, whatever else runs on the machine: tests compare results bitwise across
# calls, and pkfast's default threads="auto" lowers the count while other processes hold the cores (its own
# tests, tests/engine/test_threads.py, pass threads= explicitly).
os.environ.setdefault("PKFAST_THREADS", "all")

import pytest  # noqa: E402

@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
