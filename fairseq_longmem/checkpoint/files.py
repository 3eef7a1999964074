"""Checkpoint files that survive a kill at any moment: finding the newest intact checkpoint of a
folder, deciding what to resume from when the named one is damaged, and removing the writes a
killed save left. fairseq is changed to use them in
:mod:`fairseq_longmem.fairseq_patches.checkpoint_utils`, which says what happens when.
"""

import contextlib
import logging
import os
import re
import zipfile
from typing import List, Optional, Tuple

import torch

from ..fileio import INCOMPLETE, atomic_copy
from .guard import safe_globals

logger = logging.getLogger(__name__)

DAMAGED = ".damaged"  # suffix a damaged checkpoint is moved aside to


class CheckpointResumeError(RuntimeError):
    """The checkpoint to resume from is damaged and no intact one can stand in for it."""


def is_local(path: str) -> bool:
    """A path fairseq writes with plain file operations (not through a remote PathManager)."""
    from fairseq.file_io import PathManager

    return not PathManager.path_requires_pathmanager(path)


def damage_of(path: str) -> str:
    """Why ``path`` cannot be a checkpoint torch wrote completely; '' if it looks intact."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "empty (0 bytes)"
        with open(path, "rb") as f:
            head = f.read(4)
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
            return f"corrupt (CRC mismatch in {bad})" if bad else ""
        if head == b"PK\x03\x04":
            return f"truncated ({size} bytes, its zip directory is missing)"
        # not a zip: torch's legacy format, readable only by loading it
        with torch.serialization.safe_globals(safe_globals()):
            torch.load(path, map_location="cpu", weights_only=True)
        return ""
    except Exception as e:  # any failure to read is damage here; what it was goes in the log
        first = (str(e).splitlines() or [type(e).__name__])[0]
        return f"unreadable ({type(e).__name__}: {first[:120]})"


def _num_updates(path: str) -> Optional[int]:
    """The update count a checkpoint was saved at (tensors memory-mapped, not read)."""
    try:
        with torch.serialization.safe_globals(safe_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(state["optimizer_history"][-1]["num_updates"])
    except Exception:
        return None


def newest_intact(save_dir: str, suffix: str = "") -> Tuple[Optional[str], List[Tuple[str, str]]]:
    """The intact ``checkpoint*{suffix}.pt`` of ``save_dir`` with the most updates (ties: the
    most recently written), or None; and the damaged ones newer than it, with what is wrong."""
    pattern = re.compile(r"checkpoint.*" + re.escape(suffix) + r"\.pt")
    found: List[Tuple[int, float, str]] = []
    for name in os.listdir(save_dir):
        path = os.path.join(save_dir, name)
        if pattern.fullmatch(name) and os.path.isfile(path):
            updates = _num_updates(path)
            found.append((-1 if updates is None else updates, os.path.getmtime(path), path))
    newer_damaged = []
    for _, _, path in sorted(found, reverse=True):
        problem = damage_of(path)
        if not problem:
            return path, newer_damaged
        newer_damaged.append((path, problem))
    return None, newer_damaged


def _move_aside(path: str) -> str:
    target, n = path + DAMAGED, 1
    while os.path.lexists(target):
        n += 1
        target = f"{path}{DAMAGED}.{n}"
    os.rename(path, target)
    return target


def choose_resume_file(path: str, save_dir: str, suffix: str,
                       may_fall_back: bool) -> Tuple[str, str]:
    """``(file to load, "")`` for resuming from ``path``, or ``("", one-line error)`` when it is
    damaged and nothing can stand in for it (a plain tuple: rank 0 broadcasts it)."""
    if not is_local(path) or not os.path.isfile(path):
        return path, ""  # fairseq's own handling: a remote file, or a first launch
    problem = damage_of(path)
    if not problem:
        return path, ""
    folder = os.path.dirname(os.path.abspath(path))
    in_save_dir = os.path.isdir(save_dir) and os.path.samefile(folder, save_dir)
    if not (may_fall_back and in_save_dir):
        return "", (
            f"checkpoint {path} is {problem}; it is left as it is. Resume from an intact "
            "checkpoint (--restore-file) or move this one away"
        )
    fallback, newer_damaged = newest_intact(save_dir, suffix)
    if fallback is None:
        return "", (
            f"checkpoint {path} is {problem} and no other checkpoint in --save-dir {save_dir} is "
            "intact; nothing was moved. Move the damaged files away to start over"
        )
    moved = _move_aside(path)
    # so that a rerun finds ``path`` intact even if this one is killed before its first save
    atomic_copy(fallback, path)
    logger.warning(
        "checkpoint %s is %s: moved it to %s and resuming from %s, the newest intact checkpoint "
        "in --save-dir (copied to %s)", path, problem, moved, fallback, os.path.basename(path),
    )
    # the resumed run would write these names again: keep the damaged files under other names
    for other, other_problem in newer_damaged:
        if other != path:
            logger.warning(
                "checkpoint %s is %s too: moved it to %s", other, other_problem, _move_aside(other)
            )
    return fallback, ""


def remove_incomplete(save_dir: str, suffix: str = ""):
    """Remove ``*{suffix}.pt.incomplete`` files: writes a killed run never finished."""
    if not os.path.isdir(save_dir):
        return
    for name in sorted(os.listdir(save_dir)):
        if name.endswith(suffix + ".pt" + INCOMPLETE):
            path = os.path.join(save_dir, name)
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
                logger.info("removed %s, left by a checkpoint save that was interrupted", path)
