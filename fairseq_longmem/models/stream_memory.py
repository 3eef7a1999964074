"""The per-stream memories a decoder keeps for ``--task longmem_lm`` (one row per stream), shared
by LongMem and the training-free read: one memory per mode, so that validation never reads
training text, cleared row by row where a batch starts a new document."""

import logging
from typing import Optional

import torch

logger = logging.getLogger(__name__)

MODES = ("train", "eval")  # one stream memory each, so that validation never reads training text


class StreamMemoryMixin:
    """For a decoder with ``new_memory(num_rows, memory_size, template)`` and ``cfg.memory_size``:
    the mode's stream memory, built at its first batch (never part of the state dict)."""

    def init_stream_memories(self):
        self._memories = {}  # mode -> stream memory
        self._warned_no_flags = False

    def stream_memory(self, mode: str):
        """The memory this model keeps for its streams in ``mode`` ("train" or "eval"): what
        ``forward`` reads and extends when it is given no ``memory``; None before the first
        batch of that mode, after :meth:`reset_memory`, and with ``disable_memory``."""
        if mode not in MODES:
            raise ValueError(f"stream_memory: mode {mode!r}, expected one of {MODES}")
        return self._memories.get(mode)

    def reset_memory(self):
        """Forget every stream's memory (both modes)."""
        self._memories = {}

    def _batch_memory(self, num_rows: int, template: torch.Tensor):
        """The current mode's stream memory, built for ``num_rows`` rows on ``template``'s device
        and in its dtype at the first batch, reset (with a warning) when the batch size changes."""
        mode = "train" if self.training else "eval"
        bank = self._memories.get(mode)
        if bank is None or bank.device != template.device or bank.dtype != template.dtype:
            bank = self.new_memory(num_rows, self.cfg.memory_size, template)
            self._memories[mode] = bank
        elif bank.num_rows != num_rows:
            logger.warning(
                "batch size changed from %d to %d rows: the %s memory is reset",
                bank.num_rows, num_rows, mode,
            )
            bank.resize_rows(num_rows)
        return bank

    def stream_batch_memory(self, num_rows: int, template: torch.Tensor,
                            new_document: Optional[torch.Tensor]):
        """The stream memory for this batch, its rows flagged in ``new_document`` cleared."""
        bank = self._batch_memory(num_rows, template)
        if new_document is not None:
            rows = new_document.nonzero().flatten()
            if rows.numel():
                bank.clear(rows)
        elif not self._warned_no_flags:
            logger.warning(
                "batch has no new_document flags: every row is taken to continue its stream "
                "(use --task longmem_lm, which streams documents and sets them)"
            )
            self._warned_no_flags = True
        return bank
