"""The plain GPT-2 backbone through stock fairseq: fairseq-preprocess -> fairseq-train
--task language_modeling --arch gpt2_lm_tiny -> fairseq-eval-lm, on synthetic text with structure
(a noisy bigram chain) that a model can learn in a few epochs."""

import json
import math
import random
import re

import pytest

from conftest import TOKENS_PER_SAMPLE, USER_DIR, run_cli


WORDS = [f"w{i}" for i in range(40)]
SUCCESSOR = dict(zip(WORDS, random.Random(0).choices(WORDS, k=len(WORDS))))  # one chain for all splits


def bigram_text(n_lines, seed):
    rng = random.Random(seed)
    words, successor = WORDS, SUCCESSOR
    lines = []
    for _ in range(n_lines):
        w, line = rng.choice(words), []
        for _ in range(rng.randint(5, 20)):
            line.append(w)
            w = successor[w] if rng.random() < 0.9 else rng.choice(words)
        lines.append(" ".join(line))
    return "\n".join(lines) + "\n"


# quick loop: the backbone's fairseq-train in conftest.session_models, its eval-lm in
# test_bad_input (old_gpt2_lm_eval)
@pytest.mark.slow
def test_backbone_trains_from_scratch_and_eval_lm_agrees(tmp_path):
    (tmp_path / "train.txt").write_text(bigram_text(400, 0))
    (tmp_path / "valid.txt").write_text(bigram_text(60, 1))
    data = tmp_path / "bin"
    run_cli(["fairseq-preprocess", "--only-source", "--trainpref", tmp_path / "train.txt",
             "--validpref", tmp_path / "valid.txt", "--destdir", data, "--workers", "1"])
    common = ["--user-dir", USER_DIR, "--task", "language_modeling",
              "--tokens-per-sample", TOKENS_PER_SAMPLE, "--cpu", "--num-workers", "0"]
    log = run_cli([
        "fairseq-train", data, *common, "--arch", "gpt2_lm_tiny", "--batch-size", "16",
        "--max-epoch", "4", "--optimizer", "adam", "--lr", "3e-3", "--seed", "1",
        "--log-format", "json", "--no-epoch-checkpoints", "--save-dir", tmp_path / "ck",
    ], timeout=300)
    valid = [float(json.loads(line.split("| valid | ", 1)[1])["valid_loss"])
             for line in log.splitlines() if "| valid | " in line]
    assert len(valid) == 4 and all(map(math.isfinite, valid))
    # a uniform guess over the 40 words costs log2(40) = 5.3 bits; the chain's entropy is ~1 bit
    assert valid[0] < 5.3 and valid[-1] < valid[0] - 1.0, valid
    out = run_cli([
        "fairseq-eval-lm", data, *common, "--path", tmp_path / "ck" / "checkpoint_last.pt",
        "--gen-subset", "valid", "--batch-size", "8",
    ], timeout=180)
    loss = float(re.search(r"Loss \(base 2\): ([0-9.]+)", out).group(1))
    assert abs(loss - valid[-1]) < 0.01, (loss, valid[-1])
