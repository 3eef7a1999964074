"""Every search backend against a brute-force reference: random data, ties, partly filled rows,
rows of different fill, a capacity that is not a multiple of the block, fp16/bf16 storage; CPU."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fairseq_longmem.memory import search as memory_search
from fairseq_longmem.memory import topk
from fairseq_longmem.memory.bank import ChunkedMemoryBank
from search_reference import CASES, assert_exact_top_k, chunk_scores, make_bank, queries_for

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def cpu_backends():
    """The backends a CPU machine runs (triton: tests/test_memory_triton.py)."""
    out = ["torch", "matmul", "auto"]
    try:
        import faiss  # noqa: F401

        out.append("faiss")
    except ImportError:
        pass
    return out


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("k", sorted(CASES))
def test_backends_match_brute_force(backend, dtype, ties, k):
    msz, fills = CASES[k]
    bank = make_bank(fills, msz=msz, dtype=dtype, ties=ties, seed=1)
    bank.backend = backend
    queries = queries_for(ties, (4, 2, 7, 8), seed=2)
    assert_exact_top_k(bank, queries, k, bank.search(queries, k))


@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("k", sorted(CASES))
def test_torch_differs_from_matmul_topk_only_in_ties(ties, k):
    msz, fills = CASES[k]
    bank = make_bank(fills, msz=msz, ties=ties, seed=3)
    queries = queries_for(ties, (4, 2, 9, 8), seed=4)
    bank.backend = "matmul"
    ref = bank.search(queries, k)
    bank.backend = "torch"
    res = bank.search(queries, k)
    assert torch.equal(res.mask, ref.mask)
    # small integers score exactly in fp32: the scores rank by rank are identical
    s_ref = chunk_scores(bank, queries, ref.chunk_index)
    assert torch.equal(chunk_scores(bank, queries, res.chunk_index), s_ref)
    if not ties:
        assert torch.equal(res.chunk_index, ref.chunk_index)  # no ties: the very same chunks
    else:  # the data does tie across the cut: the nk-th best score recurs below it
        nk = k // 4
        full = chunk_scores(bank, queries, torch.arange(bank.capacity).expand(4, 2, 9, -1))[3]
        nth = full.sort(dim=-1, descending=True).values[..., nk - 1: nk + 1]
        assert (nth[..., 0] == nth[..., 1]).any()


def test_cpu_tiles_and_cuda_query_blocks_do_not_change_results(monkeypatch):
    bank = make_bank(CASES[16][1], msz=CASES[16][0], seed=4)
    queries = torch.randn(4, 2, 7, 8)
    bank.backend = "matmul"
    want = bank.search(queries, 16).chunk_index
    bank.backend = "torch"
    for tile_rows in (1, 3, 7):  # 3: tiles of 3, 3 and 1 queries
        monkeypatch.setattr(memory_search, "CPU_TILE_BYTES", tile_rows * 152 * 4)
        monkeypatch.setattr(memory_search, "CPU_MIN_TILE_QUERIES", 1)
        assert torch.equal(bank.search(queries, 16).chunk_index, want)
    # the CUDA path (all rows at once, in blocks of queries), run here on CPU tensors
    q = queries.to(bank.dtype)
    for max_bytes in (1, 3 * 4 * 2 * 152 * 4, 2**30):
        got = memory_search._two_stage_batched(q, bank._summaries, bank._count, 4, max_bytes)
        got.masked_fill_(got >= torch.from_numpy(bank._count)[:, None, None, None], -1)
        assert torch.equal(got, want)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_two_stage_selection_is_exact(data):
    """select_two_stage on arbitrary small-integer scores (many ties, -inf padding) returns
    exactly the top-nk scores, rank by rank, of distinct columns."""
    nk = data.draw(st.integers(1, 6), label="nk")
    blk = data.draw(st.integers(1, 6), label="blk")
    nb = data.draw(st.integers(nk, 3 * nk + 2), label="nb")
    width = blk * nb
    valid = data.draw(st.integers(nk, width), label="valid columns")
    n = data.draw(st.integers(1, 4), label="queries")
    values = data.draw(st.lists(st.integers(-3, 3), min_size=n * width, max_size=n * width))
    scores = torch.tensor(values, dtype=torch.float32).view(1, n, width)
    scores[..., valid:] = float("-inf")
    got = topk.select_two_stage(scores, nk, blk, nb)  # (1, n, nk)
    want = scores.topk(nk, dim=-1).values
    assert torch.equal(scores.gather(-1, got), want)
    assert (got < valid).all()
    srt = got.sort(dim=-1).values
    assert (srt[..., 1:] != srt[..., :-1]).all()


def test_block_layout():
    assert topk.block_layout(63, 4) is None  # small: one topk is as cheap
    assert topk.block_layout(4096, 16) == (16, 256)
    assert topk.block_layout(16384, 16) == (32, 512)
    blk, nb = topk.block_layout(16383, 16)
    assert (blk, nb) == (32, 512) and blk * nb >= 16383


def test_auto_is_torch_on_cpu_and_every_backend_is_listed_once():
    assert memory_search.resolve("auto") == "torch"
    assert len(set(ChunkedMemoryBank.BACKENDS)) == len(ChunkedMemoryBank.BACKENDS)
    assert ChunkedMemoryBank.BACKENDS[0] == "auto"
    from fairseq_longmem.models.longmem import SEARCH_BACKENDS

    assert [str(b) for b in SEARCH_BACKENDS] == list(ChunkedMemoryBank.BACKENDS)
