"""Key-value recall against distance: how far back LongMem's memory reaches (synthetic, CPU).

Each document states four key-value facts in its first segment and asks for them ``d`` segments
later (``d`` = 1, 2, 4, 8, 16 or 32; the local window is one segment, so only the memory can
answer). A fact is one token ``c_{i,j}`` (key i, value j); an ask is the key token ``k_i``
followed by the value token ``v_j``, and recall is the share of asked values predicted exactly.
As in tests/test_memory_recall.py, the backbone's token embeddings are compositional
(``c_{i,j} = (k_i + v_j) / sqrt 2``), standing in for what pretraining gives a real LM, and its
layers first learn the same lookup *within* a segment; LongMem (memory layer 0, r = 1, csz = 2,
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
import random
import sys
import time

import torch
from fairseq.data import Dictionary

from fairseq_longmem.models.longmem_gpt2 import LongMemGPT2Config, LongMemGPT2Model
from fairseq_longmem.modules.gpt2 import GPT2Backbone, GPT2Dims
from fairseq_longmem.tasks.longmem_lm import DocumentStreamDataset

logger = logging.getLogger("recall_distance")

NK, NV, NF, T, FACTS, ROWS = 8, 8, 32, 32, 4, 8
D, LAYERS, HEADS = 128, 4, 4
DISTANCES = (1, 2, 4, 8, 16, 32)


class Vocab:
    """Keys ``k_i``, values ``v_j``, fact tokens ``c_{i,j}`` and filler in a fairseq Dictionary."""

    def __init__(self):
        self.dict = Dictionary()
        self.keys = [self.dict.add_symbol(f"k{i}") for i in range(NK)]
        self.values = [self.dict.add_symbol(f"v{j}") for j in range(NV)]
        self.fact = {(i, j): self.dict.add_symbol(f"c{i}_{j}") for i in range(NK) for j in range(NV)}
        self.filler = [self.dict.add_symbol(f"f{i}") for i in range(NF)]


def make_document(v: Vocab, rng, distance):
    """Facts in segment 0, asked in segment ``distance``; ``distance=0``: facts in the first half
    of a single segment and asked in its second half (the backbone's in-context lookup)."""
    keys, values = rng.sample(range(NK), FACTS), [rng.randrange(NV) for _ in range(FACTS)]
    first = [rng.choice(v.filler) for _ in range(T)]
    for i, j, p in zip(keys, values, rng.sample(range(T // 2) if distance == 0 else range(T), FACTS)):
        first[p] = v.fact[(i, j)]
    ask_segment = first if distance == 0 else [rng.choice(v.filler) for _ in range(T)]
    slots = range(T // 2, T - 1, 2) if distance == 0 else range(0, T - 1, 2)
    for p, n in zip(rng.sample(slots, FACTS), rng.sample(range(FACTS), FACTS)):
        ask_segment[p], ask_segment[p + 1] = v.keys[keys[n]], v.values[values[n]]
    if distance == 0:
        return torch.tensor(first, dtype=torch.int32)
    middle = [rng.choice(v.filler) for _ in range(T * (distance - 1))]
    return torch.tensor(first + middle + ask_segment, dtype=torch.int32)


def batches(v: Vocab, distances, n_docs, seed):
    """``n_docs`` documents, distances taken in turn from ``distances``, streamed in ROWS rows."""
    rng = random.Random(seed)
    docs = [make_document(v, rng, distances[k % len(distances)]) for k in range(n_docs)]
    ds = DocumentStreamDataset(docs, v.dict.pad(), v.dict.eos(), T, ROWS, 0, 1)
    return [ds.collater([ds[t]]) for t in range(len(ds))]


def answers(v: Vocab, sample):
    src, tgt = sample["net_input"]["src_tokens"], sample["target"]
    is_key = (src >= v.keys[0]) & (src <= v.keys[-1])
    return is_key & (tgt >= v.values[0]) & (tgt <= v.values[-1])


def recall(v: Vocab, logits_of, samples):
    hit = total = 0
    with torch.no_grad():
        for s in samples:
            m = answers(v, s)
            hit += (logits_of(s).argmax(-1)[m] == s["target"][m]).sum().item()
            total += m.sum().item()
    return hit / max(total, 1), total


def xent(v: Vocab, logits, target):
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), target.flatten(), ignore_index=v.dict.pad())


def train_backbone(v: Vocab, epochs, steps):
    torch.manual_seed(0)
    dims = GPT2Dims(vocab_size=len(v.dict), embed_dim=D, num_layers=LAYERS, num_heads=HEADS,
                    max_positions=T, dropout=0.0, attention_dropout=0.0)
    bb = GPT2Backbone(dims)
    with torch.no_grad():
        k, val = 0.3 * torch.randn(NK, D), 0.3 * torch.randn(NV, D)
        bb.wte.weight.normal_(0, 0.3)  # about GPT-2's embedding norm
        for i in range(NK):
            bb.wte.weight[v.keys[i]] = k[i]
        for j in range(NV):
            bb.wte.weight[v.values[j]] = val[j]
        for (i, j), t in v.fact.items():
            bb.wte.weight[t] = (k[i] + val[j]) / 2 ** 0.5
    bb.wte.weight.requires_grad_(False)
    opt = torch.optim.Adam([p for p in bb.parameters() if p.requires_grad], lr=3e-3)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / (epochs * steps))
    logits_of = lambda s: bb.output_layer(bb(s["net_input"]["src_tokens"])[0][-1])  # noqa: E731
    for epoch in range(epochs):
        for s in batches(v, (0,), steps * ROWS, 500 + epoch):
            loss = xent(v, logits_of(s), s["target"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            decay.step()
    lookup, _ = recall(v, logits_of, batches(v, (0,), 64, 7))
    return bb, dims, lookup


def longmem(v: Vocab, bb, dims, memory_size, disable_memory):
    cfg = LongMemGPT2Config(
        embed_dim=D, num_layers=LAYERS, num_heads=HEADS, max_positions=T, memory_layer=0,
        reduction_factor=1, memory_size=memory_size, chunk_size=2, retrieved_tokens=16,
        search_backend="torch", disable_memory=disable_memory, dropout=0.0, max_target_positions=T)
    backbone = GPT2Backbone(dims)
    backbone.load_state_dict(bb.state_dict())
    torch.manual_seed(0)
    return LongMemGPT2Model.from_backbone(cfg, v.dict, backbone)


def train_longmem(v: Vocab, model, epochs, docs):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for epoch in range(epochs):
        for s in batches(v, DISTANCES, docs, 1000 + epoch):
            logits, _ = model(**s["net_input"])
            loss = xent(v, logits, s["target"])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


def score(v: Vocab, model, eval_docs):
    """Recall per distance, each on its own documents (the same ones for every condition)."""
    model.decoder.reset_memory()
    out = {}
    for d in DISTANCES:
        share, total = recall(v, lambda s: model(**s["net_input"])[0], batches(v, (d,), eval_docs, 7 + d))
        out[d] = (share, total)
    return out


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

    bb, dims, lookup = train_backbone(v, args.backbone_epochs, 32)
    logger.info("backbone: in-segment lookup %.3f (%.0fs)", lookup, time.time() - start)
    records.append({"condition": "backbone_in_segment", "recall": lookup})
    for name, disable in (("memory", False), ("memory_off", True)):
        t0 = time.time()
        model = longmem(v, bb, dims, args.memory_size, disable)
        train_longmem(v, model, args.epochs, args.docs)
        trained = time.time() - t0
        conditions = [(name, args.memory_size)]
        if not disable and args.small_memory:
            conditions.append((f"memory_{args.small_memory}", args.small_memory))
        for cond, msz in conditions:
            model.decoder.cfg.memory_size = msz  # the bank is built lazily with this size
            for d, (share, total) in score(v, model, args.eval_docs).items():
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
