"""Compatibility shims that let fairseq 0.12.3 run on numpy 2 and torch >= 2.6, and load and
write checkpoints safely.

Installed once, on import of :mod:`fairseq_longmem`: ``np.compat``; a ``torch.load`` for
fairseq.checkpoint_utils that unpickles no code and vets the config
(:mod:`fairseq_longmem.checkpoint_guard`); a ``torch.load`` for what ranks broadcast to each
other; kill-safe checkpoint writes and resume (:mod:`fairseq_longmem.checkpoint_files`).
"""

import logging
import os
import pickle
import types

import numpy as np
import torch

from ..checkpoint import files as checkpoint_files
from ..checkpoint.guard import TRUST_ENV, safe_globals, vet

logger = logging.getLogger(__name__)


def _numpy_compat():
    # numpy 2 removed ``np.compat``; fairseq's TokenBlockDataset (break mode "eos") and
    # LanguagePairDataset still read ``np.compat.long``, which was always the builtin int.
    if not hasattr(np, "compat"):
        np.compat = types.SimpleNamespace(long=int)


def load_checkpoint_file(f, map_location=None, **kwargs):
    """``torch.load`` restricted to tensors, containers and the types fairseq needs, and the
    result vetted by :func:`fairseq_longmem.checkpoint_guard.vet` (no config fairseq would
    evaluate).

    Unpickling arbitrary objects runs arbitrary code, so a checkpoint holding anything else is
    refused unless the user says they trust it with ``FAIRSEQ_LONGMEM_TRUST_CHECKPOINTS=1``.
    """
    if os.environ.get(TRUST_ENV) == "1":
        return torch.load(f, map_location=map_location, weights_only=False)
    kwargs.pop("weights_only", None)
    name = getattr(f, "name", f)
    with torch.serialization.safe_globals(safe_globals()):
        try:
            state = torch.load(f, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            raise pickle.UnpicklingError(
                f"checkpoint {name} holds objects outside the safe list (tensors, containers, "
                f"argparse.Namespace, numpy scalars); if you trust the file, set {TRUST_ENV}=1 "
                f"and retry. Detail: {str(e).splitlines()[0]}"
            ) from None
    return vet(state, name)


def load_from_peer(f, *args, **kwargs):
    """``torch.load`` of what another rank of this job sent (fairseq's ``broadcast_object``).

    torch >= 2.6 loads with ``weights_only=True`` by default, which cannot rebuild the OmegaConf
    config inside the checkpoint state that rank 0 broadcasts on resume, so every multi-process
    resume died on the other ranks. The bytes come from rank 0, which read (and vetted) the file;
    fairseq already unpickles its peers' messages elsewhere (``all_gather_list``).
    """
    kwargs.setdefault("weights_only", False)
    return torch.load(f, *args, **kwargs)


class _TorchWithLoad(types.ModuleType):
    """Stand-in for ``torch`` inside one fairseq module: the same module with another ``load``."""

    def __init__(self, load):
        super().__init__("torch")
        self.load = load

    def __getattr__(self, name):
        return getattr(torch, name)


def _torch_loads():
    from fairseq import checkpoint_utils
    from fairseq.distributed import utils as distributed_utils

    for module, load in ((checkpoint_utils, load_checkpoint_file),
                         (distributed_utils, load_from_peer)):
        if not isinstance(module.torch, _TorchWithLoad):
            module.torch = _TorchWithLoad(load)


def install():
    _numpy_compat()
    _torch_loads()
    checkpoint_files.install()
