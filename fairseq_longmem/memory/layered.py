"""One memory bank per reading layer, for the training-free read (the frozen backbone's own layers
read the memory; :mod:`fairseq_longmem.models.training_free`) and for LongMem with several memory
layers (``--read-layers``).

Each reading layer stores its own keys and values (position-free, per key-value head) and searches
them with its own queries, as InfLLM does; the banks are written together, one segment at a time,
so they always hold the same tokens. Callers that handle a LongMem bank (the stream memories of
evaluation, in-context learning's demonstration memory) handle this one the same way: ``add``
takes the layers' keys and values stacked on a leading axis. Saved and loaded as one file
(:mod:`.file_format`: every layer's bank, each under its layer's name).
"""

import copy
from typing import Dict, Optional, Sequence

import torch

from . import file_format as memory_file
from .bank import ChunkedMemoryBank
from .interface import Memory


class LayeredMemory:
    """``layers`` (backbone block indices) -> a :class:`ChunkedMemoryBank` each, same rows."""

    def __init__(self, layers: Sequence[int], **bank_options):
        if not layers:
            raise ValueError("LayeredMemory: no reading layer")
        self.layers = tuple(layers)
        self.banks: Dict[int, ChunkedMemoryBank] = {
            i: ChunkedMemoryBank(**bank_options) for i in self.layers}

    @classmethod
    def from_banks(cls, banks: Dict[int, "Memory"]) -> "LayeredMemory":
        """A layered memory of the given memories (layer -> memory with the same rows), e.g. a
        beam search's shared prompt memories, one per layer."""
        memory = cls.__new__(cls)
        memory.layers = tuple(sorted(banks))
        memory.banks = dict(banks)
        return memory

    def tensors(self):
        """Every tensor the memory holds (for checks that it does not grow)."""
        return [t for i in self.layers for t in self.banks[i].tensors()]

    def layer(self, i: int) -> ChunkedMemoryBank:
        return self.banks[i]

    def shared_search(self, every: int) -> Dict[int, Memory]:
        """Layer -> the memory that layer reads in one forward pass when the reading layers
        search in groups (``--search-every``): the layers in groups of ``every`` consecutive
        ones, bottom up; the lowest of a group searches its bank with its own queries, and the
        group's other layers read the chunks that search chose from their own banks (the same
        token positions: the banks hold the same tokens). One search per group instead of one
        per layer. The lowest layer of a group must search before the others read: layers read
        bottom up, as a forward pass runs. ``every`` 1: each layer searches its own bank."""
        if not is_search_every(every):
            raise ValueError(f"--search-every must be an integer >= 1, got {every!r}")
        if every == 1:
            return dict(self.banks)
        views: Dict[int, Memory] = {}
        for g in range(0, len(self.layers), every):
            group = self.layers[g:g + every]
            search = _SharedSearch(group)
            views.update({i: _SearchGroupLayer(self.banks[i], search, i) for i in group})
        return views

    @property
    def _first(self) -> ChunkedMemoryBank:
        return self.banks[self.layers[0]]

    @property
    def num_rows(self) -> int:
        return self._first.num_rows

    @property
    def device(self) -> torch.device:
        return self._first.device

    @property
    def dtype(self) -> torch.dtype:
        return self._first.dtype

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.banks.values())

    @property
    def num_heads(self) -> int:
        return self._first.num_heads

    @property
    def chunk_size(self) -> int:
        return self._first.chunk_size

    @property
    def memory_size(self) -> int:
        return self._first.memory_size

    def staged(self) -> torch.LongTensor:
        """(B,) tokens held back until their chunk is complete (the same in every layer's bank)."""
        return self._first.staged()

    def fill(self) -> torch.LongTensor:
        """(B,) searchable tokens per row (the same in every layer's bank)."""
        return self._first.fill()

    def clear(self, rows=None):
        for b in self.banks.values():
            b.clear(rows)

    def resize_rows(self, num_rows: int):
        for b in self.banks.values():
            b.resize_rows(num_rows)

    def select_rows(self, order):
        for b in self.banks.values():
            b.select_rows(order)
        return self

    def add(self, keys, values, lengths=None):
        """keys, values: (layers, B, Hkv, T, hd), in the order of ``self.layers``."""
        if keys.dim() != 5 or keys.shape[0] != len(self.layers) or values.shape != keys.shape:
            raise ValueError(
                f"LayeredMemory.add: expected keys and values of shape ({len(self.layers)}, B, "
                f"Hkv, T, hd), one per reading layer; got {tuple(keys.shape)} and "
                f"{tuple(values.shape)}")
        for n, i in enumerate(self.layers):
            self.banks[i].add(keys[n], values[n], lengths=lengths)

    def __copy__(self) -> "LayeredMemory":
        """A copy whose banks are copies (``copy.copy(memory).select_rows(...)`` leaves this one
        as it is, as it does for a single bank)."""
        return LayeredMemory.from_banks({i: copy.copy(b) for i, b in self.banks.items()})

    @property
    def fingerprint(self) -> str:
        """What a saved file must carry to be loaded (the same in every layer's bank)."""
        return self._first.fingerprint

    @fingerprint.setter
    def fingerprint(self, value: str):
        for b in self.banks.values():
            b.fingerprint = value

    def _banks_with_files(self):
        banks = [self.banks[i] for i in self.layers]
        if not all(isinstance(b, ChunkedMemoryBank) for b in banks):
            raise ValueError("LayeredMemory: only a memory of ChunkedMemoryBanks is saved or "
                             "loaded (a beam search's shared prompt memories are not)")
        return banks

    def save(self, path, rows=None, overwrite: bool = False):
        """Every layer's bank, the given rows (None = all), in one file ``path`` (atomic; refuses
        an existing file unless ``overwrite``)."""
        banks = self._banks_with_files()
        first = banks[0]
        memory_file.save(path, first._config(), first.dtype, self.fingerprint,
                         {i: b._saved_rows(rows) for i, b in zip(self.layers, banks)},
                         overwrite, layers=self.layers)

    def load(self, path, rows=None):
        """Load a file saved by :meth:`save` with the same layers into ``rows`` (None = all) of
        every layer's bank. Every layer is validated before any is written: a refused file leaves
        the memory as it was."""
        banks = self._banks_with_files()
        idx = banks[0]._rows(rows)
        saved = memory_file.load(path, banks[0]._config(), self.fingerprint, len(idx),
                                 layers=self.layers)
        for i, b in zip(self.layers, banks):
            b._put_rows(idx, saved[i])


def is_search_every(every) -> bool:
    """Whether ``every`` is a valid number of memory layers per search: an int >= 1 (not a bool).
    The one check behind --search-every and --free-search-every; each caller words its error."""
    return isinstance(every, int) and not isinstance(every, bool) and every >= 1


class _SharedSearch:
    """What the lowest layer of a group found, for the group's other layers (one forward)."""

    def __init__(self, group: Sequence[int]):
        self.leader = group[0]
        self.slots: Optional[torch.Tensor] = None
        self.key = None
        self.capacity = None  # the leader bank's chunk slots

    def record(self, slots: torch.Tensor, queries_shape, k: int, capacity):
        self.slots, self.key, self.capacity = slots, (tuple(queries_shape), k), capacity

    def take(self, layer: int, queries_shape, k: int) -> torch.Tensor:
        if self.slots is None:
            raise RuntimeError(f"shared search: layer {layer} reads before layer {self.leader} "
                               "searched (the layers of a group must read bottom up)")
        if self.key != (tuple(queries_shape), k):
            raise RuntimeError(f"shared search: layer {layer} asks with queries "
                               f"{tuple(queries_shape)} and k={k}, layer {self.leader} searched "
                               f"with {self.key[0]} and k={self.key[1]}")
        return self.slots


class _SearchGroupLayer:
    """One layer's bank within a search group: the group's lowest layer searches and records
    the chunks it chose; the others read those chunks from their own bank. Every other method is
    the bank's."""

    def __init__(self, bank: Memory, search: _SharedSearch, layer: int):
        self._bank, self._search, self._layer = bank, search, layer

    def __getattr__(self, name):
        return getattr(self._bank, name)

    def search(self, queries, k: int):
        if self._layer == self._search.leader:
            found = self._bank.search(queries, k)
            self._search.record(found.chunk_index, queries.shape, k,
                                getattr(self._bank, "capacity", None))
            return found
        if not hasattr(self._bank, "gather"):
            raise ValueError("a shared search (--search-every > 1) reads banks that can gather "
                             f"chunks by slot; {type(self._bank).__name__} cannot")
        slots = self._search.take(self._layer, queries.shape, k)
        # slots a search of a bank as large as this one returned lie in range by construction:
        # no range check, which costs two host syncs per follower on CUDA
        return self._bank.gather(slots, check_range=self._search.capacity != self._bank.capacity)
