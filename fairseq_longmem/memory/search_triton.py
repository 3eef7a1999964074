"""Fused Triton kernels for the exact two-stage chunk search (``backend="triton"``; the selection
and why it is exact: ``topk.py``). The (B, H, T, C) score tensor is never written.

1. ``_block_max_kernel``: per (row-head, tile of queries, tile of blocks), scores the tile's
   chunks member by member with ``tl.dot`` and keeps the running block maxima in registers;
   writes only the (T, nb) block maxima.
2. ``topk`` over the block maxima (torch) picks the nk blocks per query.
3. ``_refine_kernel``: per (row-head, query), rescores the nk * blk chunks of the kept blocks in
   fp32; ``topk`` over those (torch) gives the exact top nk.

Scores are fp32 (fp32 accumulation of fp16/bf16 products; fp32 inputs in IEEE precision, not
TF32), so results agree with ``matmul`` (which rounds scores to the storage dtype) up to that
rounding, and between the two kernels up to fp32 summation order: only chunks whose scores lie
within such rounding of the cut can differ.

Runs on CUDA. On CPU tensors it runs only through Triton's interpreter (``TRITON_INTERPRET=1`` set
before ``triton`` is imported), slowly: that is how the tests check it on machines without a GPU.
``auto`` does not pick it: no recorded figure shows it faster than ``torch`` on a GPU
(``examples/benchmarks/gpu_device.sh`` measures both).
"""

import os

import torch
import triton
import triton.language as tl

from . import topk

BLOCK_T = 64  # queries per program of the block-max kernel
BLOCK_J = 64  # blocks per program of the block-max kernel


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _block_max_kernel(q_ptr, s_ptr, count_ptr, out_ptr, T, NB, D, BLK,
                      sq_r, sq_t, ss_r, ss_c, so_r, so_t,
                      IEEE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)  # row * H + head
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)  # queries
    j = tl.program_id(2) * BLOCK_J + tl.arange(0, BLOCK_J)  # blocks
    d = tl.arange(0, BLOCK_D)
    cnt = tl.load(count_ptr + r)  # valid chunks of this row: slots [0, cnt)
    q = tl.load(q_ptr + r * sq_r + t[:, None] * sq_t + d[None, :],
                mask=(t[:, None] < T) & (d[None, :] < D), other=0.0)  # (BLOCK_T, BLOCK_D)
    best = tl.full((BLOCK_T, BLOCK_J), float("-inf"), tl.float32)
    for m in range(0, BLK):  # member m of block j is chunk m * NB + j
        c = m * NB + j
        ok = (j < NB) & (c < cnt)
        s = tl.load(s_ptr + r * ss_r + c[:, None] * ss_c + d[None, :],
                    mask=ok[:, None] & (d[None, :] < D), other=0.0)  # (BLOCK_J, BLOCK_D)
        if IEEE:  # fp32 operands: IEEE fp32, not TF32
            sc = tl.dot(q.to(tl.float32), tl.trans(s.to(tl.float32)), input_precision="ieee")
        else:  # fp16/bf16 operands, fp32 accumulation: (BLOCK_T, BLOCK_J)
            sc = tl.dot(q, tl.trans(s))
        best = tl.maximum(best, tl.where(ok[None, :], sc, float("-inf")))
    tl.store(out_ptr + r * so_r + t[:, None] * so_t + j[None, :], best,
             mask=(t[:, None] < T) & (j[None, :] < NB))


@triton.jit
def _refine_kernel(q_ptr, s_ptr, count_ptr, top_ptr, out_ptr, NB, D, BLK, NK,
                   sq_r, sq_t, ss_r, ss_c, st_r, st_t, so_r, so_t,
                   BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)  # row * H + head
    t = tl.program_id(1)  # query
    i = tl.arange(0, BLOCK_K)  # kept block, by rank
    d = tl.arange(0, BLOCK_D)
    cnt = tl.load(count_ptr + r)
    q = tl.load(q_ptr + r * sq_r + t * sq_t + d, mask=d < D, other=0.0).to(tl.float32)
    blocks = tl.load(top_ptr + r * st_r + t * st_t + i, mask=i < NK, other=0)  # (BLOCK_K,)
    for m in range(0, BLK):
        c = m * NB + blocks
        ok = (i < NK) & (c < cnt)
        s = tl.load(s_ptr + r * ss_r + c[:, None] * ss_c + d[None, :],
                    mask=ok[:, None] & (d[None, :] < D), other=0.0).to(tl.float32)
        sc = tl.where(ok, tl.sum(s * q[None, :], axis=1), float("-inf"))  # (BLOCK_K,)
        # candidate m * NK + i, the layout topk.finish_two_stage reads
        tl.store(out_ptr + r * so_r + t * so_t + m * NK + i, sc, mask=i < NK)


def search(queries, summaries, count, nk, max_score_bytes):
    """Top-nk slots (B, H, T, nk) per query, as search.search's backends return them."""
    if queries.device.type != "cuda" and not interpreting():
        raise RuntimeError(
            "backend='triton' runs on CUDA devices (on CPU only under Triton's interpreter, "
            f"TRITON_INTERPRET=1, for tests); the memory is on {queries.device}: use "
            "backend='torch'"
        )
    B, H, T, D = queries.shape
    C = summaries.shape[2]
    layout = topk.block_layout(C, nk)
    if layout is None:  # few chunks: scoring them all is as cheap
        return topk.matmul_topk(queries, summaries, count, nk, max_score_bytes)
    blk, nb = layout
    R, dev = B * H, queries.device
    q = queries.reshape(R, T, D).contiguous()  # (R, T, hd); the kernels index hd with stride 1
    s = summaries.reshape(R, C, D).contiguous()  # (R, C, hd)
    counts = torch.from_numpy(count).to(dev).repeat_interleave(H)  # (R,)
    block_d = max(16, triton.next_power_of_2(D))
    block_k = triton.next_power_of_2(nk)
    # Triton's interpreter (3.9) computes bf16 tl.dot wrongly: there, bf16 operands go through
    # fp32 (exact products); the bf16 path itself is checked on a GPU only
    ieee = queries.dtype == torch.float32 or (interpreting() and queries.dtype == torch.bfloat16)
    # block maxima and candidate scores, fp32, for a block of queries at a time
    tb = max(1, min(T, max_score_bytes // (R * (nb + nk * blk) * 4)))
    slots = torch.empty(B, H, T, nk, dtype=torch.long, device=dev)
    for t0 in range(0, T, tb):
        n = min(tb, T - t0)
        qb = q[:, t0:t0 + n]
        maxima = torch.empty(R, n, nb, dtype=torch.float32, device=dev)
        grid = (R, triton.cdiv(n, BLOCK_T), triton.cdiv(nb, BLOCK_J))
        _block_max_kernel[grid](qb, s, counts, maxima, n, nb, D, blk,
                                qb.stride(0), qb.stride(1), s.stride(0), s.stride(1),
                                maxima.stride(0), maxima.stride(1), IEEE=ieee, BLOCK_T=BLOCK_T,
                                BLOCK_J=BLOCK_J, BLOCK_D=block_d)
        top = maxima.topk(nk, dim=-1, sorted=False).indices  # (R, n, nk)
        del maxima
        cand = torch.empty(R, n, blk * nk, dtype=torch.float32, device=dev)
        _refine_kernel[(R, n)](qb, s, counts, top, cand, nb, D, blk, nk,
                               qb.stride(0), qb.stride(1), s.stride(0), s.stride(1),
                               top.stride(0), top.stride(1), cand.stride(0), cand.stride(1),
                               BLOCK_K=block_k, BLOCK_D=block_d)
        sel = topk.finish_two_stage(cand.view(R, n, blk, nk), top, nk, nb)
        slots[:, :, t0:t0 + n] = sel.view(B, H, n, nk)
    return slots
