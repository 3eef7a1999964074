"""Loss per position in the document: ``longmem_cross_entropy --position-buckets`` through
fairseq-validate, and examples/long_context_lm/score_positions.py (the same criterion under the
command line's task, for checkpoints such as a gpt2_lm backbone) against fairseq-eval-lm."""

import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import REPO, TOKENS_PER_SAMPLE, USER_DIR, document_tokens, run_cli, train_longmem

# every test here runs fairseq-train several times; the criterion's bucket code is shared with the
# recurrence buckets (fairseq_longmem/buckets.py), checked in the quick loop by
# tests/test_recurrence_buckets.py
pytestmark = pytest.mark.slow

SCORE_POSITIONS = os.path.join(REPO, "examples", "long_context_lm", "score_positions.py")
BATCH_SIZE = 4
# 40 is inside a 32-token segment's second half, 64 a segment boundary
BUCKETS = "40,64"


def expected_counts(corpus, split):
    """Tokens at positions [0, 40), [40, 64), [64, end) of every document."""
    counts = {"0_40": 0, "40_64": 0, "64_end": 0}
    for n in document_tokens(corpus.docs[split]):
        counts["0_40"] += min(n, 40)
        counts["40_64"] += max(0, min(n, 64) - 40)
        counts["64_end"] += max(0, n - 64)
    return counts


def stream_args(corpus, path):
    return [corpus.data_dir, "--user-dir", USER_DIR, "--path", path, "--task", "longmem_lm",
            "--tokens-per-sample", TOKENS_PER_SAMPLE, "--batch-size", BATCH_SIZE, "--cpu",
            "--num-workers", "0"]


def score_positions(corpus, path, tmp_path, name, *extra):
    out = tmp_path / f"{name}.json"
    log = run_cli([
        sys.executable, SCORE_POSITIONS, *stream_args(corpus, path), "--valid-subset", "valid",
        "--criterion", "longmem_cross_entropy", "--position-buckets", BUCKETS,
        "--results-json", out, *extra,
    ])
    return json.loads(out.read_text()), log


def eval_lm_loss(corpus, path, *extra):
    log = run_cli(["fairseq-eval-lm", *stream_args(corpus, path), "--gen-subset", "valid", *extra])
    return (int(re.search(r"Evaluated ([\d,]+) tokens", log).group(1).replace(",", "")),
            float(re.search(r"Loss \(base 2\): ([\d.]+)", log).group(1)))


def validate_summary(log):
    """fairseq-validate's final line (--log-format json) as {key: value}, keys unprefixed."""
    line = [l for l in log.splitlines() if "| valid | " in l][-1]
    values = json.loads(line.split("| valid | ", 1)[1])
    return {k[len("valid_"):]: float(v) for k, v in values.items()}


def buckets_of(values, prefix):
    return {k[len(prefix):]: v for k, v in values.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def longmem_checkpoint(corpus, backbone, tmp_path_factory):
    return train_longmem(corpus, backbone, tmp_path_factory.mktemp("longmem_buckets"),
                         batch_size=BATCH_SIZE)


def test_buckets_count_every_token_once_and_average_to_the_total(
        corpus, backbone, longmem_checkpoint, tmp_path):
    counts = expected_counts(corpus, "valid")
    assert sum(counts.values()) == corpus.num_tokens("valid") and min(counts.values()) > 0
    with ThreadPoolExecutor(2) as pool:
        jobs = {
            "validate": pool.submit(run_cli, [
                "fairseq-validate", *stream_args(corpus, longmem_checkpoint),
                "--valid-subset", "valid", "--criterion", "longmem_cross_entropy",
                "--position-buckets", BUCKETS, "--log-format", "json",
            ]),
            "longmem": pool.submit(score_positions, corpus, longmem_checkpoint, tmp_path, "lm"),
            "backbone": pool.submit(score_positions, corpus, backbone, tmp_path, "bb"),
            "eval_longmem": pool.submit(eval_lm_loss, corpus, longmem_checkpoint),
            "eval_backbone": pool.submit(eval_lm_loss, corpus, backbone),
        }
        res = {k: j.result() for k, j in jobs.items()}

    # fairseq-validate on a LongMem checkpoint: the criterion's buckets, rounded for display
    validated = validate_summary(res["validate"])
    assert {k: int(v) for k, v in buckets_of(validated, "ntokens_pos").items()} == counts
    assert set(buckets_of(validated, "ppl_pos")) == set(counts)

    for name in ("longmem", "backbone"):
        values, _ = res[name]
        tokens, eval_loss = res[f"eval_{name}"]
        assert tokens == corpus.num_tokens("valid")
        assert {k: int(v) for k, v in buckets_of(values, "ntokens_pos").items()} == counts
        losses = buckets_of(values, "loss_pos")
        # the buckets split the same tokens: their token-weighted mean is the total loss,
        # which is fairseq-eval-lm's on the same streams
        mean = sum(losses[k] * counts[k] for k in counts) / sum(counts.values())
        assert mean == pytest.approx(values["loss"], abs=1e-5)
        assert values["loss"] == pytest.approx(eval_loss, abs=1e-4)
        assert values["ppl_pos64_end"] == pytest.approx(2 ** losses["64_end"])
        assert len(set(round(v, 4) for v in losses.values())) == 3  # not one number three times
    # the script's criterion on a LongMem checkpoint is fairseq-validate's
    for key, value in validated.items():
        if key.startswith(("loss_pos", "ntokens_pos")):
            assert res["longmem"][0][key] == pytest.approx(value, abs=1e-3)


def test_position_bucket_errors(corpus, backbone, tmp_path):
    with ThreadPoolExecutor(2) as pool:
        bad_spec = pool.submit(run_cli, [
            sys.executable, SCORE_POSITIONS, *stream_args(corpus, backbone), "--valid-subset",
            "valid", "--criterion", "longmem_cross_entropy", "--position-buckets", "64,40",
        ], check=False)
        other_task = pool.submit(run_cli, [
            sys.executable, SCORE_POSITIONS, corpus.data_dir, "--user-dir", USER_DIR,
            "--path", backbone, "--task", "language_modeling", "--tokens-per-sample",
            TOKENS_PER_SAMPLE, "--batch-size", BATCH_SIZE, "--cpu", "--valid-subset", "valid",
            "--criterion", "longmem_cross_entropy", "--position-buckets", "40",
        ], check=False)
    assert ("--position-buckets '64,40': expected increasing positive token positions"
            in bad_spec.result())
    assert "--position-buckets needs --task longmem_lm" in other_task.result()
