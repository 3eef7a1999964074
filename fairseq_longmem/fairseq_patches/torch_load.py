"""``torch.load`` as two fairseq modules see it: fairseq 0.12 calls ``torch.load`` with
torch's defaults, which since torch 2.6 refuse the OmegaConf config inside a checkpoint and
before 2.6 unpickled any code a file holds."""

import dataclasses
import types

import torch

from ..checkpoint.guard import LOADABLE
from ..checkpoint.read import load_checkpoint_file
from ..models.common import FINGERPRINT


def load_from_peer(f, *args, **kwargs):
    """``torch.load`` of what another rank of this job sent (fairseq's ``broadcast_object``).

    torch >= 2.6 loads with ``weights_only=True`` by default, which cannot rebuild the OmegaConf
    config inside the checkpoint state that rank 0 broadcasts on resume, so a multi-process
    resume would fail on every other rank. The bytes come from rank 0, which read (and vetted)
    the file; fairseq already unpickles its peers' messages elsewhere (``all_gather_list``).
    """
    kwargs.setdefault("weights_only", False)
    return torch.load(f, *args, **kwargs)


def add_new_model_options(state):
    """Give a checkpoint of this plugin's models every model option it lacks, at its default.

    A checkpoint written before an option existed has no key for it in ``cfg.model``, and
    fairseq applies ``--model-overrides`` only to keys a checkpoint has: an override of a newer
    option (``{'search_every': 15}`` on an older LongMem) would be dropped without a word. Every
    option's default is the behaviour from before it existed, so adding the missing ones changes
    nothing until an override sets them. Left out: defaults that are ``${...}`` interpolations
    (fairseq resolves those itself), and the dictionary fingerprint, whose absence says the
    checkpoint predates fingerprints (``models.common.bind_dictionary`` warns then, where an
    empty one would be recorded afresh). Applied to what fairseq's ``load_checkpoint_to_cpu``
    reads (:func:`load_for_fairseq`), before it applies the overrides."""
    cfg = state.get("cfg") if isinstance(state, dict) else None
    model = cfg.get("model") if isinstance(cfg, dict) else None
    if not isinstance(model, dict):
        return state
    from fairseq.models import ARCH_MODEL_NAME_REGISTRY, MODEL_DATACLASS_REGISTRY

    name = ARCH_MODEL_NAME_REGISTRY.get(model.get("_name"), model.get("_name"))
    if name not in LOADABLE["model"] or name not in MODEL_DATACLASS_REGISTRY:
        return state
    for field in dataclasses.fields(MODEL_DATACLASS_REGISTRY[name]):
        if field.name in model or field.name.startswith("_") or field.name == FINGERPRINT:
            continue
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            continue
        if isinstance(default, (str, int, float, bool, type(None))) and "${" not in str(default):
            model[field.name] = default
    return state


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
