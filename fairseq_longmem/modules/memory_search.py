"""Exact top-k chunk search for the memory bank: the backends, the one list of their names, and
which one ``auto`` picks per device.

Every backend returns, per (row b, head h, query t), the ``nk`` ring-buffer slots with the largest
``<query, chunk summary>`` among the row's valid slots ``[0, count[b])``, in descending score
order, and -1 for missing slots (a row holding fewer than nk chunks).

Backends (``BACKENDS``; the model's ``--search-backend`` and the benchmarks use this list):
``torch`` (matmul + topk on the storage device, query dimension blocked to bound memory) and
``faiss`` (``faiss.knn`` over our own CPU storage, ``knn_gpu`` on CUDA when the installed faiss
has GPU support). ``auto`` picks ``torch`` on every device: on the 2-core CPU where it was
measured it was faster than faiss at every memory size of the benchmark (docs/BENCHMARKS.md,
"Memory bank"); on CUDA it needs no extra package and no host synchronisation (faiss GPU could not
be measured). Both backends return the same chunks, ties aside.
"""

import numpy as np
import torch

BACKENDS = ("auto", "torch", "faiss")

_faiss_gpu_resources = None


def resolve(backend: str, device: torch.device) -> str:
    """The backend that ``backend`` stands for on ``device`` (``auto`` -> per device)."""
    if backend != "auto":
        return backend
    return "torch"  # fastest measured on CPU; on CUDA, no extra package and no host sync


def search(backend, queries, summaries, count, nk, max_score_bytes):
    """Top-nk slots per query with a resolved ``backend``.

    queries: (B, H, T, hd) in the storage dtype and device; summaries: (B, H, C, hd);
    count: numpy (B,) valid chunks per row; returns (B, H, T, nk) long, -1 = missing.
    """
    if backend == "torch":
        slots = _matmul_topk(queries, summaries, count, nk, max_score_bytes)
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


def _query_block(B, H, T, width, element_size, max_score_bytes):
    """Queries per block so that a (B, H, block, width) score tensor stays under the bound."""
    return max(1, min(T, max_score_bytes // max(B * H * width * element_size, 1)))


def _invalid_columns(count, width, device):
    """(B, 1, 1, width) bool: slots a row does not hold (>= its count), padding included."""
    counts = torch.from_numpy(count).to(device, non_blocking=True)
    return (torch.arange(width, device=device)[None, :] >= counts[:, None])[:, None, None, :]


def _matmul_topk(queries, summaries, count, nk, max_score_bytes):
    """The reference: all (B, H, T, C) scores (in blocks of queries), then topk."""
    B, H, T, _ = queries.shape
    C = summaries.shape[2]
    partial = bool((count < C).any())
    invalid = _invalid_columns(count, C, queries.device) if partial else None
    summ_t = summaries.transpose(2, 3)  # (B, H, hd, C)
    tb = _query_block(B, H, T, C, queries.element_size(), max_score_bytes)
    slots = torch.empty(B, H, T, nk, dtype=torch.long, device=queries.device)
    for t0 in range(0, T, tb):
        scores = torch.matmul(queries[:, :, t0:t0 + tb], summ_t)  # (B, H, tb, C)
        if partial:
            scores.masked_fill_(invalid, float("-inf"))
        slots[:, :, t0:t0 + tb] = scores.topk(nk, dim=-1, sorted=True).indices
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
