"""Checkpoint writes that survive a kill at any moment, and a resume that steps over a damaged file.

fairseq 0.12 writes the first name of a save through ``<name>.tmp`` and a rename, then *copies*
it in place to the other names (``checkpoint_last.pt``, ``checkpoint_best.pt``), so a SIGKILL
during the copy leaves a truncated ``checkpoint_last.pt`` and the next run dies with a bare
``EOFError``. :func:`install` changes fairseq.checkpoint_utils so that:

- every local write (the save and each copy) goes to ``<name>.incomplete`` in the same folder,
  is flushed and fsynced, and is renamed over ``<name>`` with ``os.replace``, then the folder is
  fsynced: a reader finds the old file or the new one, never part of one. Remote paths and
  ``--write-checkpoints-asynchronously`` keep fairseq's own code;
- when ``fairseq-train`` starts, ``*.pt.incomplete`` files that a killed save left in
  ``--save-dir`` are removed (they never replaced anything), so none accumulate across runs;
- before resuming, the file fairseq is about to load is checked (zip structure and the CRC-32 of
  every record). If it is damaged and lies in ``--save-dir``, it is renamed to
  ``<name>.damaged`` (never deleted or overwritten), replaced by a copy of the newest intact
  checkpoint there (most updates, then most recent), and training resumes from that one, with
  one log line naming both files. If no checkpoint there is intact, or the damaged file was
  named elsewhere (``--restore-file``, ``--finetune-from-model``), the run stops with a one-line
  error and moves nothing;
- a run resumed at ``--max-update`` trains nothing (fairseq would train one update more).
"""

import contextlib
import logging
import os
import re
import shutil
import zipfile
from typing import Callable, List, Optional, Tuple

import torch

from .guard import safe_globals

logger = logging.getLogger(__name__)

INCOMPLETE = ".incomplete"  # suffix of a write in progress
DAMAGED = ".damaged"  # suffix a damaged checkpoint is moved aside to


class CheckpointResumeError(RuntimeError):
    """The checkpoint to resume from is damaged and no intact one can stand in for it."""


def _fsync_dir(folder: str):
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str, write: Callable):
    """``write(f)`` into ``path + '.incomplete'``, fsync, then ``os.replace`` it onto ``path``."""
    tmp = path + INCOMPLETE
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_copy(src: str, dst: str):
    with open(src, "rb") as f:
        atomic_write(dst, lambda out: shutil.copyfileobj(f, out, 16 << 20))


def _is_local(path: str) -> bool:
    from fairseq.file_io import PathManager

    return not PathManager.path_requires_pathmanager(path)


def damage(path: str) -> str:
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
        problem = damage(path)
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


def _choose(path: str, save_dir: str, suffix: str, may_fall_back: bool) -> Tuple[str, str]:
    """``("ok", file to load)`` or ``("error", message)`` for resuming from ``path``."""
    if not _is_local(path) or not os.path.isfile(path):
        return "ok", path  # fairseq's own handling: a remote file, or a first launch
    problem = damage(path)
    if not problem:
        return "ok", path
    folder = os.path.dirname(os.path.abspath(path))
    in_save_dir = os.path.isdir(save_dir) and os.path.samefile(folder, save_dir)
    if not (may_fall_back and in_save_dir):
        return "error", (
            f"checkpoint {path} is {problem}; it is left as it is. Resume from an intact "
            "checkpoint (--restore-file) or move this one away"
        )
    fallback, newer_damaged = newest_intact(save_dir, suffix)
    if fallback is None:
        return "error", (
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
    return "ok", fallback


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


def _resume_path(filename: str, cfg, trainer) -> str:
    """The file to resume from instead of ``filename``: itself when intact. Rank 0 decides and
    tells the other data-parallel ranks, so that all load the same file."""
    # sharded states (FSDP, model parallel) have a file per rank: each rank checks its own
    per_rank = trainer.checkpoint_suffix != (cfg.checkpoint_suffix or "")
    world = trainer.data_parallel_world_size
    if world == 1 or per_rank:
        decision = _choose(filename, cfg.save_dir, trainer.checkpoint_suffix, not per_rank)
    else:
        from fairseq.distributed import utils as distributed_utils

        decision = None
        if trainer.data_parallel_rank == 0:
            decision = _choose(filename, cfg.save_dir, trainer.checkpoint_suffix, True)
        decision = distributed_utils.broadcast_object(
            decision, src_rank=0, group=trainer.data_parallel_process_group,
            dist_device=trainer.device,
        )
    status, value = decision
    if status == "error":
        raise CheckpointResumeError(value)
    return value


def torch_persistent_save(obj, filename, async_write: bool = False):
    """fairseq.checkpoint_utils.torch_persistent_save, written atomically for local files."""
    if async_write or not _is_local(filename):
        return _fairseq["torch_persistent_save"](obj, filename, async_write=async_write)
    atomic_write(filename, lambda f: torch.save(obj, f))


def load_checkpoint(cfg, trainer, **passthrough_args):
    """fairseq.checkpoint_utils.load_checkpoint, resuming from an intact file (see module doc)."""
    if trainer.should_save_checkpoint_on_current_rank:
        remove_incomplete(cfg.save_dir, trainer.checkpoint_suffix)
    trainer_load = trainer.load_checkpoint

    def load(filename, *args, **kwargs):
        return trainer_load(_resume_path(filename, cfg, trainer), *args, **kwargs)

    trainer.load_checkpoint = load  # for this call only: fairseq's function calls it once
    try:
        extra_state, epoch_itr = _fairseq["load_checkpoint"](cfg, trainer, **passthrough_args)
    finally:
        del trainer.load_checkpoint
    _stop_if_done(trainer)
    return extra_state, epoch_itr


def _stop_if_done(trainer):
    """A run resumed at --max-update trains nothing. fairseq-train checks --max-update only after
    a step, so rerunning the command of a finished run (or of one killed after its last save)
    would train one update more than asked; fairseq_cli.train reads max_epoch just after this
    call, and a negative one runs no epoch."""
    max_update, done = trainer.cfg.optimization.max_update, trainer.get_num_updates()
    if max_update and done >= max_update:
        logger.info("the checkpoint is at update %d and --max-update is %d: nothing left to "
                    "train", done, max_update)
        trainer.cfg.optimization.max_epoch = -1


class _PathManagerWithAtomicCopy:
    """Stand-in for fairseq's PathManager inside checkpoint_utils: ``copy`` is atomic."""

    def __init__(self, path_manager):
        self._pm = path_manager

    def __getattr__(self, name):
        return getattr(self._pm, name)

    def copy(self, src_path: str, dst_path: str, overwrite: bool = False) -> bool:
        if not (_is_local(src_path) and _is_local(dst_path)):
            return self._pm.copy(src_path, dst_path, overwrite)
        if os.path.exists(dst_path) and not overwrite:
            return False
        atomic_copy(src_path, dst_path)
        return True


_fairseq = {}  # fairseq's own functions, kept for the cases they still handle


def install():
    from fairseq import checkpoint_utils

    if _fairseq:
        return
    _fairseq["torch_persistent_save"] = checkpoint_utils.torch_persistent_save
    _fairseq["load_checkpoint"] = checkpoint_utils.load_checkpoint
    checkpoint_utils.torch_persistent_save = torch_persistent_save
    checkpoint_utils.load_checkpoint = load_checkpoint
    checkpoint_utils.PathManager = _PathManagerWithAtomicCopy(checkpoint_utils.PathManager)
