"""Reading a checkpoint file: only tensors, containers and the few types fairseq needs are
unpickled, and the result is vetted (:mod:`.guard`) before fairseq sees it."""

import dataclasses
import os
import pickle
import zipfile

import torch

from .guard import LOADABLE, TRUST_ENV, safe_globals, vet


def load_checkpoint_file(f, map_location=None, **kwargs):
    """``torch.load`` restricted to tensors, containers and the types fairseq needs, and the
    result vetted by :func:`fairseq_longmem.checkpoint.guard.vet` (no config fairseq would
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
    reads (``fairseq_patches.torch_load``), before it applies the overrides."""
    from ..models.common import FINGERPRINT

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


# a torch.save file is a zip archive; torch's legacy format starts with a pickle protocol byte
_CHECKPOINT_MAGICS = (b"PK\x03\x04", b"\x80")


def read_checkpoint(path: str, option: str) -> dict:
    """Load a checkpoint file that an option names, refusing an empty, foreign or damaged file in
    one line that names it (torch alone says ``EOFError`` or ``pop from empty list``)."""
    fix = "point it at a complete checkpoint (re-copy it, or re-run what wrote it)"
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"{option} {path} is empty (0 bytes; an interrupted copy or save?): {fix}")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith(_CHECKPOINT_MAGICS):
        raise ValueError(
            f"{option} {path} is not a torch checkpoint: it starts with {head!r}, where a "
            f"checkpoint (a zip archive) starts with b'PK\\x03\\x04'; {fix}"
        )
    try:
        return load_checkpoint_file(path, map_location="cpu")
    except (EOFError, OSError, RuntimeError, zipfile.BadZipFile, IndexError, KeyError) as e:
        detail = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise ValueError(
            f"{option} {path} ({size} bytes) cannot be read as a torch checkpoint, truncated or "
            f"damaged ({type(e).__name__}: {detail}): {fix}"
        ) from None
