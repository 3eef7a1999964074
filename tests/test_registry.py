"""A plain ``import fairseq_longmem`` (no --user-dir scan) registers every task, model, arch,
criterion and scorer of the plugin with fairseq."""

import json
import subprocess
import sys

from conftest import REPO

PROBE = r"""
import json
import fairseq_longmem  # the only import: nothing else may register anything
from fairseq.criterions import CRITERION_REGISTRY
from fairseq.models import ARCH_MODEL_NAME_REGISTRY, MODEL_REGISTRY
from fairseq.scoring import SCORER_REGISTRY
from fairseq.tasks import TASK_REGISTRY

def ours(registry):
    return sorted(n for n, v in registry.items()
                  if getattr(v, "__module__", "").startswith("fairseq_longmem."))

print(json.dumps({
    "tasks": ours(TASK_REGISTRY),
    "models": ours(MODEL_REGISTRY),
    "archs": {a: m for a, m in ARCH_MODEL_NAME_REGISTRY.items()
              if m in ("gpt2_lm", "longmem_gpt2")},
    "criterions": ours(CRITERION_REGISTRY),
    "scorers": ours(SCORER_REGISTRY),
}))
"""

SIZES = ["tiny", "small", "medium", "large", "xl"]


def test_import_registers_every_name():
    res = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=REPO,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    found = json.loads(res.stdout.strip().splitlines()[-1])
    assert found["tasks"] == ["longmem_icl", "longmem_lm", "longmem_suffix"]
    assert found["models"] == ["gpt2_lm", "longmem_gpt2"]
    assert found["archs"] == {  # fairseq registers a model's own name as an arch too
        "gpt2_lm": "gpt2_lm", "longmem_gpt2": "longmem_gpt2",
        **{f"gpt2_lm_{s}": "gpt2_lm" for s in SIZES},
        **{f"longmem_gpt2_{s}": "longmem_gpt2" for s in SIZES},
    }
    assert found["criterions"] == ["longmem_cross_entropy"]
    assert found["scorers"] == ["candidate_accuracy", "icl_accuracy"]
