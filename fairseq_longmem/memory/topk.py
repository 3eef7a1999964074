"""Exact top-k chunk selection shared by every search backend (``search.py``,
``search_triton.py``): the reference (all scores, then ``topk``) and the two-stage selection.

Two-stage selection (exact). The chunks are split into ``nb`` blocks of ``blk`` chunks; for each
query take each block's maximum score, keep the ``nk`` blocks with the largest maxima, then
take the exact top ``nk`` among the ``nk * blk`` chunks of those blocks. Why this is exact: the
kept blocks' argmax chunks are ``nk`` distinct chunks all scoring at least m, the smallest kept
maximum, so the true nk-th best score v satisfies v >= m. Every chunk of a block that was not
kept scores at most its block's maximum <= m <= v. So every chunk scoring more than v lies in
a kept block, and the kept blocks hold at least nk chunks scoring >= v: the top nk among the
kept blocks' chunks have exactly the true top-nk scores; only which of several chunks tied at v
is returned can differ. Rows with fewer valid chunks than ``nk``: invalid slots score -inf,
every block holding a valid chunk has a finite maximum and is kept, so every valid chunk is a
candidate; the -inf picks are then marked -1. Block j holds chunks ``j, j + nb, j + 2 nb, ...``
(strided, so a block maximum is an elementwise maximum of ``blk`` contiguous rows of the score
tile, which vectorises); ``blk ~ sqrt(C / nk)`` balances the two ``topk`` calls (``nb`` and
``nk * blk`` scores per query instead of ``C``).
"""

import math

import torch


def block_layout(num_chunks: int, nk: int):
    """(blk, nb) for the two-stage selection over ``num_chunks`` chunks, or None for fewer than
    16 nk chunks, where the blocks would be too few to leave much out (one topk then)."""
    if num_chunks < 16 * nk:
        return None
    blk = 2 ** round(math.log2(math.sqrt(num_chunks / nk)))
    return blk, -(-num_chunks // blk)


def select_two_stage(scores, nk: int, blk: int, nb: int):
    """Exact top-nk chunk indices of ``scores`` (R, n, nb * blk), descending; padding columns must
    hold -inf. Block j holds chunks j + m * nb, m < blk (module docstring)."""
    R, n, W = scores.shape
    v = scores.view(R, n, blk, nb)  # v[..., m, j] = score of chunk m * nb + j
    top = v.amax(dim=2).topk(nk, dim=-1, sorted=False).indices  # (R, n, nk) kept blocks
    cand = v.gather(3, top.unsqueeze(2).expand(R, n, blk, nk))  # (R, n, blk, nk)
    return finish_two_stage(cand, top, nk, nb)


def finish_two_stage(cand, top, nk: int, nb: int):
    """Second stage: ``cand`` (R, n, blk, nk) = scores of member m of kept block ``top[..., i]``;
    returns the chunk indices of the top nk candidates, descending."""
    R, n, blk, _ = cand.shape
    best = cand.reshape(R, n, blk * nk).topk(nk, dim=-1).indices  # (R, n, nk) into (blk, nk)
    return (best // nk) * nb + top.gather(2, best % nk)  # chunk = member * nb + block


def query_block(B, H, T, width, element_size, max_score_bytes):
    """Queries per block so that a (B, H, block, width) score tensor stays under the bound."""
    return max(1, min(T, max_score_bytes // max(B * H * width * element_size, 1)))


def invalid_columns(count, width, device):
    """(B, 1, 1, width) bool: slots a row does not hold (>= its count), padding included."""
    counts = torch.from_numpy(count).to(device, non_blocking=True)
    return (torch.arange(width, device=device)[None, :] >= counts[:, None])[:, None, None, :]


def matmul_topk(queries, summaries, count, nk, max_score_bytes):
    """The reference: all (B, H, T, C) scores (in blocks of queries), then topk."""
    B, H, T, _ = queries.shape
    C = summaries.shape[2]
    partial = bool((count < C).any())
    invalid = invalid_columns(count, C, queries.device) if partial else None
    summ_t = summaries.transpose(2, 3)  # (B, H, hd, C)
    tb = query_block(B, H, T, C, queries.element_size(), max_score_bytes)
    slots = torch.empty(B, H, T, nk, dtype=torch.long, device=queries.device)
    for t0 in range(0, T, tb):
        scores = torch.matmul(queries[:, :, t0:t0 + tb], summ_t)  # (B, H, tb, C)
        if partial:
            scores.masked_fill_(invalid, float("-inf"))
        slots[:, :, t0:t0 + tb] = scores.topk(nk, dim=-1, sorted=True).indices
    return slots
