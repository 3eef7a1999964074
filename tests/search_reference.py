"""The brute-force reference that every search backend is checked against (tests/test_memory_search.py,
tests/test_memory_triton.py): banks of known fill, queries, and the exact top-k check."""

import torch

from fairseq_longmem.memory.bank import ChunkedMemoryBank


def make_bank(fills, *, H=2, hd=8, csz=4, msz=600, dtype=torch.float32, ties=False, seed=0):
    """A bank whose rows hold ``fills[b]`` chunks (a fill of "full" wraps the ring buffer)."""
    g = torch.Generator().manual_seed(seed)
    bank = ChunkedMemoryBank(len(fills), H, hd, csz, msz, dtype=dtype)
    C = bank.capacity

    def draw(T):
        if ties:  # small integers: chunk means are exact multiples of 1/4, scores tie often
            return torch.randint(-2, 3, (len(fills), H, T, hd), generator=g).to(dtype)
        return torch.randn(len(fills), H, T, hd, generator=g).to(dtype)

    chunks = [C + C // 3 if f == "full" else f for f in fills]
    T = max(chunks) * csz
    # ragged lengths: row b takes chunks[b] whole chunks, in two adds split off the chunk grid
    first = torch.tensor([min(n * csz, 5) for n in chunks])
    bank.add(draw(T), draw(T), first)
    bank.add(draw(T), draw(T), torch.tensor(chunks) * csz - first)
    assert bank.fill().tolist() == [min(n, C) * csz for n in chunks]
    return bank


def chunk_scores(bank, queries, slots):
    """float64 <query, summary> of the chunks in ``slots`` (B, H, T, nk); -1 scores chunk 0."""
    B, H, T, nk = slots.shape
    D = bank.head_dim
    idx = slots.clamp_min(0).reshape(B, H, T * nk, 1).expand(-1, -1, -1, D)
    summ = bank._summaries.double().gather(2, idx).view(B, H, T, nk, D)
    return torch.einsum("bhtd,bhtkd->bhtk", queries.to(bank.dtype).double(), summ)


def assert_exact_top_k(bank, queries, k, res):
    """Slots are distinct valid chunks whose scores, rank by rank, are the true top-k/csz scores
    (reference: float64 scores of the stored summaries, rounded as the storage dtype rounds)."""
    B, H, T, hd = queries.shape
    S, nk, dtype = bank.chunk_size, k // bank.chunk_size, bank.dtype
    assert res.chunk_index.shape == (B, H, T, nk) and res.keys.shape == (B, H, T, k, hd)
    q = queries.to(dtype).double()
    for b in range(B):
        cnt = int(bank.fill()[b]) // S
        n = min(nk, cnt)
        slots = res.chunk_index[b]  # (H, T, nk)
        assert (slots[..., n:] == -1).all()
        assert not res.mask[b].view(H, T, nk, S)[:, :, n:].any()
        assert (res.keys[b].view(H, T, nk, S, hd)[:, :, n:] == 0).all()
        if n == 0:
            continue
        got = slots[..., :n]
        assert ((got >= 0) & (got < cnt)).all()
        srt = got.sort(dim=-1).values
        assert (srt[..., 1:] != srt[..., :-1]).all()  # distinct chunks
        scores = (q[b] @ bank._summaries[b, :, :cnt].double().transpose(1, 2)).to(dtype).double()
        want = scores.sort(dim=-1, descending=True).values[..., :n]
        # fp32: summation-order noise; fp16/bf16: one unit in the last place of the largest score
        atol = 1e-4 if dtype == torch.float32 else \
            torch.finfo(dtype).eps * float(scores.abs().max())
        torch.testing.assert_close(scores.gather(-1, got), want, rtol=0, atol=atol)
        # the expansion holds those chunks' keys and values, in the same order
        for h in range(H):
            assert torch.equal(res.keys[b, h].view(T, nk, S, hd)[:, :n], bank._keys[b, h][got[h]])
            assert torch.equal(res.values[b, h].view(T, nk, S, hd)[:, :n],
                               bank._values[b, h][got[h]])
        assert res.mask[b].view(H, T, nk, S)[:, :, :n].all()


# Rows: empty, fewer chunks than nk, a part whose chunk count is not a multiple of the block, full
# and wrapped. (msz, k): k=16 is 4 chunks per query over 150 slots, k=64 is 16 over 1,200; both
# run the two-stage selection with padded blocks (block_layout: 97 -> (4, 25), 150 -> (8, 19),
# 700 -> (8, 88), 1200 -> (8, 150)).
CASES = {16: (600, [0, 3, 97, "full"]), 64: (4800, [0, 3, 700, "full"])}


def queries_for(ties, shape, seed):
    g = torch.Generator().manual_seed(seed)
    if ties:
        return torch.randint(-2, 3, shape, generator=g).float()
    return torch.randn(shape, generator=g)
