"""Scoring continuations against a memory that is filled once and then only read: the machinery
of memory-augmented in-context learning (task ``longmem_icl``) and of suffix identification.

Works with a ``longmem_gpt2`` model (memory on or off) and with a plain ``gpt2_lm`` backbone. A
memory here is a :class:`~fairseq_longmem.modules.memory_bank.ChunkedMemoryBank` the caller owns
(``model.decoder.new_memory``), never the model's own per-stream memories; scoring passes it with
``write_memory=False``, so the memory is bit-identical before and after.
"""

import logging
from typing import List, Optional, Sequence

import torch

logger = logging.getLogger(__name__)


def reads_memory(model) -> bool:
    """True for a LongMem model with its memory on (not for gpt2_lm or disable_memory)."""
    decoder = model.decoder
    return hasattr(decoder, "memory_keys_values") and not decoder.cfg.disable_memory


def _device_dtype(model):
    p = next(model.parameters())
    return p.device, p.dtype


def pad_rows(rows: Sequence[torch.Tensor], pad: int):
    """Right-pad 1-D token tensors into (len(rows), longest); returns (tokens, lengths)."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    out = torch.full((len(rows), int(lengths.max())), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out, lengths


@torch.no_grad()
def write_stream(model, memory, stream: torch.Tensor, segment_len: int, pad: int,
                 rows_per_batch: int = 8) -> int:
    """Write ``stream`` (1-D tokens, the model's *input* side, e.g. ``</s> d1 </s> d2 ...``) into
    the one-row ``memory``, as streaming it through the model in ``segment_len``-token segments
    would (positions restart at every segment, chunks run on across segment boundaries), but
    with only the backbone up to the memory layer, ``rows_per_batch`` segments per forward.
    Returns the number of tokens written."""
    if memory.num_rows != 1:
        raise ValueError(f"write_stream fills a one-row memory, got {memory.num_rows} rows")
    device, _ = _device_dtype(model)
    segments = list(torch.split(stream.long(), segment_len))
    for i in range(0, len(segments), rows_per_batch):
        batch = segments[i:i + rows_per_batch]
        tokens, lengths = pad_rows(batch, pad)
        k, v = model.decoder.memory_keys_values(tokens.to(device))  # (R, H, T, hd) each
        R, H, T, hd = k.shape
        n = int(lengths.sum())  # only the last segment of the stream can be short
        k = k.transpose(0, 1).reshape(1, H, R * T, hd)[:, :, :n]  # (1, H, n, hd), stream order
        v = v.transpose(0, 1).reshape(1, H, R * T, hd)[:, :, :n]
        memory.add(k, v)
    return int(stream.numel())


def _features(model, tokens, lengths, memory):
    """Final hidden states (B, T, C) of ``tokens``, reading ``memory`` without writing it."""
    kwargs = dict(src_tokens=tokens, src_lengths=lengths, features_only=True)
    if reads_memory(model):
        if memory is None:
            raise ValueError("a LongMem model with memory on needs a memory to read "
                             "(an empty one gives exactly the memory-off output)")
        kwargs.update(memory=memory, write_memory=False)
    features, _ = model(**kwargs)
    return features


@torch.no_grad()
def next_token_logprobs(model, prompts: torch.Tensor, lengths: torch.Tensor,
                        memory=None) -> torch.Tensor:
    """(B, V) float32 log-probabilities of the token after each right-padded prompt."""
    device, _ = _device_dtype(model)
    x = _features(model, prompts.to(device), lengths.to(device), memory)  # (B, T, C)
    last = x[torch.arange(len(lengths), device=device), lengths.to(device) - 1]  # (B, C)
    return model.decoder.output_layer(last).float().log_softmax(dim=-1)


@torch.no_grad()
def continuation_logprobs(model, prompts: Sequence[torch.Tensor],
                          continuations: Sequence[torch.Tensor], pad: int,
                          memory=None) -> List[List[torch.Tensor]]:
    """Log-probabilities of every continuation after every prompt: ``out[b][c]`` is a float32
    tensor of ``len(continuations[c])`` per-token log-probs of continuation c after prompt b.

    ``memory`` (optional) has 1 row (read by every prompt) or ``len(prompts)`` rows (prompt b
    reads row b). One forward per continuation over all prompts (prompt + continuation minus its
    last token); single-token continuations share one forward over the prompts alone."""
    device, _ = _device_dtype(model)
    B = len(prompts)
    out = [[None] * len(continuations) for _ in range(B)]
    if all(len(c) == 1 for c in continuations):
        tokens, lengths = pad_rows(prompts, pad)
        lp = next_token_logprobs(model, tokens, lengths, memory)  # (B, V)
        ids = torch.stack([c[0] for c in continuations]).to(device)
        for b in range(B):
            for c in range(len(continuations)):
                out[b][c] = lp[b, ids[c]].view(1).cpu()
        return out
    for c, cont in enumerate(continuations):
        rows = [torch.cat([p, cont[:-1]]) for p in prompts]
        tokens, lengths = pad_rows(rows, pad)
        x = _features(model, tokens.to(device), lengths.to(device), memory)  # (B, T, C)
        for b, p in enumerate(prompts):
            positions = torch.arange(len(p) - 1, len(p) - 1 + len(cont), device=device)
            lp = model.decoder.output_layer(x[b, positions]).float().log_softmax(dim=-1)
            out[b][c] = lp.gather(1, cont.to(device).view(-1, 1)).view(-1).cpu()
    return out


def memory_size_for(num_tokens: int, chunk_size: int, retrieved_tokens: int) -> int:
    """Smallest memory size holding ``num_tokens`` in whole chunks and at least the
    ``retrieved_tokens`` a query asks for."""
    chunks = -(-max(num_tokens, retrieved_tokens) // chunk_size)
    return chunks * chunk_size


def describe_memory(memory) -> Optional[str]:
    if memory is None:
        return None
    return f"{int(memory.fill()[0]):,} tokens (+{int(memory.staged()[0])} staged)"
