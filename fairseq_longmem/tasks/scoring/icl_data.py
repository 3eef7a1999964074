"""In-context-learning evaluation sets: readers for the LongMem authors' layout, a generic TSV
layout, the prompt template, and the seeded choice of demonstrations (no fairseq, no torch).

The authors' folder (their repository's ``data/icl/original/``) holds one sub-folder per set:

=========  ==============================  ==================================  =======================
set        train file                      evaluation file                     line format
=========  ==============================  ==================================  =======================
``sst2``   ``SST-2/train.tsv``             ``SST-2/dev.tsv``                   ``sentence<TAB>label``,
                                                                               with a header line
``sst5``   ``sst-5/stsa.fine.train``       ``sst-5/stsa.fine.dev``             ``L sentence``
``mr``     ``mr/train.csv``                ``mr/test.csv``                     ``L,sentence`` (CSV)
``subj``   ``subj/train.csv``              ``subj/test.csv``                   ``L,sentence`` (CSV)
``mpqa``   ``mpqa/train.csv``              ``mpqa/test.csv``                   ``L,sentence`` (CSV)
``tsv``    ``train.tsv``                   ``test.tsv``                        ``label<TAB>text``
=========  ==============================  ==================================  =======================

``L`` is a class index; its label word comes from the set (SST-2, MR, MPQA: negative/positive;
SST-5: terrible/bad/okay/good/great; Subj: subjective/objective). A ``tsv`` label is a label word
or a 0-based index into the label words given by the user. CSV lines are read with Python's csv
module, so quoted sentences lose their quotes and keep their commas (the authors' script cut the
line after the label instead, keeping the CSV quotes in the text).

A row whose text is empty (``0,``: three rows of the authors' MPQA train.csv) is skipped, and
the rows skipped are counted and named in one warning per file: a train row is never drawn as a
demonstration, an evaluation row is never scored. Any other malformed row is refused, naming
its line, and so is a file left without examples.
"""

import csv
import logging
import os
import random
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

REVIEW_TEMPLATE = "Review: {x} Sentiment: {y}. "
INPUT_TEMPLATE = "Input: {x} Type: {y}. "
POLARITY = ("negative", "positive")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SetLayout:
    folder: Optional[str]  # sub-folder of the authors' folder (None: the folder itself)
    train: str
    test: str
    fmt: str  # "sst2", "sst5", "csv" or "tsv"
    labels: Tuple[str, ...]
    template: str


SETS = {
    "sst2": SetLayout("SST-2", "train.tsv", "dev.tsv", "sst2", POLARITY, REVIEW_TEMPLATE),
    "sst5": SetLayout("sst-5", "stsa.fine.train", "stsa.fine.dev", "sst5",
                      ("terrible", "bad", "okay", "good", "great"), REVIEW_TEMPLATE),
    "mr": SetLayout("mr", "train.csv", "test.csv", "csv", POLARITY, REVIEW_TEMPLATE),
    "subj": SetLayout("subj", "train.csv", "test.csv", "csv", ("subjective", "objective"),
                      INPUT_TEMPLATE),
    "mpqa": SetLayout("mpqa", "train.csv", "test.csv", "csv", POLARITY, REVIEW_TEMPLATE),
    "tsv": SetLayout(None, "train.tsv", "test.tsv", "tsv", (), REVIEW_TEMPLATE),
}


class ICLDataError(ValueError):
    """Bad evaluation data or options; the message is one line naming the file or option."""


@dataclass(frozen=True)
class Example:
    text: str
    label: int  # index into the set's label words


@dataclass
class ICLSet:
    name: str
    labels: List[str]  # label words, by class index
    template: str  # with the placeholders {x} (text) and {y} (label word)
    train: List[Example]
    test: List[Example]


class Template:
    """``template`` with ``{x}`` before ``{y}``, e.g. ``"Review: {x} Sentiment: {y}. "``.

    A demonstration is the whole template filled in; a query is the template cut before the
    whitespace that precedes ``{y}`` (``"Review: {x} Sentiment:"``); the candidate continuation
    of a query is that whitespace plus the label word (``" positive"``), so the label is
    tokenized exactly as inside a demonstration."""

    def __init__(self, template: str):
        if template.count("{x}") != 1 or template.count("{y}") != 1 \
                or template.index("{x}") > template.index("{y}"):
            raise ICLDataError(
                f"--icl-template {template!r}: expected one {{x}} (the text) followed by one "
                "{y} (the label word), e.g. 'Review: {x} Sentiment: {y}. '"
            )
        head, self.tail = template.split("{y}")
        self.query_part = head.rstrip()
        self.gap = head[len(self.query_part):]  # whitespace between the query and the label
        self.template = template

    def demonstration(self, text: str, label: str) -> str:
        return self.query(text) + self.continuation(label) + self.tail

    def query(self, text: str) -> str:
        return self.query_part.replace("{x}", text)

    def continuation(self, label: str) -> str:
        return self.gap + label


def _open(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ICL data not found: {path}")
    return open(path, encoding="utf-8-sig", newline="")  # -sig: a leading BOM is not text


def _label_index(value: str, labels: Sequence[str], path: str, line: int) -> int:
    value = value.strip()
    if value.isdigit() and int(value) < len(labels):
        return int(value)
    if value in labels:
        return list(labels).index(value)
    raise ICLDataError(
        f"{path}:{line}: label {value!r} is neither a label word of {list(labels)} nor an index "
        f"in [0, {len(labels) - 1}]"
    )


def read_examples(path: str, fmt: str, labels: Sequence[str]) -> Tuple[List[Example], List[int]]:
    """The examples of ``path`` and the line numbers of the rows skipped for their empty text
    (published sets hold a few, e.g. ``0,`` in the authors' MPQA train.csv). A malformed row
    (no separator, an unknown label) is refused, naming its line; so is a file with no example."""
    out, empty = [], []
    with _open(path) as f:
        if fmt == "csv":
            rows = ((i, row) for i, row in enumerate(csv.reader(f), 1))
        else:
            rows = ((i, line.rstrip("\r\n")) for i, line in enumerate(f, 1))
        for i, row in rows:
            if fmt == "csv":
                if not row:
                    continue
                if len(row) < 2:
                    raise ICLDataError(f"{path}:{i}: expected 'label,sentence', got {row!r}")
                label, text = row[0], ",".join(row[1:])
            elif not row.strip():
                continue
            elif fmt == "sst2":
                text, sep, label = row.rpartition("\t")
                if i == 1 and label == "label":
                    continue  # header
                if not sep:
                    raise ICLDataError(f"{path}:{i}: expected 'sentence<TAB>label', got {row!r}")
            elif fmt == "sst5":
                label, sep, text = row.partition(" ")
                if not sep:
                    raise ICLDataError(f"{path}:{i}: expected 'L sentence', got {row!r}")
            else:  # tsv
                label, sep, text = row.partition("\t")
                if not sep:
                    raise ICLDataError(f"{path}:{i}: expected 'label<TAB>text', got {row!r}")
            label = _label_index(label, labels, path, i)  # refused even when the text is empty
            text = text.strip()
            if text:
                out.append(Example(text, label))
            else:
                empty.append(i)
    if not out:
        raise ICLDataError(f"{path}: no examples" if not empty else
                           f"{path}: no usable examples: all {rows_at(empty)} have empty text")
    return out, empty


def first_few(items: Sequence, shown: int = 5) -> str:
    """``"4, 9, 12"``; past ``shown`` items, the first ones and ``...``."""
    return ", ".join(str(x) for x in items[:shown]) + (", ..." if len(items) > shown else "")


def rows_at(lines: Sequence[int]) -> str:
    """``"3 rows (lines 4, 9, 12)"``, ``"1 row (line 4)"``."""
    s = "s" * (len(lines) != 1)
    return f"{len(lines)} row{s} (line{s} {first_few(lines)})"


def load_set(name: str, data_dir: str, labels: Optional[Sequence[str]] = None,
             template: Optional[str] = None) -> ICLSet:
    """Read set ``name`` from ``data_dir`` (the authors' folder holding ``SST-2/``, ``mr/``, ...,
    or the set's own folder). ``labels`` replaces the set's label words (same number of classes;
    required for ``tsv``); ``template`` replaces its template."""
    if name not in SETS:
        raise ICLDataError(f"--icl-dataset {name!r}: expected one of {sorted(SETS)}")
    layout = SETS[name]
    if labels:
        labels = [w.strip() for w in labels]
        if any(not w for w in labels) or len(set(labels)) != len(labels):
            raise ICLDataError(f"--icl-labels {labels}: expected distinct non-empty words")
        if layout.labels and len(labels) != len(layout.labels):
            raise ICLDataError(
                f"--icl-labels {labels}: {name} has {len(layout.labels)} classes "
                f"({', '.join(layout.labels)}), so give {len(layout.labels)} words"
            )
    elif not layout.labels:
        raise ICLDataError(f"--icl-dataset {name} needs --icl-labels (e.g. negative,positive)")
    labels = list(labels or layout.labels)
    folder = data_dir
    if layout.folder and os.path.isdir(os.path.join(data_dir, layout.folder)):
        folder = os.path.join(data_dir, layout.folder)
    train_path, test_path = (os.path.join(folder, f) for f in (layout.train, layout.test))
    train, empty_train = read_examples(train_path, layout.fmt, labels)
    test, empty_test = read_examples(test_path, layout.fmt, labels)
    if empty_train:
        logger.warning("%s: %s with empty text skipped", train_path, rows_at(empty_train))
    if empty_test:
        logger.warning("%s: %s with empty text left out of scoring; accuracy is over the %d "
                       "rows scored", test_path, rows_at(empty_test), len(test))
    return ICLSet(name, labels, template or layout.template, train, test)


def sample_demonstrations(train: Sequence[Example], in_context: int, in_memory: int,
                          seed: int) -> Tuple[List[Example], List[Example]]:
    """The authors' sampling: with ``random.seed(seed)``, first the ``in_context``
    demonstrations (shared by every test prompt), then, from the same generator, the
    ``in_memory`` ones (drawn independently, so the two sets may overlap)."""
    for option, n in (("--demos-in-context", in_context), ("--demos-in-memory", in_memory)):
        if n < 0 or n > len(train):
            raise ICLDataError(
                f"{option} {n}: expected 0 to {len(train)} (the size of the train set)"
            )
    rng = random.Random(seed)
    context = rng.sample(list(train), in_context)
    memory = rng.sample(list(train), in_memory)
    return context, memory
