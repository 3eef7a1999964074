"""Memory-augmented in-context learning (task ``longmem_icl``, scorer ``icl_accuracy``): the sets'
readers, exact prompt tokens, the scoring rules on a model whose logits are known, the shared
read-only memory, and fairseq-generate end to end on a tiny GPT-2-vocabulary LongMem."""

import json
import os
import random
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import USER_DIR, FavoursOneToken, run_cli_cases
from fairseq_longmem.tasks.scoring import icl_data, memory_scoring
from fairseq_longmem.tasks.scoring.scorers import ICLAccuracyScorer

EOS = 2
POS_ID, NEG_ID = 3967 + 4, 4633 + 4  # " positive", " negative": GPT-2 id + 4

# --------------------------------------------------------------------------- hand-made data

POSITIVE = "great fine lovely superb wonderful".split()
NEGATIVE = "awful dull bad boring poor".split()
NOUNS = "film movie story plot cast".split()


def review(rng):
    y = rng.randrange(2)
    return f"the {rng.choice(NOUNS)} was {rng.choice(POSITIVE if y else NEGATIVE)} .", y


def write_tsv_set(folder, n_train=60, n_test=12, seed=0):
    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        with open(os.path.join(folder, f"{split}.tsv"), "w") as f:
            f.writelines(f"{y}\t{t}\n" for t, y in (review(rng) for _ in range(n)))
    return folder


# --------------------------------------------------------------------------- readers, sampling


def test_readers_parse_the_authors_layouts(tmp_path):
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "train.tsv").write_text("sentence\tlabel\na fine , fun film\t1\n")
    (tmp_path / "SST-2" / "dev.tsv").write_text("sentence\tlabel\ndull\t0\n")
    (tmp_path / "sst-5").mkdir()
    (tmp_path / "sst-5" / "stsa.fine.train").write_text("4 a stirring film\n2 it is a movie\n")
    (tmp_path / "sst-5" / "stsa.fine.dev").write_text("0 awful\n")
    for name in ("mr", "subj"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train.csv").write_text('0," "" analyze that "" , sadly"\n1,plain text\n')
        (tmp_path / name / "test.csv").write_text("1,fine\n")
    sst2 = icl_data.load_set("sst2", str(tmp_path))
    assert sst2.train == [icl_data.Example("a fine , fun film", 1)]
    assert sst2.test == [icl_data.Example("dull", 0)] and sst2.labels == ["negative", "positive"]
    sst5 = icl_data.load_set("sst5", str(tmp_path))
    assert [(x.text, sst5.labels[x.label]) for x in sst5.train] == [
        ("a stirring film", "great"), ("it is a movie", "okay")]
    mr = icl_data.load_set("mr", str(tmp_path))
    # CSV quotes are removed and commas inside them kept
    assert mr.train[0] == icl_data.Example('" analyze that " , sadly', 0)
    subj = icl_data.load_set("subj", str(tmp_path))
    assert subj.labels == ["subjective", "objective"]
    assert subj.template == "Input: {x} Type: {y}. "
    # the set's own folder works too, and tsv labels may be words or indices
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "train.tsv").write_text("positive\tgood\n0\tbad\n")
    (tmp_path / "own" / "test.tsv").write_text("1\tfine\n")
    own = icl_data.load_set("tsv", str(tmp_path / "own"), labels=["negative", "positive"])
    assert [x.label for x in own.train] == [1, 0]


def test_template_cuts_the_query_before_the_label():
    t = icl_data.Template("Review: {x} Sentiment: {y}. ")
    assert t.demonstration("a film", "positive") == "Review: a film Sentiment: positive. "
    assert t.query("a film") == "Review: a film Sentiment:"
    assert t.continuation("positive") == " positive"
    with pytest.raises(icl_data.ICLDataError, match="--icl-template"):
        icl_data.Template("{y} then {x}")


def test_sampling_is_the_authors_random_sample():
    train = [icl_data.Example(f"t{i}", i % 2) for i in range(50)]
    context, memory = icl_data.sample_demonstrations(train, 5, 20, seed=3)
    random.seed(3)
    assert context == random.sample(train, 5)
    assert memory == random.sample(train, 20)
    with pytest.raises(icl_data.ICLDataError, match="--demos-in-memory 51: expected 0 to 50"):
        icl_data.sample_demonstrations(train, 5, 51, seed=3)


def write_mpqa(folder, train, test, empty_train=(), empty_test=(), raw=False):
    """The authors' MPQA layout, FOLDER/mpqa/{train,test}.csv of 'L,sentence' rows, with an empty
    row ('0,') inserted at each line number of ``empty_*``; ``raw``: a UTF-8 BOM and CRLF line
    ends, as in published files."""
    os.makedirs(os.path.join(folder, "mpqa"), exist_ok=True)
    for name, rows, empty in (("train", train, empty_train), ("test", test, empty_test)):
        lines = [f'{y},"{t}"' for t, y in rows]
        for i in empty:
            lines.insert(i - 1, f"{i % 2},")
        end = "\r\n" if raw else "\n"
        with open(os.path.join(folder, "mpqa", f"{name}.csv"), "w", newline="") as f:
            f.write(("\ufeff" if raw else "") + end.join(lines) + end)
    return folder


def test_empty_train_rows_are_skipped_counted_and_leave_the_draw_unchanged(tmp_path, caplog):
    rng = random.Random(0)
    train = [review(rng) for _ in range(40)]
    test = [review(rng) for _ in range(6)]
    clean = icl_data.load_set("mpqa", write_mpqa(str(tmp_path / "clean"), train, test))
    dirty_dir = write_mpqa(str(tmp_path / "dirty"), train, test, empty_train=(3, 17, 31),
                           raw=True)
    caplog.clear()
    dirty = icl_data.load_set("mpqa", dirty_dir)
    assert len(clean.train) == len(dirty.train) == 40 and dirty.test == clean.test
    assert dirty.train == clean.train
    for seed in (1, 2, 3):
        assert icl_data.sample_demonstrations(dirty.train, 4, 25, seed) == \
            icl_data.sample_demonstrations(clean.train, 4, 25, seed)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"{dirty_dir}/mpqa/train.csv: 3 rows (lines 3, 17, 31) with empty "
                        "text skipped"]


def test_empty_rows_in_every_layout_and_what_is_still_refused(tmp_path):
    def read(text, fmt, labels=icl_data.POLARITY):
        (tmp_path / "f").write_text(text)
        return icl_data.read_examples(str(tmp_path / "f"), fmt, labels)

    one = [icl_data.Example("fine", 1)]
    assert read("sentence\tlabel\n\t0\nfine\t1\n", "sst2") == (one, [2])
    assert read("3 \n1 fine\n4  \n", "sst5", "abcde") == ([icl_data.Example("fine", 1)],
                                                           [1, 3])
    assert read("1\tfine\npositive\t \n", "tsv") == (one, [2])
    assert read('1,fine\n0,\n1," "\n', "csv") == (one, [2, 3])
    lines = list(range(2, 9))
    assert icl_data.rows_at(lines) == "7 rows (lines 2, 3, 4, 5, 6, ...)"
    assert icl_data.rows_at([4]) == "1 row (line 4)"
    # a file with no usable row, a bad label, a missing separator: one line, naming the file
    path = tmp_path / "f"
    for text, fmt, message in [
        ("0,\n1,\n\n1, \n", "csv",
         f"{path}: no usable examples: all 3 rows (lines 1, 2, 4) have empty text"),
        ("1,fine\n7,\n", "csv", f"{path}:2: label '7' is neither a label word"),
        ("1,fine\n0\n", "csv", f"{path}:2: expected 'label,sentence', got ['0']"),
        ("1\tfine\n0 dull\n", "tsv", f"{path}:2: expected 'label<TAB>text'"),
    ]:
        with pytest.raises(icl_data.ICLDataError) as e:
            read(text, fmt)
        assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


# --------------------------------------------------------------------------- the task in-process


def make_task(gpt2_files, data_dir, **overrides):
    from fairseq_longmem.tasks.scoring.longmem_icl import LongMemICLTask

    enc, vocab, dict_txt = gpt2_files
    options = dict(data=os.path.dirname(dict_txt), icl_dataset="tsv", icl_data_dir=str(data_dir),
                   icl_labels="negative,positive", icl_template=None, demos_in_context=2, demos_in_memory=0,
                   icl_seed=1, icl_decision="labels", memory_file=None, tokens_per_sample=64,
                   bpe_cfg={"_name": "gpt2", "gpt2_encoder_json": enc, "gpt2_vocab_bpe": vocab},
                   fp16=False, bf16=False)
    options.update(overrides)
    from omegaconf import OmegaConf

    task = LongMemICLTask.setup_task(OmegaConf.create(options))
    task.load_dataset("test")
    return task


def test_prompt_tokens_are_exact(gpt2_files, tmp_path):
    (tmp_path / "train.tsv").write_text("positive\ta fine film\nnegative\ta dull film\n")
    (tmp_path / "test.tsv").write_text("negative\tthe plot\n")
    random.seed(1)
    order = random.sample([0, 1], 2)  # which train line comes first in context
    task = make_task(gpt2_files, tmp_path)
    demo = {0: [14832, 25, 257, 3734, 2646, 11352, 3681, 25, 3967, 13, 220],  # ...fine...positive.
            1: [14832, 25, 257, 19222, 2646, 11352, 3681, 25, 4633, 13, 220]}  # ...dull...negative.
    query = [14832, 25, 262, 7110, 11352, 3681, 25]  # "Review: the plot Sentiment:"
    expected = [EOS] + [i + 4 for i in demo[order[0]]] + [EOS] + [i + 4 for i in demo[order[1]]] \
        + [EOS] + [i + 4 for i in query]
    ds = task.datasets["test"]
    assert ds.prompts[0].tolist() == expected
    assert ds.queries[0].tolist() == [i + 4 for i in query]
    assert [c.tolist() for c in ds.candidates] == [[NEG_ID], [POS_ID]]
    sample = ds.collater([0])
    assert sample["target"].tolist() == [[NEG_ID]] and sample["label"].tolist() == [0]

    # left truncation: room for one demonstration only drops the oldest one, whole
    short = make_task(gpt2_files, tmp_path, tokens_per_sample=len(expected) - 12)
    assert short.datasets["test"].prompts[0].tolist() == expected[12:]
    # no room for any: the query keeps its last tokens behind </s>
    tiny = make_task(gpt2_files, tmp_path, tokens_per_sample=5)
    assert tiny.datasets["test"].prompts[0].tolist() == [EOS] + [i + 4 for i in query[-4:]]


def accuracy(task, model, nbest=2):
    """Score the whole test set as fairseq-generate does: (accuracy line, hypotheses)."""
    generator = task.build_generator([model], SimpleNamespace(nbest=nbest, beam=5))
    ds = task.datasets["test"]
    sample = ds.collater(list(range(len(ds))))
    hypos = generator.generate(sample)
    scorer = ICLAccuracyScorer(SimpleNamespace(icl_decision=task.cfg.icl_decision))
    text = lambda t: task.bpe.decode(task.dictionary.string(t))  # noqa: E731
    for i, h in enumerate(hypos):
        scorer.add_string(text(sample["target"][i]), text(h[0]["tokens"]))
    return scorer.result_string(), hypos


@pytest.mark.parametrize("decision", ["labels", "vocab"])
def test_scoring_picks_the_model_s_label_and_fails_when_labels_swap(gpt2_files, tmp_path,
                                                                      decision):
    (tmp_path / "train.tsv").write_text("1\ta fine film\n0\ta dull film\n")
    (tmp_path / "test.tsv").write_text("".join(f"1\tfilm {i}\n" for i in range(5)))
    task = make_task(gpt2_files, tmp_path, icl_decision=decision)
    vocab = len(task.dictionary)
    line, hypos = accuracy(task, FavoursOneToken(vocab, POS_ID))
    assert line == "Accuracy 100.00 (5/5)"
    top = hypos[0][0]
    assert top["tokens"].tolist() == [POS_ID]
    # the model puts logit 5 on one token and 0 on the others
    expected = 5.0 - torch.logsumexp(torch.tensor([5.0] + [0.0] * (vocab - 1)), 0).item()
    # fp32 log-softmax over the 50k vocabulary: 1.3e-5 off the exact value on an AVX2-only CPU
    assert top["score"] == pytest.approx(expected, abs=5e-5)
    if decision == "labels":
        assert [h["tokens"].tolist() for h in hypos[0]] == [[POS_ID], [NEG_ID]]
    swapped = make_task(gpt2_files, tmp_path, icl_decision=decision,
                        icl_labels="positive,negative")
    assert accuracy(swapped, FavoursOneToken(vocab, POS_ID))[0] == "Accuracy 0.00 (0/5)"


# --------------------------------------------------------------------------- the model's memory


def tiny_longmem(vocab, **overrides):
    from fairseq.data import Dictionary

    from fairseq_longmem.families.gpt2.model import LongMemGPT2Config, LongMemGPT2Model
    from fairseq_longmem.families.gpt2.modules import GPT2Backbone, GPT2Dims

    d = Dictionary()
    for i in range(vocab - d.nspecial):
        d.add_symbol(f"w{i}")
    torch.manual_seed(0)
    bb = GPT2Backbone(GPT2Dims(vocab_size=len(d), embed_dim=32, num_layers=2, num_heads=2,
                               max_positions=64, dropout=0.0, attention_dropout=0.0))
    options = dict(embed_dim=32, num_layers=2, num_heads=2, max_positions=64, memory_layer=1,
                   reduction_factor=1, memory_size=64, chunk_size=2, retrieved_tokens=4,
                   search_backend="torch", dropout=0.0, max_target_positions=16)
    options.update(overrides)
    model = LongMemGPT2Model.from_backbone(LongMemGPT2Config(**options), d, bb)
    with torch.no_grad():
        model.decoder.sidenet.memory_attention.gate.fill_(1.0)  # memory weighs in visibly
    return model.eval(), d


def test_write_stream_equals_streaming_the_tokens_through_the_model():
    model, d = tiny_longmem(30)
    stream = torch.randint(4, 30, (37,))
    bulk = model.decoder.new_memory(1, 64, next(model.parameters()))
    memory_scoring.write_stream(model, bulk, stream, segment_len=16, pad=d.pad(), rows_per_batch=2)
    step = model.decoder.new_memory(1, 64, next(model.parameters()))
    for s in range(0, 37, 16):
        seg = stream[s:s + 16][None]
        model(src_tokens=seg, memory=step, write_memory=True)
    assert bulk.fill().tolist() == step.fill().tolist() == [36] and bulk.staged().tolist() == [1]
    for name in ("_keys", "_values", "_summaries", "_stage_keys"):
        assert torch.equal(getattr(bulk, name), getattr(step, name)), name


def test_one_shared_memory_reads_as_per_row_copies_and_is_not_written(tmp_path):
    model, d = tiny_longmem(30)
    like = next(model.parameters())
    shared = model.decoder.new_memory(1, 64, like)
    memory_scoring.write_stream(model, shared, torch.randint(4, 30, (40,)), 16, d.pad())
    shared.save(tmp_path / "shared.safetensors")
    copies = model.decoder.new_memory(3, 64, like)
    for row in range(3):
        copies.load(tmp_path / "shared.safetensors", rows=[row])
    before = {n: getattr(shared, n).clone() for n in ("_keys", "_values", "_summaries")}
    tokens = torch.randint(4, 30, (3, 12))
    with torch.no_grad():
        a, _ = model(src_tokens=tokens, memory=shared, write_memory=False)
        b, _ = model(src_tokens=tokens, memory=copies, write_memory=False)
        off, _ = model(src_tokens=tokens, memory=model.decoder.new_memory(1, 64, like),
                       write_memory=False)
    assert torch.equal(a, b)
    assert not torch.allclose(a, off)  # the memory was read
    assert all(torch.equal(before[n], getattr(shared, n)) for n in before)
    assert shared.fill().tolist() == [40]
    with pytest.raises(ValueError, match="read-only"):
        model(src_tokens=tokens, memory=shared, write_memory=True)


def test_multi_token_continuations_score_as_a_full_forward():
    model, d = tiny_longmem(30)
    like = next(model.parameters())
    memory = model.decoder.new_memory(1, 64, like)
    memory_scoring.write_stream(model, memory, torch.randint(4, 30, (24,)), 16, d.pad())
    prompts = [torch.randint(4, 30, (n,)) for n in (5, 9)]
    conts = [torch.tensor([7, 8, 9]), torch.tensor([11])]
    got = memory_scoring.continuation_logprobs(model, prompts, [conts, conts], d.pad(), memory)
    for b, p in enumerate(prompts):
        for c, cont in enumerate(conts):
            full = torch.cat([p, cont])[None, :-1]
            with torch.no_grad():
                logits, _ = model(src_tokens=full, memory=memory, write_memory=False)
            lp = logits[0].float().log_softmax(-1)[len(p) - 1:].gather(1, cont[:, None])[:, 0]
            assert torch.allclose(got[b][c], lp, atol=1e-5), (b, c)


# --------------------------------------------------------------------------- fairseq-generate


@pytest.fixture(scope="module")
def icl_setup(gpt2_vocab_models, tmp_path_factory):
    data = write_tsv_set(str(tmp_path_factory.mktemp("icl") / "set"))
    return SimpleNamespace(data=data, backbone=gpt2_vocab_models.backbone,
                           longmem=gpt2_vocab_models.longmem, files=gpt2_vocab_models.files,
                           longmem_layers=gpt2_vocab_models.longmem_layers)


def generate_argv(s, *extra, path=None, data=None):
    enc, vocab, dict_txt = s.files
    return ("fairseq-generate", [
        os.path.dirname(dict_txt), "--user-dir", USER_DIR,
        "--task", "longmem_icl", "--path", path or s.longmem, "--icl-dataset", "tsv",
        "--icl-data-dir", data or s.data, "--icl-labels", "negative,positive",
        "--demos-in-context", "3", "--demos-in-memory", "40", "--scoring", "icl_accuracy",
        "--batch-size", "4", "--bpe", "gpt2", "--gpt2-encoder-json", enc, "--gpt2-vocab-bpe",
        vocab, "--cpu", "--nbest", "2", "--num-workers", "0", *extra])


BAD_INPUT = [
    (["--icl-dataset", "nope"], "invalid choice: 'nope'"),
    (["--icl-data-dir", "/nonexistent/icl"], "ICL data not found: /nonexistent/icl/train.tsv"),
    (["--icl-labels", "negative,very positive", "--icl-decision", "vocab"],
     "--icl-decision vocab compares one predicted token with the label, but ' very positive' "
     "is 2 tokens"),
    (["--demos-in-context", "61"], "--demos-in-context 61: expected 0 to 60"),
    (["--demos-in-memory", "100"], "--demos-in-memory 100: expected 0 to 60"),
    (["--gen-subset", "valid"], "--gen-subset valid: longmem_icl scores the set's evaluation"),
    (["--icl-test-examples", "-1"], "--icl-test-examples must be >= 0, got -1"),
    (["--icl-calibration", "content-free", "--icl-decision", "vocab"],
     "--icl-calibration content-free reweights the label words' probabilities: it needs "
     "--icl-decision labels"),
]


@pytest.fixture(scope="module")
def runs(icl_setup, tmp_path_factory):
    """Every fairseq-generate call of the tests below, through its entry point, one after another
    in one interpreter (fairseq's import paid once): name -> CaseLog; the folders they used."""
    tmp = tmp_path_factory.mktemp("icl_runs")
    rng = random.Random(0)
    train, test = [review(rng) for _ in range(60)], [review(rng) for _ in range(12)]
    folders = SimpleNamespace(
        tmp=tmp, memory=str(tmp / "memory.safetensors"),
        free_memory=str(tmp / "free.safetensors"),
        clean=write_mpqa(str(tmp / "clean"), train, test),
        # the test set with a content-free row, "N/A", as its example 2
        na=write_mpqa(str(tmp / "na"), train, test[:2] + [("N/A", 1)] + test[2:]),
        dirty=write_mpqa(str(tmp / "dirty"), train, test, empty_train=(5, 6, 50),
                         empty_test=(4,), raw=True))
    s = icl_setup
    todo = {
        "default": generate_argv(s),
        "mpqa_clean": generate_argv(s, "--icl-dataset", "mpqa", data=folders.clean),
        "mpqa_dirty": generate_argv(s, "--icl-dataset", "mpqa", data=folders.dirty),
        "memory_first": generate_argv(s, "--memory-file", folders.memory),
        "memory_second": generate_argv(s, "--memory-file", folders.memory),
        "memory_other_layer": generate_argv(s, "--memory-file", folders.memory,
                                            "--model-overrides", "{'memory_layer': 2}"),
        "batch1": generate_argv(s, "--batch-size", "1"),
        # --icl-calibration content-free (LongMem with memory; the training-free read)
        "calibrated": generate_argv(s, "--icl-calibration", "content-free"),
        "calibrated_na": generate_argv(s, "--icl-dataset", "mpqa", "--icl-calibration",
                                       "content-free", "--icl-content-free", "N/A",
                                       data=folders.na),
        "na": generate_argv(s, "--icl-dataset", "mpqa", data=folders.na),
        "free_calibrated": generate_argv(s, "--training-free-memory", "--free-read-layers", "2-3",
                                         "--icl-calibration", "content-free", path=s.backbone),
        "subset": generate_argv(s, "--icl-test-examples", "5"),
        # condition (e): the backbone reads the demonstrations' memory itself, no training
        "free": generate_argv(s, "--training-free-memory", "--free-read-layers", "2-3",
                              path=s.backbone),
        "free_none": generate_argv(s, "--training-free-memory", "--free-read-layers", "2-3",
                                   "--demos-in-memory", "0", path=s.backbone),
        "backbone_context": generate_argv(s, "--demos-in-memory", "0", path=s.backbone),
        # LongMem reading the demonstrations in several memory layers (--read-layers 2-3)
        "layers": generate_argv(s, path=s.longmem_layers),
        "layers_none": generate_argv(s, "--demos-in-memory", "0", path=s.longmem_layers),
        # memory files of several layers: written, read again, refused for other layers
        **{name: generate_argv(s, "--training-free-memory", "--free-read-layers", layers,
                               "--memory-file", folders.free_memory, path=s.backbone)
           for name, layers in (("free_file", "2-3"), ("free_file_again", "2-3"),
                                ("free_file_other_layers", "3"))},
        "layers_file": generate_argv(s, "--memory-file", str(tmp / "layers.safetensors"),
                                     path=s.longmem_layers),
        **{f"bad{i}": generate_argv(s, "--memory-file", str(tmp / f"bad{i}.safetensors"), *args)
           for i, (args, _) in enumerate(BAD_INPUT)},
    }
    return run_cli_cases(todo, timeout=900, watch=[folders.memory, folders.free_memory]), folders


def log_of(runs, name):
    case = runs[0][name]
    assert not case.failed, f"{name}:\n{case.log[-3000:]}"
    return case.log


def parse(log):
    """{id: (target, [(label, score), ...])} and the accuracy line's (percent, right, total)."""
    out = {}
    for line in log.splitlines():
        kind, _, rest = line.partition("-")
        if kind in ("T", "D") and rest.split("\t")[0].isdigit():
            fields = rest.split("\t")
            entry = out.setdefault(int(fields[0]), [None, []])
            if kind == "T":
                entry[0] = fields[1].strip()
            else:
                entry[1].append((fields[2].strip(), float(fields[1])))
    m = re.search(r"Generate test with beam=1: Accuracy ([\d.]+) \((\d+)/(\d+)\)", log)
    assert m, log[-2000:]
    return out, (float(m.group(1)), int(m.group(2)), int(m.group(3)))


def test_generate_prints_every_candidate_and_the_accuracy(runs):
    log = log_of(runs, "default")
    rows, (pct, right, total) = parse(log)
    assert sorted(rows) == list(range(12)) and total == 12
    for target, hyps in rows.values():
        assert target in ("negative", "positive")
        assert sorted(label for label, _ in hyps) == ["negative", "positive"]
        assert hyps[0][1] >= hyps[1][1]  # best first
    assert right == sum(target == hyps[0][0] for target, hyps in rows.values())
    assert pct == pytest.approx(100 * right / 12, abs=0.01)
    assert re.search(r"S-0\tReview: .* Sentiment:$", log, re.M)
    assert "40 in memory" in log and "written in 1 segments" in log


def test_training_free_memory_reads_the_demonstrations_with_the_backbone_s_own_layers(runs):
    """--training-free-memory on a gpt2_lm backbone: its blocks 2-3 each keep a memory of the 40
    demonstrations; with no demonstration in memory it scores exactly as the backbone alone."""
    log = log_of(runs, "free")
    rows, (_, _, total) = parse(log)
    assert total == 12 and sorted(rows) == list(range(12))
    assert "training-free memory: blocks 2-3 of the 4-layer backbone" in log
    assert "40 in memory" in log and "written in 1 segments" in log
    none, _ = parse(log_of(runs, "free_none"))
    alone, _ = parse(log_of(runs, "backbone_context"))
    assert none == alone
    assert rows != alone  # the demonstrations in memory change the scores


def load_run_icl():
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location(
        "run_icl", os.path.join(REPO, "examples", "icl", "run_icl.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_empty_rows_are_left_out_of_the_draw_and_the_score_and_run_icl_reports_them(
        runs, icl_setup, tmp_path, capsys):
    """fairseq-generate on an MPQA-layout set with empty rows in both files scores exactly as on
    the same set without them, over the rows scored, and says so; run_icl.py's table shows it."""
    import json

    dirty = runs[1].dirty
    logs = {name: log_of(runs, f"mpqa_{name}") for name in ("clean", "dirty")}
    rows, accuracy = parse(logs["dirty"])
    assert (rows, accuracy) == parse(logs["clean"])
    assert sorted(rows) == list(range(12)) and accuracy[2] == 12
    assert accuracy[1] == sum(target == hyps[0][0] for target, hyps in rows.values())
    warnings = [f"{dirty}/mpqa/train.csv: 3 rows (lines 5, 6, 50) with empty text skipped",
                f"{dirty}/mpqa/test.csv: 1 row (line 4) with empty text left out of scoring; "
                "accuracy is over the 12 rows scored"]
    run_icl = load_run_icl()
    assert run_icl.EMPTY_ROWS.findall(logs["dirty"]) == warnings
    # fairseq's other log format (when nothing configured logging before fairseq-generate)
    other = f"2026-12-01 22:00:00 | WARNING | fairseq_longmem.tasks.scoring.icl_data | {warnings[1]}\n"
    assert run_icl.EMPTY_ROWS.findall(other) == warnings[1:]
    assert " with empty text " not in logs["clean"]
    assert "mpqa: 12 test examples" in logs["dirty"]

    # run_icl.py over these logs (one seed, each condition's log this run's) prints the warnings
    out = tmp_path / "runs" / "mpqa"
    out.mkdir(parents=True)
    for condition in ("zero", "context", "memory"):
        (out / f"{condition}_seed1.log").write_text(f"# cmd\n{logs['dirty']}# seconds: 1.0\n")
    run_icl.tokenizer_args = lambda args: []
    capsys.readouterr()
    run_icl.main(["--path", icl_setup.longmem, "--dict-dir", "unused", "--dataset", "mpqa",
                  "--data-dir", dirty, "--out", str(tmp_path / "runs"), "--seeds", "1"])
    table = capsys.readouterr().out.splitlines()
    assert table[-3:-1] == [f"data: {m}" for m in warnings], table
    assert table[3] == f"| zero | 0 | 0 | {accuracy[0]:.2f} +- 0.00 | 1 | 1 s |"
    assert json.load(open(out / "summary.json"))["empty_rows"] == warnings


def test_memory_file_is_built_once_then_reused_with_identical_scores(runs):
    path = runs[1].memory
    first, second = log_of(runs, "memory_first"), log_of(runs, "memory_second")
    assert "memory saved to" in first and os.path.isfile(path)
    digest = runs[0]["memory_first"].watched[path]
    assert "loaded from" in second and "written in" not in second
    assert parse(first) == parse(second)
    assert runs[0]["memory_second"].watched[path] == digest
    # another memory layer makes other keys: the file is refused, named, and left alone
    refusal = runs[0]["memory_other_layer"]
    assert refusal.failed
    assert re.search(r"--memory-file .* holds another memory; it differs in: memory_layer "
                     r"\(file 3, this run 2\)", refusal.log)
    assert refusal.watched[path] == digest


def calibration_of(log):
    m = re.search(r"calibration: p_cf negative ([\d.]+), positive ([\d.]+)", log)
    assert m, log[-2000:]
    return float(m.group(1)), float(m.group(2))


def hypotheses(log):
    """{id: {label: H- score}} (every candidate's, --nbest 2)."""
    out = {}
    for m in re.finditer(r"^H-(\d+)\t(\S+)\t[^\n]*\n^D-\d+\t\S+\t (\w+)$", log, re.M):
        out.setdefault(int(m.group(1)), {})[m.group(3)] = float(m.group(2))
    return out


@pytest.mark.parametrize("name,raw", [("calibrated", "default"), ("free_calibrated", "free")])
def test_content_free_calibration_divides_out_one_probability_per_label(runs, name, raw):
    import math

    log = log_of(runs, name)
    p_neg, p_pos = calibration_of(log)
    assert p_neg + p_pos == pytest.approx(1, abs=2e-6) and 0 < p_neg < 1
    calibrated, plain = hypotheses(log), hypotheses(log_of(runs, raw))
    assert sorted(calibrated) == sorted(plain) == list(range(12))
    for i in plain:  # every example's score moves by -log p_cf of its label (base 2 as printed)
        for label, p in (("negative", p_neg), ("positive", p_pos)):
            assert calibrated[i][label] == pytest.approx(
                plain[i][label] - math.log2(p), abs=1e-4), (i, label)
    rows, (_, right, total) = parse(log)
    decided = sum(max(h, key=h.get) == rows[i][0] for i, h in calibrated.items())
    assert total == 12 and right == decided


def test_a_content_free_example_scores_its_labels_alike_after_calibration(runs):
    """p_cf from "N/A" alone: the test example whose text is "N/A" is divided by its own label
    distribution, so its two labels tie; the others do not."""
    calibrated, plain = hypotheses(log_of(runs, "calibrated_na")), hypotheses(log_of(runs, "na"))
    assert calibrated[2]["negative"] == pytest.approx(calibrated[2]["positive"], abs=1e-4)
    assert plain[2]["negative"] != pytest.approx(plain[2]["positive"], abs=1e-3)
    assert all(abs(h["negative"] - h["positive"]) > 1e-3 for i, h in calibrated.items() if i != 2)


def test_run_icl_reads_a_calibrated_run_s_uncalibrated_accuracy_from_its_log(runs, tmp_path,
                                                                             capsys):
    """The P- lines of a calibrated run decide as the uncalibrated run does; run_icl reports both."""
    run_icl = load_run_icl()
    calibrated = log_of(runs, "calibrated")
    assert run_icl.uncalibrated(calibrated) == parse(log_of(runs, "default"))[1]
    assert run_icl.uncalibrated(log_of(runs, "default")) is None  # nothing to undo
    # a log without every label's score (--nbest 1) cannot say what the raw scores decide
    cut = re.sub(r"^P-3\t[^\n]*\n", "", calibrated, count=1, flags=re.M)
    assert cut != calibrated and run_icl.uncalibrated(cut) is None
    out = tmp_path / "tsv"
    out.mkdir()
    for seed in (1, 2):
        (out / f"context_seed{seed}.log").write_text(calibrated + "# seconds: 1.0\n")
    run_icl.main(["--path", "m.pt", "--dict-dir", "d", "--dataset", "tsv", "--data-dir", "x",
                  "--labels", "negative,positive", "--out", str(tmp_path), "--seeds", "1-2",
                  "--conditions", "context", "--sentencepiece-model", "unused"])
    percent = parse(log_of(runs, "default"))[1][0]
    assert (f"uncalibrated (the label words' raw log-probabilities decide): context "
            f"{percent:.2f} +- 0.00") in capsys.readouterr().out
    with open(out / "summary.json", encoding="utf-8") as f:
        assert json.load(f)["context"]["uncalibrated"] == [percent, percent]


def test_batch_size_does_not_change_predictions(runs):
    one, _ = parse(log_of(runs, "batch1"))
    four, _ = parse(log_of(runs, "default"))  # --batch-size 4
    assert sorted(one) == sorted(four) == list(range(12))
    for i in one:
        assert [lbl for lbl, _ in one[i][1]] == [lbl for lbl, _ in four[i][1]]
        for (_, a), (_, b) in zip(one[i][1], four[i][1]):
            assert a == pytest.approx(b, abs=1e-4)


def test_longmem_with_several_memory_layers_reads_the_demonstrations(runs):
    log = log_of(runs, "layers")
    rows, (_, _, total) = parse(log)
    assert total == 12 and sorted(rows) == list(range(12))
    assert "40 in memory" in log and "written in 1 segments" in log
    none, _ = parse(log_of(runs, "layers_none"))
    assert rows != none  # the demonstrations in the 2 memories change the scores


def test_a_memory_of_several_layers_is_saved_once_then_reused_with_identical_scores(runs):
    path = runs[1].free_memory
    free, first, second = (log_of(runs, n) for n in ("free", "free_file", "free_file_again"))
    assert "memory saved to" in first and os.path.isfile(path)
    assert "loaded from" in second and "written in" not in second
    assert parse(first) == parse(free) == parse(second)
    digest = runs[0]["free_file"].watched[path]
    assert runs[0]["free_file_again"].watched[path] == digest
    # other reading layers: refused, named, and the file left alone
    refusal = runs[0]["free_file_other_layers"]
    assert refusal.failed and re.search(
        r"--memory-file .* holds another memory; it differs in: memory_layer \(file '2-3', "
        r"this run '3'\)", refusal.log), refusal.log[-2000:]
    assert "written in" not in refusal.log and refusal.watched[path] == digest
    # LongMem reading 2 memory layers: its file gives its scores
    layers = log_of(runs, "layers_file")
    assert "memory saved to" in layers and (runs[1].tmp / "layers.safetensors").is_file()
    assert parse(layers) == parse(log_of(runs, "layers"))


def test_a_subset_of_the_evaluation_set_scores_as_in_the_full_run(runs):
    def queries(log):
        return {int(m.group(1)): m.group(2) for m in re.finditer(r"^S-(\d+)\t(.*)$", log, re.M)}

    full_log, sub_log = log_of(runs, "default"), log_of(runs, "subset")
    full, _ = parse(full_log)
    sub, (_, _, total) = parse(sub_log)
    assert total == 5 and "5 test examples" in sub_log
    # the fixed draw (seed 0, whatever --icl-seed), kept in file order
    want = sorted(np.random.RandomState(0).permutation(12)[:5].tolist())
    full_q, sub_q = queries(full_log), queries(sub_log)
    assert [sub_q[i] for i in range(5)] == [full_q[j] for j in want]
    for i, j in enumerate(want):  # the same prompts: the same scores
        assert sub[i][0] == full[j][0]
        for (la, a), (lb, b) in zip(sorted(sub[i][1]), sorted(full[j][1])):
            assert la == lb and a == pytest.approx(b, abs=1e-4)


# five more fairseq-generate runs (each pays fairseq's config composition, seconds); the quick
# loop runs longmem_icl end to end in test_generate_prints_every_candidate_and_the_accuracy, and
# the label and vocab decisions in-process in
# test_scoring_picks_the_model_s_label_and_fails_when_labels_swap
@pytest.mark.slow
def test_memory_off_backbone_zero_shot_chunk_size_and_vocab_rule(runs, icl_setup):
    s = icl_setup
    more = run_cli_cases({
        "memory_off": generate_argv(s, "--model-overrides", "{'disable_memory': True}"),
        "zero": generate_argv(s, "--demos-in-context", "0", "--demos-in-memory", "0"),
        "csz2": generate_argv(s, "--model-overrides", "{'chunk_size': 2}"),
        "vocab": generate_argv(s, "--icl-decision", "vocab", "--nbest", "3"),
    }, timeout=600)
    runs = ({**runs[0], **more}, runs[1])
    on, _ = parse(log_of(runs, "default"))
    off_log = log_of(runs, "memory_off")
    assert "reads no memory" in off_log
    off, _ = parse(off_log)
    assert off != on  # the memory changes the scores
    parse(log_of(runs, "backbone_context"))
    zero, _ = parse(log_of(runs, "zero"))
    assert len(zero) == 12
    csz2 = log_of(runs, "csz2")
    assert "chunk size 2" in csz2
    parse(csz2)
    rows, (_, _, total) = parse(log_of(runs, "vocab"))
    assert total == 12 and all(len(h) == 3 for _, h in rows.values())


@pytest.mark.parametrize("i", range(len(BAD_INPUT)), ids=[m for _, m in BAD_INPUT])
def test_bad_input_is_refused_in_one_line_and_writes_nothing(runs, i):
    case, message = runs[0][f"bad{i}"], BAD_INPUT[i][1]
    assert case.failed and message in case.log, case.log[-2000:]
    assert "Accuracy" not in case.log
    assert not (runs[1].tmp / f"bad{i}.safetensors").exists()


def test_memory_is_filled_once_and_left_bit_identical_by_scoring(icl_setup, monkeypatch):
    from fairseq import checkpoint_utils

    task = make_task(icl_setup.files, icl_setup.data, demos_in_context=3, demos_in_memory=40)
    models, _ = checkpoint_utils.load_model_ensemble([icl_setup.longmem], task=task)
    writes = []
    real = memory_scoring.write_stream
    monkeypatch.setattr(memory_scoring, "write_stream",
                        lambda *a, **k: writes.append(a[2].numel()) or real(*a, **k))
    generator = task.build_generator(models, SimpleNamespace(nbest=2, beam=5))
    memory = generator.memory
    names = ("_keys", "_values", "_summaries", "_stage_keys", "_stage_values")
    before = {n: getattr(memory, n).clone() for n in names}
    fill = memory.fill().tolist()
    ds = task.datasets["test"]
    for i in range(0, len(ds), 5):
        generator.generate(ds.collater(list(range(i, min(i + 5, len(ds))))))
    assert writes == [len(task.memory_stream)] and fill[0] > 0
    assert all(torch.equal(before[n], getattr(memory, n)) for n in names)
    assert memory.fill().tolist() == fill


# run_icl.py's table, warnings and summary.json from fairseq-generate logs are checked in the quick
# loop by test_empty_rows_are_left_out_of_the_draw_and_the_score_and_run_icl_reports_them; this
# one runs its five fairseq-generate processes (about 30 s)
@pytest.mark.slow
def test_run_icl_prints_the_three_conditions_from_its_logs(icl_setup, tmp_path):
    import json
    import shlex
    import subprocess
    import sys

    from conftest import REPO

    enc, vocab, dict_txt = icl_setup.files
    cmd = [sys.executable, os.path.join(REPO, "examples", "icl", "run_icl.py"),
           "--path", icl_setup.longmem, "--dict-dir", os.path.dirname(dict_txt),
           "--dataset", "tsv", "--data-dir", icl_setup.data, "--labels", "negative,positive",
           "--out", str(tmp_path), "--seeds", "1-2", "--k", "2", "--n", "10", "--", "--cpu"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.load(open(tmp_path / "tsv" / "summary.json"))
    assert summary["zero"]["seeds"] == [1] and summary["memory"]["seeds"] == [1, 2]
    for condition in ("zero", "context", "memory"):
        for seed, acc in zip(summary[condition]["seeds"], summary[condition]["accuracy"]):
            log = open(tmp_path / "tsv" / f"{condition}_seed{seed}.log").read()
            assert f"Accuracy {acc:.2f} (" in log
    mean = sum(summary["memory"]["accuracy"]) / 2
    assert re.search(rf"^\| memory \| 2 \| 10 \| {mean:.2f} \+- ", res.stdout, re.M)
    assert os.path.isfile(tmp_path / "tsv" / "memory_seed2.safetensors")
    # the recorded command is the one run, shell-quoted (docs/RESULTS.md's check replays it)
    assert shlex.split(summary["command"]) == ["examples/icl/run_icl.py"] + cmd[2:]
    # a second call reads the finished logs instead of running again
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert again.stdout.splitlines()[:6] == res.stdout.splitlines()[:6]


def test_run_icl_passes_a_converted_tokenizer_the_subset_and_a_memory_file_for_every_model(
        tmp_path, monkeypatch):
    from conftest import load_example

    run_icl = load_example("icl/run_icl.py")
    seen = []

    def fake_run(cmd, **kwargs):
        seen.append(cmd)
        line = "Generate test with beam=1: Accuracy 50.00 (1/2)\n"
        return SimpleNamespace(returncode=0, stdout=line)

    monkeypatch.setattr(run_icl.subprocess, "run", fake_run)
    base = ["--path", "m.pt", "--dict-dir", "d", "--dataset", "sst2", "--data-dir", "x",
            "--out", str(tmp_path), "--seeds", "1", "--conditions", "memory",
            "--tokenizer-file", "tok.json", "--test-examples", "7"]
    assert run_icl.main(base + ["--", "--cpu"]) in (0, None)
    cmd = seen[-1]
    assert cmd[cmd.index("--bpe") + 1] == "hf_tokenizer"
    assert cmd[cmd.index("--tokenizer-file") + 1] == "tok.json"
    assert cmd[cmd.index("--icl-test-examples") + 1] == "7"
    assert "--memory-file" in cmd
    # the training-free read's memory (one bank per layer) is kept in a file too
    free = tmp_path / "free"
    base[base.index("--out") + 1] = str(free)
    run_icl.main(base + ["--", "--cpu", "--training-free-memory", "--free-read-layers", "2-3"])
    assert "--training-free-memory" in seen[-1]
    path = seen[-1][seen[-1].index("--memory-file") + 1]
    assert path == os.path.join(str(free), "sst2", "memory_seed1.safetensors")
    # unless asked not to
    base[base.index("--out") + 1] = str(tmp_path / "nofile")
    run_icl.main(base + ["--no-memory-files", "--", "--cpu"])
    assert "--memory-file" not in seen[-1] and "--demos-in-memory" in seen[-1]


def test_vader_ratings_become_labels():
    from conftest import load_example

    get_vader_sets = load_example("get_vader_sets.py")
    rows = get_vader_sets.read_rated("1\t2.5\tA fine\tfilm.\r\n2\t-0.1\tdull\r\n3\t0.0\tmeh\r\n")
    assert rows == [("A fine film.", "positive"), ("dull", "negative")]
    train, test = get_vader_sets.split(rows * 5, 3, seed=1)
    assert len(train) == 7 and len(test) == 3 and sorted(train + test) == sorted(rows * 5)
