"""Compatibility shims that let fairseq 0.12.3 run on numpy 2 and torch >= 2.6, and load and
write checkpoints safely.

Installed once, on import of :mod:`fairseq_longmem`: ``np.compat``; a ``torch.load`` for
fairseq.checkpoint_utils that unpickles no code and vets the config
(:mod:`fairseq_longmem.checkpoint_guard`); kill-safe checkpoint writes and resume
(:mod:`fairseq_longmem.checkpoint_files`).
"""

import logging
import os
import pickle
import types

import numpy as np
import torch

from . import checkpoint_files
from .checkpoint_guard import TRUST_ENV, safe_globals, vet

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


class _TorchWithSafeLoad(types.ModuleType):
    """Stand-in for ``torch`` inside fairseq.checkpoint_utils: same module, safe ``load``."""

    def __getattr__(self, name):
        return getattr(torch, name)

    load = staticmethod(load_checkpoint_file)


def _checkpoint_loading():
    from fairseq import checkpoint_utils

    if not isinstance(checkpoint_utils.torch, _TorchWithSafeLoad):
        checkpoint_utils.torch = _TorchWithSafeLoad("torch")


def install():
    _numpy_compat()
    _checkpoint_loading()
    checkpoint_files.install()
