"""Scoring continuations against a memory that is filled once and then only read: the machinery
of memory-augmented in-context learning (task ``longmem_icl``) and of suffix identification.

Works with a ``longmem_gpt2`` model (memory on or off) and with a plain ``gpt2_lm`` backbone. A
memory here is a :class:`~fairseq_longmem.memory.bank.ChunkedMemoryBank` the caller owns
(``model.decoder.new_memory``), never the model's own per-stream memories; scoring passes it with
``write_memory=False``, so the memory is bit-identical before and after.
"""

import hashlib
import logging
from typing import List, Sequence

import torch

logger = logging.getLogger(__name__)


def reads_memory(model) -> bool:
    """True for a LongMem model with its memory on (not for gpt2_lm or disable_memory)."""
    decoder = model.decoder
    return hasattr(decoder, "memory_keys_values") and not decoder.cfg.disable_memory


def backbone_digest(backbone) -> str:
    """16 hex digits of sha256 over the backbone's weights as loaded (names and bytes, in this
    dtype): what a saved memory's keys and values depend on."""
    digest = hashlib.sha256()
    for name, p in backbone.state_dict().items():
        digest.update(name.encode())
        digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _device(model) -> torch.device:
    return next(model.parameters()).device


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
    device = _device(model)
    segments = list(torch.split(stream.long(), segment_len))
    for i in range(0, len(segments), rows_per_batch):
        batch = segments[i:i + rows_per_batch]
        tokens, lengths = pad_rows(batch, pad)
        # (R, H, T, hd) each; (layers, R, H, T, hd) for the training-free read's memories
        k, v = model.decoder.memory_keys_values(tokens.to(device))
        *lead, R, H, T, hd = k.shape
        n = int(lengths.sum())  # only the last segment of the stream can be short

        def in_stream_order(t):  # -> (..., 1, H, n, hd)
            return t.transpose(-4, -3).reshape(*lead, 1, H, R * T, hd)[..., :n, :]

        memory.add(in_stream_order(k), in_stream_order(v))
    return int(stream.numel())


@torch.no_grad()
def write_streams(model, memory, streams: Sequence[torch.Tensor], segment_len: int, pad: int):
    """Write ``streams[r]`` into row r of ``memory`` (one row per stream), segment by segment as
    the model streams documents: forward s carries segment s of every stream still running."""
    if memory.num_rows != len(streams):
        raise ValueError(f"{len(streams)} streams for a memory of {memory.num_rows} rows")
    device = _device(model)
    longest = max((len(s) for s in streams), default=0)
    for start in range(0, longest, segment_len):
        segs = [s[start:start + segment_len].long() for s in streams]
        tokens, lengths = pad_rows([seg if len(seg) else seg.new_tensor([pad]) for seg in segs],
                                   pad)
        lengths = torch.tensor([len(seg) for seg in segs])
        k, v = model.decoder.memory_keys_values(tokens.to(device))  # (R, H, T, hd)
        memory.add(k, v, lengths=lengths)


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
    device = _device(model)
    x = _features(model, prompts.to(device), lengths.to(device), memory)  # (B, T, C)
    last = x[torch.arange(len(lengths), device=device), lengths.to(device) - 1]  # (B, C)
    return model.decoder.output_layer(last).float().log_softmax(dim=-1)


@torch.no_grad()
def continuation_logprobs(model, prompts: Sequence[torch.Tensor],
                          continuations: Sequence[Sequence[torch.Tensor]], pad: int,
                          memory=None) -> List[List[torch.Tensor]]:
    """Log-probabilities of continuations after prompts: ``continuations[b]`` are prompt b's
    candidates (the same number for every prompt), and ``out[b][c]`` is a float32 tensor of the
    per-token log-probs of ``continuations[b][c]`` after prompt b.

    ``memory`` (optional) has 1 row (read by every prompt) or ``len(prompts)`` rows (prompt b
    reads row b). One forward per candidate index over all prompts (prompt + candidate minus its
    last token); when every candidate is one token, one forward over the prompts alone."""
    device = _device(model)
    B, C = len(prompts), len(continuations[0])
    if any(len(cands) != C for cands in continuations):
        raise ValueError("every prompt needs the same number of candidates")
    out = [[None] * C for _ in range(B)]
    if all(len(c) == 1 for cands in continuations for c in cands):
        tokens, lengths = pad_rows(prompts, pad)
        lp = next_token_logprobs(model, tokens, lengths, memory)  # (B, V)
        for b in range(B):
            for c in range(C):
                out[b][c] = lp[b, continuations[b][c]].cpu()
        return out
    for c in range(C):
        rows = [torch.cat([p, cands[c][:-1]]) for p, cands in zip(prompts, continuations)]
        tokens, lengths = pad_rows(rows, pad)
        x = _features(model, tokens.to(device), lengths.to(device), memory)  # (B, T, C)
        for b, p in enumerate(prompts):
            cont = continuations[b][c].to(device)
            positions = torch.arange(len(p) - 1, len(p) - 1 + len(cont), device=device)
            lp = model.decoder.output_layer(x[b, positions]).float().log_softmax(dim=-1)
            out[b][c] = lp.gather(1, cont.view(-1, 1)).view(-1).cpu()
    return out


def memory_size_for(num_tokens: int, chunk_size: int, retrieved_tokens: int) -> int:
    """Smallest memory size holding ``num_tokens`` in whole chunks and at least the
    ``retrieved_tokens`` a query asks for."""
    chunks = -(-max(num_tokens, retrieved_tokens) // chunk_size)
    return chunks * chunk_size
