"""The triton search backend against the brute-force reference (tests/search_reference.py).

On a CUDA machine the kernels run for real. Without CUDA they run through Triton's interpreter
(TRITON_INTERPRET=1, on CPU tensors): ``test_kernels_through_the_interpreter`` reruns this file
in a subprocess with it set (the variable must be set before triton is imported). Without the
``triton`` package (not in the CPU build of torch; ``pip install -e .[triton]``) all skip.
"""

import os
import re
import subprocess
import sys

import pytest
import torch

from fairseq_longmem.memory import search as memory_search
from fairseq_longmem.memory.bank import ChunkedMemoryBank
from search_reference import CASES, assert_exact_top_k, make_bank, queries_for

HAS_TRITON = True
try:
    import triton  # noqa: F401
except ImportError:
    HAS_TRITON = False

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
runs_kernels = pytest.mark.skipif(
    not HAS_TRITON or not (torch.cuda.is_available() or INTERPRETING),
    reason="needs triton and CUDA, or TRITON_INTERPRET=1 (test_kernels_through_the_interpreter)")


@runs_kernels
@pytest.mark.parametrize("dtype,ties", [(torch.float32, False), (torch.float32, True),
                                        (torch.float16, False), (torch.bfloat16, False)],
                         ids=["fp32", "fp32-ties", "fp16", "bf16"])
@pytest.mark.parametrize("k", sorted(CASES))
def test_triton_matches_brute_force(dtype, ties, k):
    msz, fills = CASES[k]
    bank = make_bank(fills, msz=msz, dtype=dtype, ties=ties, seed=5).to(DEVICE)
    bank.backend = "triton"
    queries = queries_for(ties, (4, 2, 7, 8), seed=6)
    res = bank.search(queries.to(DEVICE), k)
    cpu = bank.to("cpu")
    res.keys, res.values, res.mask, res.chunk_index = (
        t.cpu() for t in (res.keys, res.values, res.mask, res.chunk_index))
    assert_exact_top_k(cpu, queries, k, res)


@runs_kernels
def test_triton_query_blocks_and_tiles_do_not_change_results():
    msz, fills = CASES[64]
    bank = make_bank(fills[-2:], H=1, msz=msz, seed=7).to(DEVICE)  # a partial and a full row
    queries = queries_for(False, (2, 1, 70, 8), seed=8)  # 70 queries: two 64-query tiles
    bank.backend = "triton"
    got = []
    per_query = 2 * (150 + 16 * 8) * 4  # fp32 maxima + candidates of 2 row-heads, layout (8, 150)
    for max_bytes in (40 * per_query, 2**30):  # blocks of 40 and 30 queries; all 70 at once
        bank.max_score_bytes = max_bytes
        got.append(bank.search(queries.to(DEVICE), 64))
    assert torch.equal(got[0].chunk_index, got[1].chunk_index)
    res = got[1]
    res.keys, res.values, res.mask, res.chunk_index = (
        t.cpu() for t in (res.keys, res.values, res.mask, res.chunk_index))
    assert_exact_top_k(bank.to("cpu"), queries, 64, res)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (pip install -e .[triton])")
@pytest.mark.skipif(torch.cuda.is_available() or INTERPRETING, reason="runs the kernels itself")
def test_kernels_through_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
                          os.path.abspath(__file__)], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.abspath(__file__)), timeout=600)
    summary = out.stdout.strip().splitlines()[-1]
    assert out.returncode == 0, out.stdout[-3000:]
    assert int(re.search(r"(\d+) passed", summary).group(1)) == 10, summary  # 8 + 1 + 1 here


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (pip install -e .[triton])")
@pytest.mark.skipif(torch.cuda.is_available() or INTERPRETING, reason="CPU without interpreter")
def test_triton_on_cpu_says_what_to_use():
    bank = ChunkedMemoryBank(1, 1, 4, 2, 8, backend="triton")
    bank.add(torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4))
    with pytest.raises(RuntimeError, match=r"backend='triton' runs on CUDA devices .* "
                       r"use backend='torch'"):
        bank.search(torch.randn(1, 1, 1, 4), 2)


def test_triton_backend_without_triton_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    with pytest.raises(ImportError, match=r"needs triton.*pip install triton"):
        ChunkedMemoryBank(1, 1, 4, 2, 8, backend="triton")
    assert memory_search.resolve("auto") == "torch"
