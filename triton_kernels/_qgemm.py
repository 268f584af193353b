"""The one quantized GEMM kernel behind fused_moe and quant_linear: C = epilogue(A @ dequant(W)^T).

Rows are either dense (row r of A, quant_linear) or routed (fused_moe: block pid_m holds BLOCK_M
pair ids of one expert, from moe_align_block_size). A row's activation is A[pair // a_div] and its
output row is C[pair // c_div], so the gate/up GEMM reads token rows (a_div = top_k) and writes pair
rows, and the down GEMM reads pair rows and accumulates into token rows (c_div = top_k).
SPLIT_K programs share one output tile, each taking a contiguous range of K tiles, and add their
fp32 partial sums with atomics: that keeps HBM busy when there are few output tiles (decode).
"""

import triton
import triton.language as tl

from .packing import load_dequant_tile

EPILOGUE_STORE = 0  # C = acc (+ bias); fp32 atomics when SPLIT_K > 1
EPILOGUE_SILU_MUL = 1  # W rows interleaved gate/up: C[:, n // 2] = silu(acc[:, n]) * acc[:, n + 1]
EPILOGUE_WEIGHTED_SUM = 2  # C[token] += topk_weight[pair] * acc  (fp32 atomics; sums the top-k)


@triton.jit
def _qgemm_kernel(
    # pointers
    a_ptr, w_ptr, s_ptr, z_ptr, c_ptr, bias_ptr, topk_w_ptr,
    sorted_ids_ptr, block_expert_ptr, num_padded_ptr,  # None for dense rows
    # sizes
    N, K, K_PADDED, num_rows, num_m_blocks, a_div, c_div,
    # strides (the last dimension of every tensor is contiguous)
    stride_am, stride_we, stride_wn, stride_se, stride_sg, stride_cm,
    # constexpr
    BITS: tl.constexpr, GROUP_K: tl.constexpr, GROUP_TILE: tl.constexpr,
    EPILOGUE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr, USE_ASM: tl.constexpr,
):
    # A: [*, K] fp16/bf16   W: packed [E, N, Kp/P]   C: [*, N] (or [*, N/2] for SILU_MUL)
    pid = tl.program_id(0)
    pid_k = pid % SPLIT_K
    pid_mn = pid // SPLIT_K
    # grouped ordering: GROUP_M row blocks sweep the N tiles together, so W tiles are reused in L2
    num_pid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_pid_n
    first_m = (pid_mn // in_group) * GROUP_M
    group_rows = min(num_m_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid_mn % in_group) % group_rows
    pid_n = (pid_mn % in_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if sorted_ids_ptr is not None:
        if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
            return
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        rows = tl.load(sorted_ids_ptr + offs_m)
    else:
        expert = 0
        rows = offs_m
    row_mask = rows < num_rows

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (rows // a_div).to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    w_base = w_ptr + expert * stride_we
    s_base = s_ptr + expert * stride_se
    z_base = z_ptr + expert * stride_se

    k_tiles = K_PADDED // BLOCK_K
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    kt_lo = pid_k * per_split
    kt_hi = min(kt_lo + per_split, k_tiles)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(kt_lo, kt_hi):
        k0 = kt * BLOCK_K
        a = tl.load(a_ptrs + k0, mask=row_mask[:, None] & (offs_k[None, :] < K - k0), other=0.0)
        w = load_dequant_tile(
            w_base, s_base, z_base, offs_n, n_mask, k0, stride_wn, stride_sg,
            BITS, GROUP_K, GROUP_TILE, BLOCK_K, BLOCK_N, a_ptr.dtype.element_ty, USE_ASM,
        )  # [BLOCK_N, BLOCK_K]
        acc = tl.dot(a, tl.trans(w), acc)

    c_rows = (rows // c_div).to(tl.int64)
    if EPILOGUE == 1:
        gate, up = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N // 2, 2)))
        h = gate * tl.sigmoid(gate) * up
        offs_h = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        c_ptrs = c_ptr + c_rows[:, None] * stride_cm + offs_h[None, :]
        tl.store(c_ptrs, h.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & (offs_h[None, :] < N // 2))
    else:
        if EPILOGUE == 2:
            weight = tl.load(topk_w_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
            acc = acc * weight[:, None]
        if bias_ptr is not None:
            bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            acc += bias[None, :] * (pid_k == 0).to(tl.float32)
        c_ptrs = c_ptr + c_rows[:, None] * stride_cm + offs_n[None, :]
        c_mask = row_mask[:, None] & n_mask[None, :]
        if EPILOGUE == 2 or SPLIT_K > 1:
            tl.atomic_add(c_ptrs, acc, mask=c_mask, sem="relaxed")
        else:
            tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


def group_tile(group_size: int, k_padded: int, per_channel: bool, block_k: int) -> tuple[int, int, int]:
    """(GROUP_K, GROUP_TILE, BLOCK_K): shrink BLOCK_K until a tile holds whole groups or lies in one.
    A group tile holds whole word pairs (16 k for int4), so group sizes are powers of two >= 16."""
    if per_channel:
        return k_padded, block_k, block_k
    if group_size < 16:
        raise ValueError(f"group_size must be >= 16 for the GEMM kernels, got {group_size}")
    return group_size, min(group_size, block_k), block_k


def launch(a, w, c, cfg, *, num_rows, num_m_blocks, epilogue, a_div=1, c_div=1,
           bias=None, topk_weights=None, routing=None):
    """Launch _qgemm_kernel over num_m_blocks x N tiles x SPLIT_K; checks are the callers' job."""
    group_k, gtile, block_k = group_tile(w.group_size, w.k_padded, w.per_channel, cfg.block_k)
    grid = (num_m_blocks * triton.cdiv(w.n, cfg.block_n) * cfg.split_k,)
    sorted_ids, block_expert, num_padded = routing if routing is not None else (None, None, None)
    _qgemm_kernel[grid](
        a, w.qweight, w.scales, w.zeros, c, bias, topk_weights,
        sorted_ids, block_expert, num_padded,
        w.n, w.k, w.k_padded, num_rows, num_m_blocks, a_div, c_div,
        a.stride(0), w.qweight.stride(0), w.qweight.stride(1), w.scales.stride(0), w.scales.stride(1),
        c.stride(0),
        BITS=w.bits, GROUP_K=group_k, GROUP_TILE=gtile, EPILOGUE=epilogue,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, SPLIT_K=cfg.split_k, GROUP_M=cfg.group_m,
        USE_ASM=a.is_cuda,  # the interpreter (CPU tensors) cannot run inline PTX
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
