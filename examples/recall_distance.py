"""Key-value recall against distance: how far back LongMem's memory reaches (synthetic, CPU).

Each document states four key-value facts in its first segment and asks for them ``d`` segments
later (``d`` = 1, 2, 4, 8, 16 or 32; the local window is one segment, so only the memory can
answer). A fact is one token ``c_{i,j}`` (key i, value j); an ask is the key token ``k_i``
followed by the value token ``v_j``, and recall is the share of asked values predicted exactly.
The task (examples/recall_task.py, shared with tests/test_memory_recall.py): the backbone's token
embeddings are compositional (``c_{i,j} = (k_i + v_j) / sqrt 2``), standing in for what
pretraining gives a real LM, and its layers first learn the same lookup *within* a segment; LongMem (memory layer 0, r = 1, csz = 2,
K = 16) is then trained once on documents of every distance, with memory and (same steps, same
data) with memory off, and scored per distance. A memory smaller than the distance has evicted
the facts (FIFO), so the run also scores the trained model with a smaller memory
(``--small-memory``, default 256 tokens = 8 segments).

    python examples/recall_distance.py                  # full run (see --help for its size)
    python examples/recall_distance.py --smoke          # a minute or two: checks the pipeline

Prints a table and writes ``OUT/recall_distance.jsonl`` (one JSON record per line: the settings,
then one record per condition and distance), which examples/plot_results.py reads.
"""

import argparse
import json
import logging
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also when loaded by its path
from recall_task import (  # noqa: E402
    FACTS, NV, T, Vocab, longmem, score, train_backbone, train_longmem)

logger = logging.getLogger("recall_distance")

DISTANCES = (1, 2, 4, 8, 16, 32)


def table(records) -> str:
    """The markdown table of a run's records (the lines of recall_distance.jsonl)."""
    settings = records[0]["settings"]
    lookup = next(r["recall"] for r in records if r.get("condition") == "backbone_in_segment")
    rows = {}
    for r in records:
        if "distance" in r:
            rows.setdefault(r["label"], {})[r["distance"]] = (r["recall"], r["asked"])
    distances = settings["distances"]
    lines = [f"Recall of a value asked d segments after its fact ({settings['segment']}-token "
             f"segments; chance {settings['chance']:.3f}; backbone's in-segment lookup {lookup:.3f})",
             "", "| condition | " + " | ".join(f"d={d}" for d in distances) + " |",
             "|---|" + "---|" * len(distances)]
    for label, res in rows.items():
        lines.append(f"| {label} | " + " | ".join(f"{res[d][0]:.3f}" for d in distances) + " |")
    asked = next(iter(rows.values()))[distances[0]][1]
    lines.append(f"\n{asked} values asked per distance and condition.")
    return "\n".join(lines) + "\n"


def hardware() -> str:
    """CPU model, cores and load, for the log (Linux; elsewhere what platform knows)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
        load = " ".join(open("/proc/loadavg", encoding="utf-8").read().split()[:3])
    except (OSError, StopIteration):
        load = "?"
    return f"{model} x {os.cpu_count()} cores, load average at start {load}"


def condition_label(cond, memory_size) -> str:
    """``memory`` / ``memory_256`` / ``memory_off`` -> a table label."""
    if cond == "memory_off":
        return "memory off"
    return f"memory ({cond.split('_')[1] if '_' in cond else memory_size} tokens)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/recall_distance", help="output folder")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the pipeline only")
    p.add_argument("--backbone-epochs", type=int, default=70, help="in-segment lookup epochs (32 steps each)")
    p.add_argument("--epochs", type=int, default=8, help="LongMem epochs")
    p.add_argument("--docs", type=int, default=256, help="training documents per LongMem epoch")
    p.add_argument("--eval-docs", type=int, default=128, help="test documents per distance")
    p.add_argument("--memory-size", type=int, default=2048, help="msz: holds 64 segments")
    p.add_argument("--small-memory", type=int, default=256, help="msz of the extra evaluation (0: none)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (results depend on it)")
    p.add_argument("--table", metavar="JSONL", help="only print the table of an earlier run's log")
    args = p.parse_args(argv)
    if args.table:
        print(table([json.loads(line) for line in open(args.table, encoding="utf-8") if line.strip()]), end="")
        return 0
    if args.smoke:
        args.backbone_epochs, args.epochs, args.docs, args.eval_docs = 12, 1, 64, 16
    logging.basicConfig(format="%(asctime)s | %(message)s", level=logging.INFO)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "recall_distance.jsonl")
    v = Vocab()
    start = time.time()
    records = [{"settings": {k: getattr(args, k) for k in vars(args)} | {
        "segment": T, "facts": FACTS, "values": NV, "chance": 1 / NV, "distances": DISTANCES,
        "torch": torch.__version__, "hardware": hardware()}}]

    bb, lookup, _ = train_backbone(v, args.backbone_epochs, 32)
    logger.info("backbone: in-segment lookup %.3f (%.0fs)", lookup, time.time() - start)
    records.append({"condition": "backbone_in_segment", "recall": lookup})
    for name, disable in (("memory", False), ("memory_off", True)):
        t0 = time.time()
        model = longmem(v, bb, args.memory_size, disable)
        train_longmem(v, model, args.epochs, args.docs, DISTANCES)
        trained = time.time() - t0
        conditions = [(name, args.memory_size)]
        if not disable and args.small_memory:
            conditions.append((f"memory_{args.small_memory}", args.small_memory))
        for cond, msz in conditions:
            model.decoder.cfg.memory_size = msz  # the bank is built lazily with this size
            for d, (share, total) in score(v, model, DISTANCES, args.eval_docs).items():
                records.append({"condition": cond, "label": condition_label(cond, args.memory_size),
                                "memory_size": 0 if disable else msz, "distance": d,
                                "recall": share, "asked": total})
        logger.info("%s: trained in %.0fs, scored in %.0fs", name, trained, time.time() - t0 - trained)
    records.append({"seconds": round(time.time() - start, 1), "threads": args.threads})
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")

    print(table(records), end="")
    print(f"({time.time() - start:.0f}s; log: {path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
