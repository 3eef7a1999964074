# Where the time of one exact search goes at the peer comparison's largest shape (msz 65,536,
# csz 4: 16,384 chunks; 1,024 queries; hd 64; 16 chunks kept), one row and head, fp32:
# bank.search = selection (search.search "torch": score product + two-stage top-k) + K/V gather
# (bank._expand); and the score product alone. Run from the repository root:
#   python docs/results/logs/benchmarks/search_breakdown_xeon_2026-12-07/breakdown.py THREADS
import sys
import time

import numpy as np
import torch

from fairseq_longmem.memory import search as S
from fairseq_longmem.memory.bank import ChunkedMemoryBank

torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
msz, T, hd, k = 65536, 1024, 64, 64
bank = ChunkedMemoryBank(num_rows=1, num_heads=1, head_dim=hd, memory_size=msz, chunk_size=4)
for _ in range(msz // T):
    bank.add(torch.randn(1, 1, T, hd), torch.randn(1, 1, T, hd))
q = torch.randn(1, 1, T, hd)


def tm(f, n=7):
    f()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        r = f()
        ts.append(time.perf_counter() - t)
        del r
    return f"best {1000 * min(ts):.1f} ms, median {1000 * float(np.median(ts)):.1f} ms"


nk = k // 4
summ = bank._summaries
slots = S.search("torch", q, summ, bank._count, nk, bank.max_score_bytes)
out = torch.empty(T, summ.shape[2])
print(f"threads {torch.get_num_threads()}")
print("bank.search (selection + gather):", tm(lambda: bank.search(q, k)))
print("selection alone:", tm(lambda: S.search("torch", q, summ, bank._count, nk,
                                               bank.max_score_bytes)))
print("score product alone:", tm(lambda: torch.mm(q[0, 0], summ[0, 0].t(), out=out)))
print("K/V gather alone:", tm(lambda: bank._expand(slots)))
