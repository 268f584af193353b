"""Sort (token, expert) pairs by expert and pad each expert's segment to the GEMM's BLOCK_M.

Pairs are numbered p = t * top_k + j for topk_ids[t, j]. The result lets one GEMM program take
BLOCK_M rows that all belong to one expert:
    sorted_ids    int32 [max_blocks * BLOCK_M]  pair ids, stable-sorted by expert; each expert's
                                                segment is padded to a multiple of BLOCK_M with the
                                                sentinel P = T * top_k (also every slot past the end)
    block_expert  int32 [max_blocks]            expert of each block, -1 past num_padded
    num_padded    int32 [1]                     used length of sorted_ids (stays on the device)
max_blocks = ceil((P + min(E, P) * (BLOCK_M - 1)) / BLOCK_M) bounds the block count for any routing,
so the GEMM grid is sized on the host without a device sync. Ids outside [0, E) are dropped.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

CHUNK = 128  # pairs per program
BLOCKS_PER_PROGRAM = 64  # blocks whose expert id / padding each program writes
PREFIX_ROWS = 32  # chunk rows per step of the prefix-sum loop


class AlignedRouting(NamedTuple):
    sorted_ids: torch.Tensor
    block_expert: torch.Tensor
    num_padded: torch.Tensor


def max_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    return -(-(num_pairs + min(num_experts, num_pairs) * (block_m - 1)) // block_m)


@triton.jit
def _chunk_ranks(ids_ptr, offs, P, E, cols):
    # pairs offs [CHUNK] of one chunk: expert e (0 where invalid), valid, onehot [CHUNK, E_PAD] and each
    # valid pair's rank among the chunk's pairs of its expert
    e = tl.load(ids_ptr + offs, mask=offs < P, other=-1)
    valid = (offs < P) & (e >= 0) & (e < E)
    e = tl.where(valid, e, 0).to(tl.int32)
    onehot = ((e[:, None] == cols[None, :]) & valid[:, None]).to(tl.int32)
    rank = tl.sum((tl.cumsum(onehot, axis=0) - onehot) * onehot, axis=1)
    return e, valid, onehot, rank


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, P, E, CHUNK: tl.constexpr, E_PAD: tl.constexpr):
    # counts: [num_chunks, E_PAD] pairs per expert in each chunk
    c = tl.program_id(0)
    cols = tl.arange(0, E_PAD)
    _, _, onehot, _ = _chunk_ranks(ids_ptr, c * CHUNK + tl.arange(0, CHUNK), P, E, cols)
    tl.store(counts_ptr + c * E_PAD + cols, tl.sum(onehot, axis=0))


@triton.jit
def _prefix_kernel(
    counts_ptr, chunk_base_ptr, expert_count_ptr, expert_start_ptr, num_padded_ptr,
    num_chunks,
    BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, ROWS: tl.constexpr,
):
    # One program. chunk_base[c, e]: pairs of expert e in chunks before c (keeps the sort stable).
    cols = tl.arange(0, E_PAD)
    running = tl.zeros([E_PAD], dtype=tl.int32)
    for r0 in range(0, num_chunks, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        offs = rows[:, None] * E_PAD + cols[None, :]
        m = (rows < num_chunks)[:, None]
        cnt = tl.load(counts_ptr + offs, mask=m, other=0)
        tl.store(chunk_base_ptr + offs, tl.cumsum(cnt, axis=0) - cnt + running[None, :], mask=m)
        running += tl.sum(cnt, axis=0)
    padded = (running + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    tl.store(expert_count_ptr + cols, running)
    tl.store(expert_start_ptr + cols, tl.cumsum(padded, axis=0) - padded)
    tl.store(num_padded_ptr, tl.sum(padded, axis=0))


@triton.jit
def _scatter_kernel(
    ids_ptr, chunk_base_ptr, expert_count_ptr, expert_start_ptr, num_padded_ptr,
    sorted_ids_ptr, block_expert_ptr,
    P, E, num_chunks, num_blocks,
    BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, E_PAD: tl.constexpr, BLOCKS: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
):
    # ONE_CHUNK (P <= CHUNK, e.g. decode): every program derives the counts and segment starts from the
    # single chunk itself, so _count_kernel and _prefix_kernel are not launched (chunk_base_ptr,
    # expert_count_ptr and expert_start_ptr are then None).
    c = tl.program_id(0)
    cols = tl.arange(0, E_PAD)
    # 1. a chunk's pairs go to start[e] + (earlier chunks' pairs of e) + (rank within the chunk)
    if ONE_CHUNK:
        offs = tl.arange(0, CHUNK)
        e, valid, onehot, rank = _chunk_ranks(ids_ptr, offs, P, E, cols)
        count_e = tl.sum(onehot, axis=0)
        padded = (count_e + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        start_e = tl.cumsum(padded, axis=0) - padded
        total = tl.sum(padded, axis=0)
        if c == 0:
            start = tl.sum(tl.where(e[:, None] == cols[None, :], start_e[None, :], 0), axis=1)
            tl.store(num_padded_ptr, total)
            tl.store(sorted_ids_ptr + start + rank, offs, mask=valid)
    else:
        if c < num_chunks:
            offs = c * CHUNK + tl.arange(0, CHUNK)
            e, valid, _, rank = _chunk_ranks(ids_ptr, offs, P, E, cols)
            base = tl.load(chunk_base_ptr + c * E_PAD + e, mask=valid, other=0)
            start = tl.load(expert_start_ptr + e, mask=valid, other=0)
            tl.store(sorted_ids_ptr + start + base + rank, offs, mask=valid)
        total = tl.load(num_padded_ptr)
        start_e = tl.load(expert_start_ptr + cols)
        count_e = tl.load(expert_count_ptr + cols)
    # 2. expert of each block, and the sentinel in every slot no pair fills
    end_e = start_e + (count_e + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    blocks = c * BLOCKS + tl.arange(0, BLOCKS)
    first = blocks * BLOCK_M
    # experts are laid out in order, so the block's expert = number of segments ending at or before it
    be = tl.sum((end_e[None, :] <= first[:, None]).to(tl.int32), axis=1)
    inside = first < total
    tl.store(block_expert_ptr + blocks, tl.where(inside, be, -1), mask=blocks < num_blocks)
    be = tl.where(inside, be, 0)
    slots = first[:, None] + tl.arange(0, BLOCK_M)[None, :]  # [BLOCKS, BLOCK_M]
    seg_start = tl.sum(tl.where(be[:, None] == cols[None, :], start_e[None, :], 0), axis=1)
    seg_count = tl.sum(tl.where(be[:, None] == cols[None, :], count_e[None, :], 0), axis=1)
    empty = (slots >= total) | (slots - seg_start[:, None] >= seg_count[:, None])
    tl.store(sorted_ids_ptr + slots, P + tl.zeros_like(slots), mask=empty & (blocks < num_blocks)[:, None])


def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> AlignedRouting:
    """Stable-sort the pairs of topk_ids [T, k] by expert, padding segments to block_m (see module doc)."""
    if topk_ids.dim() != 2 or topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be int32/int64 [T, k], got {topk_ids.dtype} {tuple(topk_ids.shape)}")
    if block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two, got {block_m}")
    ids = topk_ids.reshape(-1).contiguous()
    P, dev = ids.numel(), ids.device
    nb = max(max_blocks(P, num_experts, block_m), 1)
    e_pad = 1 << (num_experts - 1).bit_length()  # next power of two (triton's helper costs ~10 us per host call)
    num_chunks = max(-(-P // CHUNK), 1)
    num_padded = torch.empty(1, dtype=torch.int32, device=dev)
    sorted_ids = torch.empty(nb * block_m, dtype=torch.int32, device=dev)
    block_expert = torch.empty(nb, dtype=torch.int32, device=dev)
    one_chunk = num_chunks == 1
    if one_chunk:  # decode: one launch instead of three
        chunk_base = expert_count = expert_start = None
    else:
        counts = torch.empty(num_chunks, e_pad, dtype=torch.int32, device=dev)
        chunk_base = torch.empty_like(counts)
        expert_count = torch.empty(e_pad, dtype=torch.int32, device=dev)
        expert_start = torch.empty_like(expert_count)
        _count_kernel[(num_chunks,)](ids, counts, P, num_experts, CHUNK=CHUNK, E_PAD=e_pad)
        _prefix_kernel[(1,)](
            counts, chunk_base, expert_count, expert_start, num_padded, num_chunks,
            BLOCK_M=block_m, E_PAD=e_pad, ROWS=PREFIX_ROWS,
        )
    grid = (max(num_chunks, -(-nb // BLOCKS_PER_PROGRAM)),)
    _scatter_kernel[grid](
        ids, chunk_base, expert_count, expert_start, num_padded, sorted_ids, block_expert,
        P, num_experts, num_chunks, nb,
        BLOCK_M=block_m, CHUNK=CHUNK, E_PAD=e_pad, BLOCKS=BLOCKS_PER_PROGRAM, ONE_CHUNK=one_chunk,
    )
    return AlignedRouting(sorted_ids, block_expert, num_padded)


def moe_align_block_size_torch(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> AlignedRouting:
    """Torch twin of moe_align_block_size: identical outputs."""
    flat = topk_ids.reshape(-1).long()
    P, dev = flat.numel(), flat.device
    nb = max(max_blocks(P, num_experts, block_m), 1)
    valid = (flat >= 0) & (flat < num_experts)
    pair = torch.arange(P, device=dev)[valid]
    e = flat[valid]
    order = torch.argsort(e, stable=True)
    pair, e = pair[order], e[order]
    counts = torch.bincount(e, minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    start = torch.cumsum(padded, 0) - padded
    rank = torch.arange(e.numel(), device=dev) - (torch.cumsum(counts, 0) - counts)[e]
    sorted_ids = torch.full((nb * block_m,), P, dtype=torch.int32, device=dev)
    sorted_ids[start[e] + rank] = pair.to(torch.int32)
    block_expert = torch.full((nb,), -1, dtype=torch.int32, device=dev)
    used = torch.repeat_interleave(torch.arange(num_experts, device=dev), padded // block_m)
    block_expert[: used.numel()] = used.to(torch.int32)
    num_padded = padded.sum().reshape(1).to(torch.int32)
    return AlignedRouting(sorted_ids, block_expert, num_padded)
