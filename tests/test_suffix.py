"""Suffix identification (task ``longmem_suffix``, ChapterBreak's protocol): reading ChapterBreak's
JSON, exact prefix/context/candidate tokens, the prefix written into memory once per batch and
never while candidates are scored, the right candidate on a model whose logits are known, the
builder of the format from books, and fairseq-generate end to end."""

import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from conftest import REPO, USER_DIR, FavoursOneToken, run_cli_cases
from fairseq_longmem.tasks.scoring import memory_scoring
from fairseq_longmem.tasks.scoring.longmem_suffix import read_chapterbreak
from fairseq_longmem.tasks.scoring.scorers import CandidateAccuracyScorer

EOS = 2


def gpt2(text_ids):
    return [i + 4 for i in text_ids]  # fairseq index = GPT-2 id + 4


def write_json(path, data):
    path.write_text(json.dumps(data))
    return str(path)


def make_task(gpt2_files, data, **overrides):
    from fairseq_longmem.tasks.scoring.longmem_suffix import LongMemSuffixTask

    enc, vocab, dict_txt = gpt2_files
    options = dict(_name="longmem_suffix", data=os.path.dirname(dict_txt), suffix_data=data,
                   suffix_split=None, prefix_tokens=0, context_tokens=4, suffix_tokens=3,
                   suffix_seed=1, tokens_per_sample=16, fp16=False, bf16=False,
                   bpe_cfg={"_name": "gpt2", "gpt2_encoder_json": enc, "gpt2_vocab_bpe": vocab})
    options.update(overrides)
    task = LongMemSuffixTask.setup_task(OmegaConf.create(options))
    task.load_dataset("test")
    return task


def test_reads_both_chapterbreak_layouts_and_refuses_malformed_ones(tmp_path):
    example = {"ctx": "a b", "pos": "c", "negs": ["d", "e"]}
    works = write_json(tmp_path / "works.json", {"w1": [example, example], "w2": [example]})
    assert [(w, i) for w, i, *_ in read_chapterbreak(works, None)] == [("w1", 0), ("w1", 1),
                                                                        ("w2", 0)]
    release = write_json(tmp_path / "release.json", {"pg19": {"w1": [example]},
                                                      "ao3": {"w9": [example, example]}})
    assert [w for w, *_ in read_chapterbreak(release, "ao3")] == ["w9", "w9"]
    with pytest.raises(ValueError, match=r"holds the splits \['ao3', 'pg19'\]: pick one"):
        read_chapterbreak(release, None)
    bad = write_json(tmp_path / "bad.json", {"w1": [{"ctx": "a", "pos": 3, "negs": []}]})
    with pytest.raises(ValueError, match=r"work 'w1' example 0: expected \{'ctx': str"):
        read_chapterbreak(bad, None)
    (tmp_path / "broken.json").write_text('{"w1": [')
    with pytest.raises(ValueError, match="not valid JSON"):
        read_chapterbreak(str(tmp_path / "broken.json"), None)


def test_examples_with_an_empty_prefix_or_candidate_are_left_out_and_counted(gpt2_files, tmp_path,
                                                                            caplog):
    good = [{"ctx": f"The capital\nof France is {i}", "pos": f"Paris {i}", "negs": ["Rome", "Oslo"]}
            for i in range(6)]
    empty = [{"ctx": " \n", "pos": "a", "negs": ["b"]}, {"ctx": "a b", "pos": "", "negs": ["b"]},
             {"ctx": "a b", "pos": "c", "negs": ["b", "\n"]}]
    dirty = write_json(tmp_path / "dirty.json", {"w1": [good[0], empty[0], good[1], good[2]],
                                                 "w2": [empty[1], good[3], empty[2]],
                                                 "w3": good[4:]})
    clean = write_json(tmp_path / "clean.json", {"w1": good[:3], "w2": [good[3]], "w3": good[4:]})
    caplog.clear()
    kept = read_chapterbreak(dirty, None)
    assert [(w, i) for w, i, *_ in kept] == [("w1", 0), ("w1", 2), ("w1", 3), ("w2", 1),
                                              ("w3", 0), ("w3", 1)]
    assert [x[2:] for x in kept] == [x[2:] for x in read_chapterbreak(clean, None)]
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"--suffix-data {dirty}: 3 examples with an empty prefix or candidate left out of scoring "
        "(w1/1, w2/0, w2/2); accuracy is over the 6 examples scored"]
    # what is scored, candidate order included, is what the file without them gives
    a, b = (make_task(gpt2_files, d, context_tokens=4).datasets["test"] for d in (dirty, clean))
    assert a.answers == b.answers and len(a.contexts) == 6
    for name in ("memories", "contexts"):
        assert [t.tolist() for t in getattr(a, name)] == [t.tolist() for t in getattr(b, name)]
    assert [[c.tolist() for c in x] for x in a.candidates] == \
        [[c.tolist() for c in x] for x in b.candidates]
    # nothing usable: refused in one line
    none = write_json(tmp_path / "none.json", {"w": empty})
    with pytest.raises(ValueError) as e:
        read_chapterbreak(none, None)
    assert str(e.value) == (f"--suffix-data {none}: no examples: all 3 have an empty prefix or "
                            "candidate (w/0, w/1, w/2)")
    nothing = write_json(tmp_path / "nothing.json", {"w": []})
    with pytest.raises(ValueError, match=r"^--suffix-data \S+nothing.json: no examples$"):
        read_chapterbreak(nothing, None)


def test_prefix_context_memory_and_candidates_are_exact(gpt2_files, tmp_path):
    # GPT-2 ids: "The capital" = 464 3139, "of France is" = 1659 4881 318 (measured below)
    data = write_json(tmp_path / "s.json", {"w": [{
        "ctx": "The capital\nof France is", "pos": "Paris and\nmore", "negs": ["Rome"]}]})
    task = make_task(gpt2_files, data, context_tokens=4, suffix_tokens=3)
    enc = lambda t: task.encode(t).tolist()  # noqa: E731
    first, second = enc("The capital"), enc("of France is")
    assert first == gpt2([464, 3139]) and second == gpt2([1659, 4881, 318])
    prefix = [EOS] + first + [EOS] + second + [EOS]
    ds = task.datasets["test"]
    assert ds.contexts[0].tolist() == prefix[-4:]
    assert ds.memories[0].tolist() == prefix[:-4]
    true = (enc("Paris and") + [EOS] + enc("more"))[:3]
    cands = [c.tolist() for c in ds.candidates[0]]
    assert sorted(cands) == sorted([true, enc("Rome")])
    assert cands[ds.answers[0]] == true
    # --prefix-tokens keeps the prefix's last tokens
    short = make_task(gpt2_files, data, prefix_tokens=6, context_tokens=4)
    assert short.datasets["test"].memories[0].tolist() == prefix[-6:-4]


def test_a_prefix_no_longer_than_the_context_is_refused(gpt2_files, tmp_path):
    data = write_json(tmp_path / "s.json", {"w": [{"ctx": "The capital", "pos": "a",
                                                   "negs": ["b"]}]})
    with pytest.raises(ValueError, match=r"work 'w' example 0: the prefix has 4 tokens, not "
                                         r"more than the 4 in context"):
        make_task(gpt2_files, data, context_tokens=4)


def test_the_candidate_the_model_prefers_is_chosen(gpt2_files, tmp_path):
    examples = [{"ctx": f"line {i} of the prefix\nand more of it", "pos": "yes yes yes",
                 "negs": ["no no no", "so so so", "not not not"]} for i in range(5)]
    data = write_json(tmp_path / "s.json", {"w": examples})
    task = make_task(gpt2_files, data, context_tokens=4)
    yes = task.encode("yes")[0].item()
    generator = task.build_generator([FavoursOneToken(len(task.dictionary), yes)],
                                     SimpleNamespace(nbest=4, beam=5))
    ds = task.datasets["test"]
    sample = ds.collater(list(range(5)))
    hypos = generator.generate(sample)
    scorer = CandidateAccuracyScorer(None)
    text = lambda t: task.bpe.decode(task.dictionary.string(t))  # noqa: E731
    for i, h in enumerate(hypos):
        assert len(h) == 4 and h[0]["score"] >= h[1]["score"]
        scorer.add_string(text(sample["target"][i]), text(h[0]["tokens"]))
    assert scorer.result_string() == "Accuracy 100.00 (5/5)"
    assert sorted(ds.answers) != [0] * 5  # the true one is not always shown first


def test_prefix_goes_into_memory_once_and_scoring_never_writes(gpt2_vocab_models, tmp_path,
                                                              monkeypatch):
    from fairseq import checkpoint_utils

    from fairseq_longmem.memory.bank import ChunkedMemoryBank

    examples = [{"ctx": "\n".join(f"the film was fine {j} ." for j in range(6 + i)),
                 "pos": "it was", "negs": ["so it", "then"]} for i in range(3)]
    data = write_json(tmp_path / "s.json", {"w": examples})
    task = make_task(gpt2_vocab_models.files, data, context_tokens=8, tokens_per_sample=16)
    models, _ = checkpoint_utils.load_model_ensemble([gpt2_vocab_models.longmem], task=task)
    adds, phase = [], ["fill"]
    real_add = ChunkedMemoryBank.add
    monkeypatch.setattr(ChunkedMemoryBank, "add",
                        lambda self, *a, **k: adds.append(phase[0]) or real_add(self, *a, **k))
    real_score = memory_scoring.continuation_logprobs

    def scoring(*a, **k):
        phase[0] = "score"
        fill = a[4].fill().tolist()
        out = real_score(*a, **k)
        assert a[4].fill().tolist() == fill
        phase[0] = "fill"
        return out

    monkeypatch.setattr(memory_scoring, "continuation_logprobs", scoring)
    generator = task.build_generator(models, SimpleNamespace(nbest=3, beam=5))
    generator.generate(task.datasets["test"].collater([0, 1, 2]))
    memory_tokens = [len(m) for m in task.datasets["test"].memories]
    # one add per 16-token segment of the longest prefix, all before scoring, none during it
    assert adds == ["fill"] * -(-max(memory_tokens) // 16)


def suffix_case(models, data, *extra, path=None):
    enc, vocab, dict_txt = models.files
    return ("fairseq-generate", [
        os.path.dirname(dict_txt), "--user-dir", USER_DIR,
        "--task", "longmem_suffix", "--path", path or models.longmem, "--suffix-data", data,
        "--tokens-per-sample", "32", "--suffix-tokens", "8", "--scoring", "candidate_accuracy",
        "--batch-size", "2", "--bpe", "gpt2", "--gpt2-encoder-json", enc, "--gpt2-vocab-bpe",
        vocab, "--cpu", "--nbest", "3", "--num-workers", "0", *extra])


def test_generate_end_to_end_with_memory_on_and_off(gpt2_vocab_models, tmp_path):
    examples = [{"ctx": "\n".join(f"Review: the film was {w} . Sentiment: positive."
                                  for w in ["fine", "great"] * (4 + i)),
                 "pos": "Review: the film", "negs": ["Sentiment: dull", "great . fine"]}
                for i in range(3)]
    data = write_json(tmp_path / "s.json", {"w": examples})
    logs = run_cli_cases({  # one interpreter: fairseq's import paid once
        "on": suffix_case(gpt2_vocab_models, data),
        "off": suffix_case(gpt2_vocab_models, data, "--model-overrides",
                           "{'disable_memory': True}"),
        "missing": suffix_case(gpt2_vocab_models, str(tmp_path / "missing.json")),
        # several memory layers (one bank per layer) read the prefix's memory the same way
        "layers_on": suffix_case(gpt2_vocab_models, data, path=gpt2_vocab_models.longmem_layers),
        "layers_off": suffix_case(gpt2_vocab_models, data, "--model-overrides",
                                  "{'disable_memory': True}", path=gpt2_vocab_models.longmem_layers),
    })
    on, off = logs["on"].log, logs["off"].log
    assert not logs["on"].failed and not logs["off"].failed
    m = re.search(r"Generate test with beam=1: Accuracy ([\d.]+) \((\d+)/3\)", on)
    assert m, on[-2000:]
    assert len(re.findall(r"^H-\d\t", on, re.M)) == 9 and len(re.findall(r"^T-\d\t", on, re.M)) == 3
    assert "scored after the context alone" in off
    score = lambda log: [float(x) for x in re.findall(r"^H-\d\t(\S+)", log, re.M)]  # noqa: E731
    assert score(on) != score(off)
    bad = logs["missing"]
    assert bad.failed and "--suffix-data: no file at" in bad.log and "Accuracy" not in bad.log
    layers_on, layers_off = logs["layers_on"], logs["layers_off"]
    assert not layers_on.failed and not layers_off.failed, layers_on.log[-2000:]
    assert len(re.findall(r"^H-\d\t", layers_on.log, re.M)) == 9
    assert score(layers_on.log) != score(layers_off.log)


def test_builder_finds_chapters_and_writes_the_format(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "raw").mkdir(parents=True)
    chapters = []
    for c in range(1, 9):
        chapters += [f"CHAPTER {c}", f"Chapter {c} opens here with words.",
                     " ".join(f"w{c}_{j}" for j in range(20))]
        if c == 2:  # a title under the heading, a part heading at the chapter's end: dropped
            chapters[-2:-2] = ["THE TITLE OF TWO"]
            chapters += ["BOOK TWO", "THE SECOND PART"]
    book = "\n".join(chapters)
    (corpus / "raw" / "test.txt").write_text("Intro line only\n\n" + book + "\n")
    (corpus / "manifest.json").write_text(json.dumps({"books": [
        {"title": "Short", "split": "test"}, {"title": "Novel", "split": "test"}]}))
    out = tmp_path / "set.json"
    res = subprocess.run([sys.executable, os.path.join(REPO, "examples", "suffix",
                                                       "build_chapterbreak.py"),
                          "--corpus", str(corpus), "--out", str(out), "--ctx-words", "40",
                          "--suffix-words", "4", "--negatives", "2"], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    assert list(data) == ["Novel"]
    first = data["Novel"][0]
    # chapters 1 and 2 hold 2 x 26 words before the heading of chapter 3: the first boundary
    assert first["pos"] == "Chapter 3 opens here"
    assert first["ctx"].endswith(" ".join(f"w2_{j}" for j in range(20)))
    assert "CHAPTER" not in first["ctx"].split("\n")[-1]
    assert "BOOK" not in first["ctx"] and "SECOND PART" not in first["ctx"]  # never end a prefix
    assert not any("TITLE" in n for e in data["Novel"] for n in [e["pos"]] + e["negs"])
    assert len(first["negs"]) == 2 and all(n.startswith("Chapter ") for n in first["negs"])
    assert all(int(n.split()[1]) > 3 for n in first["negs"])  # from later chapters
    assert len(data["Novel"]) == 6  # boundaries before chapters 3..8
