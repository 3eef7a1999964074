"""Exact top-k chunk search for the memory bank: the backends, the one list of their names, and
which one ``auto`` picks (``torch`` on every device).

Every backend returns, per (row b, head h, query t), the ``nk`` ring-buffer slots with the largest
``<query, chunk summary>`` among the row's valid slots ``[0, count[b])``, in descending score
order, and -1 for missing slots (a row holding fewer than nk chunks). They agree with ``matmul``
(the reference: all scores, then ``topk``) up to the order of tied scores and, where they
compute scores in another precision or summation order (triton, faiss), up to that rounding.

Backends (``BACKENDS``; the model's ``--search-backend`` and the benchmarks use this list):

- ``torch``: the exact two-stage selection (``topk.py``), in plain torch. On CPU it walks the (row, head)
  pairs in tiles of queries whose scores fit in cache, with no B x H x T x C score tensor; on
  CUDA it scores blocks of queries over all rows at once.
- ``matmul``: all scores with one matmul, then ``topk`` (the reference the others are tested
  against).
- ``triton``: fused kernels (``search_triton.py``) that keep block maxima in registers and never
  write the score tensor, then rescore the kept blocks; CUDA only (CPU only through Triton's
  interpreter, for tests); needs ``triton`` (shipped with CUDA builds of torch).
- ``faiss``: ``faiss.knn`` over our own CPU storage, ``faiss.knn_gpu`` on CUDA.
- ``auto``: ``torch`` on every device. On CPU it is the fastest measured (docs/BENCHMARKS.md,
  "Exact search"). On CUDA the choice rests on reasoning, not on a measurement: it writes no
  score tensor and needs no extra package. ``examples/benchmarks/gpu_device.sh`` compares the
  backends on a GPU; its figures are what a change of this choice should rest on.

The selection primitives every backend shares (the ``matmul`` reference and the exact
two-stage selection, with why it is exact) are in ``topk.py``.
"""

import numpy as np
import torch

from .topk import (
    block_layout,
    invalid_columns,
    matmul_topk,
    query_block,
    select_two_stage,
)

BACKENDS = ("auto", "torch", "matmul", "triton", "faiss")

# Queries per score tile of the CPU two-stage search: as many as fill CPU_TILE_BYTES (about a
# core's L2 cache, so that a tile is scored, reduced and selected without going to memory), but at
# least CPU_MIN_TILE_QUERIES, so that reading a head's (C, hd) summaries once per tile stays small
# against writing the tile's scores when C is large. Measured at C = 4k-65k chunks, hd = 32-64
# (docs/BENCHMARKS.md, "Exact search").
CPU_TILE_BYTES = 2**20
CPU_MIN_TILE_QUERIES = 64

_faiss_gpu_resources = None


def resolve(backend: str) -> str:
    """The backend that ``backend`` stands for: ``auto`` is ``torch`` on every device (measured
    fastest on CPU; on CUDA the module docstring says why)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown search backend {backend!r}; expected one of {BACKENDS}")
    return "torch" if backend == "auto" else backend


def search(backend, queries, summaries, count, nk, max_score_bytes):
    """Top-nk slots per query with a resolved ``backend``.

    queries: (B, H, T, hd) in the storage dtype and device; summaries: (B, H, C, hd);
    count: numpy (B,) valid chunks per row; returns (B, H, T, nk) long, -1 = missing.
    """
    if backend == "torch":
        if queries.device.type == "cpu":
            slots = _two_stage_tiled(queries, summaries, count, nk)
        else:
            slots = _two_stage_batched(queries, summaries, count, nk, max_score_bytes)
    elif backend == "matmul":
        slots = matmul_topk(queries, summaries, count, nk, max_score_bytes)
    elif backend == "triton":
        from . import search_triton

        slots = search_triton.search(queries, summaries, count, nk, max_score_bytes)
    elif backend == "faiss":
        if queries.device.type == "cuda":
            return _faiss_gpu_search(queries, summaries, count, nk)
        return _faiss_cpu_search(queries, summaries, count, nk)
    else:
        raise ValueError(f"unknown search backend {backend!r}; expected one of {BACKENDS}")
    if bool((count < nk).any()):
        # topk had to pick empty slots for rows with fewer than nk chunks
        counts = torch.from_numpy(count).to(slots.device, non_blocking=True)
        slots.masked_fill_(slots >= counts[:, None, None, None], -1)
    return slots


def check_backend(backend: str):
    """Fail at construction, not at the first search, when a backend's package is missing."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "faiss":
        import_faiss()
    elif backend == "triton":
        import_triton()


# ---------------------------------------------------------------- two-stage selection


def _two_stage_tiled(queries, summaries, count, nk):
    """CPU: per (row, head), queries in tiles whose scores fit in ``CPU_TILE_BYTES``."""
    B, H, T, _ = queries.shape
    slots = torch.full((B, H, T, nk), -1, dtype=torch.long)
    neg_inf = float("-inf")
    for b in range(B):
        cnt = int(count[b])
        if cnt == 0:
            continue
        layout = block_layout(cnt, nk)
        if layout is None:  # small row: one topk over all its chunks, every head at once
            scores = torch.matmul(queries[b], summaries[b, :, :cnt].transpose(1, 2))  # (H, T, cnt)
            k = min(nk, cnt)
            slots[b, :, :, :k] = scores.topk(k, dim=-1, sorted=True).indices
            continue
        blk, nb = layout
        W = blk * nb  # >= cnt; columns [cnt, W) stay -inf
        tq = min(T, max(CPU_MIN_TILE_QUERIES, CPU_TILE_BYTES // (W * queries.element_size())))
        tile = torch.empty(1, tq, W, dtype=queries.dtype)
        tile[:, :, cnt:] = neg_inf
        for h in range(H):
            summ_t = summaries[b, h, :cnt].t()  # (hd, cnt)
            for t0 in range(0, T, tq):
                n = min(tq, T - t0)
                scores = tile[:, :n]  # (1, n, W)
                torch.mm(queries[b, h, t0:t0 + n], summ_t, out=scores[0, :, :cnt])
                slots[b, h, t0:t0 + n] = select_two_stage(scores, nk, blk, nb)[0]
    return slots


def _two_stage_batched(queries, summaries, count, nk, max_score_bytes):
    """CUDA: every (row, head) at once, in blocks of queries (bounded score memory)."""
    B, H, T, _ = queries.shape
    C = summaries.shape[2]
    layout = block_layout(C, nk)
    if layout is None:
        return matmul_topk(queries, summaries, count, nk, max_score_bytes)
    blk, nb = layout
    W = blk * nb
    mask = bool((count < C).any()) or W > C
    invalid = invalid_columns(count, W, queries.device) if mask else None
    summ_t = summaries.transpose(2, 3)  # (B, H, hd, C)
    tb = query_block(B, H, T, W, queries.element_size(), max_score_bytes)
    slots = torch.empty(B, H, T, nk, dtype=torch.long, device=queries.device)
    for t0 in range(0, T, tb):
        n = min(tb, T - t0)
        scores = torch.empty(B, H, n, W, dtype=queries.dtype, device=queries.device)
        torch.matmul(queries[:, :, t0:t0 + n], summ_t, out=scores[..., :C])
        if mask:
            scores.masked_fill_(invalid, float("-inf"))
        sel = select_two_stage(scores.view(B * H, n, W), nk, blk, nb)
        slots[:, :, t0:t0 + n] = sel.view(B, H, n, nk)
    return slots


# ---------------------------------------------------------------- faiss


def import_faiss():
    try:
        import faiss  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "the faiss memory-bank backend needs faiss: pip install faiss-cpu "
            "(or faiss-gpu-cu12 on CUDA machines), or use backend='torch'"
        ) from e
    return faiss


def import_triton():
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "the triton memory-bank backend needs triton, which CUDA builds of torch ship "
            "(pip install triton), or use backend='torch'"
        ) from e
    return triton


def _faiss_gpu():
    """faiss with torch interop and the process-wide StandardGpuResources (created once)."""
    global _faiss_gpu_resources
    faiss = import_faiss()
    if not hasattr(faiss, "StandardGpuResources"):
        raise RuntimeError(
            "backend='faiss' on a CUDA device needs a faiss build with GPU support "
            "(pip install faiss-gpu-cu12); the installed faiss is CPU-only. Use backend='torch'."
        )
    import faiss.contrib.torch_utils  # noqa: F401  (lets knn_gpu take torch tensors)

    if _faiss_gpu_resources is None:
        _faiss_gpu_resources = faiss.StandardGpuResources()
    return faiss, _faiss_gpu_resources


def _faiss_cpu_search(queries, summaries, count, nk):
    faiss = import_faiss()
    B, H, T, _ = queries.shape
    slots = np.full((B, H, T, nk), -1, dtype=np.int64)
    q = queries.float().contiguous().numpy()  # (B, H, T, hd)
    for b in range(B):
        cnt = int(count[b])
        if cnt == 0 or T == 0:
            continue
        kk = min(nk, cnt)
        xb_all = summaries[b, :, :cnt].float().contiguous().numpy()  # (H, cnt, hd)
        for h in range(H):
            _, idx = faiss.knn(q[b, h], xb_all[h], kk, metric=faiss.METRIC_INNER_PRODUCT)
            slots[b, h, :, :kk] = idx
    return torch.from_numpy(slots)


def _faiss_gpu_search(queries, summaries, count, nk):
    faiss, res = _faiss_gpu()
    B, H, T, _ = queries.shape
    device = queries.device
    slots = torch.full((B, H, T, nk), -1, dtype=torch.long, device=device)
    # faiss GPU brute force takes fp32/fp16 torch tensors; bf16 goes through fp32
    dt = torch.float16 if queries.dtype == torch.float16 else torch.float32
    q = queries.to(dt)
    for b in range(B):
        cnt = int(count[b])
        if cnt == 0 or T == 0:
            continue
        kk = min(nk, cnt)
        for h in range(H):
            xb = summaries[b, h, :cnt].to(dt).contiguous()
            _, idx = faiss.knn_gpu(res, q[b, h].contiguous(), xb, kk,
                                   metric=faiss.METRIC_INNER_PRODUCT, device=device.index or 0)
            slots[b, h, :, :kk] = idx
    return slots
