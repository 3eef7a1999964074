"""A plain ``import fairseq_longmem`` (no --user-dir scan) registers every task, model, arch,
criterion and scorer of the plugin with fairseq."""

import json
import subprocess
import sys

import pytest

from conftest import REPO

PROBE = r"""
import json
import fairseq_longmem  # the only import: nothing else may register anything
from fairseq.criterions import CRITERION_REGISTRY
from fairseq.data.encoders import BPE_REGISTRY
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
              if m in ("gpt2_lm", "longmem_gpt2", "llama_lm", "longmem_llama")},
    "bpes": ours(BPE_REGISTRY),
    "criterions": ours(CRITERION_REGISTRY),
    "scorers": ours(SCORER_REGISTRY),
}))
"""

SIZES = ["tiny", "small", "medium", "large", "xl"]


@pytest.fixture(scope="module")
def probed():
    """What PROBE, then PATCH_PROBE, print in one fresh interpreter (one import of fairseq):
    PROBE's ``import fairseq_longmem`` comes first, so the registries see only that import."""
    res = subprocess.run([sys.executable, "-c", PROBE + PATCH_PROBE], capture_output=True,
                         text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return [json.loads(line) for line in res.stdout.strip().splitlines()[-2:]]


def test_import_registers_every_name(probed):
    found = probed[0]
    assert found["tasks"] == ["longmem_icl", "longmem_lm", "longmem_suffix"]
    assert found["models"] == ["gpt2_lm", "llama_lm", "longmem_gpt2", "longmem_llama"]
    assert found["archs"] == {  # fairseq registers a model's own name as an arch too
        "gpt2_lm": "gpt2_lm", "longmem_gpt2": "longmem_gpt2",
        **{f"gpt2_lm_{s}": "gpt2_lm" for s in SIZES},
        **{f"longmem_gpt2_{s}": "longmem_gpt2" for s in SIZES},
        "llama_lm": "llama_lm", "llama_lm_tiny": "llama_lm", "longmem_llama": "longmem_llama",
    }
    assert found["bpes"] == ["hf_tokenizer"]
    assert found["criterions"] == ["longmem_cross_entropy"]
    assert found["scorers"] == ["candidate_accuracy", "icl_accuracy"]


PATCH_PROBE = r"""
import json
import numpy as np
import fairseq_longmem
from fairseq import checkpoint_utils
from fairseq.distributed import utils as distributed_utils
from fairseq_longmem import fairseq_patches

def where(f):
    return getattr(f, "__module__", None)

before = [where(checkpoint_utils.torch_persistent_save), where(checkpoint_utils.load_checkpoint)]
fairseq_patches.install()  # a second call changes nothing
print(json.dumps({
    "patched": [p[0] for p in fairseq_patches.PATCHES],
    "np_compat_long": np.compat.long is int,
    "torch_persistent_save": where(checkpoint_utils.torch_persistent_save),
    "load_checkpoint": where(checkpoint_utils.load_checkpoint),
    "same_after_second_install": before == [where(checkpoint_utils.torch_persistent_save),
                                            where(checkpoint_utils.load_checkpoint)],
    "checkpoint_load": where(checkpoint_utils.torch.load),
    "peer_load": where(distributed_utils.torch.load),
    "other_torch_attrs_are_torch": checkpoint_utils.torch.save is __import__("torch").save,
    "path_manager_copy": where(type(checkpoint_utils.PathManager).copy),
}))
"""


def test_fairseq_patches_installed_on_import(probed):
    """Every symbol fairseq_patches.PATCHES lists is replaced after ``import fairseq_longmem``."""
    found = probed[1]
    ours = "fairseq_longmem.fairseq_patches.checkpoint_utils"
    assert found == {
        "patched": [
            "numpy.compat", "fairseq.checkpoint_utils.torch", "fairseq.distributed.utils.torch",
            "fairseq.checkpoint_utils.torch_persistent_save",
            "fairseq.checkpoint_utils.PathManager", "fairseq.checkpoint_utils.load_checkpoint",
            "trainer.load_checkpoint (one Trainer, during that load_checkpoint call only)",
        ],
        "np_compat_long": True,
        "torch_persistent_save": ours,
        "load_checkpoint": ours,
        "same_after_second_install": True,
        "checkpoint_load": "fairseq_longmem.fairseq_patches.torch_load",
        "peer_load": "fairseq_longmem.fairseq_patches.torch_load",
        "other_torch_attrs_are_torch": True,
        "path_manager_copy": ours,
    }
