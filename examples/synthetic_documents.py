"""Write synthetic "books" (one .txt file each) for build_book_corpus.py --input-dir.

Each book has its own cast of invented names that recur throughout it, so that a model which
remembers the book's earlier text (LongMem's memory) can predict them and one that sees only a
local window cannot. Used by ``DATA=synthetic bash examples/quickstart.sh``.
"""

import argparse
import os
import random

WORDS = (
    "the a and of to in was he she it that his her with had for on as at by not but from they "
    "said were this which be all one there would have when so them up out what then into no "
    "more time some very could like now only little over after before other again our well "
    "house door morning letter walk road garden evening friend family sister brother father"
).split()
SYLLABLES = "ka lo mi ren tas vor bel dun esh fi gar hol ith jun kep lum nor pav quil"


def invented_name(rng):
    parts = SYLLABLES.split()
    return "".join(rng.choice(parts) for _ in range(rng.randint(2, 3))).capitalize()


def book(rng, paragraphs):
    cast = [invented_name(rng) for _ in range(6)]
    lines = []
    for _ in range(paragraphs):
        words = []
        for _ in range(rng.randint(20, 60)):
            words.append(rng.choice(cast) if rng.random() < 0.12 else rng.choice(WORDS))
        lines.append(" ".join(words).capitalize() + ".")
    return "\n\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True, help="folder for the .txt books (created)")
    p.add_argument("--books", type=int, default=40)
    p.add_argument("--paragraphs", type=int, default=120, help="paragraphs per book")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    rng = random.Random(args.seed)
    os.makedirs(args.out, exist_ok=True)
    for i in range(args.books):
        with open(os.path.join(args.out, f"book{i:03d}.txt"), "w", encoding="utf-8") as f:
            f.write(book(rng, args.paragraphs))
    print(f"wrote {args.books} books to {args.out}")


if __name__ == "__main__":
    main()
