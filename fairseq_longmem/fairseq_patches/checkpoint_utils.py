"""Checkpoint writes that survive a kill at any moment, and a resume that steps over a damaged file.

fairseq 0.12 writes the first name of a save through ``<name>.tmp`` and a rename, then *copies*
it in place to the other names (``checkpoint_last.pt``, ``checkpoint_best.pt``), so a SIGKILL
during the copy leaves a truncated ``checkpoint_last.pt`` and the next run dies with a bare
``EOFError``. :func:`install` changes fairseq.checkpoint_utils so that (with
:mod:`fairseq_longmem.checkpoint.files`):

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

import logging
import os

import torch

from ..checkpoint.files import (
    CheckpointResumeError,
    choose_resume_file,
    is_local,
    remove_incomplete,
)
from ..fileio import atomic_copy, atomic_write

logger = logging.getLogger(__name__)


def _resume_path(filename: str, cfg, trainer) -> str:
    """The file to resume from instead of ``filename``: itself when intact. Rank 0 decides and
    tells the other data-parallel ranks, so that all load the same file."""
    # sharded states (FSDP, model parallel) have a file per rank: each rank checks its own
    per_rank = trainer.checkpoint_suffix != (cfg.checkpoint_suffix or "")
    world = trainer.data_parallel_world_size
    if world == 1 or per_rank:
        decision = choose_resume_file(filename, cfg.save_dir, trainer.checkpoint_suffix,
                                      not per_rank)
    else:
        from fairseq.distributed import utils as distributed_utils

        decision = None
        if trainer.data_parallel_rank == 0:
            decision = choose_resume_file(filename, cfg.save_dir, trainer.checkpoint_suffix, True)
        decision = distributed_utils.broadcast_object(
            decision, src_rank=0, group=trainer.data_parallel_process_group,
            dist_device=trainer.device,
        )
    path, error = decision
    if error:
        raise CheckpointResumeError(error)
    return path


def torch_persistent_save(obj, filename, async_write: bool = False):
    """fairseq.checkpoint_utils.torch_persistent_save, written atomically for local files."""
    if async_write or not is_local(filename):
        return _fairseq_originals["torch_persistent_save"](obj, filename, async_write=async_write)
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
        extra_state, epoch_itr = _fairseq_originals["load_checkpoint"](cfg, trainer,
                                                                       **passthrough_args)
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
        self._path_manager = path_manager

    def __getattr__(self, name):
        return getattr(self._path_manager, name)

    def copy(self, src_path: str, dst_path: str, overwrite: bool = False) -> bool:
        if not (is_local(src_path) and is_local(dst_path)):
            return self._path_manager.copy(src_path, dst_path, overwrite)
        if os.path.exists(dst_path) and not overwrite:
            return False
        atomic_copy(src_path, dst_path)
        return True


# fairseq's own functions, which the wrappers call for every case they do not change
_fairseq_originals = {}


def install():
    from fairseq import checkpoint_utils

    if _fairseq_originals:
        return
    _fairseq_originals["torch_persistent_save"] = checkpoint_utils.torch_persistent_save
    _fairseq_originals["load_checkpoint"] = checkpoint_utils.load_checkpoint
    checkpoint_utils.torch_persistent_save = torch_persistent_save
    checkpoint_utils.load_checkpoint = load_checkpoint
    checkpoint_utils.PathManager = _PathManagerWithAtomicCopy(checkpoint_utils.PathManager)
