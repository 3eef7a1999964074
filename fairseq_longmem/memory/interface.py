"""What LongMem's model asks of a memory (:class:`Memory`), the result of a search
(:class:`MemoryRetrieval`) and the one rule by which chunks are ranked (:func:`chunk_means`).

Implemented by :class:`~.bank.ChunkedMemoryBank` (one memory per stream) and by the decoding
state's memory of a prompt shared by its beams; callers go through this interface only.
"""

import abc
from dataclasses import dataclass
from typing import List

import torch


@dataclass
class MemoryRetrieval:
    """Result of :meth:`Memory.search` (storage dtype, storage device)."""

    keys: torch.Tensor  # (B, H, T, k, hd)
    values: torch.Tensor  # (B, H, T, k, hd)
    mask: torch.Tensor  # (B, H, T, k) bool, True = valid memory token
    chunk_index: torch.Tensor  # (B, H, T, k // csz) long chunk slot, -1 = missing


def chunk_means(chunk_keys: torch.Tensor) -> torch.Tensor:
    """(..., csz, hd) -> (..., hd) fp32: the key a chunk is ranked by, <q, mean of its keys>.

    The mean is a sum of x * (1/csz): finite for any finite keys, where sum / csz could overflow;
    equal to mean() up to summation order when csz is a power of two (x / csz is exact)."""
    S = chunk_keys.shape[-2]
    weights = torch.full((S,), 1.0 / S, device=chunk_keys.device)
    return torch.einsum("...sd,s->...d", chunk_keys.float(), weights)


class Memory(abc.ABC):
    """Rows (one per stream or hypothesis) of ``num_heads`` key-value heads, searched by chunks
    of ``chunk_size`` tokens."""

    num_heads: int
    chunk_size: int

    @property
    @abc.abstractmethod
    def num_rows(self) -> int:
        ...

    @abc.abstractmethod
    def fill(self) -> torch.Tensor:
        """(rows,) searchable tokens per row."""

    @abc.abstractmethod
    def add(self, keys, values, lengths=None):
        """Append keys, values (rows, heads, T, hd), the first ``lengths[b]`` tokens of row b."""

    @abc.abstractmethod
    def search(self, queries, k: int) -> MemoryRetrieval:
        """The top ``k // chunk_size`` chunks per (row, head, query) of queries (rows, heads,
        n, hd) by :func:`chunk_means`, best first, expanded to their ``k`` tokens."""

    @abc.abstractmethod
    def select_rows(self, order):
        """Rows follow ``order`` (a beam search's choice); returns self."""

    @abc.abstractmethod
    def segments_back(self, slots: torch.Tensor) -> torch.Tensor:
        """How many ``add`` calls ago (1 = the latest) each retrieved chunk was written."""

    @abc.abstractmethod
    def contents_segments_back(self) -> torch.Tensor:
        """(rows, slots): the same for every stored chunk, -1 for empty slots."""

    @abc.abstractmethod
    def tensors(self) -> List[torch.Tensor]:
        """Every tensor the memory holds (for checks that it does not grow)."""
