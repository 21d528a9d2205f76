"""Triton kernel for the tile accumulation ``G += Σ_s α_s · A_s B_sᵀ`` and its autotune configurations.

Only ``@triton.jit`` code and config functions live here; checks, allocation and the launch grid are in
:mod:`pkfast.engine.accumulate.triton_launch`. The structure follows Triton's matrix-multiplication tutorial
(``python/tutorials/03-matrix-multiplication.py``): arguments grouped as pointers → sizes → strides →
``tl.constexpr`` meta-parameters, grouped program ordering, masked loads and stores, one accumulator.

Design:

* One program owns one ``BLOCK_M × BLOCK_N`` block of ``G``. Its accumulator (fp32, or fp64 for fp64
  inputs) runs over all S steps and all of K; ``G``'s block is loaded, added to and stored once at the end.
* α_s is applied in registers to the ``A`` operand tile before the dot (``tl.dot(α_s·a, b, acc)``), so there
  is no per-step partial product: ``acc`` is the only tile-sized value that lives across the loops. The
  extra cost is one multiply per loaded ``A`` element (``BLOCK_M·BLOCK_K`` per ``BLOCK_M·BLOCK_N·BLOCK_K``
  multiply-adds); the extra rounding is one of α_s·a in the working precision.
* ``UPPER`` (``A is B`` on a diagonal tile of a symmetric Gram): only the ``T(T+1)/2`` blocks with
  ``pid_m ≤ pid_n`` are launched (``T = cdiv(M, BLOCK)``, ``BLOCK_M == BLOCK_N``). Program ``p`` is mapped
  to the lower-triangle coordinates ``(i, j)``, ``j ≤ i``, with ``p = i(i+1)/2 + j`` and then transposed to
  ``(pid_m, pid_n) = (j, i)``. Blocks strictly below the block diagonal are never read or written; the
  elements below the diagonal inside a diagonal block are written (with correct values).
* Strides are arguments, so transposed or otherwise strided views (e.g. ``B = Bt.T``) need no copy. Rows
  and columns past ``M`` / ``N`` wrap around (``% M``) so the operand loads need no row mask; K is masked;
  the store is masked. Offsets are int64 so panels beyond 2³¹ elements address correctly. One pointer tile
  per operand lives across the loops: it walks K, then jumps back and on to the next step's matrices.
* ``EPILOGUE_SUBTILE`` (config): the load-add-store of ``G`` is done in two column halves (``tl.split``,
  as in Triton's persistent-matmul tutorial), so 128×128 fp32 blocks do not spill registers.
* ``INPUT_MODE``: ``"ieee"`` (exact fp32 or fp64 products), ``"tf32"`` (tensor-core tf32 inputs), ``"bf16"``
  (fp32 inputs rounded to bf16 in registers, fp32 accumulation).
* ``EMULATE``: set by the launcher under ``TRITON_INTERPRET=1``. The interpreter runs ``tl.dot`` as an exact
  numpy matmul: it ignores ``input_precision="tf32"`` and multiplies bf16 *bit patterns*
  (triton-lang/triton#11584, "we just don't support it yet"); its fp32 → bf16 cast also truncates instead of
  rounding to nearest even (seen with triton 3.9.0). So under the interpreter the operands are rounded in registers with integer bit
  operations (bf16: nearest, ties to even, as the GPU's default cast; tf32: mantissa rounded to 10 bits,
  nearest, ties away, as ``cvt.rna.tf32.f32``) and the dot is done exactly in fp32.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

__all__ = [
    "INPUT_MODES",
    "get_cuda_autotune_configs",
    "get_interpreter_configs",
    "get_autotune_configs",
    "prune_configs",
    "pk_accumulate_kernel",
    "pk_accumulate_kernel_autotuned",
    "loop_probe_kernel",
]

#: ``tl.constexpr`` values of ``INPUT_MODE``.
INPUT_MODES = ("ieee", "tf32", "bf16")

#: Shared memory we allow a config to ask for (bytes): operand tiles of every pipeline stage.
_SMEM_LIMIT = 200 * 1024


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def get_cuda_autotune_configs() -> list[triton.Config]:
    """Configs for NVIDIA GPUs; fp32 operands are 4 bytes in shared memory in every input mode.

    Chosen so that none spills registers on sm_90 (``ptxas -v`` on the compiled PTX, unit-stride K, all
    three modes): 128×128 blocks need ``EPILOGUE_SUBTILE``; ``BLOCK_K = 64`` at 128×128 and 128×256 blocks
    spill kilobytes and are left out. Square ``BLOCK_M == BLOCK_N`` configs serve ``UPPER`` and fp64 uses
    the ≤ 64×64 ones without the split epilogue (see :func:`prune_configs`).
    """
    c = triton.Config
    split = dict(GROUP_M=8, EPILOGUE_SUBTILE=True)
    whole = dict(GROUP_M=8, EPILOGUE_SUBTILE=False)
    return [
        c({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, **split}, num_stages=4, num_warps=8),
        c({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, **split}, num_stages=3, num_warps=8),
        c({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 16, **split}, num_stages=5, num_warps=8),
        c({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, **whole}, num_stages=4, num_warps=8),
        c({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, **split}, num_stages=4, num_warps=8),
        # small tiles: fp64, and small or skinny Gram tiles
        c({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, **whole}, num_stages=4, num_warps=4),
        c({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, **whole}, num_stages=3, num_warps=4),
        c({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16, **whole}, num_stages=3, num_warps=4),
        c({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, **whole}, num_stages=4, num_warps=2),
    ]


def get_interpreter_configs() -> list[triton.Config]:
    """One small config for ``TRITON_INTERPRET=1``: no autotuning (the interpreter is far slower than torch:
    ~30 ms for one 37×53×129 update, thousands of times torch's ~10 µs); 32 does not divide the odd test
    shapes, so ragged edges are exercised."""
    return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2, "EPILOGUE_SUBTILE": True},
                          num_stages=1, num_warps=4)]


def get_autotune_configs() -> list[triton.Config]:
    return get_interpreter_configs() if _interpreting() else get_cuda_autotune_configs()


def prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop configs that cannot serve this call: ``UPPER`` needs square blocks; fp64 accumulators over
    64×64 (or with the split epilogue) spill registers; operand tiles of all stages must fit in shared memory."""
    upper = bool(kwargs.get("UPPER", named_args.get("UPPER", False)))
    a = named_args.get("a_ptr")
    itemsize = a.element_size() if hasattr(a, "element_size") else 4
    kept = []
    for cfg in configs:
        kw = cfg.kwargs
        bm, bn, bk = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
        if upper and bm != bn:
            continue
        if itemsize == 8 and (bm * bn > 64 * 64 or kw["EPILOGUE_SUBTILE"]):
            continue
        if max(cfg.num_stages, 1) * (bm + bn) * bk * itemsize > _SMEM_LIMIT:
            continue
        kept.append(cfg)
    return kept or [get_interpreter_configs()[0]]


@triton.jit
def _round_to_tf32(x):
    """fp32 → fp32 with the mantissa rounded to tf32's 10 bits (nearest, ties away from zero)."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x1000) & -8192  # -8192 == 0xFFFFE000: clear the 13 low mantissa bits
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _round_to_bf16(x):
    """fp32 → fp32 holding the nearest bfloat16 (ties to even), by integer bit operations: the interpreter's
    own fp32 → bf16 cast truncates, which biases sums of squares (the diagonal of A·Aᵀ)."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # -65536 == 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def pk_accumulate_kernel(
    # pointers
    g_ptr, a_ptr, b_ptr, alpha_ptr,
    # sizes: S steps, G is [M, N], A is [S, M, K], B is [S, N, K]
    S, M, N, K,
    # strides (in elements)
    stride_as, stride_am, stride_ak,
    stride_bs, stride_bn, stride_bk,
    stride_gm, stride_gn,
    # meta-parameters
    UPPER: tl.constexpr,  # G is a symmetric diagonal tile (A is B): compute only blocks with pid_m <= pid_n
    INPUT_MODE: tl.constexpr,  # "ieee" | "tf32" | "bf16"
    EMULATE: tl.constexpr,  # interpreter: round operands in registers, then an exact fp32 dot
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EPILOGUE_SUBTILE: tl.constexpr,  # add acc into G in two column halves (lower register pressure)
):
    """``G[M, N] += Σ_s alpha[s] · A[s] @ B[s]ᵀ`` for one ``BLOCK_M × BLOCK_N`` block of ``G`` per program."""
    pid = tl.program_id(axis=0)
    if UPPER:
        # p = i(i+1)/2 + j with 0 <= j <= i (row-major lower triangle), then (pid_m, pid_n) = (j, i).
        # The float estimate of i is corrected by one step either way (exact for any launchable grid).
        i = ((tl.sqrt(8.0 * pid.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
        i = tl.where(i * (i + 1) // 2 > pid, i - 1, i)
        i = tl.where((i + 1) * (i + 2) // 2 <= pid, i + 1, i)
        pid_m = pid - i * (i + 1) // 2
        pid_n = i
    else:
        # Grouped ordering: GROUP_M block-rows are swept together, so their A panels stay in L2.
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows / columns past the edge wrap around: their loads stay in bounds and their results are masked.
    rows_a = (offs_m % M).to(tl.int64)
    rows_b = (offs_n % N).to(tl.int64)
    offs_k64 = offs_k.to(tl.int64)
    # Pointer tiles advance by BLOCK_K along K and, after each step, on to the next step's matrices. All
    # offsets are int64: panels can exceed 2³¹ elements, and K · stride_k can too for transposed views.
    a_ptrs = a_ptr + (rows_a[:, None] * stride_am + offs_k64[None, :] * stride_ak)  # [BLOCK_M, BLOCK_K]
    b_ptrs = b_ptr + (offs_k64[:, None] * stride_bk + rows_b[None, :] * stride_bn)  # [BLOCK_K, BLOCK_N] of Bᵀ
    num_k = tl.cdiv(K, BLOCK_K)
    a_k_step = tl.cast(stride_ak, tl.int64) * BLOCK_K
    b_k_step = tl.cast(stride_bk, tl.int64) * BLOCK_K
    a_s_step = tl.cast(stride_as, tl.int64) - tl.cast(num_k, tl.int64) * a_k_step  # undo the K walk, next step
    b_s_step = tl.cast(stride_bs, tl.int64) - tl.cast(num_k, tl.int64) * b_k_step

    acc_dtype = tl.float64 if a_ptr.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
    for s in range(0, S):
        alpha = tl.load(alpha_ptr + s).to(acc_dtype)
        for k in range(0, num_k):
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            a = a * alpha  # α_s folded into the A operand: one accumulator across steps
            if INPUT_MODE == "bf16":
                if EMULATE:
                    acc = tl.dot(_round_to_bf16(a), _round_to_bf16(b), acc, input_precision="ieee")
                else:
                    acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
            elif INPUT_MODE == "tf32":
                if EMULATE:
                    acc = tl.dot(_round_to_tf32(a), _round_to_tf32(b), acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, b, acc, input_precision="tf32")
            else:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            a_ptrs += a_k_step
            b_ptrs += b_k_step
        a_ptrs += a_s_step
        b_ptrs += b_s_step

    # G_block += acc, once (load, add, store).
    g_rows = g_ptr + offs_m.to(tl.int64)[:, None] * stride_gm
    row_mask = offs_m[:, None] < M
    if EPILOGUE_SUBTILE:
        # In two column halves (as Triton's persistent-matmul tutorial), so that acc, G's values and G's
        # 64-bit pointers fit in registers together: 128×128 blocks spill without it.
        acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        offs_n0 = pid_n * BLOCK_N + tl.arange(0, BLOCK_N // 2)
        offs_n1 = offs_n0 + BLOCK_N // 2
        g0_ptrs = g_rows + offs_n0.to(tl.int64)[None, :] * stride_gn
        g0_mask = row_mask & (offs_n0[None, :] < N)
        g0 = tl.load(g0_ptrs, mask=g0_mask, other=0.0)
        tl.store(g0_ptrs, g0 + acc0.to(g0.dtype), mask=g0_mask)
        g1_ptrs = g_rows + offs_n1.to(tl.int64)[None, :] * stride_gn
        g1_mask = row_mask & (offs_n1[None, :] < N)
        g1 = tl.load(g1_ptrs, mask=g1_mask, other=0.0)
        tl.store(g1_ptrs, g1 + acc1.to(g1.dtype), mask=g1_mask)
    else:
        g_ptrs = g_rows + offs_n.to(tl.int64)[None, :] * stride_gn
        g_mask = row_mask & (offs_n[None, :] < N)
        g = tl.load(g_ptrs, mask=g_mask, other=0.0)
        tl.store(g_ptrs, g + acc.to(g.dtype), mask=g_mask)


#: The autotuned launcher entry. ``restore_value`` is essential: G is accumulated in place, and benchmarking
#: runs the kernel once per config and repetition. ``UPPER`` and ``INPUT_MODE`` join ``M, N, K`` in the key
#: because they change which configs are valid (square blocks) and fastest; tensor dtypes are added by Triton.
pk_accumulate_kernel_autotuned = triton.autotune(
    configs=get_autotune_configs(),
    key=["M", "N", "K", "UPPER", "INPUT_MODE"],
    prune_configs_by={"early_config_prune": prune_configs},
    restore_value=["g_ptr"],
)(pk_accumulate_kernel)


@triton.jit
def loop_probe_kernel(out_ptr, n):
    """``out[0] = n`` by a loop over a runtime int, as the accumulation kernel loops over steps and K: some
    Triton interpreters (3.6 with numpy ≥ 2.4) cannot run such a loop (``TypeError: only 0-dimensional
    arrays can be converted to Python scalars``), which :func:`~pkfast.engine.accumulate.triton_launch.triton_status`
    detects with this kernel."""
    acc = 0
    for _ in range(0, n):
        acc += 1
    tl.store(out_ptr, acc)
