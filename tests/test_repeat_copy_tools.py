"""examples/repeat_augment.py (spans copied from earlier in a training document) and
examples/long_context_lm/copy_probe.py (how well a model copies a span from d segments back)."""

import json
import os

import numpy as np
import pytest
import torch
from fairseq.data import Dictionary, data_utils

from conftest import TOKENS_PER_SAMPLE, load_example

copy_probe = load_example(os.path.join("long_context_lm", "copy_probe.py"))
repeat_augment = load_example("repeat_augment.py")


def test_augment_document_copies_only_from_earlier_text():
    eos = 2
    doc = np.arange(10, 5010, dtype=np.int64)
    doc[::97] = eos  # line ends
    orig = doc.copy()
    copies = repeat_augment.augment_document(doc, eos, np.random.RandomState(3), rate=0.2,
                                             span=(4, 9), max_distance=300)
    written = sum(n for _, _, n in copies)
    assert 0.1 * len(doc) < written <= 0.2 * len(doc) + 9
    assert (doc[orig == eos] == eos).all() and (doc == eos).sum() == (orig == eos).sum()
    changed = np.flatnonzero(doc != orig)
    # every original token value is distinct, so a copied token names the position it came from
    assert (doc[changed] < orig[changed]).all()
    covered = np.zeros(len(doc), dtype=bool)
    for a, b, n in copies:
        assert 4 <= n <= 9 and n <= b - a <= 300
        assert (doc[a:a + n] == doc[b:b + n]).all()  # every pair still matches at the end
        assert not covered[b:b + n].any()  # no copy writes over another
        covered[b:b + n] = True
    assert set(changed) <= set(np.flatnonzero(covered))


def test_augment_document_random_spans_come_in_pairs():
    eos = 2
    doc = np.arange(5000, 9000, dtype=np.int64)
    doc[::97] = eos
    copies = repeat_augment.augment_document(doc, eos, np.random.RandomState(5), rate=0.1,
                                             span=(4, 9), max_distance=2000,
                                             random_vocab=range(4, 50))
    mask = np.zeros(len(doc), dtype=bool)
    for a, b, n in copies:
        assert (doc[a:a + n] == doc[b:b + n]).all() and ((doc[b:b + n] >= 4) & (doc[b:b + n] < 50)).all()
        assert not mask[a:a + n].any() and not mask[b:b + n].any()  # pairs never overlap
        mask[a:a + n] = mask[b:b + n] = True
    # the random tokens are exactly the pairs' tokens, about rate * len(doc) of them
    assert (np.flatnonzero((doc < 50) & (doc != eos)) == np.flatnonzero(mask)).all()
    assert 0.05 * len(doc) < mask.sum() <= 0.1 * len(doc) + 18
    assert max(b - a for a, b, _ in copies) > 500  # long distances survive the no-overlap rule


def test_augment_document_is_seeded():
    def run(seed):
        doc = np.arange(3, 4003, dtype=np.int64)
        repeat_augment.augment_document(doc, 2, np.random.RandomState(seed), 0.1, (8, 32), 1000)
        return doc
    assert (run(1) == run(1)).all() and not (run(1) == run(2)).all()


def test_repeat_augment_changes_only_the_training_split(corpus, tmp_path):
    out = tmp_path / "rep"
    assert repeat_augment.main([corpus.data_dir, "--out", str(out), "--rate", "0.1",
                                "--max-distance", "64", "--span", "2,6"]) == 0
    d = Dictionary.load(os.path.join(corpus.data_dir, "dict.txt"))
    for split in ("valid", "test"):
        for ext in ("bin", "idx"):
            a = open(os.path.join(corpus.data_dir, f"{split}.{ext}"), "rb").read()
            assert a == open(out / f"{split}.{ext}", "rb").read()
    old = data_utils.load_indexed_dataset(os.path.join(corpus.data_dir, "train"), d)
    new = data_utils.load_indexed_dataset(str(out / "train"), d)
    assert len(old) == len(new)
    a = np.concatenate([old[i].numpy() for i in range(len(old))])
    b = np.concatenate([new[i].numpy() for i in range(len(new))])
    assert [len(old[i]) for i in range(len(old))] == [len(new[i]) for i in range(len(new))]
    assert ((a == d.eos()) == (b == d.eos())).all()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokens"] == len(a) - sum(len(old[i]) == 1 for i in range(len(old)))
    assert 0 < (a != b).sum() <= manifest["tokens_overwritten"]
    assert manifest["copies"] > 0
    with pytest.raises(SystemExit):  # never overwrites an existing folder
        repeat_augment.main([corpus.data_dir, "--out", str(out)])


def test_make_trials_geometry():
    text = np.arange(100, 1100)
    T, span = 32, 5
    for d in (0, 1, 3):
        docs, first, second = copy_probe.make_trials(text, range(4, 50), T, span, d, 6, seed=7)
        assert docs.shape == (6, (d + 2) * T)
        for i in range(6):
            a, b = first[i], second[i]
            assert T < a and a + span <= T + T - span  # segment 1, room for the d = 0 copy
            assert b == (a + span if d == 0 else a + d * T)
            assert (docs[i, a:a + span] == docs[i, b:b + span]).all()
            assert ((docs[i, a:a + span] >= 4) & (docs[i, a:a + span] < 50)).all()
    # the same trials (span, offset, text) at every distance
    d0, f0, _ = copy_probe.make_trials(text, range(4, 50), T, span, 0, 6, seed=7)
    d2, f2, _ = copy_probe.make_trials(text, range(4, 50), T, span, 2, 6, seed=7)
    assert f0 == f2 and (d0[:, :f0[0]] == d2[:, :f0[0]]).all()


def test_copy_losses():
    lp = torch.full((1, 20), -1.0)
    lp[0, 12:16] = -0.25  # the second copy's tokens 1..3 (positions 12-14 of copy at 11)
    a, b = copy_probe.copy_losses(lp, [3], [11], span=4)
    assert a == pytest.approx(1 / np.log(2)) and b == pytest.approx(0.25 / np.log(2))


def test_copy_probe_end_to_end(corpus, backbone, longmem_run, tmp_path):
    lm = longmem_run.checkpoint
    out = tmp_path / "probe.json"
    assert copy_probe.main([corpus.data_dir, "--path", backbone, "--path", lm,
                            "--tokens-per-sample", str(TOKENS_PER_SAMPLE), "--span", "6",
                            "--trials", "4", "--distances", "0,1,3", "--read-hits",
                            "--results-json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["path"], r["memory"], r["distance"]) for r in rows] == [
        (backbone, False, 0), (backbone, False, 1), (backbone, False, 3),
        (lm, True, 0), (lm, True, 1), (lm, True, 3)]
    for r in rows:
        assert r["recall_bits"] == pytest.approx(r["first_bits"] - r["second_bits"])
        # where the memory's reads land: LongMem's one memory layer, from d = 1 on
        hits = r["memory"] and r["distance"] >= 1
        assert ("read_hits" in r) == hits
        if hits:
            (share,) = r["read_hits"].values()
            assert 0 <= share <= 1
            assert 0 < r["read_hits_chance"] < 1
    # the first copy sits in segment 1 whatever the distance: what comes after it (the second
    # copy, more segments) cannot change its loss, with or without a memory (causality)
    for model in (backbone, lm):
        firsts = [r["first_bits"] for r in rows if r["path"] == model]
        assert max(firsts) - min(firsts) < 1e-5


def test_copy_probe_table_has_a_row_per_file_and_a_column_per_distance(tmp_path, capsys):
    def row(d, first, second):
        return {"distance": d, "first_bits": first, "second_bits": second,
                "recall_bits": first - second}

    (tmp_path / "on.json").write_text(json.dumps([row(1, 20.0, 6.5), row(16, 20.0, 14.25)]))
    (tmp_path / "off.json").write_text(json.dumps([row(4, 16.5, 16.625)]))
    assert copy_probe.main(["--table", str(tmp_path / "on.json"), str(tmp_path / "off.json")]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "| run | d = 1 | d = 4 | d = 16 |",
        "|---|---|---|---|",
        "| on | +13.50 (6.50 of 20.00) |  | +5.75 (14.25 of 20.00) |",
        "| off |  | -0.12 (16.62 of 16.50) |  |",
    ]
    with pytest.raises(ValueError, match="one model per file"):
        copy_probe.table([("two", [row(1, 2.0, 1.0), row(1, 3.0, 1.0)])])


def test_read_hits_counts_the_first_copys_chunks_against_chance():
    T, csz, span = 16, 4, 4
    first, second = [T + 5, T + 1], [2 * T + 5, 2 * T + 1]  # d = 1: memory holds 8 chunks
    # trial 0's first copy is tokens 21-24 = source positions 22-25: chunks 5 and 6;
    # trial 1's is tokens 17-20 = source positions 18-21: chunks 4 and 5
    idx = torch.full((2, 3, T, 2), -1, dtype=torch.long)  # (B, H, T, nk)
    idx[0, :, 6:9, 0] = 6  # trial 0's second-copy queries (positions 6-8): a hit each ...
    idx[0, :, 6:9, 1] = 0  # ... and a miss each
    idx[1, :, 2:5, 0] = 4  # trial 1: hits only
    share, chance = copy_probe.read_hits(idx, first, second, T, span, csz)
    assert share == pytest.approx((9 + 9) / (18 + 9)) and chance == pytest.approx(2 / 8)
    idx[1, 0, 3, 1] = 8  # a chunk the document never wrote
    with pytest.raises(ValueError, match="wrapped"):
        copy_probe.read_hits(idx, first, second, T, span, csz)
