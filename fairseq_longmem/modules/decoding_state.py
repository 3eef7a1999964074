"""What LongMem keeps between steps of incremental decoding (docs/GENERATION.md): the local
key/value caches of the current segment and the memory each hypothesis reads.

Segment rule: a hypothesis is a stream cut into segments of T tokens exactly as training and
``fairseq-eval-lm`` cut it. Within a segment every token attends to the segment's earlier tokens
(the caches, T slots each); when a segment is full, its backbone layer-m keys/values are written
into the memory and the caches restart. So a step costs O(T + msz), whatever was generated.

Beam rule: every beam reads the prompt's memory plus the segments that beam generated. The
prompt's memory is one bank row per prompt, shared read-only by its beams
(:class:`SharedPromptMemory`), and each beam writes its own segments into a bank of its own,
searched jointly with the prompt's (exact top-k over the union). That split is exact while no
prompt chunk can be evicted (prompt + generated tokens fit in ``--memory-size``) and segments
end on chunk boundaries (T a multiple of ``--chunk-size``); otherwise every beam gets its own
copy of the prompt's memory.
"""

import math
from dataclasses import dataclass
from typing import List, Optional

import torch

from ..families.base import KVCache
from ..memory.bank import ChunkedMemoryBank
from ..memory.interface import Memory, MemoryRetrieval, chunk_means
from ..memory.layered import LayeredMemory
from .memory_attention import read_memory


def chunk_scores(q: torch.Tensor, found: MemoryRetrieval, chunk_size: int) -> torch.Tensor:
    """<q, mean of the chunk's keys> (B, H, T, nk) of each retrieved chunk, -inf where missing:
    the scores the bank ranked them by (its summaries are fp32 means of the same keys)."""
    B, H, T, K, hd = found.keys.shape
    means = chunk_means(found.keys.view(B, H, T, K // chunk_size, chunk_size, hd))  # (B,H,T,nk,hd)
    scores = torch.einsum("bhtd,bhtnd->bhtn", q.float(), means)  # (B, H, T, nk)
    return scores.masked_fill(found.chunk_index < 0, -math.inf)


def merge_retrievals(q, first: MemoryRetrieval, second: MemoryRetrieval, chunk_size: int
                     ) -> MemoryRetrieval:
    """The top nk chunks of the union of two retrievals of nk chunks each, best first: exact,
    since each holds its bank's top nk. ``chunk_index`` of the result is a position in the
    union (``[0, 2 nk)``; -1 missing), not a bank slot."""
    B, H, T, K, hd = first.keys.shape
    nk, S = K // chunk_size, chunk_size
    scores = torch.cat([chunk_scores(q, first, S), chunk_scores(q, second, S)], dim=-1)
    best = scores.topk(nk, dim=-1).indices  # (B, H, T, nk) into the 2 nk candidates

    def pick(a, b):  # (B, H, T, K, ...) twice -> the chosen chunks' tokens (B, H, T, K, ...)
        rest = a.shape[4:]
        both = torch.cat([a.reshape(B, H, T, nk, S, *rest), b.reshape(B, H, T, nk, S, *rest)],
                         dim=3)  # (B, H, T, 2 nk, S, ...)
        index = best.view(B, H, T, nk, *([1] * (1 + len(rest)))).expand(B, H, T, nk, S, *rest)
        return both.gather(3, index).reshape(B, H, T, K, *rest)

    valid = scores.gather(3, best) > -math.inf  # (B, H, T, nk)
    return MemoryRetrieval(keys=pick(first.keys, second.keys),
                           values=pick(first.values, second.values),
                           mask=pick(first.mask, second.mask),
                           chunk_index=torch.where(valid, best, torch.full_like(best, -1)))


class SharedPromptMemory(Memory):
    """The memory of ``beam`` hypotheses per prompt: the prompts' bank (R rows, read-only, shared
    by each prompt's beams: hypothesis n reads prompt row n // beam) and a bank of the segments
    each hypothesis generated (R * beam rows)."""

    def __init__(self, prompt: ChunkedMemoryBank, beam: int, generated: ChunkedMemoryBank):
        if generated.num_rows != prompt.num_rows * beam:
            raise ValueError(f"{generated.num_rows} generated rows for {prompt.num_rows} "
                             f"prompts x {beam} beams")
        self.prompt, self.beam, self.generated = prompt, beam, generated
        self.num_heads, self.chunk_size = prompt.num_heads, prompt.chunk_size

    @property
    def num_rows(self) -> int:
        return self.generated.num_rows

    @property
    def nbytes(self) -> int:
        return self.prompt.nbytes + self.generated.nbytes

    def fill(self) -> torch.Tensor:
        """(R * beam,) searchable tokens per hypothesis: its prompt's plus its own."""
        return self.prompt.fill().repeat_interleave(self.beam) + self.generated.fill()

    def search(self, queries, k: int) -> MemoryRetrieval:
        found = read_memory(self.prompt, queries, k)  # hypothesis n reads row n // beam
        if int(self.generated.fill().sum()) == 0:
            return found
        return merge_retrievals(queries, found, self.generated.search(queries, k),
                                self.prompt.chunk_size)

    def add(self, keys, values, lengths=None):
        self.generated.add(keys, values, lengths=lengths)

    def segments_back(self, slots):
        raise ValueError("a decoding memory keeps no write times: where reads reach is logged "
                         "in training and evaluation only (--memory-reach-buckets)")

    contents_segments_back = segments_back

    def tensors(self):
        return self.prompt.tensors() + self.generated.tensors()

    def select_rows(self, order: torch.Tensor):
        """Hypotheses follow ``order`` (beams of a prompt stay together, in groups of
        ``beam``); the prompts' bank is re-indexed only when prompts drop out of the batch."""
        prompts = order.view(-1, self.beam)[:, 0] // self.beam  # (R',) prompt row of each group
        if prompts.numel() != self.prompt.num_rows or not torch.equal(
                prompts.cpu(), torch.arange(self.prompt.num_rows)):
            self.prompt.select_rows(prompts)
        self.generated.select_rows(order)
        return self


@dataclass
class DecodingState:
    """Per-hypothesis state of incremental decoding: local caches of the current segment (one
    per backbone block and per side block, T slots each; all hold ``pos`` tokens) and the memory
    (None when the model reads none)."""

    backbone: List[KVCache]
    side: List[KVCache]
    memory: Optional[Memory]  # ChunkedMemoryBank, SharedPromptMemory or a LayeredMemory of them

    @property
    def pos(self) -> int:
        """Tokens of the current segment seen so far (0 = a segment starts)."""
        return self.backbone[0].len

    @property
    def num_rows(self) -> int:
        return self.backbone[0].k.size(0)

    @property
    def segment_len(self) -> int:
        """T: the caches' capacity."""
        return self.backbone[0].k.size(2)

    def restart_segment(self):
        for cache in self.backbone + self.side:
            cache.reset()

    def reorder(self, order: torch.Tensor):
        """Every hypothesis takes the state of hypothesis ``order[n]`` (fairseq's new_order)."""
        if order.numel() == self.num_rows and torch.equal(
                order.cpu(), torch.arange(self.num_rows)):
            return  # greedy and sampling keep their rows until a sentence finishes
        for cache in self.backbone + self.side:
            cache.reorder(order)
        if self.memory is not None:
            self.memory.select_rows(order)

    def expand(self, beam: int, new_bank, share: bool):
        """From one row per prompt to ``beam`` rows per prompt (rows p*beam .. p*beam+beam-1
        continue prompt p). ``share``: the prompts' bank stays one row per prompt and a bank of
        ``new_bank(rows)`` takes the beams' segments (module docstring: when that is exact)."""
        if beam == 1:
            return self
        R = self.num_rows
        order = torch.arange(R).repeat_interleave(beam)
        for cache in self.backbone + self.side:
            cache.reorder(order.to(cache.k.device))
        if self.memory is not None:
            if share and isinstance(self.memory, LayeredMemory):  # one shared memory per layer
                generated = new_bank(R * beam)
                self.memory = LayeredMemory.from_banks({
                    i: SharedPromptMemory(self.memory.layer(i), beam, generated.layer(i))
                    for i in self.memory.layers})
            elif share:
                self.memory = SharedPromptMemory(self.memory, beam, new_bank(R * beam))
            else:
                self.memory.select_rows(order)
        return self

    def tensors(self) -> List[torch.Tensor]:
        """Every tensor the state holds (for checks that it does not grow)."""
        out = [t for c in self.backbone + self.side for t in (c.k, c.v)]
        return out + ([] if self.memory is None else self.memory.tensors())
