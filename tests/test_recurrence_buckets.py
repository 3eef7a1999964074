"""Loss by how far back a token's bigram last occurred (``longmem_cross_entropy
--recurrence-buckets``): exact bucket counts on a hand-made document, totals against
fairseq-eval-lm through fairseq-validate and score_positions.py (LongMem and a gpt2_lm backbone),
and where memory reads reach (``--memory-reach-buckets``)."""

import json
import math
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch
from fairseq.data import Dictionary
from fairseq.logging import metrics

from conftest import REPO, USER_DIR, document_tokens, load_example, run_cli, run_cli_cases, train_longmem
from fairseq_longmem.criterions.longmem_cross_entropy import (
    LongMemCrossEntropyCriterion,
    reach_sums,
)
from fairseq_longmem.buckets import parse_segment_buckets, segments_back_bucket
from fairseq_longmem.memory.bank import ChunkedMemoryBank
from fairseq_longmem.modules.memory_attention import reach_of_read
from fairseq_longmem.tasks.document_stream import DocumentStreamDataset, previous_bigram_distance

SCORE_POSITIONS = os.path.join(REPO, "examples", "long_context_lm", "score_positions.py")
LABELS = ["none", "local", "1", "2_4", "5_16", "17_end"]
EOS, PAD = 2, 1


def hand_made_document():
    """56 tokens, T = 2: ``a b`` pairs whose ``b`` repeats the bigram (a, b) at chosen distances,
    ``b b`` once inside a segment, every other token unique. Positions of the recurring bigrams:
    3 (b, b) local; 6 (a, b) 3 segments after 1; 9 one after 6; 18 five after 9 (its ``a`` at 17
    ends the previous segment: the bigram crosses a boundary); 53 seventeen after 18."""
    a, b = 10, 11
    doc = [100 + i for i in range(56)]  # unique fillers
    doc[0], doc[1], doc[2], doc[3] = a, b, b, b
    for p in (5, 8, 17, 52):
        doc[p], doc[p + 1] = a, b
    return doc


def brute_force_buckets(doc, T):
    """The bucket of every position by the definition, in O(n^2)."""
    out = []
    for i, tok in enumerate(doc):
        prev = doc[i - 1] if i else EOS
        j = next((j for j in range(i - 1, -1, -1)
                  if doc[j] == tok and (doc[j - 1] if j else EOS) == prev), None)
        if j is None:
            out.append("none")
            continue
        back = i // T - j // T
        out.append("local" if back == 0 else "1" if back == 1 else "2_4" if back <= 4
                   else "5_16" if back <= 16 else "17_end")
    return out


def criterion(buckets="1,4,16", T=2):
    task = SimpleNamespace(target_dictionary=SimpleNamespace(pad=lambda: PAD))
    return LongMemCrossEntropyCriterion(task, False, recurrence_buckets=buckets,
                                        tokens_per_sample=T)


def reduced(logging_outputs):
    with metrics.aggregate() as agg:
        LongMemCrossEntropyCriterion.reduce_metrics(logging_outputs)
        return agg.get_smoothed_values()


def test_memory_statistics_a_model_does_not_report_are_not_logged():
    """The training-free read reports its memory's fill but has no gate: mem_fill is logged,
    mem_gate and mem_share are not (and nothing fails)."""
    class Model(torch.nn.Module):
        def forward(self, src_tokens, **kwargs):
            logits = torch.zeros(*src_tokens.shape, 8, requires_grad=True)
            return logits, {"memory_stats": {"fill": torch.tensor(12.0)}}

        def get_normalized_probs(self, net_output, log_probs, sample=None):
            return torch.log_softmax(net_output[0], dim=-1)

        def get_targets(self, sample, net_output):
            return sample["target"]

    sample = {"net_input": {"src_tokens": torch.full((1, 2), 5)}, "target": torch.full((1, 2), 5),
              "ntokens": 2, "nsentences": 1}
    _, _, log = criterion("")(Model(), sample)
    assert log["mem_fill"] == 12.0 and "mem_gate" not in log and "mem_share" not in log
    values = reduced([log, log])
    assert values["mem_fill"] == 12.0 and "mem_gate" not in values


def test_previous_bigram_distance_of_a_hand_made_document():
    dist = previous_bigram_distance(hand_made_document(), EOS)
    expected = [0] * 56
    expected[3], expected[6], expected[9], expected[18], expected[53] = 1, 5, 3, 9, 35
    assert dist.tolist() == expected
    # position 0's previous token is the </s> before the document: (</s>, 7) recurs at 3
    assert previous_bigram_distance([7, 2, 5, 2, 7], EOS).tolist() == [0, 0, 0, 0, 4]


def test_recurrence_buckets_count_a_hand_made_document_exactly():
    doc = hand_made_document()
    expected = {label: 0 for label in LABELS}
    for label in brute_force_buckets(doc, 2):
        expected[label] += 1
    assert expected == {"none": 51, "local": 1, "1": 1, "2_4": 1, "5_16": 1, "17_end": 1}

    # two streams: the document, and a short one that runs out (padding is never counted)
    documents = [torch.tensor(doc, dtype=torch.int32), torch.tensor([10, 11, 10], dtype=torch.int32)]
    ds = DocumentStreamDataset(documents, PAD, EOS, 2, bsz_per_shard=2, shard_id=0, num_shards=1)
    ds.track_recurrence = True
    crit = criterion()
    logs = []
    for t in range(len(ds)):
        sample = ds.collater([ds[t]])
        # a loss of 1 + the token's document position, so that the summed losses say which
        # tokens went where
        pos = sample["segment"].unsqueeze(1) * 2 + torch.arange(sample["target"].shape[1])
        token_loss = (1.0 + pos).float().flatten()
        log = crit.recurrence_sums(token_loss, sample)
        scored = sample["target"].flatten().ne(PAD)
        log.update(ntokens=sample["ntokens"], sample_size=sample["ntokens"],
                   loss=float(token_loss[scored].sum()))
        logs.append(log)
    counts = {label: sum(log["ntokens_rec" + label] for log in logs) for label in LABELS}
    short = brute_force_buckets([10, 11, 10], 2)
    assert short == ["none", "none", "none"]
    assert counts == {**expected, "none": 51 + 3}
    assert sum(counts.values()) == sum(log["ntokens"] for log in logs) == 56 + 3
    nats = {label: sum(log["lossnat_rec" + label] for log in logs) for label in LABELS}
    assert nats["local"] == 4 and nats["1"] == 10 and nats["2_4"] == 7
    assert nats["5_16"] == 19 and nats["17_end"] == 54

    values = reduced(logs)
    assert values["ntokens_rec17_end"] == 1
    assert values["loss_rec17_end"] == pytest.approx(54 / math.log(2), abs=1e-3)
    assert values["ppl_rec2_4"] == pytest.approx(2 ** (7 / math.log(2)), rel=1e-3)


def test_recurrence_bucket_errors():
    with pytest.raises(ValueError, match=r"--recurrence-buckets '4,1': expected increasing"):
        criterion("4,1")
    with pytest.raises(ValueError, match="needs --task longmem_lm"):
        criterion().recurrence_sums(torch.zeros(4), {"target": torch.zeros(1, 4).long()})


def test_segment_buckets_put_each_distance_in_its_inclusive_range():
    # the criterion's recurrence buckets and the memory's reach share this one rule
    buckets = parse_segment_buckets("1,4,16")
    assert buckets == [(1, 1), (2, 4), (5, 16), (17, math.inf)]
    back = torch.tensor([1, 2, 4, 5, 16, 17, 1000])
    assert segments_back_bucket(back, buckets).tolist() == [0, 1, 1, 2, 2, 3, 3]
    assert segments_back_bucket(back, parse_segment_buckets("2")).tolist() == [0, 0, 1, 1, 1, 1, 1]


def test_write_times_follow_their_rows_when_beams_reorder_them():
    # row 0 written 3 times, row 1 once; select_rows (a beam reorder) must carry each row's
    # clock and per-chunk write times with it, as it carries its keys
    bank = ChunkedMemoryBank(2, 1, 2, chunk_size=1, memory_size=8)
    for step in range(3):
        bank.add(torch.ones(2, 1, 1, 2), torch.ones(2, 1, 1, 2))
    bank.clear(1)
    bank.add(torch.ones(2, 1, 1, 2), torch.ones(2, 1, 1, 2))
    slot0 = torch.zeros(2, 1, 1, 1, dtype=torch.long)  # each row's first chunk
    assert bank.segments_back(slot0).flatten().tolist() == [4, 1]
    bank.select_rows([1, 0, 0])
    assert bank.segments_back(torch.zeros(3, 1, 1, 1, dtype=torch.long)).flatten().tolist() == [1, 4, 4]


def test_reach_shares_of_a_hand_made_memory_sum_to_one():
    # one row, one head, csz 1: chunks written 1, 2, 3, 5 and 20 adds before the read
    bank = ChunkedMemoryBank(1, 1, 2, chunk_size=1, memory_size=32)
    for step in range(20):
        bank.add(torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2))
    slots = torch.tensor([19, 18, 17, 15, 0]).view(1, 1, 1, 5)  # written by adds 20, 19, 18, 16, 1
    assert bank.segments_back(slots).flatten().tolist() == [1, 2, 3, 5, 20]
    probs = torch.tensor([0.4, 0.1, 0.1, 0.25, 0.15]).view(1, 1, 1, 5)
    found = SimpleNamespace(chunk_index=slots)
    reach = reach_of_read(probs, found, torch.ones(1, 1, 1, 1, dtype=torch.bool), bank,
                          parse_segment_buckets("1,4,16"))
    assert reach["mass"].flatten().tolist() == pytest.approx([0.4, 0.2, 0.25, 0.15])
    assert reach["chunks"].flatten().tolist() == [1, 2, 1, 1]
    # chance: the 20 stored chunks were written 1, 2-4 (3), 5-16 (12), 17-20 (4) adds back
    assert reach["stored"].tolist() == pytest.approx([1 / 20, 3 / 20, 12 / 20, 4 / 20])
    # two rows (row 1 cleared, then one add), batch rows folded onto them two by two, and one
    # batch row whose queries found nothing: each row's contents weighted by its readers
    two = ChunkedMemoryBank(2, 1, 2, chunk_size=1, memory_size=32)
    for step in range(20):
        two.add(torch.ones(2, 1, 1, 2), torch.ones(2, 1, 1, 2))
    two.clear(1)
    two.add(torch.ones(2, 1, 1, 2), torch.ones(2, 1, 1, 2))
    # contents now: row 0 written 1-21 back (1, 3, 12, 5), row 1 one chunk 1 back
    has_mem = torch.ones(4, 2, 3, 1, dtype=torch.bool)
    has_mem[1] = False  # batch row 1 reads row 0 but found nothing
    probs4 = torch.full((4, 2, 3, 1), 1.0)
    slots4 = torch.zeros(4, 2, 3, 1, dtype=torch.long)
    stored = reach_of_read(probs4, SimpleNamespace(chunk_index=slots4), has_mem, two,
                           parse_segment_buckets("1,4,16"))["stored"]
    row0 = torch.tensor([1, 3, 12, 5]) / 21
    want = 6 * row0 + 12 * torch.tensor([1.0, 0, 0, 0])  # batch row 0 (6 pairs); rows 2, 3
    assert stored.tolist() == pytest.approx(want.tolist())
    # a cleared row counts afresh
    bank.clear()
    bank.add(torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2))
    assert bank.segments_back(torch.tensor([0]).view(1, 1, 1, 1)).item() == 1

    labels = ["1", "2_4", "5_16", "17_end"]
    logs = []
    for mass, chunks, stored in ((reach["mass"], reach["chunks"], reach["stored"]),
                                 (torch.tensor([[0.0, 1.0, 1.0, 0.0], [2.0, 0.0, 0.0, 0.0]]),
                                  torch.tensor([[0.0, 3.0, 1.0, 0.0], [4.0, 0.0, 0.0, 0.0]]),
                                  torch.tensor([0.0, 0.0, 1.0, 1.0]))):
        logs.append(reach_sums({"mass": mass, "chunks": chunks, "stored": stored,
                                "labels": labels}))
    for log in logs:
        log.update(loss=0.0, ntokens=1, sample_size=1)
    values = reduced(logs)
    # mass 1 + 2 + 2 = 5 over all heads: 1 back 2.4, 2-4 back 1.2, 5-16 back 1.25, 17+ 0.15
    shares = [values[f"mem_reach{label}"] for label in labels]
    assert sum(shares) == pytest.approx(1, abs=2e-3)
    assert shares == pytest.approx([2.4 / 5, 1.2 / 5, 1.25 / 5, 0.15 / 5], abs=1e-3)
    assert values["mem_reach1_h1"] == 1.0
    assert values["mem_chunks2_4"] == pytest.approx(5 / 13, abs=1e-3)
    # the contents: (0.05, 0.15, 0.6, 0.2) + (0, 0, 1, 1) over 3
    stored = [values[f"mem_stored{label}"] for label in labels]
    assert stored == pytest.approx([0.05 / 3, 0.15 / 3, 1.6 / 3, 1.2 / 3], abs=1e-3)


# ---------------------------------------------------------------------------------------------
# through the CLIs

T_EVAL = 8  # short segments, so that the test documents span up to 17 of them
BATCH = 4


def expected_counts(corpus):
    d = Dictionary.load(os.path.join(corpus.data_dir, "dict.txt"))
    counts = {label: 0 for label in LABELS}
    for lines in corpus.docs["valid"]:
        doc = [t for line in lines for t in [d.index(w) for w in line.split()] + [d.eos()]]
        for label in brute_force_buckets(doc, T_EVAL):
            counts[label] += 1
    return counts


def args(corpus, path):
    return [corpus.data_dir, "--user-dir", USER_DIR, "--path", path, "--task", "longmem_lm",
            "--tokens-per-sample", T_EVAL, "--batch-size", BATCH, "--cpu", "--num-workers", "0"]


@pytest.fixture(scope="module")
def longmem_checkpoint(corpus, backbone, tmp_path_factory):
    return train_longmem(corpus, backbone, tmp_path_factory.mktemp("longmem_rec"), "--sidenet-init",
                         "zero-out", batch_size=BATCH)


def eval_lm(corpus, path):
    log = run_cli(["fairseq-eval-lm", *args(corpus, path), "--gen-subset", "valid"])
    return (int(re.search(r"Evaluated ([\d,]+) tokens", log).group(1).replace(",", "")),
            float(re.search(r"Loss \(base 2\): ([\d.]+)", log).group(1)))


def score(corpus, path, out, *extra):
    run_cli([sys.executable, SCORE_POSITIONS, *args(corpus, path), "--valid-subset", "valid",
             "--criterion", "longmem_cross_entropy", "--recurrence-buckets", "1,4,16",
             "--results-json", out, *extra])
    return json.loads(out.read_text())


def test_recurrence_buckets_through_the_clis_match_eval_lm(corpus, backbone, longmem_checkpoint,
                                                           tmp_path):
    counts = expected_counts(corpus)
    assert sum(counts.values()) == corpus.num_tokens("valid")
    assert sum(1 for v in counts.values() if v) >= 5
    reach = "{'memory_reach_buckets': '1,4,16'}"
    with ThreadPoolExecutor(2) as pool:
        jobs = {
            "validate": pool.submit(run_cli, [
                "fairseq-validate", *args(corpus, longmem_checkpoint), "--valid-subset", "valid",
                "--criterion", "longmem_cross_entropy", "--recurrence-buckets", "1,4,16",
                "--log-format", "json", "--model-overrides", reach]),
            "longmem": pool.submit(score, corpus, longmem_checkpoint, tmp_path / "lm.json",
                                   "--model-overrides", reach),
            "backbone": pool.submit(score, corpus, backbone, tmp_path / "bb.json"),
            "eval_longmem": pool.submit(eval_lm, corpus, longmem_checkpoint),
            "eval_backbone": pool.submit(eval_lm, corpus, backbone),
        }
        res = {k: j.result() for k, j in jobs.items()}
    line = [l for l in res["validate"].splitlines() if "| valid | " in l][-1]
    validated = {k[len("valid_"):]: float(v)
                 for k, v in json.loads(line.split("| valid | ", 1)[1]).items()}
    assert {label: int(validated["ntokens_rec" + label]) for label in LABELS
            if counts[label]} == {k: v for k, v in counts.items() if v}
    for name in ("longmem", "backbone"):
        values = res[name]
        tokens, eval_loss = res[f"eval_{name}"]
        assert tokens == corpus.num_tokens("valid")
        assert {label: values.get("ntokens_rec" + label, 0) for label in LABELS} == counts
        mean = sum(values["loss_rec" + k] * n for k, n in counts.items() if n) / tokens
        assert mean == pytest.approx(values["loss"], abs=1e-5)
        assert values["loss"] == pytest.approx(eval_loss, abs=1e-4)
    # the memory read's reach: shares over 1, 2-4, 5-16, 17+ segments back sum to 1, per head too
    shares = [res["longmem"][f"mem_reach{label}"] for label in LABELS[2:]]
    assert sum(shares) == pytest.approx(1, abs=1e-6) and shares[0] > 0 and shares[1] > 0
    chunks = [res["longmem"][f"mem_chunks{label}"] for label in LABELS[2:]]
    assert sum(chunks) == pytest.approx(1, abs=1e-6)
    # chance, the memory's contents: every read has at least the previous segment in memory
    stored = [res["longmem"][f"mem_stored{label}"] for label in LABELS[2:]]
    assert sum(stored) == pytest.approx(1, abs=1e-6) and stored[0] > 0
    for h in range(4):  # longmem_gpt2_tiny's heads
        assert sum(res["longmem"][f"mem_reach{label}_h{h}"] for label in LABELS[2:]) \
            == pytest.approx(1, abs=1e-6)
    assert validated["mem_reach1"] == pytest.approx(shares[0], abs=1e-3)
    assert "mem_reach1" not in res["backbone"]


# ---------------------------------------------------------------------------------------------
# the sliding window (b) on the same streams: score_positions.py --context-window


def eval_lm_windows(data, path, subsets, windows):
    """fairseq-eval-lm's sliding window over each of ``subsets`` on its own, for each context
    window C of ``windows``: {(C, subset): (tokens, loss in bits)}, all in one interpreter."""
    cases = {f"{C}:{s}": ("fairseq-eval-lm", [
        data, "--user-dir", USER_DIR, "--path", path, "--task", "language_modeling",
        "--sample-break-mode", "none", "--tokens-per-sample", T_EVAL, "--context-window", C,
        "--batch-size", BATCH, "--cpu", "--num-workers", "0", "--gen-subset", s])
        for C in windows for s in subsets}
    out = {}
    for name, case in run_cli_cases(cases).items():
        assert not case.failed, case.log[-2000:]
        C, s = name.split(":")
        out[int(C), s] = (
            int(re.search(r"Evaluated ([\d,]+) tokens", case.log).group(1).replace(",", "")),
            float(re.search(r"Loss \(base 2\): ([\d.]+)", case.log).group(1)))
    return out


@pytest.fixture(scope="module")
def one_document_per_split(corpus, tmp_path_factory):
    """The valid split binarized once as one stream without the empty lines between documents
    (``test``, what run.sh's eval-lm (b) reads) and once per document (``test1``, ``test2``, ...),
    with the corpus's dict.txt."""
    root = tmp_path_factory.mktemp("window_docs")
    docs = corpus.docs["valid"]
    (root / "stream").write_text("".join("\n".join(lines) + "\n" for lines in docs))
    prefixes = [root / "stream"]
    for i, lines in enumerate(docs):
        (root / f"doc{i}").write_text("\n".join(lines) + "\n")
        prefixes.append(root / f"doc{i}")
    run_cli(["fairseq-preprocess", "--only-source", "--srcdict",
             os.path.join(corpus.data_dir, "dict.txt"), "--testpref",
             ",".join(str(p) for p in prefixes), "--destdir", root / "bin", "--workers", "1"])
    return str(root / "bin"), [f"test{i + 1}" for i in range(len(docs))]


@pytest.mark.slow  # 3 score_positions.py runs and 26 of fairseq-eval-lm
def test_sliding_window_scores_the_tokens_of_a_as_eval_lm_scores_each_document(
        corpus, backbone, one_document_per_split, tmp_path):
    data, doc_subsets = one_document_per_split
    windows = (4, 3)  # C = 4: blocks of 4 nest in the 8-token segments; 3: blocks of 5 straddle them
    with ThreadPoolExecutor(2) as pool:
        jobs = {C: pool.submit(score, corpus, backbone, tmp_path / f"b{C}.json",
                               "--context-window", C) for C in windows}
        jobs["a"] = pool.submit(score, corpus, backbone, tmp_path / "a.json")
        eval_lm = eval_lm_windows(data, backbone, ["test"] + doc_subsets, windows)
        res = {k: j.result() for k, j in jobs.items()}
    counts = expected_counts(corpus)
    segments = res["a"]
    for C in windows:
        window = res[C]
        # the same tokens as (a), bucket by bucket
        assert {k: v for k, v in window.items() if k.startswith("ntokens")} \
            == {k: v for k, v in segments.items() if k.startswith("ntokens")}
        assert {label: window.get("ntokens_rec" + label, 0) for label in LABELS} == counts
        assert sum(counts.values()) == eval_lm[C, "test"][0] == corpus.num_tokens("valid")
        # and the same loss as eval-lm's window over each document alone. run.sh's eval-lm (b)
        # reads all documents as one stream ("test" here), whose window does not reset at a
        # document's start: the first C tokens of every later document also see the end of the
        # one before, so only the token count can equal that run's
        per_doc = [eval_lm[C, s] for s in doc_subsets]
        assert [n for n, _ in per_doc] == document_tokens(corpus.docs["valid"])
        mean = sum(n * loss for n, loss in per_doc) / sum(n for n, _ in per_doc)
        # eval-lm prints 4 decimals: each document's loss, and so their mean, is within 5e-5
        # bits. The random-word documents leave a context little to predict with, so the losses
        # of other contexts lie close: (a) (none) and the one stream (across documents) are
        # still told apart
        tol = 6e-5
        assert window["loss"] == pytest.approx(mean, abs=tol)
        assert abs(window["loss"] - segments["loss"]) > 2 * tol
        assert abs(window["loss"] - eval_lm[C, "test"][1]) > 2 * tol


def test_sliding_window_refuses_other_models_and_windows(corpus, backbone, longmem_checkpoint):
    score_positions = load_example(os.path.join("long_context_lm", "score_positions.py"))
    base = [corpus.data_dir, "--user-dir", USER_DIR, "--task", "longmem_lm", "--tokens-per-sample",
            str(T_EVAL), "--batch-size", "2", "--cpu", "--num-workers", "0", "--valid-subset",
            "valid", "--criterion", "longmem_cross_entropy"]
    with pytest.raises(ValueError, match=r"--context-window 4 is for a backbone LM \(gpt2_lm, "
                                         r"llama_lm\); --path holds a LongMemGPT2Model"):
        score_positions.main(base + ["--path", longmem_checkpoint, "--context-window", "4"])
    with pytest.raises(ValueError, match=r"--context-window 8: expected 0 < C < "
                                         r"--tokens-per-sample \(8\), e.g. 4"):
        score_positions.main(base + ["--path", backbone, "--context-window", "8"])
