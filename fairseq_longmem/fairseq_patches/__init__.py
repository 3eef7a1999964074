"""Everything this plugin changes inside fairseq 0.12.3, in one place.

:func:`install` runs once when ``fairseq_longmem`` is imported with fairseq installed (the plugin
entry, ``fairseq_longmem/__init__.py``); models, modules and tasks never import this package.
:data:`PATCHES` lists every symbol it replaces and why; docs/DESIGN.md, "What the plugin changes
in fairseq, and why", says why each is patched the way it is. A fairseq upgrade should start
here: each patch names the fairseq code it stands in for.
"""

import types

import numpy as np

from . import checkpoint_utils, torch_load

# (patched symbol, what replaces it, why)
PATCHES = (
    ("numpy.compat", "a namespace with long = int",
     "numpy 2 removed it; fairseq's TokenBlockDataset (break mode eos) and LanguagePairDataset "
     "still read np.compat.long, an alias of the builtin int"),
    ("fairseq.checkpoint_utils.torch", "torch with load = torch_load.load_for_fairseq",
     "every checkpoint fairseq reads (load_checkpoint_to_cpu, load_ema_from_checkpoint) is "
     "unpickled with weights_only=True and a short allow-list, then vetted "
     "(checkpoint.guard): no pickled code, no config fairseq would evaluate; a checkpoint of "
     "this plugin's models gains the model options it lacks at their defaults, so that "
     "--model-overrides reaches options added after it was written"),
    ("fairseq.distributed.utils.torch", "torch with load = torch_load.load_from_peer",
     "torch >= 2.6 loads with weights_only=True, which cannot rebuild the OmegaConf config that "
     "rank 0 broadcasts on resume; the bytes come from rank 0, which vetted the file"),
    ("fairseq.checkpoint_utils.torch_persistent_save", "checkpoint_utils.torch_persistent_save",
     "local saves go through <name>.incomplete, fsync and a rename: a kill never leaves a "
     "truncated checkpoint"),
    ("fairseq.checkpoint_utils.PathManager", "one whose copy is atomic",
     "save_checkpoint copies the first name to checkpoint_last.pt/checkpoint_best.pt; fairseq's "
     "copy writes in place, so a kill during it would truncate checkpoint_last.pt"),
    ("fairseq.checkpoint_utils.load_checkpoint", "checkpoint_utils.load_checkpoint",
     "removes *.pt.incomplete left by a killed save, resumes from the newest intact checkpoint "
     "when the named one is damaged, and trains nothing when resumed at --max-update"),
    ("trainer.load_checkpoint (one Trainer, during that load_checkpoint call only)",
     "the same method given the intact file's path",
     "fairseq's load_checkpoint computes the path and calls trainer.load_checkpoint once; this "
     "is where the path it chose can be exchanged for an intact one"),
)


def _numpy_compat():
    if not hasattr(np, "compat"):
        np.compat = types.SimpleNamespace(long=int)


def install():
    """Apply every patch in :data:`PATCHES`; a second call changes nothing."""
    _numpy_compat()
    torch_load.install()
    checkpoint_utils.install()
