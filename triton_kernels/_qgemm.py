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

from .packing import (TILE_K, join_slices, k_tile_offset, kernel_words, load_scale_zero, slice_k_offsets,
                      unpack_offset, unpack_slice, weight_tile_ptrs)

EPILOGUE_STORE = 0  # C = acc (+ bias); fp32 atomics when SPLIT_K > 1
EPILOGUE_SILU_MUL = 1  # W rows interleaved gate/up: C[:, n // 2] = silu(acc[:, n]) * acc[:, n + 1]
EPILOGUE_WEIGHTED_SUM = 2  # C[token] += topk_weight[pair] * acc  (fp32 atomics; sums the top-k)


@triton.jit
def _mma(a, w, acc, SWAP_AB: tl.constexpr):
    # a [BLOCK_M, k], w [BLOCK_N, k] -> acc + (w a^T if SWAP_AB else a w^T)
    if SWAP_AB:
        out = tl.dot(w, tl.trans(a), acc)
    else:
        out = tl.dot(a, tl.trans(w), acc)
    return out


@triton.jit
def _load_a(a_rows, ak, row_mask, K, EVEN_K: tl.constexpr):
    # [BLOCK_M, len(ak)] activations at columns ak
    if EVEN_K:
        a = tl.load(a_rows + ak[None, :], mask=row_mask[:, None], other=0.0)
    else:
        a = tl.load(a_rows + ak[None, :], mask=row_mask[:, None] & (ak[None, :] < K), other=0.0)
    return a


@triton.jit
def _dequant(w, s, zo, DT: tl.constexpr):
    # [BLOCK_N, k] OFFSET + q -> DT weights; the difference is exact, the product rounds once
    return (w - zo.to(DT)[:, None]) * s.to(DT)[:, None]


@triton.jit
def _close_group(part, asum, s, zo, SWAP_AB: tl.constexpr, SUB_ZERO: tl.constexpr):
    # the group's contribution s * (P - (OFFSET + z) * sum_k a), or s * P where P is already on q - z;
    # s, zo [BLOCK_N], asum [BLOCK_M, KW] (summed here)
    if SUB_ZERO:
        if SWAP_AB:
            out = s[:, None] * part
        else:
            out = s[None, :] * part
    else:
        asum = tl.sum(asum, axis=1)
        if SWAP_AB:
            out = s[:, None] * (part - zo[:, None] * asum[None, :])
        else:
            out = s[None, :] * (part - asum[:, None] * zo[None, :])
    return out


@triton.jit
def _qgemm_kernel(
    # pointers
    a_ptr, w_ptr, s_ptr, z_ptr, c_ptr, bias_ptr, topk_w_ptr,
    sorted_ids_ptr, block_expert_ptr, num_padded_ptr,  # None for dense rows
    # sizes
    N, K, K_PADDED, num_rows, num_m_blocks, a_div, c_div,
    # strides (the last dimension of every tensor is contiguous)
    stride_am, stride_we, stride_wt, stride_se, stride_sg, stride_cm,
    # constexpr
    BITS: tl.constexpr, GROUP_K: tl.constexpr, OFFSET: tl.constexpr, ZERO: tl.constexpr, EPILOGUE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr, SWAP_AB: tl.constexpr, INT_MMA: tl.constexpr,
    K_UNROLL: tl.constexpr, UNPACK_ASM: tl.constexpr, EVEN_K: tl.constexpr, JOIN_SLICES: tl.constexpr,
    SUB_ZERO: tl.constexpr,
):
    # A: [*, K] fp16/bf16   W: packed words of kernel_words(packed) (tiles of TILE_N rows x TILE_K k)
    # C: [*, N] (or [*, N/2] for SILU_MUL)
    # GROUP_K: group size, 0 for per-channel; OFFSET: see packing.unpack_offset; ZERO: see load_scale_zero
    # K_UNROLL: K tiles per iteration of the pipelined loop (Triton unrolls it), so their loads issue together
    # EVEN_K: K == K_PADDED, so the activation loads need no K mask (every real model's shapes; the masks
    # cost 7% of a decode K tile's instructions)
    # Each K tile is split into slices s (int4: nibble s of every word, 16-k runs; int8 has one), each
    # an MMA of its own; unpack_slice gives OFFSET + q with elementwise ops only (UNPACK_ASM: inline PTX).
    # SWAP_AB (decode) computes acc^T = W . A^T: the weight tile is the wgmma A operand, fed from
    # registers, and the few token rows are its N (>= 16).
    # INT_MMA: the integers go into the MMA as they are, P = (OFFSET + q) . a, and once per group
    # acc += s * (P - (OFFSET + z) * sum_k a): zero point and offset come off through the
    # activations' row sums and the scale is applied in fp32, so a weight costs a mask and an OR.
    # SUB_ZERO (with INT_MMA): P = (q - z) . a instead, one exact subtraction per pair of weights, and
    # acc += s * P: no row sums, whose reduction across threads costs shared memory and barriers.
    # Otherwise each weight is dequantized, W = DT(DT(OFFSET + q - (OFFSET + z)) * DT(s)).
    DT: tl.constexpr = a_ptr.dtype.element_ty
    SLICES: tl.constexpr = 4 if BITS == 4 else 1
    KW: tl.constexpr = BLOCK_K // SLICES  # words of a row of the weight tile
    PER_CHANNEL: tl.constexpr = GROUP_K == 0
    # A K tile lies in one group (BLOCK_K <= GROUP_K): its scales and zeros are loaded one tile ahead, so their
    # latency hides behind the current tile's MMAs (H100: 1.05-1.35x at 64-4096 rows; decode: int4 +-1%, int8 2-4%)
    TILE_GROUP: tl.constexpr = (not PER_CHANNEL) and GROUP_K >= BLOCK_K
    # JOIN_SLICES: the dequantized slices are joined back into natural k order, one [BLOCK_N, BLOCK_K] operand
    # and one MMA: one wgmma wait per K tile instead of one per slice when the tile is the shared-memory
    # operand (no swap; sm_90 SASS). Dequantized int4 tiles in one group only; elsewhere the flag changes nothing.
    JOINED: tl.constexpr = JOIN_SLICES and SLICES == 4 and (not INT_MMA) and (PER_CHANNEL or TILE_GROUP)
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
    a_rows = a_ptr + (rows // a_div).to(tl.int64)[:, None] * stride_am
    w_ptrs = weight_tile_ptrs(w_ptr + expert * stride_we, offs_n, stride_wt, BITS, BLOCK_K)  # [BLOCK_N, KW]
    s_ptrs = s_ptr + expert * stride_se + offs_n
    z_ptrs = z_ptr + expert * stride_se + offs_n

    k_tiles = K_PADDED // BLOCK_K
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    kt_lo = pid_k * per_split
    kt_hi = min(kt_lo + per_split, k_tiles)
    if PER_CHANNEL:
        s, zo = load_scale_zero(s_ptrs, z_ptrs, n_mask, OFFSET, ZERO)
    if TILE_GROUP:
        g = min(kt_lo, k_tiles - 1) * BLOCK_K // GROUP_K
        s, zo = load_scale_zero(s_ptrs + g * stride_sg, z_ptrs + g * stride_sg, n_mask, OFFSET, ZERO)
    # acc (and part, the open group of INT_MMA) is [BLOCK_N, BLOCK_M] if SWAP_AB else [BLOCK_M, BLOCK_N]
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    part = tl.zeros_like(acc)
    asum = tl.zeros((BLOCK_M, KW), dtype=tl.float32)  # the open group's activations, summed over slices
    for kt in tl.range(kt_lo, kt_hi, loop_unroll_factor=K_UNROLL):
        k0 = kt * BLOCK_K
        raw = tl.load(w_ptrs + k_tile_offset(k0, BITS), mask=n_mask[:, None], other=0)  # [BLOCK_N, KW] words
        if TILE_GROUP:
            g_next = min(kt + 1, kt_hi - 1) * BLOCK_K // GROUP_K
            s_next, zo_next = load_scale_zero(s_ptrs + g_next * stride_sg, z_ptrs + g_next * stride_sg, n_mask,
                                              OFFSET, ZERO)
        if JOINED:
            a = _load_a(a_rows, k0 + tl.arange(0, BLOCK_K), row_mask, K, EVEN_K)
            w = join_slices(_dequant(unpack_slice(raw, 0, BITS, DT, UNPACK_ASM), s, zo, DT),
                            _dequant(unpack_slice(raw, 1, BITS, DT, UNPACK_ASM), s, zo, DT),
                            _dequant(unpack_slice(raw, 2, BITS, DT, UNPACK_ASM), s, zo, DT),
                            _dequant(unpack_slice(raw, 3, BITS, DT, UNPACK_ASM), s, zo, DT))
            acc = _mma(a, w, acc, SWAP_AB)
        else:
            for sl in tl.static_range(SLICES):
                ak = slice_k_offsets(k0, BITS, sl, BLOCK_K)
                a = _load_a(a_rows, ak, row_mask, K, EVEN_K)
                w = unpack_slice(raw, sl, BITS, DT, UNPACK_ASM)  # [BLOCK_N, KW]: OFFSET + q
                # a slice lies in one group (block_k_for() sizes BLOCK_K so); INT_MMA closes it at the group's
                # end. Tiles of two groups (int4, groups of 32: slices 0-1 and 2-3) load each group's scales here.
                if (not PER_CHANNEL) and (not TILE_GROUP):
                    if sl * 16 % GROUP_K == 0:
                        g = (k0 + sl * 16) // GROUP_K
                        s, zo = load_scale_zero(s_ptrs + g * stride_sg, z_ptrs + g * stride_sg, n_mask, OFFSET, ZERO)
                if INT_MMA:
                    if SUB_ZERO:
                        part = _mma(a, w - zo.to(DT)[:, None], part, SWAP_AB)  # q - z, exact
                    else:
                        part = _mma(a, w, part, SWAP_AB)
                        asum += a.to(tl.float32)
                    if not PER_CHANNEL:
                        if (sl == SLICES - 1) or ((sl + 1) * 16 % GROUP_K == 0):
                            acc += _close_group(part, asum, s, zo, SWAP_AB, SUB_ZERO)
                            part = tl.zeros_like(part)
                            asum = tl.zeros_like(asum)
                else:
                    acc = _mma(a, _dequant(w, s, zo, DT), acc, SWAP_AB)
        if TILE_GROUP:
            s, zo = s_next, zo_next
    if INT_MMA and PER_CHANNEL:
        acc = _close_group(part, asum, s, zo, SWAP_AB, SUB_ZERO)
    if SWAP_AB:
        acc = tl.trans(acc)  # [BLOCK_M, BLOCK_N]

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


def block_k_for(group_size: int, per_channel: bool, bits: int, block_k: int) -> int:
    """BLOCK_K such that each slice of a K tile lies in one quantization group.

    An int4 tile is whole 64-k chunks of the layout, whose slices cover 16 of every 64 k: so
    64 <= BLOCK_K <= group_size, or 64 for groups of 32 (slices 0-1 and 2-3 are then a group each).
    int8 tiles need BLOCK_K <= group_size.
    """
    min_k = 64 if bits == 4 else 16
    if block_k > TILE_K:
        raise ValueError(f"block_k={block_k} exceeds the stored weight tiles' {TILE_K} k (packing.TILE_K)")
    if per_channel:
        return max(block_k, min_k)
    if group_size < 32 or group_size & (group_size - 1):
        raise ValueError(f"the GEMM kernels need a power-of-two group_size >= 32, got {group_size}")
    return max(min(block_k, group_size), min_k)


def launch(a, w, c, cfg, *, num_rows, num_m_blocks, epilogue, a_div=1, c_div=1,
           bias=None, topk_weights=None, routing=None):
    """Launch _qgemm_kernel over num_m_blocks x N tiles x SPLIT_K; checks are the callers' job."""
    block_k = block_k_for(w.group_size, w.per_channel, w.bits, cfg.block_k)
    group_k = 0 if w.per_channel else w.group_size
    grid = (num_m_blocks * -(-w.n // cfg.block_n) * cfg.split_k,)  # plain ints: triton.cdiv costs ~10 us on the host
    sorted_ids, block_expert, num_padded = routing if routing is not None else (None, None, None)
    words = kernel_words(w)
    _qgemm_kernel[grid](
        a, words, w.scales, w.zeros, c, bias, topk_weights,
        sorted_ids, block_expert, num_padded,
        w.n, w.k, w.k_padded, num_rows, num_m_blocks, a_div, c_div,
        a.stride(0), words.stride(0), words.stride(1), w.scales.stride(0), w.scales.stride(1),
        c.stride(0),
        BITS=w.bits, GROUP_K=group_k, OFFSET=unpack_offset(w.bits, a.dtype), ZERO=w.kernel_zero, EPILOGUE=epilogue,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, SPLIT_K=cfg.split_k, GROUP_M=cfg.group_m,
        SWAP_AB=cfg.swap_ab, INT_MMA=cfg.int_mma, K_UNROLL=cfg.k_unroll, UNPACK_ASM=a.is_cuda,
        EVEN_K=w.k == w.k_padded, JOIN_SLICES=cfg.join_slices, SUB_ZERO=cfg.sub_zero, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, maxnreg=cfg.max_regs,
    )
