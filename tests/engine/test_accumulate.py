"""The torch accumulation path against float64 products, including the blocked upper-triangle (SYRK) path."""

import pytest
import torch

from pkfast.engine.accumulate import accumulate, accumulate_diagonal
from pkfast.engine.accumulate.torch_blas import syrk_blocks


@pytest.mark.parametrize("n", [1, 37, 65, 201, 515, 1281])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_upper_only_matches_gemm_on_the_upper_triangle(n, dtype):
    A = torch.randn(n, 29, dtype=dtype)
    acc0 = torch.randn(n, n, dtype=dtype)
    acc = acc0.clone()
    accumulate(acc, A, A, 0.7, backend="torch", upper_only=True)
    expected = acc0.double() + 0.7 * A.double() @ A.double().T
    iu = torch.triu_indices(n, n)
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(acc.double()[iu[0], iu[1]], expected[iu[0], iu[1]], rtol=tol, atol=tol)
    assert syrk_blocks(n) == {1: 1, 37: 1, 65: 2, 201: 2, 515: 2, 1281: 4}[n]  # the measured rule (csrc/README.md)
    if syrk_blocks(n) > 1:  # blocks strictly below the block diagonal were skipped
        il = torch.tril_indices(n, n, offset=-(n // syrk_blocks(n) + 1))
        assert torch.equal(acc[il[0], il[1]], acc0[il[0], il[1]])


def test_general_accumulate_and_diagonal():
    A, B = torch.randn(7, 3, 11, dtype=torch.float64), torch.randn(7, 3, 11, dtype=torch.float64)
    acc = torch.zeros(7, 7, dtype=torch.float64)
    accumulate(acc, A.reshape(7, -1), B.reshape(7, -1), 2.0, backend="torch")
    torch.testing.assert_close(acc, 2.0 * A.reshape(7, -1) @ B.reshape(7, -1).T)
    d = torch.ones(7, dtype=torch.float64)
    accumulate_diagonal(d, A, B, 0.5, full=False)
    torch.testing.assert_close(d, 1 + 0.5 * (A * B).sum((1, 2)))
    D = torch.zeros(7, 3, 3, dtype=torch.float64)
    accumulate_diagonal(D, A, B, 0.5, full=True)
    torch.testing.assert_close(D, 0.5 * A @ B.transpose(1, 2))
