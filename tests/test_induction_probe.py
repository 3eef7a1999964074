"""examples/long_context_lm/induction_probe.py on the session's LongMem checkpoint: it hooks the
memory reads (memory_attention.read_memory), counts hits on every recurring bigram's earlier
occurrence, and puts the hook back."""

import json
import os

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
