"""The memory search alone, per backend, at the paper's shapes (or scaled ones), with a check that
every backend returns the reference chunks (``matmul``: all scores, then topk).

Run from the repository root:
  python examples/benchmarks/search.py --threads 1                       # CPU, scaled: B=1
  (--log-dir DIR also writes the table, every timing and the machine there)
  python examples/benchmarks/search.py --device cuda --dtype float16 --B 8  # the paper's shapes
"""

import argparse
import logging
import os
import time

import torch
from runlog import RunLog, cpu_model  # examples/benchmarks/runlog.py, beside this script

from fairseq_longmem.memory import search as memory_search
from fairseq_longmem.memory.bank import ChunkedMemoryBank


logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def available_backends(device):
    out = []
    for name in ChunkedMemoryBank.BACKENDS:
        if name == "auto":
            continue
        try:
            memory_search.check_backend(name)
        except (ImportError, RuntimeError) as e:
            print(f"# {name}: skipped ({' '.join(str(e).split())[:120]})")
            continue
        if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            print("# triton: skipped (needs a CUDA device)")
            continue
        out.append(name)
    return out


def best_time(fn, repeats, sync, log=None, key=None):
    """Fastest of ``repeats`` calls (after one warm-up): on a shared machine the least disturbed.
    Every call's time goes to the run's log (raw.json) under ``key``."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    if log is not None:
        log.times(key, times)
    return min(times)


def same_as_reference(summaries, queries, slots, ref):
    """('same' | 'same up to N tied ranks', max score difference) of slots against ref slots."""
    if torch.equal(slots, ref):
        return "same", 0.0
    valid = ref >= 0
    if not torch.equal(slots >= 0, valid):
        raise AssertionError("a backend returned another number of chunks than the reference")
    S = summaries.float()  # (B, H, C, hd)

    def scores(s):
        B, H, T, nk = s.shape
        idx = s.clamp_min(0).reshape(B, H, T * nk, 1).expand(-1, -1, -1, S.shape[-1])
        picked = S.gather(2, idx).view(B, H, T, nk, -1)
        return torch.einsum("bhtd,bhtkd->bhtk", queries.float(), picked)

    diff = (scores(slots) - scores(ref)).abs()[valid]
    scale = float(scores(ref)[valid].abs().max())
    # same scores rank by rank up to the storage dtype's rounding of scores: ties, not errors
    tol = 4 * torch.finfo(summaries.dtype).eps * max(scale, 1.0)
    if float(diff.max()) > tol:
        raise AssertionError(f"chunks differ from the reference beyond ties: max score "
                             f"difference {float(diff.max()):.3g} > {tol:.3g}")
    return f"same up to {int((slots != ref).any(dim=-1).sum())} tied queries", float(diff.max())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--B", type=int, default=None,
                   help="batch rows (default: 8 on CUDA, the paper's; 1 on CPU)")
    p.add_argument("--H", type=int, default=16, help="heads")
    p.add_argument("--T", type=int, default=1024, help="queries per row and head (segment)")
    p.add_argument("--hd", type=int, default=64, help="head size")
    p.add_argument("--csz", type=int, default=4, help="chunk size")
    p.add_argument("--k", type=int, default=64, help="retrieved tokens per query (k/csz chunks)")
    p.add_argument("--memory-sizes", type=int, nargs="+", default=[65536, 262144])
    p.add_argument("--backends", nargs="+", default=None,
                   help="default: every backend this machine runs")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--threads", type=int, default=None, help="torch (and faiss) threads")
    p.add_argument("--log-dir", help="also write the table, every timing and the machine's "
                   "description there (docs/results/logs/benchmarks/RUN)")
    args = p.parse_args()
    log = RunLog(args.log_dir)
    dev = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
        try:
            import faiss

            faiss.omp_set_num_threads(args.threads)
        except ImportError:
            pass
    B = args.B or (8 if dev.type == "cuda" else 1)
    dtype = getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    backends = args.backends or available_backends(dev)
    backends = ["matmul"] + [b for b in backends if b != "matmul"]  # the reference first
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_model()
    log.print(f"# {name}, device={dev}, dtype={args.dtype}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")
    log.print(f"# B={B} H={args.H} T={args.T} queries hd={args.hd} csz={args.csz} k={args.k} "
          f"({args.k // args.csz} chunks per query); each memory full; best of {args.repeats}; "
          "'select' = the chunk selection alone, 'search' = bank.search (selection + K/V gather)")
    cols = ["msz", "chunks C", "backend", "select ms", "search ms", "select vs matmul",
            "chunks vs matmul"]
    log.print("| " + " | ".join(cols) + " |")
    log.print("|" + "---|" * len(cols))
    g = torch.Generator().manual_seed(0)
    for msz in args.memory_sizes:
        bank = ChunkedMemoryBank(B, args.H, args.hd, args.csz, msz, dtype=dtype, device=dev)
        for _ in range(msz // args.T + 1):  # full, and the ring buffer wrapped
            kv = torch.randn(2, B, args.H, args.T, args.hd, generator=g).to(dev, dtype)
            bank.add(kv[0], kv[1])
        assert int(bank.fill().min()) == msz
        queries = torch.randn(B, args.H, args.T, args.hd, generator=g).to(dev, dtype)
        nk = args.k // args.csz
        ref, t_ref = None, None
        for backend in backends:
            bank.backend = backend

            def select():
                return memory_search.search(backend, queries, bank._summaries, bank._count, nk,
                                            bank.max_score_bytes)

            slots = select().to(dev)
            t_sel = best_time(select, args.repeats, sync, log, f"{msz} {backend} select")
            t_all = best_time(lambda: bank.search(queries, args.k), args.repeats, sync, log,
                              f"{msz} {backend} search")
            if backend == "matmul":
                ref, t_ref, check = slots, t_sel, "reference"
            else:
                check, _ = same_as_reference(bank._summaries, queries, slots, ref)
            log.print(f"| {msz:,} | {bank.capacity:,} | {backend} | {1e3 * t_sel:.1f} | "
                      f"{1e3 * t_all:.1f} | {t_sel / t_ref:.2f}x | {check} |")
        del bank, queries, ref
    log.close()


if __name__ == "__main__":
    main()
