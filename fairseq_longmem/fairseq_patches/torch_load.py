"""``torch.load`` as two fairseq modules see it: fairseq 0.12 calls ``torch.load`` with
torch's defaults, which since torch 2.6 refuse the OmegaConf config inside a checkpoint and
before 2.6 unpickled any code a file holds."""

import types

import torch

from ..checkpoint.read import add_new_model_options, load_checkpoint_file


def load_from_peer(f, *args, **kwargs):
    """``torch.load`` of what another rank of this job sent (fairseq's ``broadcast_object``).

    torch >= 2.6 loads with ``weights_only=True`` by default, which cannot rebuild the OmegaConf
    config inside the checkpoint state that rank 0 broadcasts on resume, so a multi-process
    resume would fail on every other rank. The bytes come from rank 0, which read (and vetted)
    the file; fairseq already unpickles its peers' messages elsewhere (``all_gather_list``).
    """
    kwargs.setdefault("weights_only", False)
    return torch.load(f, *args, **kwargs)


def load_for_fairseq(f, *args, **kwargs):
    """``torch.load`` of a checkpoint file fairseq reads (``load_checkpoint_to_cpu``): the file
    read and vetted (:func:`load_checkpoint_file`; with the opt-in, a full unpickle), then given
    the model options it lacks, so that ``--model-overrides`` reaches them
    (:func:`add_new_model_options`)."""
    return add_new_model_options(load_checkpoint_file(f, *args, **kwargs))


class _TorchWithLoad(types.ModuleType):
    """Stand-in for ``torch`` inside one fairseq module: the same module with another ``load``."""

    def __init__(self, load):
        super().__init__("torch")
        self.load = load

    def __getattr__(self, name):
        return getattr(torch, name)


def install():
    """Give fairseq.checkpoint_utils and fairseq.distributed.utils their own ``load``.

    This is the narrowest hook fairseq allows: the calls sit inside functions that do much more
    (``load_checkpoint_to_cpu`` also fetches remote files, applies overrides and upgrades old
    states; ``_broadcast_object_slow`` also moves the bytes between ranks), so wrapping those
    functions cannot reach the call, and replacing ``torch.load`` itself would change it for
    every library in the process. Every other ``torch`` attribute those modules read is torch's.
    """
    from fairseq import checkpoint_utils
    from fairseq.distributed import utils as distributed_utils

    for module, load in ((checkpoint_utils, load_for_fairseq),
                         (distributed_utils, load_from_peer)):
        if not isinstance(module.torch, _TorchWithLoad):
            module.torch = _TorchWithLoad(load)
