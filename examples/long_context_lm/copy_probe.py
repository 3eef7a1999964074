"""Can a model copy a span it has seen before, and from how far back? A span of random tokens is
written into real text twice, the second time ``d`` segments after the first (``d = 0``: right
after it, in the same segment, where the local attention sees it); the loss on the second copy
against the loss on the first (both unpredictable from the text around them) is what the model
recalls. The memory is for exactly this: the first copy is d segments back, inside the memory
and outside the local window::

    python examples/long_context_lm/copy_probe.py DATA --path CK [--path CK2 ...] \\
        --tokens-per-sample 256 [--span 32] [--trials 64] [--distances 0,1,2,4,8,16] \\
        [--span-vocab 1000] [--span-first 0] [--model-overrides "{'disable_memory': True}"] \\
        [--training-free-memory 15-29 [--free-memory-size 8192 ...]] [--results-json FILE]

Each trial is a document of ``d + 2`` segments of real text from ``DATA``'s ``--split`` (valid by
default) with the span at the same random offset of segment 1 and of segment ``1 + d``; the
same trials (same spans, offsets and text, from ``--seed``) for every model and distance. Its
segments are scored in order, one stream per trial, as ``fairseq-eval-lm --task longmem_lm``
streams a document: a LongMem model writes each segment into its memory after reading it; a
``gpt2_lm`` backbone (or LongMem with memory off) scores each segment from an empty context.
Prints, per model and distance, the loss in bits per token of the first and the second copy
(the span's first token is left out: nothing predicts it) and the recall: their difference.

``copy_probe.py --table A.json [B.json ...]`` prints the markdown table of saved
``--results-json`` files: one row per file, one column per distance, each cell the recall and, in
brackets, the second copy's loss of the first's.
"""

import argparse
import contextlib
import json
import logging
import math
import os
import sys
from typing import Optional

import numpy as np
import torch
from fairseq import checkpoint_utils, utils
from fairseq.data import data_utils

from fairseq_longmem import user_dir

logger = logging.getLogger("copy_probe")


def real_text(data: str, split: str, dictionary) -> np.ndarray:
    """The split's tokens as one array, documents and lines in order."""
    ds = data_utils.load_indexed_dataset(os.path.join(data, split), dictionary)
    if ds is None:
        raise SystemExit(f"error: no binarized split {split!r} under {data}")
    return np.concatenate([ds[i].numpy() for i in range(len(ds))])


def make_trials(text: np.ndarray, vocab: range, T: int, span: int, distance: int, trials: int,
                seed: int):
    """``(docs, first, second)``: ``docs`` (trials, (d + 2) * T) token ids and the document
    positions where the two copies start. Trial ``i`` draws its span, offset and text from
    ``seed`` and ``i`` only, so every distance shares them."""
    if not 1 <= span <= T // 2 - 1:
        raise SystemExit(f"error: --span {span} must be in [1, {T // 2 - 1}] for T = {T}")
    length = (distance + 2) * T
    docs, first, second = [], [], []
    for i in range(trials):
        rng = np.random.RandomState([seed, i])
        tokens = rng.randint(vocab.start, vocab.stop, size=span)
        offset = int(rng.randint(1, T - 2 * span + 1))
        start = int(rng.randint(0, len(text)))
        doc = np.take(text, np.arange(start, start + length), mode="wrap")  # wraps at the end
        a = T + offset
        b = a + span if distance == 0 else (1 + distance) * T + offset
        doc[a:a + span] = tokens
        doc[b:b + span] = tokens
        docs.append(doc)
        first.append(a)
        second.append(b)
    return torch.from_numpy(np.stack(docs)).long(), first, second


@contextlib.contextmanager
def recording_reads(reads: Optional[list]):
    """While active, every memory read's chunk indices (B, H, T, nk; -1 = none) go to ``reads``."""
    if reads is None:
        yield
        return
    from fairseq_longmem.modules import memory_attention

    read = memory_attention.read_memory

    def recorded(memory, q, retrieved_tokens):
        found = read(memory, q, retrieved_tokens)
        reads.append(found.chunk_index.detach().cpu())
        return found

    memory_attention.read_memory = recorded
    try:
        yield
    finally:
        memory_attention.read_memory = read


@torch.no_grad()
def score(model, docs: torch.Tensor, T: int, eos: int, memory: bool,
          reads_of_segment: Optional[int] = None, reads: Optional[list] = None) -> torch.Tensor:
    """Log-probability (nats) of every document token, the documents read as streams; with
    ``reads`` (a list), the chunk indices of every memory read while segment ``reads_of_segment``
    is scored are appended to it, in the order of the reads (the reading layers, bottom up)."""
    B, n = docs.shape
    source = torch.cat([torch.full((B, 1), eos, dtype=docs.dtype), docs[:, :-1]], dim=1)
    out = torch.empty(B, n)
    for s in range(n // T):
        src, tgt = source[:, s * T:(s + 1) * T], docs[:, s * T:(s + 1) * T]
        kwargs = {"new_document": torch.full((B,), s == 0)} if memory else {}
        with recording_reads(reads if s == reads_of_segment else None):
            logits, _ = model(src, **kwargs)
        lprobs = torch.log_softmax(logits.float(), dim=-1)
        out[:, s * T:(s + 1) * T] = lprobs.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    return out


def read_hits(chunk_index: torch.Tensor, first, second, T: int, span: int, csz: int):
    """Where one memory read of segment ``1 + d`` lands for the queries of the second copy's
    tokens (all but its first): the share of the chunks they retrieved (over heads, queries and
    trials) that hold part of the first copy, and that share's chance level, the first copy's
    chunks among all those in memory. Assumes what the probe guarantees: each stream's memory was
    empty at the document's start and never wrapped, so slot ``g`` holds the document's ``g``-th
    chunk, source positions ``csz*g .. csz*g + csz - 1`` (source position p holds token p - 1)."""
    B = chunk_index.shape[0]
    seg = second[0] // T
    in_memory = seg * T // csz
    hits = total = good_sum = 0
    for i in range(B):
        a = first[i]  # the first copy is tokens a .. a+span-1, source positions a+1 .. a+span
        good = torch.zeros(in_memory + 1, dtype=torch.bool)  # index in_memory: -1 (no chunk)
        good[(a + 1) // csz:(a + span) // csz + 1] = True
        t0 = second[i] - seg * T
        slots = chunk_index[i, :, t0 + 1:t0 + span].reshape(-1)
        slots = slots[slots >= 0]
        if slots.numel() and int(slots.max()) >= in_memory:
            raise ValueError("a read named a chunk beyond what the document wrote (wrapped memory)")
        hits += int(good[slots].sum())
        total += slots.numel()
        good_sum += int(good[:in_memory].sum())
    return hits / max(total, 1), good_sum / (B * in_memory)


def copy_losses(lprobs: torch.Tensor, first, second, span: int):
    """Mean loss in bits on the two copies, each without its first token."""
    a = torch.stack([lprobs[i, p + 1:p + span] for i, p in enumerate(first)])
    b = torch.stack([lprobs[i, p + 1:p + span] for i, p in enumerate(second)])
    bits = -1.0 / math.log(2)
    return float(a.mean() * bits), float(b.mean() * bits)


def table(named_results) -> str:
    """Markdown table of ``[(name, results-json rows)]``: a row per name, a column per distance."""
    distances = sorted({r["distance"] for _, rows in named_results for r in rows})
    lines = ["| run | " + " | ".join(f"d = {d}" for d in distances) + " |",
             "|---|" + "---|" * len(distances)]
    for name, rows in named_results:
        by_d = {r["distance"]: r for r in rows}
        if len(by_d) != len(rows):
            raise ValueError(f"{name}: more than one result per distance (one model per file)")
        cells = [f"{by_d[d]['recall_bits']:+.2f} ({by_d[d]['second_bits']:.2f} of "
                 f"{by_d[d]['first_bits']:.2f})" if d in by_d else "" for d in distances]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_table(paths) -> int:
    named = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            named.append((os.path.splitext(os.path.basename(path))[0], json.load(f)))
    print(table(named))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", nargs="?")
    p.add_argument("--path", action="append", help="a checkpoint; repeatable")
    p.add_argument("--table", nargs="+", metavar="RESULTS_JSON",
                   help="only print the markdown table of saved --results-json files")
    p.add_argument("--split", default="valid")
    p.add_argument("--tokens-per-sample", type=int)
    p.add_argument("--span", type=int, default=32)
    p.add_argument("--trials", type=int, default=64)
    p.add_argument("--distances", default="0,1,2,4,8,16", help="segments between the copies")
    p.add_argument("--span-vocab", type=int, default=1000,
                   help="span tokens are drawn from the N most frequent types (dict.txt is sorted "
                        "by count): rare types' embeddings are barely trained in a small model")
    p.add_argument("--span-first", type=int, default=0,
                   help="the first dictionary index span tokens are drawn from (0: the first "
                        "after the special symbols); for a converted model's dict.txt, which lists "
                        "its ids in id order, not by count, e.g. 1003 for ids 1000 and up")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--model-overrides", default="{}", help="applied to every --path")
    p.add_argument("--training-free-memory", metavar="LAYERS",
                   help="read each --path (a gpt2_lm/llama_lm backbone) with the training-free "
                        "memory of these blocks, e.g. 15-29 (fairseq-eval-lm's "
                        "--training-free-memory --free-read-layers)")
    p.add_argument("--free-memory-size", type=int, default=8192)
    p.add_argument("--free-chunk-size", type=int, default=4)
    p.add_argument("--free-retrieved-tokens", type=int, default=32)
    p.add_argument("--free-search-every", type=int, default=1,
                   help="with --training-free-memory: one memory search per N reading layers "
                        "(fairseq-eval-lm's --free-search-every)")
    p.add_argument("--free-memory-distance", type=int, default=0,
                   help="Llama: every retrieved token is read as if this many positions before its "
                        "query (0: the segment length; docs/DESIGN.md, rotary positions)")
    p.add_argument("--read-hits", action="store_true",
                   help="also record where the memory's reads land (d >= 1): per reading layer, the "
                        "share of the chunks retrieved for the second copy's queries that hold the "
                        "first copy, against chance")
    p.add_argument("--results-json")
    args = p.parse_args(argv)
    if args.table:
        return print_table(args.table)
    if not args.data or not args.path or not args.tokens_per_sample:
        p.error("DATA, --path and --tokens-per-sample are required (or --table FILE ...)")
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout)
    utils.import_user_module(argparse.Namespace(user_dir=user_dir.path()))
    distances = [int(d) for d in args.distances.split(",")]
    T = args.tokens_per_sample
    overrides = eval(args.model_overrides)  # a dict literal, as fairseq's --model-overrides
    results = []
    for path in args.path:
        models, _, task = checkpoint_utils.load_model_ensemble_and_task(
            [path], arg_overrides=dict(overrides, data=args.data, tokens_per_sample=T))
        model = models[0].eval()
        if args.training_free_memory:
            from fairseq_longmem.models.training_free import FreeReadConfig, TrainingFreeMemoryModel

            model = TrainingFreeMemoryModel.around(model, FreeReadConfig(
                layers=args.training_free_memory, memory_size=args.free_memory_size,
                chunk_size=args.free_chunk_size, retrieved_tokens=args.free_retrieved_tokens,
                memory_distance=args.free_memory_distance, max_target_positions=T,
                search_every=args.free_search_every)).eval()
        d = task.source_dictionary
        text = real_text(args.data, args.split, d)
        # a LongMem decoder (or the training-free read) keeps one memory per stream; a plain
        # backbone has none
        memory = hasattr(model.decoder, "reset_memory") and not model.decoder.cfg.disable_memory
        lo = args.span_first or d.nspecial
        if not d.nspecial <= lo < len(d):
            raise SystemExit(f"error: --span-first {lo} is not an ordinary symbol of the "
                             f"{len(d)}-symbol dictionary (from {d.nspecial})")
        vocab = range(lo, min(len(d), lo + args.span_vocab))
        for distance in distances:
            docs, first, second = make_trials(text, vocab, T, args.span,
                                              distance, args.trials, args.seed)
            if memory:
                model.decoder.reset_memory()
            hits = args.read_hits and memory and distance >= 1
            if hits and (distance + 1) * T > model.decoder.cfg.memory_size:
                raise SystemExit(f"error: --read-hits at d = {distance} needs a memory of at least "
                                 f"{(distance + 1) * T} tokens (it would wrap)")
            reads = [] if hits else None
            lp = score(model, docs, T, d.eos(), memory, 1 + distance, reads)
            loss1, loss2 = copy_losses(lp, first, second, args.span)
            row = {"path": path, "memory": memory, "distance": distance, "trials": args.trials,
                   "training_free_memory": args.training_free_memory,
                   "free_memory_distance": (args.free_memory_distance or T)
                   if args.training_free_memory else None,
                   "free_search_every": args.free_search_every
                   if args.training_free_memory else None,
                   "span": args.span, "first_bits": loss1, "second_bits": loss2,
                   "recall_bits": loss1 - loss2}
            if hits:
                cfg = model.decoder.cfg
                layers = list(getattr(model.decoder, "read_layers", None)
                              or getattr(cfg, "layers", None) or [cfg.memory_layer])
                if len(layers) != len(reads):
                    layers = list(range(len(reads)))  # cannot name them: number the reads
                shares = [read_hits(r, first, second, T, args.span, cfg.chunk_size) for r in reads]
                row["read_hits"] = {str(layer): share for layer, (share, _) in zip(layers, shares)}
                row["read_hits_chance"] = shares[0][1]
            results.append(row)
            print(f"{path} memory={memory} d={distance}: first {loss1:.3f} second {loss2:.3f} "
                  f"recall {loss1 - loss2:+.3f} bits/token", flush=True)
            if hits:
                print("  reads landing on the first copy (layer: share; chance "
                      f"{row['read_hits_chance']:.3f}): " + ", ".join(
                          f"{k}: {v:.3f}" for k, v in row["read_hits"].items()), flush=True)
    if args.results_json:
        with open(args.results_json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
