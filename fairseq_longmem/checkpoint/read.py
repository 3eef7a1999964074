"""Reading a checkpoint file: only tensors, containers and the few types fairseq needs are
unpickled, and the result is vetted (:mod:`.guard`) before fairseq sees it."""

import os
import pickle
import zipfile

import torch

from .guard import TRUST_ENV, safe_globals, vet


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
