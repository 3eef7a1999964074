"""Tests of the chunked memory bank against a naive list-of-chunks reference; CPU, seconds."""

import json
import os
import random
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from fairseq_longmem.memory.bank import (
    SHARED_GATHER_POOL,
    ChunkedMemoryBank,
    GatherPool,
    MemoryRetrieval,
)
from fairseq_longmem.memory.file_format import read_identity

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES_DIR = os.path.join(REPO, "fairseq_longmem", "modules")


class ReferenceMemory:
    """Plain-Python model of the bank: per row, a list of whole chunks and one of staged tokens."""

    def __init__(self, num_rows, chunk_size, memory_size):
        self.csz = chunk_size
        self.capacity = memory_size // chunk_size
        # row -> [(keys (H, csz, hd), values)], oldest first
        self.chunks = [[] for _ in range(num_rows)]
        self.staged = [[] for _ in range(num_rows)]  # row -> [(key (H,hd), value (H,hd))]

    def add(self, keys, values, lengths=None):
        for b in range(keys.shape[0]):
            n = keys.shape[2] if lengths is None else int(lengths[b])
            for t in range(n):
                self.staged[b].append((keys[b, :, t].clone(), values[b, :, t].clone()))
                if len(self.staged[b]) == self.csz:
                    ck = torch.stack([k for k, _ in self.staged[b]], dim=1)  # (H, csz, hd)
                    cv = torch.stack([v for _, v in self.staged[b]], dim=1)
                    self.chunks[b].append((ck, cv))
                    self.staged[b] = []
            self.chunks[b] = self.chunks[b][-self.capacity:]

    def clear(self, rows):
        for b in rows:
            self.chunks[b], self.staged[b] = [], []

    def fill(self):
        return [len(c) * self.csz for c in self.chunks]


def assert_matches_reference(res: MemoryRetrieval, ref: ReferenceMemory, queries, k):
    """Same chunks (identified by their exact keys) as the reference's top-k/csz, in score order.

    Near-ties are resolved by score: each returned chunk's reference score must equal the
    reference's score at that rank (float64, tolerance far below the gap between random scores).
    """
    B, H, T, hd = queries.shape
    csz, nk = ref.csz, k // ref.csz
    assert res.keys.shape == (B, H, T, k, hd) and res.values.shape == (B, H, T, k, hd)
    assert res.mask.shape == (B, H, T, k) and res.mask.dtype == torch.bool
    assert res.chunk_index.shape == (B, H, T, nk) and res.chunk_index.dtype == torch.long
    got_k = res.keys.view(B, H, T, nk, csz, hd)
    got_v = res.values.view(B, H, T, nk, csz, hd)
    for b in range(B):
        chunks = ref.chunks[b]
        n_valid = min(nk, len(chunks))
        for h in range(H):
            lookup = {chunks[i][0][h].numpy().tobytes(): i for i in range(len(chunks))}
            summ = torch.stack([c[0][h].double().mean(0) for c in chunks]) if chunks else None
            for t in range(T):
                mask = res.mask[b, h, t].view(nk, csz)
                assert mask[:n_valid].all() and not mask[n_valid:].any()
                assert (res.chunk_index[b, h, t, n_valid:] == -1).all()
                assert (got_k[b, h, t, n_valid:] == 0).all()
                assert (got_v[b, h, t, n_valid:] == 0).all()
                if n_valid == 0:
                    continue
                scores = summ @ queries[b, h, t].double()
                want = torch.sort(scores, descending=True).values[:n_valid]
                ids = [lookup[got_k[b, h, t, j].numpy().tobytes()] for j in range(n_valid)]
                assert len(set(ids)) == n_valid
                slots = res.chunk_index[b, h, t, :n_valid]
                assert len(set(slots.tolist())) == n_valid and (slots >= 0).all()
                torch.testing.assert_close(scores[ids], want, rtol=0, atol=1e-4)
                for j, i in enumerate(ids):
                    assert torch.equal(got_v[b, h, t, j], chunks[i][1][h])


def random_rows(rng, B):
    kind = rng.choice(["none", "list", "mask", "tensor", "int"])
    if kind == "none":
        return None, list(range(B))
    picked = sorted(rng.sample(range(B), rng.randint(0, B)))
    if kind == "list":
        return picked, picked
    if kind == "mask":
        m = torch.zeros(B, dtype=torch.bool)
        m[picked] = True
        return m, picked
    if kind == "int":
        b = rng.randrange(B)
        return b, [b]
    return torch.tensor(picked, dtype=torch.long), picked


@pytest.mark.parametrize("seed,csz,msz,backend", [
    (0, 4, 32, "torch"), (1, 2, 24, "torch"), (2, 4, 48, "faiss"), (3, 1, 8, "torch"),
])
def test_random_operations_match_reference(seed, csz, msz, backend):
    if backend == "faiss":
        pytest.importorskip("faiss")
    rng = random.Random(seed)
    torch.manual_seed(seed)
    B, H, hd = 3, 2, 8
    bank = ChunkedMemoryBank(B, H, hd, csz, msz, backend=backend)
    ref = ReferenceMemory(B, csz, msz)
    data_ptr = bank._keys.data_ptr()
    searches = 0
    for step in range(120):
        op = rng.random()
        if op < 0.55:
            if rng.random() < 0.5:  # whole chunks, sometimes more than the capacity at once
                T = csz * rng.choice([0, 1, 2, 3, msz // csz + 2])
            else:
                T = rng.randint(0, 3 * csz + 3)
            keys, values = torch.randn(B, H, T, hd), torch.randn(B, H, T, hd)
            lengths = None
            if rng.random() < 0.3:
                lengths = torch.tensor([rng.randint(0, T) for _ in range(B)])
            bank.add(keys, values, lengths)
            ref.add(keys, values, lengths)
        elif op < 0.65:
            rows, picked = random_rows(rng, B)
            bank.clear(rows)
            ref.clear(picked)
        else:
            k = csz * rng.randint(1, msz // csz)
            queries = torch.randn(B, H, rng.randint(1, 5), hd)
            assert_matches_reference(bank.search(queries, k), ref, queries, k)
            searches += 1
        assert bank.fill().tolist() == ref.fill()
        assert bank.staged().tolist() == [len(s) for s in ref.staged]
    assert searches > 20
    assert bank._keys.data_ptr() == data_ptr  # updated in place, never re-allocated


def test_partial_chunk_is_staged_until_completed():
    bank = ChunkedMemoryBank(2, 1, 4, 4, 16)
    keys = torch.arange(2 * 6 * 4, dtype=torch.float32).view(2, 1, 6, 4)
    bank.add(keys, -keys)  # 6 tokens per row: one chunk searchable, two tokens staged
    assert bank.fill().tolist() == [4, 4] and bank.staged().tolist() == [2, 2]
    # the search key of a chunk is the mean of its keys (a scaled sum would rank the same)
    assert torch.equal(bank._summaries[:, 0, 0], keys[:, 0, :4].mean(1))
    q = torch.ones(2, 1, 1, 4)
    assert bank.search(q, 4).mask.sum().item() == 8
    with pytest.raises(ValueError, match="capacity"):
        bank.search(q, 20)
    res = bank.search(q, 8)  # only one chunk exists: the second slot is missing
    assert res.mask[..., :4].all() and not res.mask[..., 4:].any()
    more = 100 + torch.arange(2 * 2 * 4, dtype=torch.float32).view(2, 1, 2, 4)
    bank.add(more, -more, lengths=torch.tensor([2, 1]))
    assert bank.fill().tolist() == [8, 4] and bank.staged().tolist() == [0, 3]
    res = bank.search(q, 8)
    # row 0's second chunk spans the segment boundary: staged tokens 4,5 then the new tokens 0,1
    newest = torch.cat([keys[0, 0, 4:6], more[0, 0, 0:2]])
    assert torch.equal(res.keys[0, 0, 0, :4], newest)  # highest score (largest keys) comes first
    assert torch.equal(res.values[0, 0, 0, :4], -newest)
    bank.clear([1])
    assert bank.staged().tolist() == [0, 0] and bank.fill().tolist() == [8, 0]
    bank.add(torch.zeros(2, 1, 1, 4), torch.zeros(2, 1, 1, 4), lengths=torch.tensor([0, 1]))
    assert bank.staged().tolist() == [0, 1]  # row 1 restarted from an empty staging area


def test_fifo_eviction_keeps_newest_chunks():
    bank = ChunkedMemoryBank(1, 1, 2, 2, 8)  # capacity 4 chunks
    for seg in range(3):  # 3 segments x 3 chunks: chunks 5..8 survive
        ids = torch.arange(seg * 6, seg * 6 + 6, dtype=torch.float32)
        keys = torch.stack([ids, torch.ones(6)], dim=-1).view(1, 1, 6, 2)
        bank.add(keys, keys)
    res = bank.search(torch.tensor([[[[1.0, 0.0]]]]), 8)
    first_tokens = res.keys[0, 0, 0, ::2, 0].tolist()
    assert first_tokens == [16.0, 14.0, 12.0, 10.0]
    assert bank.fill().tolist() == [8]


def test_rows_are_isolated_and_clear_empties_a_row():
    torch.manual_seed(0)
    B, H, hd, csz = 4, 3, 8, 4
    bank = ChunkedMemoryBank(B, H, hd, csz, 64)
    offset = 1000.0 * torch.arange(1, B + 1).view(B, 1, 1, 1)
    for T in (16, 7, 13, 40, 5):  # includes ragged adds and wrap-around
        lengths = torch.randint(0, T + 1, (B,)) if T % csz else None
        bank.add(torch.randn(B, H, T, hd) + offset, torch.randn(B, H, T, hd) + offset, lengths)
    res = bank.search(torch.randn(B, H, 6, hd), 32)
    for b in range(B):
        for t in (res.keys[b][res.mask[b]], res.values[b][res.mask[b]]):
            assert t.numel() > 0 and ((t - offset[b]).abs() < 10).all()
    before = bank.search(torch.ones(B, H, 2, hd), 16)
    bank.clear(torch.tensor([False, True, False, True]))
    after = bank.search(torch.ones(B, H, 2, hd), 16)
    assert not after.mask[[1, 3]].any() and (after.chunk_index[[1, 3]] == -1).all()
    assert (after.keys[[1, 3]] == 0).all()
    for name in ("keys", "values", "mask", "chunk_index"):
        assert torch.equal(getattr(after, name)[[0, 2]], getattr(before, name)[[0, 2]])
    assert bank.fill().tolist()[1::2] == [0, 0] and min(bank.fill().tolist()[0::2]) > 0


def filled_bank(seed=0, backend="torch", dtype=torch.float32, B=3, H=4, hd=16, csz=4, msz=64, **kw):
    """A bank with one empty row, one partly filled row with staged tokens, one wrapped row."""
    g = torch.Generator().manual_seed(seed)
    bank = ChunkedMemoryBank(B, H, hd, csz, msz, dtype=dtype, backend=backend, **kw)
    for T, lengths in ((32, None), (30, [0, 30, 30]), (40, [0, 2, 40]), (27, [0, 0, 27])):
        keys = torch.randn(B, H, T, hd, generator=g).to(dtype)
        values = torch.randn(B, H, T, hd, generator=g).to(dtype)
        bank.add(keys, values, None if lengths is None else torch.tensor(lengths))
    bank.clear([0])
    bank.add(*(torch.randn(B, H, 1, hd, generator=g).to(dtype) for _ in range(2)),
              lengths=torch.tensor([0, 0, 1]))
    return bank


def state(bank):
    return [t.clone() for t in (bank._keys, bank._values, bank._summaries,
                                bank._stage_keys, bank._stage_values)] + [
        torch.from_numpy(a.copy()) for a in (bank._write_ptr, bank._count, bank._stage_len)]


def assert_same_state(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_faiss_and_torch_backends_agree():
    pytest.importorskip("faiss")
    bank = filled_bank(seed=1, B=3, H=4, hd=32, msz=128)  # row 2 wrapped
    assert bank.fill().tolist() == [0, 64, 128]
    queries = torch.randn(3, 4, 50, 32)
    for k in (4, 32, 128):
        bank.backend = "torch"
        a = bank.search(queries, k)
        bank.backend = "faiss"
        f = bank.search(queries, k)
        assert torch.equal(a.chunk_index, f.chunk_index)
        assert torch.equal(a.mask, f.mask) and torch.equal(a.keys, f.keys)
        assert (a.chunk_index[0] == -1).all() and (a.chunk_index[2] >= 0).all()


def test_torch_backend_blocks_queries_without_changing_results():
    bank = filled_bank(seed=2)
    queries = torch.randn(3, 4, 37, 16)
    full = bank.search(queries, 16)
    bank.max_score_bytes = 1  # one query per block
    blocked = bank.search(queries, 16)
    assert torch.equal(full.chunk_index, blocked.chunk_index)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_backends_agree_with_cpu():
    cpu = filled_bank(seed=3, B=3, H=4, hd=32, msz=256)
    gpu = filled_bank(seed=3, B=3, H=4, hd=32, msz=256).to("cuda")
    queries = torch.randn(3, 4, 50, 32)
    want = cpu.search(queries, 32)
    got = gpu.search(queries.cuda(), 32)
    assert got.keys.is_cuda and torch.equal(got.chunk_index.cpu(), want.chunk_index)
    assert torch.equal(got.keys.cpu(), want.keys)
    faiss = pytest.importorskip("faiss")

    gpu.backend = "faiss"
    if hasattr(faiss, "StandardGpuResources"):
        assert torch.equal(gpu.search(queries.cuda(), 32).chunk_index.cpu(), want.chunk_index)
    else:
        with pytest.raises(RuntimeError, match="faiss-gpu"):
            gpu.search(queries.cuda(), 32)


def test_save_load_round_trip_is_bit_exact(tmp_path):
    bank = filled_bank(seed=4, fingerprint="gpt2:abc")
    path = tmp_path / "mem.safetensors"
    bank.save(path)
    assert os.listdir(tmp_path) == ["mem.safetensors"]  # no temporary file left behind
    other = ChunkedMemoryBank(3, 4, 16, 4, 64, fingerprint="gpt2:abc")
    other.load(path)
    n = bank._count
    for name in ("_keys", "_values", "_summaries"):
        for b in range(3):
            assert torch.equal(getattr(other, name)[b, :, :n[b]], getattr(bank, name)[b, :, :n[b]])
    assert (other._write_ptr == bank._write_ptr).all()
    assert (other._stage_len == bank._stage_len).all()
    queries = torch.randn(3, 4, 5, 16)
    for name in ("keys", "values", "mask", "chunk_index"):
        want = getattr(bank.search(queries, 24), name)
        assert torch.equal(getattr(other.search(queries, 24), name), want)
    # staged tokens survived: the same next segment completes the same chunks in both banks
    nxt = torch.randn(3, 4, 3, 16)
    bank.add(nxt, nxt)
    other.add(nxt, nxt)
    assert torch.equal(other.search(queries, 24).keys, bank.search(queries, 24).keys)


def test_save_load_selected_rows_and_dtype_cast(tmp_path):
    bank = filled_bank(seed=5)
    path = tmp_path / "two_rows.safetensors"
    bank.save(path, rows=[2, 1])
    target = ChunkedMemoryBank(4, 4, 16, 4, 64, dtype=torch.bfloat16)
    target.load(path, rows=torch.tensor([0, 3]))
    assert target.fill().tolist() == [bank.fill()[2].item(), 0, 0, bank.fill()[1].item()]
    n = int(bank._count[2])
    assert torch.equal(target._keys[0, :, :n], bank._keys[2, :, :n].to(torch.bfloat16))
    assert target.staged().tolist() == [bank.staged()[2].item(), 0, 0, bank.staged()[1].item()]
    with pytest.raises(ValueError, match="number of rows: expected 1, found 2"):
        target.load(path, rows=[1])
    # and back: bf16 saved, fp32 loaded
    target.save(tmp_path / "bf16.safetensors", rows=[0])
    back = ChunkedMemoryBank(1, 4, 16, 4, 64)
    back.load(tmp_path / "bf16.safetensors")
    assert torch.equal(back._keys[0, :, :n], bank._keys[2, :, :n].to(torch.bfloat16).float())


def test_save_refuses_to_overwrite(tmp_path):
    bank = filled_bank(seed=6)
    path = tmp_path / "mem.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        bank.save(path)
    assert path.read_bytes() == b"precious"
    bank.save(path, overwrite=True)
    ChunkedMemoryBank(3, 4, 16, 4, 64).load(path)


def test_saved_file_honours_the_umask(tmp_path):
    bank = filled_bank(seed=6)
    old = os.umask(0o022)
    try:
        for umask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
            os.umask(umask)
            path = tmp_path / f"mem{umask:o}.safetensors"
            bank.save(path)
            assert os.stat(path).st_mode & 0o777 == mode, (oct(umask), oct(os.stat(path).st_mode))
    finally:
        os.umask(old)


def test_load_across_processes_is_bit_exact(tmp_path):
    bank = filled_bank(seed=7, fingerprint="fp")
    queries = torch.randn(3, 4, 6, 16)
    bank.save(tmp_path / "mem.safetensors")
    save_file({"queries": queries}, str(tmp_path / "queries.safetensors"))
    script = textwrap.dedent(f"""
        import torch
        from safetensors.torch import load_file, save_file
        from fairseq_longmem.memory.bank import ChunkedMemoryBank
        bank = ChunkedMemoryBank(3, 4, 16, 4, 64, fingerprint="fp")
        bank.load({str(tmp_path / "mem.safetensors")!r})
        q = load_file({str(tmp_path / "queries.safetensors")!r})["queries"]
        r = bank.search(q, 16)
        save_file({{"keys": r.keys, "values": r.values, "mask": r.mask, "idx": r.chunk_index,
                    "fill": bank.fill(), "staged": bank.staged()}},
                  {str(tmp_path / "out.safetensors")!r})
    """)
    subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True, timeout=120)
    out = load_file(str(tmp_path / "out.safetensors"))
    want = bank.search(queries, 16)
    assert torch.equal(out["keys"], want.keys) and torch.equal(out["values"], want.values)
    assert torch.equal(out["mask"], want.mask) and torch.equal(out["idx"], want.chunk_index)
    assert torch.equal(out["fill"], bank.fill()) and torch.equal(out["staged"], bank.staged())


def test_truncated_or_corrupt_file_is_refused_and_memory_unchanged(tmp_path):
    src = filled_bank(seed=8)
    path = tmp_path / "mem.safetensors"
    src.save(path)
    data = path.read_bytes()
    victim = filled_bank(seed=9)
    before = state(victim)
    header_len = int.from_bytes(data[:8], "little")
    cases = {
        "empty": b"",
        "in_length": data[:5],
        "in_header": data[: 8 + header_len // 2],
        "in_data": data[: (8 + header_len + len(data)) // 2],
        "last_byte": data[:-1],
    }
    flipped = bytearray(data)
    flipped[-10] ^= 0x40  # a flipped bit in the tensor data keeps the structure intact
    cases["bit_flip"] = bytes(flipped)
    cases["not_safetensors"] = b"\x00" * 64
    for name, blob in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(blob)
        with pytest.raises(ValueError, match="refused") as err:
            victim.load(bad)
        assert "\n" not in str(err.value), name
        assert_same_state(before, state(victim))
    with pytest.raises(FileNotFoundError):
        victim.load(tmp_path / "missing.safetensors")
    # a safetensors file without our header
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="longmem_memory_bank"):
        victim.load(tmp_path / "plain.safetensors")
    assert_same_state(before, state(victim))


@pytest.mark.parametrize("config,found", [
    (dict(H=2), "num_heads: expected 2, found 4"),
    (dict(hd=8), "head_dim: expected 8, found 16"),
    (dict(csz=2), "chunk_size: expected 2, found 4"),
    (dict(msz=128), "memory_size: expected 128, found 64"),
    (dict(fingerprint="other"), "fingerprint: expected 'other', found 'model-a'"),
])
def test_wrong_configuration_is_refused_and_memory_unchanged(tmp_path, config, found):
    path = tmp_path / "mem.safetensors"
    filled_bank(seed=10, fingerprint="model-a").save(path)
    victim = filled_bank(seed=11, **config)
    before = state(victim)
    with pytest.raises(ValueError, match=found):
        victim.load(path)
    assert_same_state(before, state(victim))


def test_fingerprint_rules(tmp_path):
    filled_bank(seed=12, fingerprint="").save(tmp_path / "a.safetensors")
    filled_bank(seed=12, fingerprint="x").save(tmp_path / "b.safetensors")
    # a bank without a fingerprint takes any file
    ChunkedMemoryBank(3, 4, 16, 4, 64, fingerprint="").load(tmp_path / "a.safetensors")
    ChunkedMemoryBank(3, 4, 16, 4, 64, fingerprint="").load(tmp_path / "b.safetensors")
    # a bank with one refuses a file without one, memory unchanged
    victim = filled_bank(seed=13, fingerprint="y")
    before = state(victim)
    with pytest.raises(ValueError, match="fingerprint: expected 'y', found none") as err:
        victim.load(tmp_path / "a.safetensors")
    assert "\n" not in str(err.value)
    assert_same_state(before, state(victim))
    ChunkedMemoryBank(3, 4, 16, 4, 64, fingerprint="x").load(tmp_path / "b.safetensors")


def test_read_identity_takes_only_its_own_kind(tmp_path):
    # the one reader of the identities that prompt memories and ICL memories carry
    kind = "fairseq_longmem.prompt_memory/1"
    own = {"kind": kind, "num_tokens": 7}
    for name, fingerprint in (("own", json.dumps(own)), ("other", json.dumps({"kind": "icl/1"})),
                              ("plain", "gpt2:abc"), ("list", "[1, 2]"), ("none", "")):
        filled_bank(seed=14, fingerprint=fingerprint).save(tmp_path / f"{name}.safetensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    assert read_identity(tmp_path / "own.safetensors", kind) == own
    for name in ("other", "plain", "list", "none"):
        with pytest.raises(ValueError) as err:
            read_identity(tmp_path / f"{name}.safetensors", kind)
        assert str(err.value) == f"no {kind} identity in its header", name
    with pytest.raises(ValueError, match=r"empty.safetensors: refused, expected a complete "
                       r"safetensors memory-bank file, found an unreadable file"):
        read_identity(tmp_path / "empty.safetensors", kind)


@pytest.mark.parametrize("kwargs,match", [
    (dict(chunk_size=0), "chunk_size must be a positive int"),
    (dict(chunk_size=-4), "chunk_size must be a positive int"),
    (dict(memory_size=0), "memory_size must be a positive int"),
    (dict(memory_size=30), "multiple of chunk_size"),
    (dict(num_rows=0), "num_rows must be a positive int"),
    (dict(num_heads=0), "num_heads must be a positive int"),
    (dict(head_dim=-1), "head_dim must be a positive int"),
    (dict(num_heads=2.0), "num_heads must be a positive int"),
    (dict(backend="annoy"), "backend must be one of"),
    (dict(dtype=torch.int64), "floating-point"),
])
def test_bad_construction(kwargs, match):
    args = dict(num_rows=2, num_heads=2, head_dim=8, chunk_size=4, memory_size=32)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ChunkedMemoryBank(**args)


def test_bad_add_search_clear_arguments():
    bank = ChunkedMemoryBank(2, 3, 8, 4, 32)
    ok = torch.randn(2, 3, 8, 8)
    bad_adds = [
        ((torch.randn(3, 3, 8, 8), ok),
         r"expected shape \(B=2, H=3, T, hd=8\), got \(3, 3, 8, 8\)"),
        ((torch.randn(2, 4, 8, 8), ok), r"got \(2, 4, 8, 8\)"),
        ((torch.randn(2, 3, 8, 7), ok), r"got \(2, 3, 8, 7\)"),
        ((torch.randn(2, 3, 8), ok), r"got \(2, 3, 8\)"),
        ((ok, torch.randn(2, 3, 4, 8)), r"values: expected T=8"),
        ((ok.long(), ok), "floating-point tensor, got torch.int64"),
        ((torch.empty(2, 3, 8, 8, device="meta"), ok), "expected device cpu, got meta"),
        ((ok, ok, torch.tensor([1, 2, 3])), r"lengths: expected an integer tensor of shape \(2,\)"),
        ((ok, ok, torch.tensor([1.0, 2.0])), "lengths: expected an integer tensor"),
        ((ok, ok, torch.tensor([1, 9])), r"lengths: expected values in \[0, T=8\]"),
        ((ok, ok, torch.tensor([-1, 2])), r"lengths: expected values in \[0, T=8\]"),
    ]
    before = state(bank)
    for args, match in bad_adds:
        with pytest.raises(ValueError, match=match):
            bank.add(*args)
    assert_same_state(before, state(bank))
    bank.add(ok, ok)
    for k, match in ((0, "positive multiple of chunk_size=4"), (-4, "positive multiple"),
                     (6, "positive multiple"), (4.0, "positive multiple"), (36, "capacity=8")):
        with pytest.raises(ValueError, match=match):
            bank.search(ok, k)
    with pytest.raises(ValueError, match=r"queries: expected shape .* got \(2, 3, 8, 4\)"):
        bank.search(torch.randn(2, 3, 8, 4), 4)
    with pytest.raises(ValueError, match="queries: expected device cpu, got meta"):
        bank.search(torch.empty(2, 3, 8, 8, device="meta"), 4)
    bad_rows = [(5, r"in \[0, 2\), got 5"), ([-1], "got -1"),
                (torch.ones(3, dtype=torch.bool), r"shape \(2,\)"),
                (torch.tensor([0.5]), "row indices or a bool mask"), ([1, 1], "duplicate")]
    for rows, match in bad_rows:
        with pytest.raises(ValueError, match=match):
            bank.clear(rows)
    assert bank.fill().tolist() == [8, 8]
    with pytest.raises(ValueError, match="num_rows must be a positive int"):
        bank.resize_rows(0)


@pytest.mark.parametrize("where,bad", [("keys", float("inf")), ("keys", float("-inf")),
                                       ("keys", float("nan")), ("values", float("nan")),
                                       ("values", float("-inf"))])
def test_non_finite_keys_or_values_are_refused(where, bad):
    bank = filled_bank(seed=14)
    before = state(bank)
    keys, values = torch.randn(3, 4, 9, 16), torch.randn(3, 4, 9, 16)
    (keys if where == "keys" else values)[2, 1, 6, 3] = bad  # row 2, token 6
    for lengths in (None, torch.tensor([9, 9, 7])):
        with pytest.raises(ValueError, match=r"keys/values: refused, expected finite numbers, "
                           r"found inf or NaN among the tokens appended to row\(s\) \[2\]") as err:
            bank.add(keys, values, lengths)
        assert "\n" not in str(err.value)
        assert_same_state(before, state(bank))
    # a token past the row's length is not appended, so it is not refused
    bank.add(keys, values, torch.tensor([9, 9, 6]))
    assert bank.staged().tolist() == [(s + n) % 4 for s, n in zip(before[-1].tolist(), (9, 9, 6))]


def test_huge_finite_keys_are_accepted_unless_the_storage_overflows():
    bank = filled_bank(seed=16)
    huge = torch.full((3, 4, 8, 16), 3e38)  # finite, though their sum overflows
    bank.add(huge, -huge)
    assert bank.fill().tolist() == [8, 64, 64]
    assert torch.isfinite(bank._summaries).all()  # the chunk means too
    half = filled_bank(seed=16, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"found inf or NaN .* row\(s\) \[0, 1, 2\]"):
        half.add(torch.full((3, 4, 8, 16), 1e5), huge[..., :16])  # 1e5 is inf in fp16


def test_search_results_stay_valid_while_held():
    # on CPU the bank reuses its last K/V gather buffers, but never while anything holds them
    bank = filled_bank(seed=15)
    q1, q2 = torch.randn(3, 4, 5, 16), torch.randn(3, 4, 5, 16)
    first = bank.search(q1, 16)
    kept = first.keys.clone(), first.values.clone()
    second = bank.search(q2, 16)
    assert torch.equal(first.keys, kept[0]) and torch.equal(first.values, kept[1])
    # a retrieval saved for backward (as JointAttention's einsum does) survives later searches
    x = torch.randn(3, 4, 5, 16, requires_grad=True)
    out = torch.einsum("bhtd,bhtkd->bhtk", x, second.keys)
    want_grad = second.keys.sum(dim=3).clone()
    del second
    third = bank.search(q1, 16)
    out.sum().backward()
    torch.testing.assert_close(x.grad, want_grad)
    # once released, a buffer is reused (no fresh tens-of-MB tensor per step)
    pooled = bank.gather_pool.nbytes
    ptrs = {r.data_ptr() for r in (first.keys, first.values, third.keys, third.values)}
    del first, third, out
    again = bank.search(q2, 16)
    assert {again.keys.data_ptr(), again.values.data_ptr()} <= ptrs
    assert bank.gather_pool.nbytes == pooled


def test_banks_share_their_search_buffers_and_never_hand_out_a_held_one():
    # 6 layers' memories searched in turn, each result dropped before the next search (a
    # no-grad forward): two buffers in all (keys, values), not two per bank
    banks = [filled_bank(seed=s) for s in range(6)]
    pool = GatherPool()
    assert all(bank.gather_pool is SHARED_GATHER_POOL for bank in banks)  # the default
    for bank in banks:
        bank.gather_pool = pool
    q = torch.randn(3, 4, 5, 16)
    alone = []
    for bank in banks:  # the reference: each bank with a pool of its own
        own = filled_bank(seed=banks.index(bank))
        own.gather_pool = GatherPool()
        r = own.search(q, 16)
        alone.append((r.keys.clone(), r.values.clone()))
    one = 2 * 3 * 4 * 5 * 16 * 16 * 4  # keys + values: B*H*T*K*hd fp32
    for bank, (k, v) in zip(banks, alone):
        r = bank.search(q, 16)
        assert torch.equal(r.keys, k) and torch.equal(r.values, v)
        del r
        assert pool.nbytes == one
    # held results (a training step keeps every layer's for backward) are never overwritten
    held = [bank.search(q, 16) for bank in banks]
    assert len({r.keys.data_ptr() for r in held} | {r.values.data_ptr() for r in held}) == 12
    for r, (k, v) in zip(held, alone):
        assert torch.equal(r.keys, k) and torch.equal(r.values, v)
    assert pool.nbytes == 6 * one
    # another shape: the free buffers of the old one are dropped, held ones kept
    del held[1:], r
    small = banks[0].search(q[:, :, :2], 8)
    assert pool.nbytes == one + 2 * 3 * 4 * 2 * 8 * 16 * 4
    assert torch.equal(held[0].keys, alone[0][0])
    del small


def test_resize_rows_and_to():
    bank = filled_bank(seed=13)
    bank.resize_rows(5)
    assert bank.num_rows == 5 and bank.fill().tolist() == [0] * 5
    assert bank.search(torch.randn(5, 4, 2, 16), 8).mask.sum() == 0
    bank = filled_bank(seed=13)
    half = filled_bank(seed=13).to(dtype=torch.float16)
    assert half.dtype == torch.float16 and half._keys.dtype == torch.float16
    n = int(bank._count[2])
    assert torch.equal(half._keys[2, :, :n], bank._keys[2, :, :n].half())


def test_storage_overhead_is_below_1_3x_of_raw_kv():
    for csz in (2, 4):
        bank = ChunkedMemoryBank(2, 16, 64, csz, 4096, dtype=torch.float16)
        raw = 2 * 2 * 4096 * 16 * 64 * 2  # K and V, rows x msz tokens, fp16
        assert bank.nbytes / raw <= 1.3


def test_faiss_backend_without_faiss_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        ChunkedMemoryBank(1, 1, 4, 2, 8, backend="faiss")
    bank = ChunkedMemoryBank(1, 1, 4, 2, 8, backend="torch")  # the torch backend needs no faiss
    bank.add(torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4))
    assert bank.search(torch.randn(1, 1, 1, 4), 4).mask.all()


# a pytest run in a second interpreter; the message without faiss is checked in the quick loop by
# test_faiss_backend_without_faiss_says_what_to_install
@pytest.mark.slow
def test_faiss_tests_skip_without_faiss():
    # run this file's faiss tests with `import faiss` failing: they must skip, not fail (in this
    # one process, -n 0: pytest.ini's xdist workers would import faiss afresh)
    script = textwrap.dedent(f"""
        import sys
        sys.modules["faiss"] = None
        import pytest
        sys.exit(pytest.main(["-q", "-n", "0", "-p", "no:cacheprovider",
                              {os.path.abspath(__file__)!r}, "-k",
                              "faiss and not skip_without_faiss"]))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=REPO, timeout=300)
    summary = out.stdout.strip().splitlines()[-1]
    assert out.returncode == 0, out.stdout[-2000:]
    assert "failed" not in summary and "error" not in summary, summary
    skipped = int(re.search(r"(\d+) skipped", summary).group(1))
    assert skipped >= 2, summary  # the faiss-vs-reference run and the faiss/torch agreement


# Put on PYTHONPATH as sitecustomize.py: the path finder no longer sees fairseq, so to every
# `import` and `importlib.util.find_spec` it is as if fairseq were not installed.
HIDE_FAIRSEQ = """
import importlib.machinery, sys

class PathFinderWithoutFairseq(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] == "fairseq":
            return None
        return super().find_spec(name, path, target)

sys.meta_path[:] = [PathFinderWithoutFairseq if f is importlib.machinery.PathFinder else f
                    for f in sys.meta_path]
"""


def test_memory_bank_imports_without_fairseq_and_the_plugin_says_what_to_install(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(HIDE_FAIRSEQ)
    script = textwrap.dedent("""
        import importlib.util, sys
        print("fairseq found:", importlib.util.find_spec("fairseq") is not None)
        import torch
        import fairseq_longmem.memory.bank as mod
        bank = mod.ChunkedMemoryBank(1, 1, 4, 2, 8)
        bank.add(torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4))
        print("search mask:", bank.search(torch.randn(1, 1, 1, 4), 2).mask.tolist())
        print("imported:", sorted(m for m in sys.modules
                                  if m.split(".")[0] in ("fairseq", "faiss", "triton")))
        for name in ("fairseq_longmem.models", "fairseq_longmem.tasks", "fairseq_longmem.criterions"):
            try:
                importlib.import_module(name)
            except ImportError as e:
                print(type(e).__name__ + ":", e)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[:3] == ["fairseq found: False", "search mask: [[[[True, True]]]]", "imported: []"]
    install = ("needs fairseq, which is not installed: pip install --no-deps ve-fairseq==0.12.3 "
               "(see README.md, 'Install'); the memory bank (fairseq_longmem.memory) works "
               "without it")
    assert lines[3:] == [f"ImportError: fairseq_longmem.{name} {install}"
                         for name in ("models", "tasks", "criterions")]
