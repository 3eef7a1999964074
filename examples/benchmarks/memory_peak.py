"""Peak resident memory of one LongMem step over what the process held before it: the memory off,
the memory on with each bank keeping its own search-result buffers, and the memory on with the
buffers shared by every bank (the default, ``ChunkedMemoryBank.gather_pool``). Each cell runs in
a fresh child process (glibc keeps freed pages for reuse, so two configurations measured in one
process would flatter the second; malloc_trim hands back what the fill freed); the peak is
Linux's VmHWM, reset through /proc/self/clear_refs once the memory is full (the first step's
optimizer state is in every configuration's peak).

Run from the repository root (the model options are longmem_speed.py's), e.g. the SideNet that
reads in 15 blocks at an in-context-learning batch's shape:

    python examples/benchmarks/memory_peak.py --backbone SMOLLM2/checkpoint.pt \
        --reduction-factor 1 --sidenet-from 15 --read-layers 15-29 --sidenet-residual none \
        --memory-read joint --sidenet-copy first --T 1024 --B 4 --msz 4096 --K 32 --threads 2
"""

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys

import torch
from longmem_speed import Runner, build_models, make_batches, make_dictionary
from runlog import RunLog

from fairseq_longmem.memory.bank import SHARED_GATHER_POOL, GatherPool
from fairseq_longmem.memory.layered import LayeredMemory
from fairseq_longmem.models.backbone import read_backbone_checkpoint

CONFIGS = {
    "off": "memory off",
    "per-bank": "memory on, buffers per bank",
    "shared": "memory on, buffers shared",
}


def status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (this script needs Linux)")


def banks_of(model, mode):
    memory = model.decoder.stream_memory(mode)
    return list(memory.banks.values()) if isinstance(memory, LayeredMemory) else [memory]


def child(args, config, mode):
    """One cell: fill the memory, then the peak of ``args.steps`` steps over the RSS before."""
    if args.threads:
        torch.set_num_threads(args.threads)
    dictionary = make_dictionary(args.vocab)
    on, off = build_models(args, dictionary)
    model = off if config == "off" else on
    del on, off
    runner = Runner(model, args, torch.device("cpu"), dictionary.pad())
    train = mode == "train"
    fill = args.msz // args.T
    batches = make_batches(args, dictionary, fill + args.steps)
    for b in batches[:fill]:
        runner.fill(b, train)
    SHARED_GATHER_POOL.release()  # the fill's buffers: every configuration starts without
    banks, pools = [], []
    if config != "off":
        banks = banks_of(model, mode)
        if config == "per-bank":
            for bank in banks:
                bank.gather_pool = GatherPool()
        pools = list({id(b.gather_pool): b.gather_pool for b in banks}.values())
    step = runner.train_step if train else runner.eval_forward
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # what the fill freed goes back to the system
    before = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # VmHWM := VmRSS
    for b in batches[fill:]:
        step(b)
    peak = status_kib("VmHWM")
    return dict(before_mib=before / 1024, peak_mib=peak / 1024,
                step_mib=(peak - before) / 1024,
                pooled_mib=sum(p.nbytes for p in pools) / 2**20, banks=len(banks))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", required=True, help="a plain LM checkpoint (converted SmolLM2)")
    p.add_argument("--reduction-factor", type=int, default=2)
    p.add_argument("--memory-layer", type=int, default=-1)
    p.add_argument("--sidenet-copy", default="last", choices=("last", "first"))
    p.add_argument("--sidenet-from", type=int, default=0)
    p.add_argument("--read-layers", default="")
    p.add_argument("--sidenet-residual", default="cross", choices=("cross", "none"))
    p.add_argument("--memory-read", default="gated", choices=("gated", "joint"))
    p.add_argument("--T", type=int, default=256)
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--msz", type=int, default=4096)
    p.add_argument("--K", type=int, default=32)
    p.add_argument("--csz", type=int, default=4)
    p.add_argument("--steps", type=int, default=2, help="steps measured (the first included)")
    p.add_argument("--modes", default="eval,train")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--log-dir")
    p.add_argument("--child", nargs=2, metavar=("CONFIG", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    # what build_models / Runner read, fixed here
    args.size, args.backend, args.dtype = "tiny", "auto", "fp32"
    if args.msz % args.T:
        p.error(f"--msz ({args.msz}) must be a multiple of --T ({args.T})")
    args.vocab = read_backbone_checkpoint(args.backbone)[0].dims.vocab_size
    if args.child:
        print(json.dumps(child(args, *args.child)))
        return
    modes = args.modes.split(",")
    log = RunLog(args.log_dir)
    rows = {}
    for mode in modes:
        for config in CONFIGS:
            out = subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:],
                                  "--child", config, mode], capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{config} {mode} failed:\n{out.stderr[-4000:]}")
            rows[mode, config] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{mode} {config}: {rows[mode, config]}", file=sys.stderr, flush=True)
    log.raw = {f"{m} {c}": r for (m, c), r in rows.items()}
    log.print(f"B={args.B} T={args.T} msz={args.msz} K={args.K} csz={args.csz}, "
              f"read layers {args.read_layers or 'default'}, {args.steps} measured steps; "
              "MiB over the process's resident set before the steps")
    log.print()
    log.print("| mode | configuration | banks | RSS before | peak during steps | step's peak over "
              "before | search buffers held after | step's peak over memory off |")
    log.print("|---|---|---|---|---|---|---|---|")
    for mode in modes:
        base = rows[mode, "off"]["step_mib"]
        for config, name in CONFIGS.items():
            r = rows[mode, config]
            log.print(f"| {mode} | {name} | {r['banks']} | {r['before_mib']:.0f} | "
                      f"{r['peak_mib']:.0f} | {r['step_mib']:.0f} | {r['pooled_mib']:.0f} | "
                      f"{r['step_mib'] - base:+.0f} |")
    log.close()


if __name__ == "__main__":
    main()
