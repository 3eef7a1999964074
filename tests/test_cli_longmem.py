"""LongMem end to end through fairseq's CLIs on tiny synthetic data: fairseq-train (with a
mid-epoch checkpoint and a resume), fairseq-eval-lm with memory on and off, fairseq-validate,
fairseq-hydra-train with the tiny YAML, the paper YAMLs and in-order streaming (bad input:
tests/test_bad_input.py)."""

import json
import math
import os
import re
import shutil

import pytest
import torch

from conftest import (
    LONGMEM_UPDATES,
    REPO,
    TOKENS_PER_SAMPLE,
    USER_DIR,
    as_case,
    longmem_train_argv,
    run_cli,
    run_cli_cases,
    stream_dataset,
)

CONFIG_DIR = os.path.join(REPO, "user_dir_configs")
BATCH_SIZE = 4
FIRST_LEG_UPDATES = LONGMEM_UPDATES  # the session's LongMem run: 20 updates, mid-epoch
RESUMED_UPDATES = 36  # crosses into epoch 2


def longmem_args(corpus, backbone, save_dir, *extra, batch_size=BATCH_SIZE):
    return longmem_train_argv(corpus.data_dir, backbone, save_dir, "--log-format", "json",
                              "--log-interval", "1", *extra, batch_size=batch_size)


def records(log, tag):
    """The JSON stats fairseq logs under ``tag`` (train_inner, train, valid), values as floats."""
    out = []
    for line in log.splitlines():
        head, sep, body = line.partition(f"| {tag} | ")
        if sep and body.startswith("{"):
            out.append({k: float(v) for k, v in json.loads(body).items()})
    return out


def finite(x):
    return isinstance(x, float) and math.isfinite(x)


@pytest.fixture(scope="module")
def trained(longmem_run):
    """First leg (the session's run): 20 updates with validation, checkpoints every 10 updates
    (mid-epoch)."""
    return longmem_run.save_dir, longmem_run.log


# ---------------------------------------------------------------------------------------------
# training, evaluation and their agreement


def test_train_logs_finite_losses_and_memory_stats(trained):
    _, log = trained
    inner = records(log, "train_inner")
    assert [r["num_updates"] for r in inner] == list(range(1, FIRST_LEG_UPDATES + 1))
    for r in inner:
        assert finite(r["loss"]) and 0 < r["loss"] < 20
        assert {"mem_fill", "mem_gate", "mem_share"} <= r.keys()
        assert 0 <= r["mem_gate"] <= 1 and 0 <= r["mem_share"] <= 1
    # the first batch reads an empty memory; later ones read what earlier segments wrote
    assert inner[0]["mem_fill"] == 0
    assert sum(r["mem_fill"] > 0 for r in inner) >= len(inner) // 2
    summary = records(log, "train")[-1]
    assert finite(summary["train_loss"]) and summary["train_mem_fill"] > 0
    valid = records(log, "valid")
    assert [v["valid_num_updates"] for v in valid] == [10, 20]
    for v in valid:
        assert finite(v["valid_loss"]) and v["valid_mem_fill"] > 0
        assert {"valid_mem_gate", "valid_mem_share"} <= v.keys()


# a whole epoch of training; the criterion's statistics are checked in the quick loop by
# test_train_logs_finite_losses_and_memory_stats
@pytest.mark.slow
def test_sentence_avg_divides_by_the_segments_of_the_batch(corpus, backbone, tmp_path):
    # a sentence is a segment: a batch row whose stream has not run out yet
    ds = stream_dataset(corpus, "train", BATCH_SIZE)
    segments = [sum(t < len(stream) for stream in ds.my_streams) for t in range(len(ds))]
    assert min(segments) < BATCH_SIZE  # the epoch's tail has rows whose stream ran out
    log = run_cli(longmem_args(corpus, backbone, str(tmp_path), "--sentence-avg", "--max-epoch",
                               "1", "--disable-validation", "--no-save"))
    inner = records(log, "train_inner")
    assert [int(r["bsz"]) for r in inner] == segments
    for r in inner:  # loss per segment; nll_loss per token, what ppl is derived from
        assert r["loss"] == pytest.approx(r["nll_loss"] * r["wpb"] / r["bsz"], rel=1e-3)
        assert r["ppl"] == pytest.approx(2 ** r["nll_loss"], rel=1e-3)


def eval_lm_argv(corpus, checkpoint, *extra):
    return [
        corpus.data_dir, "--task", "longmem_lm", "--user-dir", USER_DIR, "--path", checkpoint,
        "--batch-size", BATCH_SIZE, "--tokens-per-sample", TOKENS_PER_SAMPLE, "--cpu",
        "--num-workers", "0", "--gen-subset", "valid", *extra,
    ]


def eval_lm_result(log):
    """(tokens evaluated, loss in base 2) that fairseq-eval-lm printed."""
    tokens = int(re.search(r"Evaluated (\d+) tokens", log).group(1))
    loss = float(re.search(r"Loss \(base 2\): ([-\d.infa]+)", log).group(1))
    return tokens, loss


def test_eval_lm_with_and_without_memory_matches_validate(trained, corpus):
    save_dir, _ = trained
    checkpoint = os.path.join(save_dir, "checkpoint_last.pt")
    validate = [
        "fairseq-validate", corpus.data_dir, "--task", "longmem_lm", "--user-dir", USER_DIR,
        "--path", checkpoint, "--batch-size", BATCH_SIZE, "--cpu", "--num-workers", "0",
        "--valid-subset", "valid",
    ]
    logs = run_cli_cases({
        "with_memory": ("fairseq-eval-lm", eval_lm_argv(corpus, checkpoint)),
        "without": ("fairseq-eval-lm", eval_lm_argv(
            corpus, checkpoint, "--model-overrides", "{'disable_memory': True}")),
        "validate": as_case(validate),
    })
    assert not any(case.failed for case in logs.values()), {n: c.log[-2000:] for n, c in logs.items()}
    (tokens_mem, loss_mem), (tokens_off, loss_off) = (
        eval_lm_result(logs["with_memory"].log), eval_lm_result(logs["without"].log))
    log = logs["validate"].log

    valid_tokens = corpus.num_tokens("valid")
    # every token of every validation document is scored exactly once, with memory or without
    assert tokens_mem == tokens_off == valid_tokens
    assert finite(loss_mem) and finite(loss_off)
    assert loss_mem != loss_off  # the memory is read: turning it off changes the scores

    m = re.search(r"valid on 'valid' subset \| loss ([\d.]+) \| mem_fill ([\d.]+)", log)
    assert m, log[-2000:]
    # both stream the split identically and score the same tokens: the same loss (base 2),
    # printed to 4 decimals by eval-lm and 3 by validate
    assert abs(loss_mem - float(m.group(1))) <= 6e-4, (loss_mem, m.group(1))
    assert float(m.group(2)) > 0


# ---------------------------------------------------------------------------------------------
# resume


# a second training run; resuming mid-epoch runs in the quick loop in test_bad_input
# (resume_other_data_reset)
@pytest.mark.slow
def test_resume_continues_at_the_saved_iterator_position(trained, corpus, backbone, tmp_path):
    """Checkpoints hold no memory. On resume fairseq restores the epoch iterator's position; rows
    whose document is in flight continue with an empty memory (as if that document began at the
    resume point); documents that start later are unaffected."""
    first_dir, first_log = trained
    resume_dir = str(tmp_path / "resume")
    os.makedirs(resume_dir)
    shutil.copy(os.path.join(first_dir, "checkpoint_last.pt"), resume_dir)
    log = run_cli(longmem_args(
        corpus, backbone, resume_dir, "--max-update", RESUMED_UPDATES,
        "--save-interval-updates", "10", "--no-epoch-checkpoints",
    ))
    assert f"(epoch 1 @ {FIRST_LEG_UPDATES} updates)" in log
    assert "done training" in log

    batches = stream_dataset(corpus, "train", BATCH_SIZE)
    per_epoch = len(batches)
    assert FIRST_LEG_UPDATES < per_epoch < RESUMED_UPDATES
    ntokens = [batches.collater([batches[t]])["ntokens"] for t in range(per_epoch)]

    first, resumed = records(first_log, "train_inner"), records(log, "train_inner")
    assert [r["num_updates"] for r in resumed] == list(
        range(FIRST_LEG_UPDATES + 1, RESUMED_UPDATES + 1)
    )
    for r in first + resumed:
        k = int(r["num_updates"])  # the k-th update ran batch (k-1) % per_epoch of its epoch
        assert r["epoch"] == 1 + (k - 1) // per_epoch
        assert r["update"] == round(k / per_epoch, 3)  # fairseq's epoch progress
        assert r["wpb"] == ntokens[(k - 1) % per_epoch], k  # the batch's own token count
    # the first resumed batch reads an empty memory, in-flight documents included
    assert resumed[0]["mem_fill"] == 0 and first[FIRST_LEG_UPDATES - 1]["mem_fill"] > 0
    assert finite(records(log, "train")[-1]["train_loss"])


# a training run of its own; the task's resume checks run in the quick loop in test_bad_input
# (resume_other_data)
@pytest.mark.slow
def test_resume_with_another_stream_layout_is_refused(trained, corpus, backbone, tmp_path):
    """A different batch size regroups documents into other streams, so the saved iterator
    position would point at other data: the task refuses instead of skipping or replaying."""
    first_dir, _ = trained
    resume_dir = str(tmp_path / "relayout")
    os.makedirs(resume_dir)
    shutil.copy(os.path.join(first_dir, "checkpoint_last.pt"), resume_dir)
    args = longmem_args(corpus, backbone, resume_dir, "--max-update", RESUMED_UPDATES,
                        batch_size=BATCH_SIZE + 1)
    log = run_cli(args, check=False)
    assert f"trained with {BATCH_SIZE} streams" in log and "--reset-dataloader" in log
    assert "done training" not in log


# ---------------------------------------------------------------------------------------------
# the task's own iterator


def test_task_iterator_streams_every_document_in_order(corpus):
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    bsz = 3
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [
        corpus.data_dir, "--user-dir", USER_DIR, "--task", "longmem_lm",
        "--arch", "longmem_gpt2_tiny", "--tokens-per-sample", str(TOKENS_PER_SAMPLE),
        "--batch-size", str(bsz), "--cpu",
    ])
    task = tasks.setup_task(convert_namespace_to_omegaconf(args).task)
    d = task.dictionary
    for split in ("train", "valid", "test"):
        expected = [
            torch.cat([d.encode_line(line, add_if_not_exist=False).long() for line in lines])
            for lines in corpus.docs[split]
        ]
        num_segments = [-(-len(doc) // TOKENS_PER_SAMPLE) for doc in expected]
        task.load_dataset(split)
        itr = task.get_batch_iterator(task.dataset(split)).next_epoch_itr(shuffle=False)
        rows = [[] for _ in range(bsz)]  # row -> [(doc, seg, new_document, source, target)]
        scored = 0
        for sample in itr:
            assert sample["net_input"]["src_tokens"].shape[0] == bsz
            tgt = sample["target"]
            scored += int(tgt.ne(d.pad()).sum())
            assert sample["ntokens"] == int(tgt.ne(d.pad()).sum())
            for b in range(bsz):
                n = int(tgt[b].ne(d.pad()).sum())
                rows[b].append((
                    int(sample["document"][b]), int(sample["segment"][b]),
                    bool(sample["net_input"]["new_document"][b]),
                    sample["net_input"]["src_tokens"][b, :n], tgt[b, :n],
                ))
        # every target token of every document scored exactly once
        assert scored == corpus.num_tokens(split) == sum(len(x) for x in expected)

        owner = {}
        for b, row in enumerate(rows):
            live = [r for r in row if r[0] >= 0]
            assert row[:len(live)] == live, "a stream's empty rows come only at its end"
            for doc, seg, new, src, tgt in row[len(live):]:
                assert new and len(tgt) == 0
            prev = None
            for doc, seg, new, src, tgt in live:
                assert new == (seg == 0), (split, b, doc, seg)
                if prev is None or prev[0] != doc:
                    # a document starts at segment 0 only after the previous one finished
                    assert seg == 0
                    assert prev is None or prev[1] == num_segments[prev[0]] - 1
                    assert doc not in owner, f"document {doc} in rows {owner.get(doc)} and {b}"
                    owner[doc] = b
                else:
                    assert seg == prev[1] + 1
                prev = (doc, seg)
            assert prev is None or prev[1] == num_segments[prev[0]] - 1
            for doc in {r[0] for r in live}:
                segs = [r for r in live if r[0] == doc]
                target = torch.cat([r[4] for r in segs])
                source = torch.cat([r[3] for r in segs])
                assert torch.equal(target, expected[doc]), (split, doc)
                # the input is the document shifted right behind </s>, across segment borders
                assert torch.equal(source, torch.cat([target.new_tensor([d.eos()]), target[:-1]]))
        assert sorted(owner) == list(range(len(expected)))


# ---------------------------------------------------------------------------------------------
# fairseq-hydra-train configs


# fairseq-hydra-train in a process of its own; the YAMLs compose in the quick loop
# (test_yaml_composes_into_the_arch_and_paper_settings)
@pytest.mark.slow
def test_tiny_yaml_trains_with_fairseq_hydra_train(corpus, backbone, tmp_path):
    log = run_cli([
        "fairseq-hydra-train", "--config-dir", CONFIG_DIR, "--config-name", "longmem_tiny_cpu",
        f"common.user_dir={USER_DIR}", f"task.data={corpus.data_dir}",
        f"model.backbone_path={backbone}", f"checkpoint.save_dir={tmp_path / 'ck'}",
        f"task.tokens_per_sample={TOKENS_PER_SAMPLE}", "optimization.max_update=4",
        "common.log_interval=1",
    ], cwd=str(tmp_path))
    # hydra's log format: "[train][INFO] - epoch 001 | loss 4.763 | mem_fill 36 | ..."
    train = re.search(r"\[train\]\[INFO\] - epoch 001 \| loss (\S+) \| mem_fill (\S+) \|", log)
    assert train, log[-2000:]
    assert finite(float(train.group(1))) and float(train.group(2)) > 0
    assert "num_updates 4 |" in log
    # hydra's model config reaches build_model as a merged copy: what the model works out (the
    # dictionary fingerprint, the backbone's positions) must still reach the checkpoint
    from fairseq.data import Dictionary

    from fairseq_longmem.models.common import dictionary_fingerprint

    saved = torch.load(tmp_path / "ck" / "checkpoint_last.pt", weights_only=False)["cfg"]["model"]
    dictionary = Dictionary.load(os.path.join(corpus.data_dir, "dict.txt"))
    assert saved["dictionary_fingerprint"] == dictionary_fingerprint(dictionary)


# Hydra warns that fairseq validates a config against a ConfigStore schema of the same name and
# that version_base 1.1 is a compatibility mode: that is how fairseq-hydra-train works
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name,size", [
    ("longmem_gpt2_small", "small"), ("longmem_gpt2_medium", "medium"),
    ("longmem_tiny_cpu", "tiny"),
])
def test_yaml_composes_into_the_arch_and_paper_settings(name, size):
    """Compose the YAML against fairseq's schema as fairseq-hydra-train does, merge the
    registered dataclasses (unknown keys fail here), and compare with what --arch sets."""
    from argparse import Namespace

    from fairseq.dataclass.initialize import add_defaults, hydra_init
    from fairseq.models import ARCH_CONFIG_REGISTRY
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    import fairseq_longmem  # noqa: F401
    from fairseq_longmem.models.longmem import validate_config

    GlobalHydra.instance().clear()
    hydra_init(name)
    # fairseq-hydra-train's @hydra.main names no version_base: Hydra 1.1 semantics
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.1"):
        cfg = compose(config_name=name, overrides=["task.data=/data", "model.backbone_path=/b.pt"])
    GlobalHydra.instance().clear()
    user_dir = OmegaConf.to_container(cfg.common, resolve=False)["user_dir"]
    assert user_dir == "${hydra:runtime.cwd}/fairseq_longmem"
    add_defaults(cfg)
    assert cfg.task._name == "longmem_lm" and cfg.criterion._name == "longmem_cross_entropy"
    assert cfg.model._name == "longmem_gpt2"

    arch = Namespace()
    ARCH_CONFIG_REGISTRY[f"longmem_gpt2_{size}"](arch)
    for key, value in vars(arch).items():
        assert cfg.model[key] == value, (key, cfg.model[key], value)
    validate_config(cfg.model)
    if size == "tiny":
        return
    assert cfg.model.memory_layer == {"small": 9, "medium": 17}[size]
    model = cfg.model
    assert (model.memory_size, model.retrieved_tokens, model.chunk_size) == (65536, 64, 4)
    assert cfg.task.tokens_per_sample == 1024
    assert cfg.optimizer._name == "adam"
    assert eval(cfg.optimizer.adam_betas) == (0.9, 0.98)
    assert cfg.optimizer.adam_eps == 1e-6 and cfg.optimizer.weight_decay == 0.01
    assert list(cfg.optimization.lr) == [2e-4]
    assert cfg.lr_scheduler._name == "polynomial_decay"
    assert cfg.lr_scheduler.total_num_update == cfg.optimization.max_update == 100000
    assert cfg.common.fp16 is True
    gpus = 8  # the header comment's example
    assert cfg.dataset.batch_size * cfg.optimization.update_freq[0] * gpus == 256
