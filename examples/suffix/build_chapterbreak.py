"""Build a ChapterBreak-format suffix-identification set from the books of a corpus.

Reads the raw text that examples/build_book_corpus.py writes (``CORPUS/raw/{split}.txt``: one
paragraph per line, one empty line between books; titles in ``CORPUS/manifest.json``) and finds
chapter headings: short lines such as ``CHAPTER I``, ``Chapter 1``, ``CHAPTER 1. Loomings.``,
``CHAPTER ONE``. Every chapter boundary with at least ``--ctx-words`` words before it gives one
example::

    {title: [{"ctx": the --ctx-words words before the heading (whole paragraphs, "\\n"-joined),
              "pos": the first --suffix-words words of the next chapter (heading removed),
              "negs": the beginnings of --negatives other chapters of the same book}, ...]}

Negatives come from chapters after the true one where there are enough (so that none of them
appears in the prefix), else also from chapters before the prefix window; a book needs
``--negatives`` + 2 chapters. Headings never appear in candidates, nor at the end of ``ctx``
(a chapter number would give the order away). Usage::

    python examples/suffix/build_chapterbreak.py --corpus data/books --splits valid,test \\
        --out data/suffix/books_ctx8k.json --ctx-words 7000
"""

import argparse
import json
import os
import random
import re
import sys
from typing import Dict, List

# "CHAPTER I", "Chapter 1", "CHAPTER ONE", "CHAPTER 1. Loomings." (a title only after . or :)
HEADING = re.compile(
    r"^(chapter|chap\.)\s+([ivxlcdm]+|\d+|[a-z]+(-[a-z]+)?)(\s*[.:](\s.{0,60})?)?$",
    re.IGNORECASE)


def books_of(corpus: str, splits: List[str]) -> Dict[str, List[str]]:
    """{title: paragraphs} of the corpus's books in ``splits``, in manifest order."""
    with open(os.path.join(corpus, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    entries = manifest["books"] if isinstance(manifest, dict) else manifest
    out = {}
    for split in splits:
        titles = [b["title"] for b in entries if b["split"] == split]
        with open(os.path.join(corpus, "raw", f"{split}.txt"), encoding="utf-8") as f:
            texts = f.read().strip("\n").split("\n\n")
        if len(texts) != len(titles):
            raise SystemExit(f"error: {corpus}/raw/{split}.txt holds {len(texts)} books, the "
                             f"manifest {len(titles)}")
        out.update({t: text.split("\n") for t, text in zip(titles, texts)})
    return out


def is_caps_line(p: str) -> bool:
    """A short line in capitals: a chapter's title under its heading ("THE EVE OF THE WAR"), a
    part heading ("BOOK TWO") or "THE END", which no prefix or candidate should hold."""
    p = p.strip()
    return 0 < len(p) <= 80 and any(ch.isalpha() for ch in p) and p == p.upper()


def chapters_of(paragraphs: List[str]):
    """[(heading line index, [paragraph indices of the chapter's text])]: the lines between a
    heading and the next, without capital-letter lines at either end (titles, part headings)."""
    heads = [i for i, p in enumerate(paragraphs) if len(p) <= 80 and HEADING.match(p.strip())]
    bounds = heads + [len(paragraphs)]
    out = []
    for h, nxt in zip(heads, bounds[1:]):
        body = list(range(h + 1, nxt))
        while body and is_caps_line(paragraphs[body[0]]):
            body.pop(0)
        while body and is_caps_line(paragraphs[body[-1]]):
            body.pop()
        if body:
            out.append((h, body))
    return out


def first_words(paragraphs: List[str], n: int) -> str:
    out, count = [], 0
    for p in paragraphs:
        words = p.split()
        out.append(" ".join(words[:n - count]))
        count += min(len(words), n - count)
        if count >= n:
            break
    return "\n".join(out)


def last_words(paragraphs: List[str], n: int) -> str:
    """The last whole paragraphs holding at least n words (or all of them)."""
    out, count = [], 0
    for p in reversed(paragraphs):
        out.append(p)
        count += len(p.split())
        if count >= n:
            break
    return "\n".join(reversed(out))


def build(books: Dict[str, List[str]], ctx_words: int, suffix_words: int, negatives: int,
          seed: int):
    rng = random.Random(seed)
    data, skipped = {}, []
    for title, paragraphs in books.items():
        chapters = chapters_of(paragraphs)
        if len(chapters) < negatives + 2:
            skipped.append(f"{title} ({len(chapters)} chapters)")
            continue
        beginnings = [first_words([paragraphs[i] for i in body], suffix_words)
                      for _, body in chapters]
        examples = []
        for c in range(1, len(chapters)):
            # up to the previous chapter's last line of text: no heading or title ends a prefix
            before = paragraphs[:chapters[c - 1][1][-1] + 1]
            if sum(len(p.split()) for p in before) < ctx_words:
                continue
            ctx = last_words(before, ctx_words)
            later = list(range(c + 1, len(chapters)))
            if len(later) < negatives:  # fall back to chapters that end before the prefix
                start = len(before) - len(ctx.split("\n"))
                later += [j for j in range(c) if chapters[j + 1][0] <= start]
            if len(later) < negatives:
                continue
            negs = rng.sample(later, negatives)
            examples.append({"ctx": ctx, "pos": beginnings[c],
                             "negs": [beginnings[j] for j in negs]})
        if examples:
            data[title] = examples
        else:
            skipped.append(f"{title} (no chapter with {ctx_words} words before it)")
    return data, skipped


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", required=True, help="output folder of build_book_corpus.py")
    p.add_argument("--splits", default="test", help="comma-separated corpus splits to read")
    p.add_argument("--out", required=True, help="the JSON file to write")
    p.add_argument("--ctx-words", type=int, default=7000,
                   help="words of prefix (about 1.3 GPT-2 tokens each: 7000 covers 8k tokens)")
    p.add_argument("--suffix-words", type=int, default=150)
    p.add_argument("--negatives", type=int, default=5)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    data, skipped = build(books_of(args.corpus, args.splits.split(",")), args.ctx_words,
                          args.suffix_words, args.negatives, args.seed)
    if not data:
        sys.exit(f"error: no chapter boundary found ({'; '.join(skipped) or 'no books'})")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False)
    os.replace(args.out + ".tmp", args.out)
    n = sum(len(v) for v in data.values())
    print(f"{args.out}: {n} examples from {len(data)} books "
          f"({', '.join(f'{t}: {len(v)}' for t, v in data.items())})")
    if skipped:
        shown = "; ".join(skipped[:8]) + (f"; and {len(skipped) - 8} more" if len(skipped) > 8 else "")
        print(f"skipped {len(skipped)} books: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
