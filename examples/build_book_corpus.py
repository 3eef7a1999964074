"""Build a long-document corpus of whole public-domain books and binarize it for fairseq.

Books come from Debian packages (``apt-get download`` + ``dpkg -x`` into a cache; nothing is
installed, no R is needed) and/or a folder of the user's own ``.txt`` files (one book per file):

* ``austen``    r-cran-janeaustenr: Jane Austen's six novels (R lazy-load database)
* ``kjv``       bible-kjv + bible-kjv-text: the King James Bible, one document per biblical book
* ``mobydick``  r-cran-tokenizers: Melville's Moby Dick (R lazy-load database)
* ``tidytext``  r-cran-tidytext: the Gutenberg novels in ``extdata/books.rda``

Document convention (fairseq's ``--sample-break-mode complete_doc``): one paragraph per line
(a paragraph's wrapped lines joined with single spaces, empty lines inside a book dropped) and
exactly one empty line between two books. After ``fairseq-preprocess`` every paragraph is an item
ending in ``</s>`` and every book boundary is an item of size 1 (the lone ``</s>`` of the empty
line), so a split of N books holds N - 1 size-1 items. Splits are made by book, deterministically
from ``--seed``. Usage::

    python examples/build_book_corpus.py --out data/books --sources austen,kjv,mobydick \\
        --valid-books 2 --test-books 2 --bpe sentencepiece --vocab-size 8000

writes ``OUT/raw/{split}.txt``, ``OUT/{split}.tok``, ``OUT/bin`` (for fairseq) and
``OUT/manifest.json`` (per book: title, source, split, characters). See docs/DATA.md.
"""

import argparse
import gzip
import json
import logging
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

logger = logging.getLogger("build_book_corpus")

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "fairseq_longmem", "debs")
ALL_SOURCES = ("austen", "kjv", "mobydick", "tidytext")
SPLITS = ("train", "valid", "test")
# sentencepiece's unigram model depends on its thread count (1, 2 and 4 threads give different
# vocabularies): fixed, so that every machine builds the same one
SPM_THREADS = 2


class CorpusError(RuntimeError):
    """A problem the user must fix; printed as one ``error:`` line."""


@dataclass
class Book:
    title: str
    source: str
    text: str  # one paragraph per line, no empty lines
    split: str = ""

    @property
    def characters(self) -> int:
        return len(self.text)


# --------------------------------------------------------------------------- R serialization

# R's serialize() "XDR" format: big-endian ints; each item starts with a flags word whose low byte
# is the SEXP type, bit 9 = has attributes, bit 10 = has tag. Only what data packages use is read.
NILVALUE, REFSXP, ALTREP = 254, 255, 238
SPECIAL_ENVS = {254, 253, 252, 251, 250, 242, 241}  # nil, global/empty/base env, missing arg...
PAIRLISTS = {2, 3, 5, 6, 17, 239, 240}  # list, closure, promise, language, dots, attr variants
VECTORS = {10: "i", 13: "i", 14: "d", 16: None, 19: None, 20: None, 24: "raw"}


class RVector(list):
    """An R vector: a list of its elements plus its attributes as a dict (``names`` etc)."""

    def __init__(self, values, attributes=None):
        super().__init__(values)
        self.attributes = attributes or {}


class RUnserializer:
    def __init__(self, data: bytes):
        self.data, self.pos, self.refs = data, 0, []

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return v

    def read(self):
        if self.data[:2] != b"X\n":
            raise ValueError(f"not an R XDR serialization (starts with {self.data[:2]!r})")
        self.pos = 2
        version = self.int()
        self.int(), self.int()  # writer's R version, minimal R version
        if version == 3:
            n = self.int()
            self.pos += n  # native encoding name
        return self.item()

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in SPECIAL_ENVS:
            return None
        if kind == REFSXP:
            return self.refs[(flags >> 8 or self.int()) - 1]
        if kind in (247, 248, 249):  # persistent name, package/namespace env: a string vector
            self.int()
            value = [self.item() for _ in range(self.int())]
            self.refs.append(value)
            return value
        if kind == 1:  # symbol: its name
            name = self.item()
            self.refs.append(name)
            return name
        if kind in PAIRLISTS:
            attr = self.item() if has_attr else None
            tag = self.item() if has_tag else None
            car = self.item()
            return ("pairlist", tag, car, self.item(), attr)
        if kind == 4:  # environment: registered before its contents, which may refer to it
            env = {}
            self.refs.append(env)
            self.int()
            for _ in range(4):  # enclosure, frame, hash table, attributes
                self.item()
            return env
        if kind == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None  # NA_character_
            s = self.data[self.pos : self.pos + n].decode("utf-8", "replace")
            self.pos += n
            return s
        if kind in VECTORS:
            n = self.int()
            if n == -1:  # long vector
                n = (self.int() << 32) + self.int()
            fmt = VECTORS[kind]
            if fmt in ("i", "d"):
                size = 4 if fmt == "i" else 8
                values = list(struct.unpack_from(f">{n}{fmt}", self.data, self.pos))
                self.pos += size * n
            elif fmt == "raw":
                values = list(self.data[self.pos : self.pos + n])
                self.pos += n
            else:
                values = [self.item() for _ in range(n)]
            return RVector(values, pairlist_dict(self.item()) if has_attr else None)
        if kind == ALTREP:  # e.g. compact row names: class info, state, attributes
            return ("altrep", self.item(), self.item(), self.item())
        raise ValueError(f"unsupported R object type {kind} at byte {self.pos - 4}")


def pairlist_dict(p) -> Dict[str, object]:
    out = {}
    while isinstance(p, tuple) and p[0] == "pairlist":
        out[p[1]] = p[2]
        p = p[3]
    return out


def read_rdx(path: str):
    raw = open(path, "rb").read()
    # saveRDS() gzips the index; accept the lazy-load "4-byte length + zlib" form as well
    data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else zlib.decompress(raw[4:])
    return RUnserializer(data).read()


def read_lazyload_db(base: str) -> Dict[str, object]:
    """All objects of an R lazy-load database ``base.rdx`` + ``base.rdb``, by name."""
    index = read_rdx(base + ".rdx")
    variables = index[index.attributes["names"].index("variables")]
    out = {}
    with open(base + ".rdb", "rb") as f:
        for name, (offset, length) in zip(variables.attributes["names"], variables):
            f.seek(offset)
            blob = f.read(length)
            # each object: 4-byte big-endian uncompressed length, then a zlib stream
            out[name] = RUnserializer(zlib.decompress(blob[4:])).read()
    return out


def read_rda(path: str) -> Dict[str, object]:
    """A (gzip'd) ``.rda`` file saved by ``save()``: ``RDX2\\n`` + a pairlist of named objects."""
    raw = open(path, "rb").read()
    data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    if data[:4] not in (b"RDX2", b"RDX3"):
        raise ValueError(f"{path} is not an R save() file")
    return pairlist_dict(RUnserializer(data[5:]).read())


# --------------------------------------------------------------------------- text handling


def paragraphs(lines) -> str:
    """Join wrapped lines into paragraphs (one per output line); empty lines only separate."""
    out, cur = [], []
    for line in lines:
        line = line.strip()
        if line:
            cur.append(line)
        elif cur:
            out.append(" ".join(cur))
            cur = []
    if cur:
        out.append(" ".join(cur))
    return "\n".join(re.sub(r"\s+", " ", p) for p in out)


def strip_gutenberg(text: str) -> str:
    start = re.search(r"\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG[^\n]*\n", text)
    end = re.search(r"\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG", text)
    if start and end and start.end() < end.start():
        text = text[start.end() : end.start()]
    elif end:
        text = text[: end.start()]
    return text


# --------------------------------------------------------------------------- package sources


def fetch_debs(packages: List[str], cache: str) -> Dict[str, str]:
    """``apt-get download`` + ``dpkg -x`` each package (once) into cache; return extracted roots."""
    roots = {}
    for pkg in packages:
        root = os.path.join(cache, pkg)
        if os.path.isfile(os.path.join(root, ".extracted")):
            roots[pkg] = root
            continue
        if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
            raise CorpusError(f"apt-get/dpkg not available to fetch {pkg}; pass --input-dir with .txt books")
        dl = os.path.join(cache, "download")
        os.makedirs(dl, exist_ok=True)
        res = subprocess.run(["apt-get", "download", pkg], cwd=dl, capture_output=True, text=True)
        debs = [f for f in os.listdir(dl) if f.startswith(pkg + "_") and f.endswith(".deb")]
        if res.returncode != 0 or not debs:
            detail = (res.stderr.strip().splitlines() or ["no .deb produced"])[-1]
            raise CorpusError(f"apt-get download {pkg} failed ({detail}); try `apt-get update`, or pass --input-dir")
        shutil.rmtree(root, ignore_errors=True)
        subprocess.run(["dpkg", "-x", os.path.join(dl, sorted(debs)[-1]), root], check=True)
        open(os.path.join(root, ".extracted"), "w").close()
        roots[pkg] = root
    return roots


R_LIB = os.path.join("usr", "lib", "R", "site-library")
AUSTEN_TITLES = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}


def austen_books(cache: str) -> List[Book]:
    root = fetch_debs(["r-cran-janeaustenr"], cache)["r-cran-janeaustenr"]
    objects = read_lazyload_db(os.path.join(root, R_LIB, "janeaustenr", "data", "Rdata"))
    return [Book(title, "r-cran-janeaustenr", paragraphs(objects[name])) for name, title in AUSTEN_TITLES.items()]


def mobydick_books(cache: str) -> List[Book]:
    root = fetch_debs(["r-cran-tokenizers"], cache)["r-cran-tokenizers"]
    objects = read_lazyload_db(os.path.join(root, R_LIB, "tokenizers", "data", "Rdata"))
    text = strip_gutenberg("\n".join(objects["mobydick"]).replace("\r\n", "\n").lstrip("\ufeff"))
    return [Book("Moby Dick", "r-cran-tokenizers", paragraphs(text.split("\n")))]


def tidytext_books(cache: str) -> List[Book]:
    root = fetch_debs(["r-cran-tidytext"], cache)["r-cran-tidytext"]
    frame = read_rda(os.path.join(root, R_LIB, "tidytext", "extdata", "books.rda"))["books"]
    columns = dict(zip(frame.attributes["names"], frame))
    titles = columns["title"]
    if isinstance(titles, RVector) and "levels" in titles.attributes:  # a factor
        titles = [titles.attributes["levels"][i - 1] for i in titles]
    by_title: Dict[str, List[str]] = {}
    for title, line in zip(titles, columns["text"]):
        by_title.setdefault(title, []).append(line or "")
    return [Book(t, "r-cran-tidytext", paragraphs(lines)) for t, lines in by_title.items()]


def kjv_books(cache: str) -> List[Book]:
    """Dump the KJV with the packaged ``bible`` program; one document per biblical book."""
    roots = fetch_debs(["bible-kjv", "bible-kjv-text"], cache)
    program = os.path.join(roots["bible-kjv"], "usr", "bin", "bible")
    data = os.path.join(roots["bible-kjv-text"], "usr", "lib")
    try:
        res = subprocess.run([program, "-p", data, "gen1:1-rev22:21"], capture_output=True, text=True, timeout=120)
    except OSError as e:
        logger.warning("skipping kjv: cannot run %s (%s)", program, e)
        return []
    if res.returncode != 0 or not res.stdout.strip():
        logger.warning("skipping kjv: %s failed: %s", program, res.stderr.strip()[-200:])
        return []
    books: Dict[str, List[str]] = {}
    verses: List[str] = []
    prev_empty, current = True, None
    for line in res.stdout.split("\n"):
        heading = re.fullmatch(r"(\S.*) (\d+)", line) if prev_empty else None
        prev_empty = not line.strip()
        if heading:
            current = heading.group(1)
            verses = books.setdefault(current, [])
            verses.append(line)  # the chapter heading, e.g. "Genesis 1", as its own paragraph
        elif current is None or not line.strip():
            continue
        elif re.match(r"\s+\d+ ", line):  # "  12 And God said..." starts a verse
            verses.append(re.sub(r"^\s+\d+ ", "", line))
        else:
            verses[-1] += " " + line.strip()
    return [Book(name, "bible-kjv-text", "\n".join(v.strip() for v in lines)) for name, lines in books.items()]


SOURCES: Dict[str, Callable[[str], List[Book]]] = {
    "austen": austen_books,
    "kjv": kjv_books,
    "mobydick": mobydick_books,
    "tidytext": tidytext_books,
}


def input_dir_books(folder: str) -> List[Book]:
    files = sorted(f for f in os.listdir(folder) if f.endswith(".txt"))
    if not files:
        raise CorpusError(f"--input-dir {folder} holds no .txt files")
    books = []
    for f in files:
        with open(os.path.join(folder, f), encoding="utf-8", errors="replace") as fh:
            books.append(Book(os.path.splitext(f)[0], "input-dir", paragraphs(fh.read().split("\n"))))
    return books


def collect_books(sources: List[str], input_dir: Optional[str], cache: str) -> List[Book]:
    books: List[Book] = []
    for name in sources:
        books += SOURCES[name](cache)
    if input_dir:
        books += input_dir_books(input_dir)
    seen, unique = set(), []
    for b in books:  # tidytext repeats Pride and Prejudice from janeaustenr
        key = re.sub(r"\W+", "", b.title.lower())
        if key in seen or not b.text:
            logger.info("skipping %s (%s): duplicate or empty", b.title, b.source)
            continue
        seen.add(key)
        unique.append(b)
    return unique


# --------------------------------------------------------------------------- split, tokenize, binarize


def split_books(books: List[Book], valid: int, test: int, seed: int) -> Dict[str, List[Book]]:
    if valid + test >= len(books):
        raise CorpusError(f"{len(books)} books cannot give {valid} valid + {test} test books and a train split")
    order = list(range(len(books)))
    random.Random(seed).shuffle(order)
    for rank, i in enumerate(order):
        books[i].split = "valid" if rank < valid else "test" if rank < valid + test else "train"
    # each split keeps the books' collection order, so the raw files read naturally
    return {s: [b for b in books if b.split == s] for s in SPLITS}


def write_raw(path: str, books: List[Book]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n\n".join(b.text for b in books) + "\n")


def encode_file(encode: Callable[[str], str], src: str, dst: str) -> int:
    """Encode line by line (empty separator lines stay empty); return tokens incl. one </s> per line."""
    tokens = 0
    with open(src, encoding="utf-8") as fin, open(dst, "w", encoding="utf-8") as fout:
        for line in fin:
            line = line.rstrip("\n")
            enc = encode(line) if line else ""
            tokens += len(enc.split()) + 1
            fout.write(enc + "\n")
    return tokens


def make_encoder(kind: str, out: str, vocab_size: int, bpe_dest: Optional[str]):
    """Return (encode function, srcdict or None)."""
    from argparse import Namespace

    from fairseq.data import encoders

    if kind == "gpt2":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import get_gpt2_bpe

        try:
            paths = get_gpt2_bpe.fetch(bpe_dest or get_gpt2_bpe.DEFAULT_DEST)
        except ConnectionError as e:
            raise CorpusError(str(e)) from None
        bpe = encoders.build_bpe(
            Namespace(bpe="gpt2", gpt2_encoder_json=paths["encoder.json"], gpt2_vocab_bpe=paths["vocab.bpe"])
        )
        return bpe.encode, paths["dict.txt"]
    import sentencepiece as spm

    prefix = os.path.join(out, "spm")
    spm.SentencePieceTrainer.train(
        input=os.path.join(out, "raw", "train.txt"), model_prefix=prefix, vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0, input_sentence_size=2_000_000,
        shuffle_input_sentence=True, num_threads=SPM_THREADS, minloglevel=2,
    )
    bpe = encoders.build_bpe(
        Namespace(bpe="sentencepiece", sentencepiece_model=prefix + ".model",
                  sentencepiece_enable_sampling=False, sentencepiece_alpha=None)
    )
    return bpe.encode, None


def binarize(out: str, splits: Dict[str, List[Book]], srcdict: Optional[str], workers: int) -> None:
    cmd = [os.path.join(os.path.dirname(sys.executable), "fairseq-preprocess"), "--only-source",
           "--destdir", os.path.join(out, "bin"), "--workers", str(workers)]
    for split in SPLITS:
        if splits[split]:
            cmd += [f"--{split}pref", os.path.join(out, f"{split}.tok")]
    if srcdict:
        cmd += ["--srcdict", srcdict]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise CorpusError(f"fairseq-preprocess failed: {res.stderr.strip()[-500:]}")


def build(args) -> dict:
    sources = [s for s in args.sources.split(",") if s] if args.sources else []
    unknown = sorted(set(sources) - set(SOURCES))
    if unknown:
        raise CorpusError(f"unknown source {unknown[0]!r}; choose from {','.join(ALL_SOURCES)}")
    if not sources and not args.input_dir:
        raise CorpusError("nothing to build: give --sources and/or --input-dir")
    if sources and not args.input_dir and shutil.which("apt-get") is None:
        raise CorpusError("apt-get is not available to fetch the packaged books; pass --input-dir with .txt books")
    books = collect_books(sources, args.input_dir, args.cache)
    splits = split_books(books, args.valid_books, args.test_books, args.seed)
    os.makedirs(os.path.join(args.out, "raw"), exist_ok=True)
    for split, bs in splits.items():
        write_raw(os.path.join(args.out, "raw", f"{split}.txt"), bs)
    encode, srcdict = make_encoder(args.bpe, args.out, args.vocab_size, args.bpe_dest)
    tokens = {}
    for split in SPLITS:
        if splits[split]:
            tokens[split] = encode_file(encode, os.path.join(args.out, "raw", f"{split}.txt"),
                                        os.path.join(args.out, f"{split}.tok"))
    binarize(args.out, splits, srcdict, args.workers)
    manifest = {
        "bpe": args.bpe,
        "seed": args.seed,
        "convention": "one paragraph per line; one empty line between books (complete_doc)",
        "splits": {s: {"books": len(splits[s]), "tokens": tokens.get(s, 0),
                       "characters": sum(b.characters for b in splits[s])} for s in SPLITS},
        "books": [{k: v for k, v in asdict(b).items() if k != "text"} | {"characters": b.characters}
                  for b in books],
    }
    with open(os.path.join(args.out, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--sources", default="austen,kjv,mobydick",
                   help=f"comma-separated packaged sources ({','.join(ALL_SOURCES)}); '' for none")
    p.add_argument("--input-dir", help="a folder of .txt files, one book per file")
    p.add_argument("--valid-books", type=int, default=2)
    p.add_argument("--test-books", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--bpe", choices=("gpt2", "sentencepiece"), default="sentencepiece")
    p.add_argument("--vocab-size", type=int, default=8000, help="sentencepiece vocabulary size")
    p.add_argument("--bpe-dest", help="GPT-2 BPE cache folder (see examples/get_gpt2_bpe.py)")
    p.add_argument("--cache", default=DEFAULT_CACHE, help="where .deb packages are downloaded and extracted")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    args = p.parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    try:
        manifest = build(args)
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['books']} books, {info['tokens']} tokens, {info['characters']} characters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
