"""examples/long_context_lm/induction_probe.py on the session's LongMem checkpoint: it hooks the
memory reads (memory_attention.read_memory), counts hits on every recurring bigram's earlier
occurrence, and puts the hook back."""

import json
import os

import pytest

import fairseq_longmem.modules.memory_attention as memory_attention
from conftest import TOKENS_PER_SAMPLE, load_example

induction_probe = load_example(os.path.join("long_context_lm", "induction_probe.py"))


def test_induction_probe_reads_the_memory_and_restores_the_hook(corpus, longmem_run, tmp_path,
                                                                 capsys):
    read = memory_attention.read_memory
    out = tmp_path / "probe.json"
    rc = induction_probe.main([corpus.data_dir, "--path", longmem_run.checkpoint, "--split",
                               "valid", "--tokens-per-sample", str(TOKENS_PER_SAMPLE),
                               "--results-json", str(out)])
    assert rc == 0, capsys.readouterr().out  # some token's bigram recurred in memory
    assert memory_attention.read_memory is read
    result = json.loads(out.read_text())
    assert result["tokens"] > 0 and result["heads"] >= 1
    for key in ("continuation_hit_rate", "same_token_hit_rate", "chance_rate",
                "same_offset_share"):
        assert 0.0 <= result[key] <= 1.0, (key, result)
    assert 0.0 < result["chance_rate"]


@pytest.mark.slow  # trains a LongMem of several memory layers (fairseq-train, 8 updates)
def test_induction_probe_counts_every_reading_layer(corpus, backbone, tmp_path, capsys):
    from conftest import TOP_COPY_OPTIONS, train_longmem

    checkpoint = train_longmem(corpus, backbone, tmp_path / "layers", *TOP_COPY_OPTIONS)
    out = tmp_path / "probe.json"
    rc = induction_probe.main([corpus.data_dir, "--path", checkpoint, "--split", "valid",
                               "--tokens-per-sample", str(TOKENS_PER_SAMPLE),
                               "--results-json", str(out)])
    assert rc == 0, capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["layers"] == [2, 3] and sorted(result["per_layer"]) == ["2", "3"]
    for name in ("continuation_hit_rate", "same_token_hit_rate"):
        per = [result["per_layer"][layer][name] for layer in ("2", "3")]
        assert abs(result[name] - sum(per) / 2) < 1e-12, (name, result)
