"""Write a copy of a binarized corpus whose training split repeats spans of its own documents.

A model learns to copy from its context (the *induction heads* of large language models: find
the earlier occurrence of the current token, predict what followed it) only when its training
text rewards it; GPT-2's pretraining text does, the few million tokens a tiny backbone trains on
here do not (``examples/long_context_lm/copy_probe.py`` measures it). This overwrites a share of
each training document with spans copied from earlier in the same document, at distances drawn
log-uniformly up to ``--max-distance`` tokens, so that recalling them pays, locally and from a
memory::

    python examples/repeat_augment.py DATA/bin --out DATA/bin-repeat --rate 0.1 \\
        --max-distance 16384 [--span 8,32] [--seed 1]

Only the training split changes (its line lengths and every ``</s>`` stay where they were: a span
never covers one); valid and test, the dictionary and every other file are copied unchanged, so
that models trained on the copy are scored on the original text. ``manifest.json`` in ``--out``
records the settings and counts.
"""

import argparse
import json
import math
import os
import shutil
import sys

import numpy as np
import torch
from fairseq.data import Dictionary, data_utils, indexed_dataset


def augment_document(doc: np.ndarray, eos: int, rng: np.random.RandomState, rate: float,
                     span: tuple, max_distance: int, random_vocab: range = None) -> list:
    """Overwrite, in place, about ``rate * len(doc)`` tokens of ``doc`` with spans copied from
    earlier in it, left to right (a later span may copy an earlier copy, as the model sees it).
    With ``random_vocab``, the earlier span is first overwritten with tokens drawn uniformly from
    it, so that only recalling the first occurrence predicts the second (real text's spans are
    partly predictable from their own words). Spans never cover ``eos``, and no copy writes over
    an earlier copy or its source, so every pair still matches in the result. Returns the copies
    as ``(source start, copy start, length)``."""
    lo, hi = span
    n = len(doc)
    per_copy = (lo + hi) / 2 * (1 if random_vocab is None else 2)  # random: both copies written
    wanted = int(rate * n / per_copy)
    if wanted == 0 or n < 2 * hi:
        return []
    starts = np.sort(rng.randint(hi, n - hi, size=wanted))
    copies = []
    taken = np.zeros(n, dtype=bool)  # copies and their sources: never overwritten again
    for b in starts:
        length = int(rng.randint(lo, hi + 1))
        far = min(max_distance, b)
        if far < length:
            continue
        distance = int(round(math.exp(rng.uniform(math.log(length), math.log(far)))))
        a = b - distance
        if (doc[a:a + length] == eos).any() or (doc[b:b + length] == eos).any():
            continue
        if taken[b:b + length].any() or (random_vocab is not None and taken[a:a + length].any()):
            continue  # would break an earlier pair (a text copy may copy a copy: it is unchanged)
        if random_vocab is not None:
            doc[a:a + length] = rng.randint(random_vocab.start, random_vocab.stop, size=length)
        doc[b:b + length] = doc[a:a + length]
        taken[a:a + length] = taken[b:b + length] = True
        copies.append((int(a), int(b), length))
    return copies


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="a fairseq-preprocess folder (dict.txt, train/valid/test .bin/.idx)")
    p.add_argument("--out", required=True, help="a new folder (refused if it exists)")
    p.add_argument("--rate", type=float, default=0.1, help="share of training tokens overwritten")
    p.add_argument("--max-distance", type=int, default=16384, help="tokens back, at most")
    p.add_argument("--span", default="8,32", help="span lengths: min,max tokens")
    p.add_argument("--random-spans", type=int, default=0, metavar="N",
                   help="write random tokens (from the N most frequent types) at both copies "
                        "instead of copying the document's own text (0: copy its text)")
    p.add_argument("--random-first", type=int, default=0, metavar="I",
                   help="with --random-spans: draw from the N types from dictionary index I on (0: "
                        "the first after the special symbols); for a converted model's dict.txt, "
                        "which lists ids in id order, not by count, e.g. 1003 for ids 1000 and up")
    p.add_argument("--split", default="train")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    span = tuple(int(x) for x in args.span.split(","))
    if len(span) != 2 or not 1 <= span[0] <= span[1]:
        p.error(f"--span {args.span!r}: expected MIN,MAX with 1 <= MIN <= MAX")
    if not 0 < args.rate < 1:
        p.error(f"--rate {args.rate}: expected a share in (0, 1)")
    if os.path.exists(args.out):
        p.error(f"--out {args.out} exists: choose a new folder (nothing is overwritten)")
    dictionary = Dictionary.load(os.path.join(args.data, "dict.txt"))
    ds = data_utils.load_indexed_dataset(os.path.join(args.data, args.split), dictionary)
    if ds is None:
        p.error(f"no binarized split {args.split!r} in {args.data}")
    lines = [ds[i].numpy().astype(np.int64) for i in range(len(ds))]
    eos = dictionary.eos()
    random_vocab = None
    if args.random_spans:
        first = args.random_first or dictionary.nspecial
        if not dictionary.nspecial <= first < len(dictionary):
            p.error(f"--random-first {first} is not an ordinary symbol of the {len(dictionary)}-"
                    f"symbol dictionary (from {dictionary.nspecial})")
        random_vocab = range(first, min(len(dictionary), first + args.random_spans))

    os.makedirs(args.out)
    for name in os.listdir(args.data):
        if not name.startswith(args.split + "."):
            shutil.copy2(os.path.join(args.data, name), os.path.join(args.out, name))

    # documents are runs of lines between empty lines (a lone </s>), as longmem_lm reads them
    rng = np.random.RandomState(args.seed)
    builder = indexed_dataset.make_builder(
        os.path.join(args.out, args.split + ".bin"), impl="mmap", vocab_size=len(dictionary))
    total = written = docs = pairs = 0
    i = 0
    while i < len(lines):
        j = i
        while j < len(lines) and not (len(lines[j]) == 1 and lines[j][0] == eos):
            j += 1
        if j > i:
            flat = np.concatenate(lines[i:j])
            copies = augment_document(flat, eos, rng, args.rate, span, args.max_distance,
                                      random_vocab)
            written += sum(n * (1 if random_vocab is None else 2) for _, _, n in copies)
            pairs += len(copies)
            total += len(flat)
            docs += 1
            pieces = np.split(flat, np.cumsum([len(x) for x in lines[i:j]])[:-1])
            for piece in pieces:
                builder.add_item(torch.from_numpy(piece))
        if j < len(lines):
            builder.add_item(torch.from_numpy(lines[j]))  # the empty line between documents
        i = j + 1
    builder.finalize(os.path.join(args.out, args.split + ".idx"))
    manifest = {"source": os.path.abspath(args.data), "split": args.split, "rate": args.rate,
                "random_spans": args.random_spans, "random_first": args.random_first,
                "max_distance": args.max_distance, "span": list(span), "seed": args.seed,
                "documents": docs, "tokens": total, "copies": pairs, "tokens_overwritten": written}
    with open(os.path.join(args.out, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    print(json.dumps(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
