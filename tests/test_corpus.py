"""examples/build_book_corpus.py on a folder of small synthetic books (no network), and its reading
of R data files (through the rdata package) on hand-built bytes."""

import gzip
import json
import os
import random
import struct
import zlib

import pytest

from conftest import load_example

bbc = load_example("build_book_corpus.py")

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


def test_build_hf_tokenizer_corpus_one_book_per_line(tmp_path):
    """--bpe hf_tokenizer: a pretrained model's </s> is its end of text, so a whole book is one
    line, its paragraphs separated by a blank line in the model's own newline tokens; books are
    still separated by an empty line, and longmem_lm reads one document per book."""
    from argparse import Namespace

    from fairseq.data import Dictionary, data_utils, encoders

    from fairseq_longmem.tasks.document_stream import split_documents
    from fairseq_longmem.tokenizer_files import tokenizer_json_from_gguf
    from test_hf_tokenizer import TINY_TOKENS, tiny_metadata, write_dict

    books = synthetic_books(tmp_path / "in", n=6)
    model = tmp_path / "model"
    model.mkdir()
    (model / "tokenizer.json").write_text(tokenizer_json_from_gguf(tiny_metadata()), encoding="utf-8")
    write_dict(model / "dict.txt", len(TINY_TOKENS))
    out = tmp_path / "out"
    args = ["--out", str(out), "--sources", "", "--input-dir", str(tmp_path / "in"),
            "--valid-books", "1", "--test-books", "2", "--seed", "3", "--workers", "1",
            "--bpe", "hf_tokenizer"]
    assert bbc.main(args) == 2  # no tokenizer given: one line (captured), nothing built
    assert not (out / "bin").exists()
    assert bbc.main(args + ["--tokenizer-file", str(model / "tokenizer.json")]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["convention"].startswith("one book per line")
    bpe = encoders.build_bpe(Namespace(bpe="hf_tokenizer", tokenizer_file=str(model / "tokenizer.json")))
    d = Dictionary.load(str(out / "bin" / "dict.txt"))
    assert (out / "bin" / "dict.txt").read_text() == (model / "dict.txt").read_text()
    for split in bbc.SPLITS:
        titles = [b["title"] for b in manifest["books"] if b["split"] == split]
        ds = data_utils.load_indexed_dataset(str(out / "bin" / split), d)
        items = [ds[i] for i in range(len(ds))]
        assert len(items) == 2 * len(titles) - 1
        assert all(items[i].tolist() == [d.eos()] for i in range(1, len(items), 2))
        for title, item in zip(titles, items[::2]):
            assert item[-1] == d.eos() and (item[:-1] != d.eos()).all()  # </s> only at its end
            assert bpe.decode(d.string(item[:-1])) == "\n\n".join(books[title])
        assert sum(len(x) for x in items) == manifest["splits"][split]["tokens"]
        assert split_documents(ds.sizes) == [(i, i + 1) for i in range(0, len(items), 2)]


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


# --------------------------------------------------------------------------- source code (pycode)

import io  # noqa: E402
import tarfile  # noqa: E402
import zipfile  # noqa: E402

pyc = load_example("pycode_corpus.py")

METADATA = "Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n{license}\n"


def code_file(rng, n_funcs, tag):
    """A Python module with blank lines, nested indentation, a tab-indented line, identifiers reused."""
    lines = [f'"""Module {tag}."""', "", "import os", ""]
    for i in range(n_funcs):
        name = f"{tag}_{rng.choice(['load', 'parse', 'scan', 'merge'])}_{i}"
        lines += ["", f"def {name}(path, limit={rng.randint(1, 99)}):",
                  "    total = 0", "    for item in os.listdir(path):", "        if len(item) > limit:",
                  "            total += 1", "", "\treturn total   "]
    return "\n".join(lines) + "\n"


def make_packages(folder, seed=0):
    """Six local packages (three wheels, two sdists, one folder) with small files and duplicates;
    returns {name: (version, {path: source})} of the .py files each holds."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    shared = code_file(rng, 12, "shared")  # vendored: in alpha and in delta (twice)
    licenses = ["License-Expression: MIT", "Classifier: License :: OSI Approved :: BSD License",
                "License: Apache-2.0", "", "Classifier: License :: OSI Approved :: MIT License", ""]
    pkgs = {}
    for k, name in enumerate(["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]):
        version = f"1.{k}"
        files = {f"{name}/__init__.py": f"from .core import {name}_load\n",  # small: dropped
                 f"{name}/core.py": code_file(rng, 10 + 3 * k, name),
                 f"{name}/util.py": code_file(rng, 8, name + "u")}
        if name in ("alpha", "delta"):
            files[f"{name}/_vendor/shared.py"] = shared
        if name == "delta":
            files["delta/_vendor/copy_of_shared.py"] = shared
            files["delta/tiny.py"] = "x = 1\n" * 5  # small: dropped
        meta = METADATA.format(name=name, version=version, license=licenses[k])
        if k < 3:  # wheels
            with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as z:
                for path, src in files.items():
                    z.writestr(path, src)
                z.writestr(f"{name}-{version}.dist-info/METADATA", meta)
        elif k < 5:  # sdists with a LICENSE file
            with tarfile.open(folder / f"{name}-{version}.tar.gz", "w:gz") as t:
                extra = {"PKG-INFO": meta, "LICENSE": "\nZero-Clause BSD\n\nPermission...\n"}
                for path, src in {**{f"src/{p}": s for p, s in files.items()}, **extra}.items():
                    data = src.encode()
                    info = tarfile.TarInfo(f"{name}-{version}/{path}")
                    info.size = len(data)
                    t.addfile(info, io.BytesIO(data))
            files = {f"{name}-{version}/src/{p}": s for p, s in files.items()}
        else:  # an unpacked folder, no metadata: name and version from the folder name
            for path, src in files.items():
                (folder / f"{name}-{version}" / path).parent.mkdir(parents=True, exist_ok=True)
                (folder / f"{name}-{version}" / path).write_text(src)
            (folder / f"{name}-{version}" / "COPYING").write_text("MIT License\n")
        pkgs[name] = (version, files)
    return pkgs


def test_code_document_keeps_indentation_drops_blank_lines():
    src = "\ufeffdef f(x):\r\n\r\n    if x:\n\treturn 1  \n\x0c\n    y = 'a\x0bb'\n   \n"
    assert pyc.code_document(src) == "def f(x):\n    if x:\n        return 1\n    y = 'a b'"


def test_pycode_packages_read_with_versions_and_licences(tmp_path):
    made = make_packages(tmp_path / "pk")
    pkgs, docs = pyc.collect([], str(tmp_path / "pk"), str(tmp_path / "cache"), min_file_bytes=100)
    assert [(p.name, p.version, p.license) for p in pkgs] == [
        ("alpha", "1.0", "MIT"), ("beta", "1.1", "BSD License"), ("delta", "1.3", "Zero-Clause BSD"),
        ("epsilon", "1.4", "MIT License"), ("gamma", "1.2", "Apache-2.0"), ("zeta", "1.5", "MIT License")]
    assert {p.name: (p.kept, p.dropped_small, p.dropped_duplicate) for p in pkgs} == {
        "alpha": (3, 1, 0), "beta": (2, 1, 0), "gamma": (2, 1, 0),
        "delta": (2, 2, 2),  # both copies of alpha's vendored file: exact duplicates
        "epsilon": (2, 1, 0), "zeta": (2, 1, 0)}
    assert [(p.name, path) for p, path, _ in docs if "shared" in path] == [("alpha", "alpha/_vendor/shared.py")]
    expected = {pyc.code_document(s) for _, files in made.values() for s in files.values() if len(s) >= 100}
    assert sorted(d for _, _, d in docs) == sorted(expected)  # 13 distinct documents
    assert len(docs) == 13
    # the floor counts bytes of the file as it is: 0 keeps the 5-line file, not the empty document
    pkgs0, docs0 = pyc.collect([], str(tmp_path / "pk"), str(tmp_path / "c"), min_file_bytes=0)
    assert len(docs0) == 13 + 7


def test_build_pycode_corpus(tmp_path):
    import sentencepiece as spm
    from fairseq.data import Dictionary, data_utils

    make_packages(tmp_path / "pk")
    out = tmp_path / "out"
    rc = bbc.main(["--out", str(out), "--sources", "pycode", "--pycode-dir", str(tmp_path / "pk"),
                   "--valid-packages", "1", "--test-packages", "2", "--seed", "2", "--min-file-bytes", "100",
                   "--bpe", "sentencepiece", "--vocab-size", "80", "--workers", "1"])
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    packages = manifest["pycode"]["packages"]
    assert all(p["license"] and p["version"] for p in packages) and len(packages) == 6
    assert sum(p["dropped_small"] for p in packages) == 7 and sum(p["dropped_duplicate"] for p in packages) == 2
    lists = [manifest["splits"][s]["packages"] for s in bbc.SPLITS]
    assert [len(x) for x in lists] == [3, 1, 2]
    assert sorted(sum(lists, [])) == sorted(p["name"] for p in packages)  # each package in one split
    for doc in manifest["books"]:
        assert doc["split"] == next(p["split"] for p in packages if p["name"] == doc["group"])
        assert doc["title"].startswith(doc["group"] + "/")
    d = Dictionary.load(str(out / "bin" / "dict.txt"))
    sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
    for split in bbc.SPLITS:
        docs = (out / "raw" / f"{split}.txt").read_text()[:-1].split("\n\n")
        assert len(docs) == manifest["splits"][split]["books"]
        assert len(docs) == sum(p["kept"] for p in packages if p["split"] == split)
        ds = data_utils.load_indexed_dataset(str(out / "bin" / split), d)
        sizes = ds.sizes.tolist()
        assert sizes.count(1) + 1 == len(docs)  # binarized documents = the manifest's
        assert sum(sizes) == manifest["splits"][split]["tokens"]
        if split == "train":  # indentation and spacing survive tokenization (other splits have unseen characters)
            for line in "\n".join(docs).split("\n"):
                assert sp.decode(sp.encode(line)) == line
    # an indentation run is one piece; a line starts without sentencepiece's dummy space
    assert sp.encode("        return total", out_type=str)[0] == "\u2581" * 8
    assert sp.encode("            x", out_type=str)[0] == "\u2581" * 12
    assert sp.encode("import os", out_type=str)[0] != "\u2581"
    assert set(manifest["splits"]["train"]["packages"]) == {"alpha", "gamma", "zeta"}  # deterministic from --seed 2


def test_pycode_cache_and_unreachable_registry(tmp_path, monkeypatch, capsys):
    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True)
    (wheels / "Foo_Bar-1.0-py3-none-any.whl").write_bytes(b"")
    (wheels / "native-2.0-cp311-cp311-linux_x86_64.whl").write_bytes(b"")
    calls = []
    monkeypatch.setattr(pyc.subprocess, "run", lambda *a, **k: calls.append(a))
    assert pyc.fetch_wheels(["foo-bar==1.0"], str(tmp_path / "cache")) == [str(wheels / "Foo_Bar-1.0-py3-none-any.whl")]
    assert calls == []  # cached: pip is not run
    with pytest.raises(pyc.PackageError, match="native-2.0-cp311-cp311-linux_x86_64.whl is not a pure-Python wheel"):
        pyc.fetch_wheels(["native==2.0"], str(tmp_path / "cache"))
    monkeypatch.undo()
    # a registry that cannot be reached: pip fails fast, the builder prints one error line
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    rc = bbc.main(["--out", str(tmp_path / "out"), "--sources", "pycode", "--pycode-packages", "requests==2.31.0",
                   "--pycode-cache", str(tmp_path / "cache2")])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: pip download of the pycode packages failed (is PyPI reachable?)")
    assert "--pycode-dir" in err[0]
    rc = bbc.main(["--out", str(tmp_path / "out"), "--sources", "pycode", "--pycode-packages", "requests>=2"])
    assert rc == 2 and capsys.readouterr().err.strip() == "error: --pycode-packages: 'requests>=2' is not NAME==VERSION"
