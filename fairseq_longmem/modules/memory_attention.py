"""LongMem's memory-reading joint attention (docs/DESIGN.md, section 1), built on any family's own
attention class, and the read of a memory by query heads (``read_memory``).

Per-head tensors are B x H x T x hd for the H query heads; the memory holds Hkv key-value heads
(Hkv = H without grouped-query attention), and the H / Hkv query heads of one key-value head are
folded onto it for the search and the read.
"""

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..buckets import segments_back_bucket
from ..families.base import KVCache
from ..memory.interface import Memory, MemoryRetrieval


@dataclass
class MemoryReadStats:
    """Detached figures about one memory read, for the logs."""

    gate: torch.Tensor  # mean sigmoid(g_h) over heads
    memory_share: torch.Tensor  # mean share of attention mass on memory over (B, H, T)
    # with reach buckets: {"mass": (H, nb) memory-attention mass summed over the queries that
    # read memory, "chunks": (H, nb) retrieved chunks counted} by segments back of the chunk,
    # and "stored": (nb,) the share of the memory's chunks in each bucket, summed over the same
    # (query, head) pairs: where reads would land if they picked stored chunks at random
    reach: Optional[Dict[str, torch.Tensor]] = None


def reach_of_read(probs, found, has_mem, memory: Memory, buckets: Sequence[Tuple[int, float]]):
    """Memory-attention mass and retrieved chunks per head by how many segments back their chunk
    was written, in ``buckets`` (from ``parse_segment_buckets``, e.g. "1,4,16": 1, 2-4, 5-16, 17+)."""
    B, H, T, K = probs.shape
    nk = found.chunk_index.shape[-1]
    nb = len(buckets)
    back = memory.segments_back(found.chunk_index)  # (B, H, T, nk)
    bucket = segments_back_bucket(back, buckets)  # (B, H, T, nk) in [0, nb)
    valid = (found.chunk_index >= 0) & has_mem  # (B, H, T, nk)
    mass = probs.float().view(B, H, T, nk, K // nk).sum(-1) * valid  # (B, H, T, nk)
    index = (torch.arange(H, device=back.device).view(1, H, 1, 1) * nb + bucket).flatten()
    per_mass = torch.zeros(H * nb, device=back.device).index_add_(0, index, mass.flatten())
    per_chunks = torch.zeros(H * nb, device=back.device).index_add_(
        0, index, valid.float().flatten())
    # chance: the memory's contents by bucket, per memory row, weighted by the (query, head)
    # pairs of the batch rows that read that row and found something
    contents = memory.contents_segments_back()  # (R, C), -1 for empty slots
    in_bucket = F.one_hot(segments_back_bucket(contents, buckets), nb) * (contents > 0)[..., None]
    counts = in_bucket.sum(1).float()  # (R, nb)
    shares = counts / counts.sum(-1, keepdim=True).clamp_min(1)
    readers = has_mem.expand(B, H, T, 1).float().sum(dim=(1, 2, 3))  # (B,)
    stored = (shares.repeat_interleave(B // contents.shape[0], 0) * readers[:, None]).sum(0)
    return {"mass": per_mass.view(H, nb), "chunks": per_chunks.view(H, nb), "stored": stored}


def read_memory(memory: Memory, q, retrieved_tokens: int) -> MemoryRetrieval:
    """Search ``memory`` (R rows, Hkv heads) with the queries q (B, H, T, hd), R dividing B and
    Hkv dividing H; returns what each query head retrieved, (B, H, T, K, ...).

    Batch row b reads memory row ``b // (B // R)``: R = B is the usual one memory per stream;
    R = 1 lets every row read the same memory (the demonstrations of in-context learning) and
    R < B lets consecutive rows share one (the candidates of one example). Query heads
    h * g .. h * g + g - 1 (g = H / Hkv) read key-value head h. Sharing rows and grouped heads
    are folded into the query axis, so each memory row and head is searched once, never copied."""
    B, H, T, hd = q.shape
    R, Hkv = memory.num_rows, memory.num_heads
    if B % R:
        raise ValueError(
            f"a memory of {R} rows cannot serve a batch of {B} rows: the batch size must be a "
            "multiple of the memory's rows"
        )
    if H % Hkv:
        raise ValueError(f"a memory of {Hkv} heads cannot serve {H} query heads")
    n, g = B // R, H // Hkv
    if n == 1 and g == 1:
        return memory.search(q, retrieved_tokens)
    folded = (q.view(R, n, Hkv, g, T, hd).permute(0, 2, 1, 3, 4, 5)
              .reshape(R, Hkv, n * g * T, hd))  # (R, Hkv, n*g*T, hd)
    found = memory.search(folded, retrieved_tokens)

    def unfold(t):  # (R, Hkv, n*g*T, ...) -> (B, H, T, ...)
        rest = t.shape[3:]
        return (t.view(R, Hkv, n, g, T, *rest).permute(0, 2, 1, 3, 4, *range(5, 5 + len(rest)))
                .reshape(B, H, T, *rest))

    return MemoryRetrieval(keys=unfold(found.keys), values=unfold(found.values),
                           mask=unfold(found.mask), chunk_index=unfold(found.chunk_index))


class JointAttentionMixin:
    """Causal local attention mixed per head with attention over retrieved memory tokens, on top
    of a family's attention class (its ``project_qkv``, ``local_attention``, ``memory_queries``
    and ``merge_heads``; its parameter names, so a copy of a backbone layer loads as it is).

    ``A = (1 - sigmoid(g_h)) * A_local + sigmoid(g_h) * A_mem`` for a query that retrieved at
    least one memory token, and ``A = A_local`` for one that retrieved none (an empty memory, or
    the first segment of a document): an empty memory then gives exactly the memory-off output.
    With ``delta`` (``--sidenet-init read-delta``) the layer adds only what the memory changes,
    ``A = sigmoid(g_h) * (A_mem - A_local)`` where the query retrieved something and 0 elsewhere,
    memory off included.
    Returns the output and, beside it, the :class:`MemoryReadStats` of the read (None without a
    memory), where the family's attention returns its keys and values.
    """

    def __init__(self, dims):
        super().__init__(dims)
        self.gate = nn.Parameter(torch.zeros(dims.num_heads))
        # the gate's logit is gate * gate_scale: Adam moves a parameter by about lr per update
        # whatever its gradient's size, so the scale multiplies the gate's learning rate
        self.gate_scale = 1.0
        self.delta = False  # A = g * (A_mem - A_local) (see the class docstring)
        self.reach_buckets: Sequence[Tuple[int, float]] = ()  # where reads reach (reach_of_read)
        # "gated": the paper's mixture above; "joint": one softmax over the retrieved tokens and
        # the local context (joint_read), the gate's logit added to the memory tokens' scores
        self.read_mode = "gated"

    def forward(self, x, memory: Optional[Memory] = None, retrieved_tokens: int = 0,
                cache: Optional[KVCache] = None
                ) -> Tuple[torch.Tensor, Optional[MemoryReadStats]]:
        q, k, v = self.project_qkv(x)  # (B, H, T, hd), (B, Hkv, T, hd) x 2
        if self.read_mode == "joint":
            return self.joint_forward(q, k, v, cache, memory, retrieved_tokens)
        local = self.local_attention(q, k, v, cache)  # (B, H, T, hd)
        if memory is None:
            # delta: nothing to add; "local * 0" keeps the block's parameters in the graph, so that
            # data-parallel training with memory off still sees a (zero) gradient for each
            return self.merge_heads(local * 0 if self.delta else local), None

        q = self.memory_queries(q)
        found = read_memory(memory, q, retrieved_tokens)  # detached, in the memory's dtype
        mem_k = found.keys.to(q.dtype)  # (B, H, T, K, hd)
        mem_v = found.values.to(q.dtype)  # (B, H, T, K, hd)
        scores = torch.einsum("bhtd,bhtkd->bhtk", q, mem_k) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(~found.mask, torch.finfo(scores.dtype).min)
        probs = F.softmax(scores, dim=-1)  # (B, H, T, K)
        read_probs = probs
        if self.training and self.attention_dropout > 0:
            probs = F.dropout(probs, p=self.attention_dropout)
        mem_out = torch.einsum("bhtk,bhtkd->bhtd", probs, mem_v)  # (B, H, T, hd)

        has_mem = found.mask.any(dim=-1, keepdim=True)  # (B, H, T, 1)
        g = torch.sigmoid(self.gate * self.gate_scale).to(q.dtype).view(1, -1, 1, 1)  # (1, H, 1, 1)
        # torch.where keeps the gate in the graph even when nothing was found, so data-parallel
        # training sees a (zero) gradient for it on every step
        if self.delta:
            out = torch.where(has_mem, g * (mem_out - local), torch.zeros_like(local))
        else:
            out = torch.where(has_mem, (1 - g) * local + g * mem_out, local)
        with torch.no_grad():
            share = (g * has_mem).float()  # (B, H, T, 1)
            stats = MemoryReadStats(gate=g.float().mean(), memory_share=share.mean())
            if self.reach_buckets:
                stats.reach = reach_of_read(read_probs, found, has_mem, memory, self.reach_buckets)
        return self.merge_heads(out), stats

    def joint_forward(self, q, k, v, cache, memory: Optional[Memory], retrieved_tokens: int):
        """``read_mode == "joint"``: :func:`joint_read` with the gate's logit as the memory
        tokens' log-weight (0: the frozen layer's own attention over memory and context, as the
        training-free read); with no memory, or an empty one, the layer's own attention."""
        bias = self.gate * self.gate_scale  # (H,)
        if memory is None or not bool(memory.fill().any()):
            # "+ 0 * bias" keeps the gate in the graph (data-parallel training sees its gradient)
            out = self.local_attention(q, k, v, cache) + 0 * bias.sum()
            stats = None if memory is None else MemoryReadStats(
                gate=torch.sigmoid(bias.detach()).float().mean(),
                memory_share=torch.zeros((), device=q.device))
            return self.merge_heads(out), stats
        out, probs, found, has_mem = joint_read(self, q, k, v, cache, memory, retrieved_tokens,
                                                memory_bias=bias)
        with torch.no_grad():
            stats = MemoryReadStats(gate=torch.sigmoid(bias.detach()).float().mean(),
                                    memory_share=probs.float().sum(-1).mean())
            if self.reach_buckets:
                stats.reach = reach_of_read(probs, found, has_mem, memory, self.reach_buckets)
        return self.merge_heads(out), stats


def joint_read(attn, q, k, v, cache: Optional[KVCache], memory: Memory, retrieved_tokens: int,
               memory_bias: Optional[torch.Tensor] = None):
    """One softmax over the tokens ``attn`` (a family's attention) retrieves from ``memory`` and
    its causal local context together, every retrieved token placed ``attn.memory_distance``
    positions before its query (rotary families; GPT-2's keys carry no position): the frozen
    layer's own attention, extended to the memory. ``memory_bias`` (H,) is added to the scores of
    the memory tokens (a per-head log-weight; None: 0). Returns the heads' output
    (B, H, n, hd), the probabilities on the K memory tokens (B, H, n, K), the retrieval and, per
    query, whether it retrieved anything (B, H, n, 1). A query that retrieved nothing attends
    as the layer alone."""
    mq = attn.memory_queries(q)
    found = read_memory(memory, mq, retrieved_tokens)  # (B, H, n, K, ...)
    ql, kl, vl, past = attn.positioned(q, k, v, cache)  # kl, vl (B, H, past + n, hd)
    n, scale = q.size(2), 1.0 / math.sqrt(attn.head_dim)
    neg = torch.finfo(q.dtype).min
    local = torch.matmul(ql, kl.transpose(-1, -2)) * scale  # (B, H, n, past + n)
    allowed = (torch.arange(n, device=q.device)[:, None] + past
               >= torch.arange(past + n, device=q.device)[None, :])
    local = local.masked_fill(~allowed, neg)
    mem = torch.einsum("bhtd,bhtkd->bhtk", mq, found.keys.to(q.dtype)) * scale
    if memory_bias is not None:
        mem = mem + memory_bias.to(mem.dtype).view(1, -1, 1, 1)
    mem = mem.masked_fill(~found.mask, neg)  # (B, H, n, K)
    probs = F.softmax(torch.cat([mem, local], dim=-1).float(), dim=-1).to(q.dtype)
    K = mem.size(-1)
    if attn.training and attn.attention_dropout > 0:
        probs = F.dropout(probs, p=attn.attention_dropout)
    out = (torch.einsum("bhtk,bhtkd->bhtd", probs[..., :K], found.values.to(q.dtype))
           + torch.matmul(probs[..., K:], vl))  # (B, H, n, hd)
    return out, probs[..., :K], found, found.mask.any(dim=-1, keepdim=True)


class FreeReadMixin:
    """A frozen backbone layer's own attention reading a memory without training (the
    training-free read, InfLLM's idea; :func:`joint_read`). No parameter of its own, so the
    backbone's weights load as they are. A read that finds nothing in memory (an empty memory, a
    document's first segment) gives exactly the layer's own output. Returns the output and the
    layer's keys and values (what the memory stores), as the family's attention."""

    def forward(self, x, memory: Optional[Memory] = None, retrieved_tokens: int = 0,
                cache: Optional[KVCache] = None):
        q, k, v = self.project_qkv(x)  # (B, H, n, hd), (B, Hkv, n, hd) x 2
        if memory is None or not bool(memory.fill().any()):
            return self.merge_heads(self.local_attention(q, k, v, cache)), (k, v)
        out, _, _, _ = joint_read(self, q, k, v, cache, memory, retrieved_tokens)
        return self.merge_heads(out), (k, v)


_VARIANTS = {}


def _variant(mixin: type, attention: type, prefix: str) -> type:
    if (mixin, attention) not in _VARIANTS:
        _VARIANTS[mixin, attention] = type(f"{prefix}{attention.__name__}", (mixin, attention), {})
    return _VARIANTS[mixin, attention]


def joint_attention_class(attention: type) -> type:
    """The memory-reading variant of a family's attention class (one class per family)."""
    return _variant(JointAttentionMixin, attention, "Joint")


def free_read_attention_class(attention: type) -> type:
    """The training-free reading variant of a family's attention class (:class:`FreeReadMixin`)."""
    return _variant(FreeReadMixin, attention, "FreeRead")
