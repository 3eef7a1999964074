"""examples/build_book_corpus.py on a folder of small synthetic books (no network), and its reading
of R data files (through the rdata package) on hand-built bytes."""

import gzip
import json
import os
import random
import struct
import sys
import zlib

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "examples"))
import build_book_corpus as bbc  # noqa: E402

WORDS = "the a cat dog sat ran on under mat log red blue big small and then it was very long day".split()


def synthetic_books(folder, n=8, seed=0):
    """n books of wrapped paragraphs; returns {title: [paragraph, ...]}."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    books = {}
    for b in range(n):
        paras = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) for _ in range(rng.randint(3, 12))]
        lines = []
        for p in paras:
            words = p.split()
            lines += [" ".join(words[i : i + 6]) for i in range(0, len(words), 6)]  # wrapped
            lines += [""] * rng.randint(1, 3)  # one or more blank lines between paragraphs
        title = f"book{b:02d}"
        (folder / f"{title}.txt").write_text("\n".join(lines))
        books[title] = paras
    return books


def test_paragraph_joining():
    text = ["  First line", "continues here.", "", "", "Second", "", "  third  para  ", ""]
    assert bbc.paragraphs(text) == "First line continues here.\nSecond\nthird para"


def test_split_by_book_is_deterministic(tmp_path):
    synthetic_books(tmp_path / "in", n=10)

    def assign(seed):
        books = bbc.collect_books([], str(tmp_path / "in"), str(tmp_path / "cache"))
        splits = bbc.split_books(books, valid=2, test=3, seed=seed)
        return {s: [b.title for b in bs] for s, bs in splits.items()}

    a, b, c = assign(1), assign(1), assign(2)
    assert a == b
    assert a != c
    assert [len(a[s]) for s in bbc.SPLITS] == [5, 2, 3]
    titles = a["train"] + a["valid"] + a["test"]
    assert sorted(titles) == [f"book{i:02d}" for i in range(10)]  # every book in exactly one split
    with pytest.raises(bbc.CorpusError, match="cannot give"):
        bbc.split_books(bbc.collect_books([], str(tmp_path / "in"), str(tmp_path / "c")), 5, 5, 1)


def test_build_sentencepiece_corpus(tmp_path):
    from fairseq.data import Dictionary, data_utils

    books = synthetic_books(tmp_path / "in", n=8)
    out = tmp_path / "out"
    rc = bbc.main(["--out", str(out), "--sources", "", "--input-dir", str(tmp_path / "in"),
                   "--valid-books", "2", "--test-books", "1", "--seed", "3",
                   "--bpe", "sentencepiece", "--vocab-size", "40", "--workers", "1"])
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    by_split = {s: [b["title"] for b in manifest["books"] if b["split"] == s] for s in bbc.SPLITS}
    assert [len(by_split[s]) for s in bbc.SPLITS] == [5, 2, 1]
    assert all(b["source"] == "input-dir" for b in manifest["books"])
    assert {b["title"]: b["characters"] for b in manifest["books"]} == {
        t: len("\n".join(p)) for t, p in books.items()
    }

    d = Dictionary.load(str(out / "bin" / "dict.txt"))
    for split in bbc.SPLITS:
        raw = (out / "raw" / f"{split}.txt").read_text()
        # exactly one empty line between books, none inside a book
        assert raw.endswith("\n") and not raw.endswith("\n\n")
        docs = raw[:-1].split("\n\n")
        assert docs == ["\n".join(books[t]) for t in by_split[split]]
        assert "\n\n\n" not in raw

        ds = data_utils.load_indexed_dataset(str(out / "bin" / split), d)
        sizes = ds.sizes.tolist()
        n_paragraphs = sum(len(books[t]) for t in by_split[split])
        assert len(sizes) == n_paragraphs + len(docs) - 1
        assert sizes.count(1) == len(docs) - 1  # one lone </s> per book boundary
        assert sum(sizes) == manifest["splits"][split]["tokens"]
        # a document boundary item is exactly [</s>]
        separators = [i for i, s in enumerate(sizes) if s == 1]
        assert all(ds[i].tolist() == [d.eos()] for i in separators)


def test_packaged_sources_need_apt_or_input_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bbc.shutil, "which", lambda name: None)
    rc = bbc.main(["--out", str(tmp_path / "out"), "--sources", "austen", "--cache", str(tmp_path / "c")])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "apt-get" in err[0] and "--input-dir" in err[0]


# --------------------------------------------------------------------------- R serialization


def xdr_int(v):
    return struct.pack(">i", v)


def r_charsxp(s):
    if s is None:
        return xdr_int(9) + xdr_int(-1)  # NA_character_
    b = s.encode("utf-8")
    return xdr_int(9 | (1 << 15) << 0) + xdr_int(len(b)) + b  # UTF-8 flag in the levels bits


def r_strsxp(values, names=None):
    flags = 16 | ((1 << 9) if names else 0)
    body = xdr_int(len(values)) + b"".join(r_charsxp(v) for v in values)
    return xdr_int(flags) + body + (r_attributes({"names": r_strsxp(names)}) if names else b"")


def r_intsxp(values):
    return xdr_int(13) + xdr_int(len(values)) + b"".join(xdr_int(v) for v in values)


def r_vecsxp(items, names=None):
    flags = 19 | ((1 << 9) if names else 0)
    body = xdr_int(len(items)) + b"".join(items)
    return xdr_int(flags) + body + (r_attributes({"names": r_strsxp(names)}) if names else b"")


def r_attributes(attrs):
    out = b""
    for tag, value in attrs.items():
        out += xdr_int(2 | (1 << 10)) + xdr_int(1) + r_charsxp(tag) + value  # LISTSXP, SYMSXP tag
    return out + xdr_int(254)  # NILVALUE ends the pairlist


def r_serialize(item, version=3):
    head = b"X\n" + xdr_int(version) + xdr_int(0x040201) + xdr_int(0x030500)
    if version == 3:
        head += xdr_int(5) + b"UTF-8"
    return head + item


@pytest.mark.parametrize("version", [2, 3])
def test_r_character_vector(version):
    pytest.importorskip("rdata")
    data = r_serialize(r_strsxp(["EMMA", "", "By Jane Austen", None, "caf\u00e9"]), version)
    assert list(bbc.unserialize(data)) == ["EMMA", "", "By Jane Austen", None, "caf\u00e9"]
    assert list(bbc.unserialize(gzip.compress(data))) == list(bbc.unserialize(data))


def test_r_sources_without_rdata_say_what_to_install(tmp_path, monkeypatch, capsys):
    find_spec = bbc.importlib.util.find_spec
    monkeypatch.setattr(bbc.importlib.util, "find_spec",
                        lambda name, *a: None if name == "rdata" else find_spec(name, *a))
    rc = bbc.main(["--out", str(tmp_path / "out"), "--sources", "kjv,mobydick",
                   "--cache", str(tmp_path / "c")])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: the sources austen,mobydick,tidytext are R data files, read with the "
                   "rdata package: pip install 'rdata>=1.0' (or pass --input-dir)"]
    assert not (tmp_path / "c").exists()  # refused before downloading anything


def test_r_lazyload_db(tmp_path):
    """A two-object lazy-load database (.rdb blobs + gzip'd .rdx index) read back by name."""
    pytest.importorskip("rdata")
    objects = {"emma": ["EMMA", "", "Chapter 1"], "persuasion": ["Persuasion", "by Jane Austen"]}
    rdb, offsets = b"", []
    for values in objects.values():
        payload = r_serialize(r_strsxp(values))
        blob = struct.pack(">I", len(payload)) + zlib.compress(payload)
        offsets.append((len(rdb), len(blob)))
        rdb += blob
    variables = r_vecsxp([r_intsxp(list(o)) for o in offsets], names=list(objects))
    index = r_vecsxp([variables, r_vecsxp([]), xdr_int(10) + xdr_int(1) + xdr_int(1)],
                     names=["variables", "references", "compressed"])
    (tmp_path / "Rdata.rdb").write_bytes(rdb)
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(r_serialize(index)))
    got = bbc.read_lazyload_db(str(tmp_path / "Rdata"))
    assert {k: list(v) for k, v in got.items()} == objects
