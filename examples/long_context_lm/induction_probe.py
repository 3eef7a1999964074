"""Can the memory find the continuation of an earlier occurrence? For every token whose bigram
(previous token, token) last occurred in an earlier segment of its document, still in memory,
check which chunks the memory layer's queries retrieve: the chunk holding the earlier
occurrence's second token (the *continuation*: its value is what an induction-style lookup
needs), the chunk holding its first token (the *same token* as the query's), against the share
of the memory that the retrieval covers (*chance*)::

    python examples/long_context_lm/induction_probe.py DATA --path CK --split valid \\
        --tokens-per-sample 128 [--max-segments 400] [--model-overrides "{...}"]

Prints, over those tokens and every head, the hit rates (a head hits when one of its retrieved
chunks is the one named) and the expected rate of a random choice of chunks; with several reading
layers (``--read-layers``, the training-free read) over every layer's heads, and per layer under
``per_layer``; and the share of
retrieved chunks that sit at the query's own offset in their segment (the backbone's learned
positions restart every segment, so keys carry the offset), against its chance, csz / T. One stream
(batch size 1), documents in order, as ``fairseq-eval-lm --batch-size 1`` reads them.
"""

import argparse
import json
import logging
import sys

import torch
from fairseq import checkpoint_utils, tasks, utils

import fairseq_longmem.modules.memory_attention as memory_attention
from fairseq_longmem import user_dir
from fairseq_longmem.tasks.document_stream import previous_bigram_distance

logger = logging.getLogger("induction_probe")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data")
    p.add_argument("--path", required=True)
    p.add_argument("--split", default="valid")
    p.add_argument("--tokens-per-sample", type=int, default=128)
    p.add_argument("--max-segments", type=int, default=0, help="stop after this many (0: all)")
    p.add_argument("--model-overrides", default="{}")
    p.add_argument("--results-json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout)
    utils.import_user_module(argparse.Namespace(user_dir=user_dir.path()))
    overrides = eval(args.model_overrides)
    overrides.update(data=args.data, tokens_per_sample=args.tokens_per_sample, batch_size=1)
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [args.path], arg_overrides=overrides)
    model = models[0].eval()
    T = args.tokens_per_sample
    task.load_dataset(args.split)
    ds = task.dataset(args.split)
    mcfg = model.decoder.cfg
    csz, capacity = mcfg.chunk_size, mcfg.memory_size // mcfg.chunk_size

    layers = list(getattr(model.decoder, "read_layers", None)
                  or getattr(mcfg, "layers", None) or [mcfg.memory_layer])
    captured = []  # the chunk slots (H, T, nk) of every read of the current forward, bottom up
    real_read = memory_attention.read_memory

    def read_and_keep(memory, q, k):
        found = real_read(memory, q, k)
        captured.append(found.chunk_index[0])
        return found

    memory_attention.read_memory = read_and_keep
    hits = {"continuation": 0, "same_token": 0}
    per_layer = {str(layer): {"continuation": 0, "same_token": 0} for layer in layers}
    chance, probes, heads = 0.0, 0, None
    aligned = retrieved = 0
    dist_cache = {}
    try:
        with torch.no_grad():
            for t in range(len(ds)):
                if args.max_segments and t >= args.max_segments:
                    break
                (_, rows) = ds[t]
                source, target, new_doc, doc, seg = rows[0]
                if source is None:
                    break
                sample = ds.collater([ds[t]])
                captured.clear()
                model(**sample["net_input"])
                if not captured or seg == 0:
                    continue
                if len(captured) != len(layers):
                    raise SystemExit(f"error: {len(captured)} memory reads per forward for the "
                                     f"{len(layers)} reading layer(s) {layers}")
                slots = captured[0]
                if doc not in dist_cache:
                    dist_cache = {doc: previous_bigram_distance(ds.documents[doc].numpy(), ds.eos)}
                dist = dist_cache[doc]
                H, W, nk = slots.shape
                heads = H
                # memory entry e of a document is its source token e (entry 0: the </s> before it),
                # i.e. document token e - 1; chunk n holds entries [n*csz, (n+1)*csz). Slot s holds
                # the newest chunk n < written with n = s (mod capacity).
                written = (seg * T) // csz  # whole chunks written before this segment
                for k in range(len(target)):
                    i = seg * T + k  # the target's document position
                    d = int(dist[i])
                    if d == 0 or i // T == (i - d) // T:
                        continue  # first occurrence, or in the segment the local attention sees
                    j = i - d  # earlier occurrence of the bigram: tokens j-1, j
                    want = {"continuation": (j + 1) // csz, "same_token": j // csz}
                    oldest = max(0, written - capacity)
                    if want["same_token"] < oldest or want["continuation"] >= written:
                        continue  # evicted, or not searchable yet
                    probes += 1
                    for layer, read in zip(layers, captured):
                        found = read[:, k]  # (H, nk) ring slots
                        got = [set(((written - 1) - ((written - 1 - s) % capacity))
                                   for s in found[h].tolist() if s >= 0) for h in range(H)]
                        for name, n in want.items():
                            hit = sum(n in g for g in got)
                            hits[name] += hit
                            per_layer[str(layer)][name] += hit
                        # the learned positions restart every segment: a chunk at the query's own
                        # offset in its segment (chance: csz / T of the retrieved chunks)
                        aligned += sum(sum(((n * csz) % T) // csz == k // csz for n in g)
                                       for g in got)
                        retrieved += sum(len(g) for g in got)
                    chance += H * min(1.0, nk / (written - oldest))
    finally:
        memory_attention.read_memory = real_read
    if not probes:
        print("no token whose bigram recurred in an earlier segment inside the memory")
        return 1
    total = probes * heads
    result = {"tokens": probes, "heads": heads, "layers": layers,
              "continuation_hit_rate": hits["continuation"] / (total * len(layers)),
              "same_token_hit_rate": hits["same_token"] / (total * len(layers)),
              "chance_rate": chance / total,
              "same_offset_share": aligned / retrieved, "same_offset_chance": csz / T}
    if len(layers) > 1:
        result["per_layer"] = {layer: {f"{name}_hit_rate": n / total for name, n in counts.items()}
                               for layer, counts in per_layer.items()}
    print(json.dumps(result, indent=1))
    if args.results_json:
        with open(args.results_json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
