"""Our ChunkedMemoryBank (exact search over chunk summaries) against lucidrains' KNNMemory
(memorizing-transformers-pytorch 0.4.1: faiss HNSW, approximate, one index per row, memmapped K/V),
in the same process, on the same data.

One head of 64 (KNNMemory keeps a single K/V head), B=1 stream, segments of --segment tokens,
k=64 retrieved tokens (ours: 16 chunks of 4). Each memory is first filled to capacity, so every
timed add also evicts; each timed step is a search with --segment queries, then an add, for both
memories in turn, so a slow spell of a shared machine hits both. The peer is not a dependency of
this project; install it beside it (it needs faiss, numpy and joblib, which are installed):

    pip install --no-deps memorizing-transformers-pytorch==0.4.1 einops einops-exts
    python examples/benchmarks/bank_vs_lucidrains.py --threads 1 --log-dir DIR
"""

import argparse
import os
import statistics
import tempfile
import time

import torch
from runlog import RunLog, cpu_model  # examples/benchmarks/runlog.py, beside this script

from fairseq_longmem.memory.bank import ChunkedMemoryBank


def knn_memory_class():
    try:
        from memorizing_transformers_pytorch.knn_memory import KNNMemory
    except ImportError as e:
        raise SystemExit(f"error: this comparison needs lucidrains' package ({e}): pip install "
                         "--no-deps memorizing-transformers-pytorch==0.4.1 einops einops-exts")
    return KNNMemory


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--memory-sizes", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--segment", type=int, default=1024, help="tokens added, and queries, per step")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--k", type=int, default=64, help="retrieved tokens per query")
    p.add_argument("--chunk-size", type=int, default=4, help="ours: tokens per chunk")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch and faiss threads")
    p.add_argument("--log-dir", help="also write the table, every timing and the machine's "
                   "description there (docs/results/logs/benchmarks/RUN)")
    args = p.parse_args(argv)
    KNNMemory = knn_memory_class()
    if args.threads:
        import faiss

        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    log = RunLog(args.log_dir)
    T, hd, k, csz = args.segment, args.head_dim, args.k, args.chunk_size
    g = torch.Generator().manual_seed(0)
    log.print(f"# {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
              f"T={T} queries and added tokens per step, hd={hd}, k={k} (ours: {k // csz} chunks of "
              f"{csz}), B=1, one head; each memory full; best and median of {args.repeats} steps")
    log.print("| msz (tokens) | search ours ms | search peer ms | search peer/ours | "
              "add ours ms | add peer ms | add peer/ours |")
    log.print("|---|---|---|---|---|---|---|")
    for msz in args.memory_sizes:
        with tempfile.TemporaryDirectory() as tmp:
            peer = KNNMemory(dim=hd, max_memories=msz, num_indices=1,
                             memmap_filename=os.path.join(tmp, "m.memmap"), multiprocessing=False)
            ours = ChunkedMemoryBank(1, 1, hd, csz, msz)
            for _ in range(msz // T + 1):  # full, and wrapped once
                kv = torch.randn(1, T, 2, hd, generator=g)
                peer.add(kv)
                ours.add(kv[:, None, :, 0], kv[:, None, :, 1])
            assert int(ours.fill().min()) == msz
            t = {"search ours": [], "search peer": [], "add ours": [], "add peer": []}
            for _ in range(args.repeats):
                kv = torch.randn(1, T, 2, hd, generator=g)
                q = torch.randn(1, T, hd, generator=g)
                for name, fn in (("search peer", lambda: peer.search(q, k)),
                                 ("add peer", lambda: peer.add(kv)),
                                 ("search ours", lambda: ours.search(q[:, None], k)),
                                 ("add ours", lambda: ours.add(kv[:, None, :, 0], kv[:, None, :, 1]))):
                    t0 = time.perf_counter()
                    fn()
                    t[name].append(time.perf_counter() - t0)
            for name, times in t.items():
                log.times(f"{msz} {name}", times)
            best = {n: 1e3 * min(v) for n, v in t.items()}
            med = {n: 1e3 * statistics.median(v) for n, v in t.items()}
            log.print(f"| {msz:,} | {best['search ours']:.1f} (median {med['search ours']:.1f}) | "
                      f"{best['search peer']:.1f} (median {med['search peer']:.1f}) | "
                      f"{best['search peer'] / best['search ours']:.2f}x | "
                      f"{best['add ours']:.2f} | {best['add peer']:.1f} | "
                      f"{best['add peer'] / best['add ours']:.0f}x |")
            peer.clear()
    log.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
