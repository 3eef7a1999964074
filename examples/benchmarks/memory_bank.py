"""Benchmark of the chunked memory bank against the authors' design (one faiss IndexFlatIP per head,
``remove_ids`` of the oldest chunks on eviction): add+evict and search time per segment, storage.

Run from the repository root:  python examples/benchmarks/memory_bank.py [--log-dir DIR]
"""

import argparse
import gc
import time

import numpy as np
import torch
from runlog import RunLog, cpu_model  # examples/benchmarks/runlog.py, beside this script

from fairseq_longmem.memory.bank import ChunkedMemoryBank


class PerHeadFaissBaseline:
    """The authors' memory, re-implemented for comparison: one row shared by everything, one
    IndexFlatIP of chunk summaries per head, K/V in per-head tensors; on overflow the oldest chunks
    are removed from every index (``remove_ids``) and the K/V tensors are shifted (a copy of the
    store)."""

    def __init__(self, num_heads, head_dim, chunk_size, memory_size):
        import faiss

        self.faiss = faiss
        self.H, self.hd, self.csz = num_heads, head_dim, chunk_size
        self.capacity = memory_size // chunk_size
        self.indexes = [faiss.IndexFlatIP(head_dim) for _ in range(num_heads)]
        self.keys = torch.zeros(num_heads, self.capacity, chunk_size, head_dim)
        self.values = torch.zeros(num_heads, self.capacity, chunk_size, head_dim)
        self.n = 0

    def add(self, keys, values):  # (H, T, hd)
        H, T, hd = keys.shape
        new = T // self.csz
        if self.n + new > self.capacity:
            drop = self.n + new - self.capacity
            for index in self.indexes:
                index.remove_ids(np.arange(drop, dtype=np.int64))
            pad = torch.zeros(H, drop, self.csz, hd)
            self.keys = torch.cat([self.keys[:, drop:], pad], dim=1)
            self.values = torch.cat([self.values[:, drop:], pad], dim=1)
            self.n -= drop
        ck = keys[:, : new * self.csz].reshape(H, new, self.csz, hd)
        cv = values[:, : new * self.csz].reshape(H, new, self.csz, hd)
        summaries = ck.mean(dim=2).contiguous().numpy()
        for h, index in enumerate(self.indexes):
            index.add(summaries[h])
        self.keys[:, self.n:self.n + new] = ck
        self.values[:, self.n:self.n + new] = cv
        self.n += new

    def search(self, queries, k):  # (H, T, hd) -> keys, values (H, T, k, hd)
        H, T, hd = queries.shape
        q = queries.contiguous().numpy()
        out_k, out_v = [], []
        for h, index in enumerate(self.indexes):
            _, idx = index.search(q[h], k // self.csz)
            idx = torch.from_numpy(idx)
            out_k.append(self.keys[h][idx].view(T, k, hd))
            out_v.append(self.values[h][idx].view(T, k, hd))
        return torch.stack(out_k), torch.stack(out_v)


def best_time(fn, repeats, log=None, key=None):
    """Fastest of `repeats` runs: on a shared machine the minimum is the least disturbed figure.
    Every repeat goes to the run's log (raw.json) under `key`."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    if log is not None:
        log.times(key, times)
    return min(times)


def fill_to_capacity(add, msz, segments):
    for i in range(msz // segments[0][0].shape[-2] + 1):
        add(*segments[i % len(segments)])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--memory-sizes", type=int, nargs="+", default=[4096, 16384, 65536, 262144])
    p.add_argument("--rows", type=int, default=1,
                   help="B (batch rows). The baseline holds one row: its search time is multiplied "
                   "by B, its add is not (compare add at B=1)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=4)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--segment", type=int, default=1024, help="T of each added segment")
    p.add_argument("--search-queries", type=int, default=256,
                   help="query tokens per search (T of the search); the paper's is 1024")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--threads", type=int, default=None,
                   help="torch and faiss threads (default: torch's default, all cores)")
    p.add_argument("--log-dir", help="also write the table, every timing and the machine's "
                   "description there (docs/results/logs/benchmarks/RUN)")
    args = p.parse_args()
    log = RunLog(args.log_dir)
    if args.threads:
        import faiss

        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    B, H, hd, csz, T, Tq, k = (args.rows, args.heads, args.head_dim, args.chunk_size, args.segment,
                               args.search_queries, args.k)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    segments = [(torch.randn(B, H, T, hd, generator=g).to(dev, dtype),
                 torch.randn(B, H, T, hd, generator=g).to(dev, dtype)) for _ in range(4)]
    queries = torch.randn(B, H, Tq, hd, generator=g).to(dev, dtype)
    log.print(f"# {cpu_model()}, {torch.get_num_threads()} threads, "
          f"device={dev}, dtype={args.dtype}, torch {torch.__version__}")
    log.print(f"# B={B} H={H} hd={hd} csz={csz} k={k}, add T={T}, search T={Tq}; times are the best of "
          f"{args.repeats}, per segment; baseline = one faiss IndexFlatIP per head + remove_ids "
          f"(B=1, CPU fp32 only)")
    cols = ["msz", "add ours ms", "add base ms", "add ratio", "search torch ms", "search faiss ms",
            "search base ms", "torch/base", "faiss/base", "bytes/token ratio"]
    log.print("| " + " | ".join(cols) + " |")
    log.print("|" + "---|" * len(cols))
    for msz in args.memory_sizes:
        bank = ChunkedMemoryBank(B, H, hd, csz, msz, dtype=dtype, device=dev, backend="torch")
        fill_to_capacity(bank.add, msz, segments)
        seg = iter(segments * (args.repeats + 1))

        def add_ours():
            bank.add(*next(seg))
            sync()

        add_ours()  # warm-up
        t_add = best_time(add_ours, args.repeats, log, f"{msz} add ours")

        def search_with(backend):
            def run():
                bank.backend = backend
                bank.search(queries, k)
                sync()
            run()  # warm-up
            return best_time(run, max(1, args.repeats // 2 + 1), log, f"{msz} search {backend}")

        t_torch = search_with("torch")
        t_faiss = search_with("faiss") if dev.type == "cpu" else float("nan")
        overhead = bank.nbytes / (B * msz) / (2 * H * hd * bank.dtype.itemsize)
        del bank
        gc.collect()

        if dev.type == "cpu" and dtype == torch.float32:
            base = PerHeadFaissBaseline(H, hd, csz, msz)
            b_segments = [(kk[0], vv[0]) for kk, vv in segments]
            fill_to_capacity(base.add, msz, b_segments)
            bseg = iter(b_segments * (args.repeats + 1))
            base.add(*next(bseg))  # warm-up
            t_badd = best_time(lambda: base.add(*next(bseg)), args.repeats, log, f"{msz} add base")
            base.search(queries[0], k)
            t_bsearch = best_time(lambda: base.search(queries[0], k), max(1, args.repeats // 2 + 1),
                                  log, f"{msz} search base") * B  # baseline holds one row
            del base
            gc.collect()
        else:
            t_badd = t_bsearch = float("nan")
        row = [f"{msz:,}", f"{1e3 * t_add:.2f}", f"{1e3 * t_badd:.1f}", f"{t_add / t_badd:.3f}",
               f"{1e3 * t_torch:.0f}", f"{1e3 * t_faiss:.0f}", f"{1e3 * t_bsearch:.0f}",
               f"{t_torch / t_bsearch:.2f}", f"{t_faiss / t_bsearch:.2f}", f"{overhead:.3f}"]
        log.print("| " + " | ".join(row) + " |")
    log.close()


if __name__ == "__main__":
    main()
