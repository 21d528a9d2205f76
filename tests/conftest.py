"""Shared test set-up: deterministic seeds, Triton's CPU interpreter when there is no GPU, tolerances."""

import os

import torch

# Triton kernels run on CPU tensors through the interpreter when no GPU is present. This must be set before
# anything imports triton (pkfast imports it lazily, only for backend="triton").
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
