"""Build a long-document corpus of whole public-domain books and binarize it for fairseq.

Books come from Debian packages (``apt-get download`` + ``dpkg -x`` into a cache; nothing is
installed, no R is needed: R's data files are read with the ``rdata`` package, ``pip install -e
'.[corpus]'``) and/or a folder of the user's own ``.txt`` files (one book per file):

* ``austen``    r-cran-janeaustenr: Jane Austen's six novels (R lazy-load database)
* ``kjv``       bible-kjv + bible-kjv-text: the King James Bible, one document per biblical book
* ``mobydick``  r-cran-tokenizers: Melville's Moby Dick (R lazy-load database)
* ``tidytext``  r-cran-tidytext: the Gutenberg novels in ``extdata/books.rda``
* ``pycode``    not books: the ``.py`` files of pinned pure-Python PyPI packages, one document per
                file, split by package (examples/pycode_corpus.py; ``--pycode-dir`` reads local
                package archives instead of downloading)

Document convention (fairseq's ``--sample-break-mode complete_doc``): one paragraph per line
(a paragraph's wrapped lines joined with single spaces, empty lines inside a book dropped) and
exactly one empty line between two books. After ``fairseq-preprocess`` every paragraph is an item
ending in ``</s>`` and every book boundary is an item of size 1 (the lone ``</s>`` of the empty
line), so a split of N books holds N - 1 size-1 items. With ``--bpe hf_tokenizer`` (a converted
pretrained model's tokenizer, whose ``</s>`` is its end-of-text token) a whole book is one line
instead, its paragraphs separated by a blank line in the model's own newline tokens, so that
``</s>`` falls only at a book's end. Splits are made by book, deterministically from ``--seed``.
Usage::

    python examples/build_book_corpus.py --out data/books --sources austen,kjv,mobydick \\
        --valid-books 2 --test-books 2 --bpe sentencepiece --vocab-size 8000
    python examples/build_book_corpus.py --out data/books-smollm2 --sources austen,kjv,mobydick \\
        --bpe hf_tokenizer --tokenizer-file SMOLLM2/tokenizer.json   # SMOLLM2: get_smollm2.py --out

writes ``OUT/raw/{split}.txt``, ``OUT/{split}.tok``, ``OUT/bin`` (for fairseq) and
``OUT/manifest.json`` (per book: title, source, split, characters). See docs/DATA.md.
"""

import argparse
import importlib.util
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import zlib
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Tuple

logger = logging.getLogger("build_book_corpus")

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "fairseq_longmem", "debs")
ALL_SOURCES = ("austen", "kjv", "mobydick", "tidytext", "pycode")
SPLITS = ("train", "valid", "test")
# sentencepiece's unigram model depends on its thread count (1, 2 and 4 threads give different
# vocabularies): fixed, so that every machine builds the same one
SPM_THREADS = 2
# Source code keeps its indentation through sentencepiece: no whitespace collapsing or stripping,
# no NFKC (identity normalization, so that decoding gives the line back), no dummy space before
# a line (an indentation of 8 spaces is then 8 spaces, not 9), and runs of 4..32 spaces as
# single pieces (user-defined symbols), so that an indentation costs one token, not one per space.
CODE_SPM_OPTIONS = {
    "remove_extra_whitespaces": False,
    "normalization_rule_name": "identity",
    "add_dummy_prefix": False,
    "user_defined_symbols": ["\u2581" * n for n in range(32, 0, -4)],
}


class CorpusError(RuntimeError):
    """A problem the user must fix; printed as one ``error:`` line."""


@dataclass
class Book:
    title: str
    source: str
    text: str  # one paragraph per line, no empty lines
    split: str = ""
    group: str = ""  # the split unit when not the book itself: a package for source code

    @property
    def characters(self) -> int:
        return len(self.text)


# --------------------------------------------------------------------------- R data files

RDATA = "rdata>=1.0"  # reads R's serialization format (pip install -e '.[corpus]')
R_SOURCES = ("austen", "mobydick", "tidytext")


def _rdata():
    if importlib.util.find_spec("rdata") is None:
        raise CorpusError(f"the sources {','.join(R_SOURCES)} are R data files, read with the rdata "
                          f"package: pip install '{RDATA}' (or pass --input-dir)")
    import rdata

    return rdata


def unserialize(data: bytes):
    """An R object from serialize()'s bytes (gzip'd or not) as Python objects (numpy arrays,
    dicts for named lists, pandas data frames)."""
    rdata = _rdata()
    return rdata.conversion.convert(rdata.parser.parse_data(data, extension=".rds"))


def read_lazyload_db(base: str) -> Dict[str, object]:
    """All objects of an R lazy-load database ``base.rdx`` + ``base.rdb``, by name: the index
    (.rdx) is a named list whose ``variables`` give each object's (offset, length) in the .rdb,
    where an object is a 4-byte big-endian length and a zlib stream of its serialization."""
    with open(base + ".rdx", "rb") as f:
        raw = f.read()
    # saveRDS() gzips the index; accept the lazy-load "4-byte length + zlib" form as well
    index = unserialize(raw if raw[:2] == b"\x1f\x8b" else zlib.decompress(raw[4:]))
    out = {}
    with open(base + ".rdb", "rb") as f:
        for name, (offset, length) in index["variables"].items():
            f.seek(int(offset))
            out[str(name)] = unserialize(zlib.decompress(f.read(int(length))[4:]))
    return out


def read_rda(path: str) -> Dict[str, object]:
    """The objects of an ``.rda`` file saved by ``save()``, by name; a tibble reads as the data
    frame it is."""
    rdata = _rdata()
    classes = {**rdata.conversion.DEFAULT_CLASS_MAP,
               "tbl_df": rdata.conversion.dataframe_constructor}
    return rdata.read_rda(path, constructor_dict=classes)


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
    by_title: Dict[str, List[str]] = {}
    for title, line in zip(frame["title"], frame["text"].fillna("")):  # NA text: an empty line
        by_title.setdefault(str(title), []).append(line)
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


def code_books(args) -> Tuple[List[Book], list]:
    """The pycode documents as Books grouped by package, and the packages (pycode_corpus)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import pycode_corpus

    pins = list(pycode_corpus.PINNED)
    if args.pycode_packages:
        pins = [p for p in args.pycode_packages.split(",") if p.strip()]
    try:
        packages, docs = pycode_corpus.collect(pins, args.pycode_dir, args.pycode_cache, args.min_file_bytes)
    except pycode_corpus.PackageError as e:
        raise CorpusError(str(e)) from None
    books = [Book(f"{pkg.name}/{path}", f"{pkg.name}=={pkg.version}", doc, group=pkg.name) for pkg, path, doc in docs]
    empty = [p.name for p in packages if not p.kept]
    if empty:
        logger.warning("no file of %s passes --min-file-bytes %d and deduplication", ",".join(empty),
                       args.min_file_bytes)
    return books, [p for p in packages if p.kept]


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
    """Split by unit (a book, or the package of a source file), deterministically from seed."""
    def unit(b: Book):
        return ("package", b.group) if b.group else ("book", b.title)

    units = list(dict.fromkeys(unit(b) for b in books))
    if valid + test >= len(units):
        kind = "books" if not any(b.group for b in books) else "packages" if all(b.group for b in books) else "units"
        raise CorpusError(f"{len(units)} {kind} cannot give {valid} valid + {test} test {kind} and a train split")
    order = list(range(len(units)))
    random.Random(seed).shuffle(order)
    split_of = {}
    for rank, i in enumerate(order):
        split_of[units[i]] = "valid" if rank < valid else "test" if rank < valid + test else "train"
    for b in books:
        b.split = split_of[unit(b)]
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


def encode_documents(encode: Callable[[str], str], books: List[Book], dst: str) -> int:
    """``--bpe hf_tokenizer``: one document per line (a pretrained model's ``</s>`` is its
    end-of-text token, so a line end must not fall inside a document), newlines encoded as the
    model's own newline tokens (a blank line between a book's paragraphs, one newline between
    source lines), and one empty line between documents as in every other corpus here. Returns
    tokens incl. the ``</s>`` of every line."""
    lines = [encode(b.text if b.group else b.text.replace("\n", "\n\n")) for b in books]
    with open(dst, "w", encoding="utf-8") as fout:
        fout.write("\n\n".join(lines) + "\n")
    return sum(len(line.split()) for line in lines) + 2 * len(lines) - 1


def hf_tokenizer_files(tokenizer_file: Optional[str], srcdict: Optional[str]):
    """(tokenizer.json, dict.txt) for ``--bpe hf_tokenizer``: the dictionary defaults to the
    converter's ``dict.txt`` beside the tokenizer (python -m fairseq_longmem.convert)."""
    if not tokenizer_file:
        raise CorpusError("--bpe hf_tokenizer needs --tokenizer-file DIR/tokenizer.json (a converted "
                          "model's folder, e.g. from examples/get_smollm2.py)")
    srcdict = srcdict or os.path.join(os.path.dirname(os.path.abspath(tokenizer_file)), "dict.txt")
    for what, path in (("--tokenizer-file", tokenizer_file), ("--srcdict", srcdict)):
        if not os.path.isfile(path):
            raise CorpusError(f"{what} {path}: no such file (the converted model's folder holds "
                              "tokenizer.json and dict.txt side by side)")
    return tokenizer_file, srcdict


def make_encoder(kind: str, out: str, vocab_size: int, bpe_dest: Optional[str], code: bool = False,
                 tokenizer_file: Optional[str] = None, srcdict: Optional[str] = None):
    """Return (encode function, srcdict or None); code: keep whitespace (CODE_SPM_OPTIONS)."""
    from argparse import Namespace

    from fairseq.data import encoders

    if kind == "hf_tokenizer":
        import fairseq_longmem.hf_tokenizer_bpe  # noqa: F401  (registers the bpe)

        tokenizer_file, srcdict = hf_tokenizer_files(tokenizer_file, srcdict)
        bpe = encoders.build_bpe(Namespace(bpe="hf_tokenizer", tokenizer_file=tokenizer_file))
        return bpe.encode, srcdict
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
    try:
        spm.SentencePieceTrainer.train(
            input=os.path.join(out, "raw", "train.txt"), model_prefix=prefix, vocab_size=vocab_size,
            model_type="unigram", character_coverage=1.0, input_sentence_size=2_000_000,
            shuffle_input_sentence=True, num_threads=SPM_THREADS, minloglevel=2,
            **(CODE_SPM_OPTIONS if code else {}),
        )
    except RuntimeError as e:  # e.g. "Vocabulary size too high (120). Please set it to a value <= 85."
        raise CorpusError(f"--vocab-size {vocab_size}: sentencepiece training failed: "
                          f"{str(e).splitlines()[-1].split('] ')[-1]}") from None
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
    unknown = sorted(set(sources) - set(ALL_SOURCES))
    if unknown:
        raise CorpusError(f"unknown source {unknown[0]!r}; choose from {','.join(ALL_SOURCES)}")
    if not sources and not args.input_dir:
        raise CorpusError("nothing to build: give --sources and/or --input-dir")
    if set(sources) & set(R_SOURCES):
        _rdata()  # refused before anything is downloaded
    book_sources = [s for s in sources if s != "pycode"]
    if book_sources and not args.input_dir and shutil.which("apt-get") is None:
        raise CorpusError("apt-get is not available to fetch the packaged books; pass --input-dir with .txt books")
    if args.min_file_bytes < 0:
        raise CorpusError(f"--min-file-bytes must be >= 0, got {args.min_file_bytes}")
    code = "pycode" in sources
    books = collect_books(book_sources, args.input_dir, args.cache)
    packages = []
    if code:
        code_docs, packages = code_books(args)
        books += code_docs
    splits = split_books(books, args.valid_books, args.test_books, args.seed)
    split_of = {b.group: b.split for b in books if b.group}
    for pkg in packages:
        pkg.split = split_of[pkg.name]
    os.makedirs(os.path.join(args.out, "raw"), exist_ok=True)
    for split, bs in splits.items():
        write_raw(os.path.join(args.out, "raw", f"{split}.txt"), bs)
    encode, srcdict = make_encoder(args.bpe, args.out, args.vocab_size, args.bpe_dest, code,
                                   args.tokenizer_file, args.srcdict)
    tokens = {}
    for split in SPLITS:
        if not splits[split]:
            continue
        dst = os.path.join(args.out, f"{split}.tok")
        if args.bpe == "hf_tokenizer":
            tokens[split] = encode_documents(encode, splits[split], dst)
        else:
            tokens[split] = encode_file(encode, os.path.join(args.out, "raw", f"{split}.txt"), dst)
    binarize(args.out, splits, srcdict, args.workers)
    manifest = {
        "bpe": args.bpe,
        "seed": args.seed,
        "convention": ("one book per line, paragraphs separated by the model's own newline tokens "
                       "(a blank line), </s> = the model's end of text; one empty line between books "
                       "(complete_doc)" if args.bpe == "hf_tokenizer" else
                       "one paragraph per line; one empty line between books (complete_doc)"),
        "splits": {s: {"books": len(splits[s]), "tokens": tokens.get(s, 0),
                       "characters": sum(b.characters for b in splits[s])} for s in SPLITS},
        "books": [{k: v for k, v in asdict(b).items() if k != "text" and (k != "group" or v)}
                  | {"characters": b.characters} for b in books],
    }
    if code:
        manifest["convention"] += ("; source code: one file per document, one source line per line, "
                                   "blank lines dropped, tabs expanded to 8 columns, indentation kept")
        manifest["pycode"] = {
            "min_file_bytes": args.min_file_bytes,
            "sentencepiece_options": CODE_SPM_OPTIONS if args.bpe == "sentencepiece" else None,
            "packages": [p.summary() for p in packages],
        }
        for s in SPLITS:
            manifest["splits"][s]["packages"] = [p.name for p in packages if p.split == s]
    with open(os.path.join(args.out, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--sources", default="austen,kjv,mobydick",
                   help=f"comma-separated packaged sources ({','.join(ALL_SOURCES)}); '' for none")
    p.add_argument("--input-dir", help="a folder of .txt files, one book per file")
    p.add_argument("--valid-books", "--valid-packages", dest="valid_books", type=int, default=2,
                   help="books held out for valid (for pycode: packages)")
    p.add_argument("--test-books", "--test-packages", dest="test_books", type=int, default=2,
                   help="books held out for test (for pycode: packages)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--bpe", choices=("gpt2", "sentencepiece", "hf_tokenizer"), default="sentencepiece",
                   help="hf_tokenizer: a converted model's tokenizer.json (--tokenizer-file), one "
                   "document per line with its newlines as the model's tokens")
    p.add_argument("--tokenizer-file", help="hf_tokenizer: DIR/tokenizer.json of a converted model")
    p.add_argument("--srcdict", help="hf_tokenizer: the model's dict.txt (default: beside "
                   "--tokenizer-file)")
    p.add_argument("--vocab-size", type=int, default=8000, help="sentencepiece vocabulary size")
    p.add_argument("--bpe-dest", help="GPT-2 BPE cache folder (see examples/get_gpt2_bpe.py)")
    p.add_argument("--cache", default=DEFAULT_CACHE, help="where .deb packages are downloaded and extracted")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--pycode-packages", help="pycode: comma-separated NAME==VERSION to fetch instead "
                   "of the pinned list (examples/pycode_corpus.py PINNED)")
    p.add_argument("--pycode-dir", help="pycode: a folder of local package archives (.whl, .tar.gz, .zip) "
                   "or unpacked package folders, read instead of downloading")
    p.add_argument("--pycode-cache", default=os.path.join(os.path.dirname(DEFAULT_CACHE), "pycode"),
                   help="pycode: where the wheels are downloaded (once)")
    p.add_argument("--min-file-bytes", type=int, default=2048,
                   help="pycode: drop .py files smaller than this many bytes")
    args = p.parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    try:
        manifest = build(args)
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for split, info in manifest["splits"].items():
        docs = f"{info['books']} books" if "packages" not in info else \
            f"{info['books']} documents ({len(info['packages'])} packages)"
        print(f"{split}: {docs}, {info['tokens']} tokens, {info['characters']} characters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
