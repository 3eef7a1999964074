"""Peak resident memory of one no-gradient forward of a converted Llama backbone to its logits,
over what the process held before it: ours keeping every hidden state ``[h_0 .. h_L]`` (what the
backbone returned before ``keep=``), ours keeping only what the language model reads (``keep=``,
the default of ``llama_lm`` since commit c72716a), and transformers' LlamaForCausalLM on the same
weights (``llama_forward.py``'s twin, ``use_cache=False``). Each cell runs in a fresh child
process, the peak read from Linux's VmHWM after a reset through /proc/self/clear_refs.

Run from the repository root, e.g.

    python examples/benchmarks/forward_peak.py SMOLLM2/checkpoint.pt --batches 1,4 \
        --lengths 1024,2048 --log-dir docs/results/logs/benchmarks/forward_peak_...
"""

import argparse
import ctypes
import json
import subprocess
import sys

import torch
from llama_forward import hf_twin, load_ours
from memory_peak import status_kib
from runlog import RunLog

MODES = {"all": "ours, every hidden state kept", "keep": "ours, keep=(L,)",
         "transformers": "transformers"}


def child(path, mode, B, T, threads):
    torch.set_num_threads(threads)
    ours, _ = load_ours(path)
    model = hf_twin(ours) if mode == "transformers" else ours
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, ours.dims.vocab_size, (B, T), generator=g)
    last = len(ours.blocks)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # VmHWM := VmRSS
    with torch.no_grad():
        if mode == "transformers":
            logits = model(input_ids=tokens, use_cache=False).logits
        else:
            hiddens, _ = ours(tokens, keep=None if mode == "all" else (last,))
            logits = ours.logits(hiddens[last])
    peak = status_kib("VmHWM")
    print(json.dumps({"before_mib": before / 1024, "peak_mib": peak / 1024,
                      "step_mib": (peak - before) / 1024,
                      "logits_mib": logits.numel() * logits.element_size() / 2**20}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a converted llama_lm checkpoint (examples/get_smollm2.py)")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--lengths", default="1024,2048")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-dir", help="write the table, command and machine here (runlog.py)")
    p.add_argument("--child", nargs=3, metavar=("MODE", "B", "T"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        mode, B, T = args.child
        return child(args.checkpoint, mode, int(B), int(T), args.threads)
    log = RunLog(args.log_dir)
    log.print("peak resident memory of one forward to the logits over the process's resident "
              f"memory before it (MiB), {args.threads} threads, fp32, fresh process per cell")
    log.print()
    log.print("| B | T | " + " | ".join(MODES.values())
              + " | of which logits | kept / every state |")
    log.print("|---|---|" + "---|" * (len(MODES) + 2))
    for B in [int(x) for x in args.batches.split(",")]:
        for T in [int(x) for x in args.lengths.split(",")]:
            peaks = {}
            for mode in MODES:
                out = subprocess.run([sys.executable, __file__, args.checkpoint, "--threads",
                                      str(args.threads), "--child", mode, str(B), str(T)],
                                     capture_output=True, text=True, check=True).stdout
                peaks[mode] = json.loads(out.strip().splitlines()[-1])
                log.raw[f"B{B}_T{T}_{mode}"] = peaks[mode]
            cells = [f"{peaks[m]['step_mib']:.0f}" for m in MODES]
            ratio = peaks["keep"]["step_mib"] / peaks["all"]["step_mib"]
            log.print(f"| {B} | {T} | " + " | ".join(cells)
                      + f" | {peaks['keep']['logits_mib']:.0f} | {ratio:.2f} |")
    log.close()


if __name__ == "__main__":
    main()
