"""LongMem's residual SideNet and its memory-reading joint attention (docs/DESIGN.md, section 1).

The SideNet runs beside a frozen GPT-2 backbone: side layer i takes the previous side state plus
the backbone's change over its ``r`` layers, and one side layer reads the long-term memory.
Layout is B x T x C; per-head tensors are B x H x T x hd.
"""

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..memory.bank import MemoryRetrieval
from .gpt2 import Block, CausalSelfAttention, GPT2Backbone, GPT2Dims, KVCache


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

# SideNet initialisations (--sidenet-init): "paper" copies backbone blocks as they are;
# "zero-out" also zeroes every side block's output projections (attention and MLP c_proj), so
# that each block adds nothing and, through the cross-network residual, the SideNet's output is
# the backbone's at the start (up to the rounding of h_0 + (h_2 - h_0) + ...)
SIDENET_INITS = ("paper", "zero-out")


def reach_of_read(probs, found, has_mem, memory, reach_edges: Sequence[int]):
    """Memory-attention mass and retrieved chunks per head by how many segments back their chunk
    was written, bucketed at ``reach_edges`` (e.g. (1, 4, 16): 1, 2-4, 5-16, 17+)."""
    B, H, T, K = probs.shape
    nk = found.chunk_index.shape[-1]
    nb = len(reach_edges) + 1
    back = memory.segments_back(found.chunk_index)  # (B, H, T, nk)
    edges = torch.tensor(list(reach_edges), device=back.device)
    bucket = torch.bucketize(back, edges)  # (B, H, T, nk) in [0, nb)
    valid = (found.chunk_index >= 0) & has_mem  # (B, H, T, nk)
    mass = probs.float().view(B, H, T, nk, K // nk).sum(-1) * valid  # (B, H, T, nk)
    index = (torch.arange(H, device=back.device).view(1, H, 1, 1) * nb + bucket).flatten()
    per_mass = torch.zeros(H * nb, device=back.device).index_add_(0, index, mass.flatten())
    per_chunks = torch.zeros(H * nb, device=back.device).index_add_(
        0, index, valid.float().flatten())
    # chance: the memory's contents by bucket, per memory row, weighted by the (query, head)
    # pairs of the batch rows that read that row and found something
    contents = memory.contents_segments_back()  # (R, C), -1 for empty slots
    in_bucket = F.one_hot(torch.bucketize(contents, edges), nb) * (contents > 0)[..., None]
    counts = in_bucket.sum(1).float()  # (R, nb)
    shares = counts / counts.sum(-1, keepdim=True).clamp_min(1)
    readers = has_mem.expand(B, H, T, 1).float().sum(dim=(1, 2, 3))  # (B,)
    stored = (shares.repeat_interleave(B // contents.shape[0], 0) * readers[:, None]).sum(0)
    return {"mass": per_mass.view(H, nb), "chunks": per_chunks.view(H, nb), "stored": stored}


def read_memory(memory, q, retrieved_tokens: int):
    """Search ``memory`` (R rows) with the queries q (B, H, T, hd), R dividing B: batch row b
    reads memory row ``b // (B // R)``. R = B is the usual one memory per stream; R = 1 lets
    every row read the same memory (the demonstrations of in-context learning) and R < B lets
    consecutive rows share one (the candidates of one example). Sharing rows are folded into
    the query axis, so each memory row is searched once and never copied."""
    B, H, T, hd = q.shape
    R = memory.num_rows
    if R == B:
        return memory.search(q, retrieved_tokens)
    if B % R:
        raise ValueError(
            f"a memory of {R} rows cannot serve a batch of {B} rows: the batch size must be a "
            "multiple of the memory's rows"
        )
    n = B // R
    folded = q.view(R, n, H, T, hd).transpose(1, 2).reshape(R, H, n * T, hd)  # (R, H, n*T, hd)
    found = memory.search(folded, retrieved_tokens)

    def unfold(t):  # (R, H, n*T, ...) -> (B, H, T, ...)
        rest = t.shape[3:]
        return t.view(R, H, n, T, *rest).transpose(1, 2).reshape(B, H, T, *rest)

    return MemoryRetrieval(keys=unfold(found.keys), values=unfold(found.values),
                           mask=unfold(found.mask), chunk_index=unfold(found.chunk_index))


class JointAttention(CausalSelfAttention):
    """Causal local attention mixed per head with attention over retrieved memory tokens.

    ``A = (1 - sigmoid(g_h)) * A_local + sigmoid(g_h) * A_mem`` for a query that retrieved at
    least one memory token, and ``A = A_local`` for one that retrieved none (an empty memory, or
    the first segment of a document): an empty memory then gives exactly the memory-off output.
    Returns the output and, beside it, the :class:`MemoryReadStats` of the read (None without a
    memory), where :class:`CausalSelfAttention` returns its keys and values.
    """

    def __init__(self, dims: GPT2Dims):
        super().__init__(dims)
        self.gate = nn.Parameter(torch.zeros(dims.num_heads))
        # the gate's logit is gate * gate_scale: Adam moves a parameter by about lr per update
        # whatever its gradient's size, so the scale multiplies the gate's learning rate
        self.gate_scale = 1.0
        self.reach_edges: Sequence[int] = ()  # set to log where reads reach (reach_of_read)

    def forward(self, x, memory=None, retrieved_tokens: int = 0, cache: Optional[KVCache] = None
                ) -> Tuple[torch.Tensor, Optional[MemoryReadStats]]:
        q, k, v = self.project_qkv(x)  # (B, H, T, hd) each
        local = self.local_attention(q, k, v, cache)  # (B, H, T, hd)
        if memory is None:
            return self.merge_heads(local), None

        found = read_memory(memory, q, retrieved_tokens)  # detached, in the bank's dtype
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
        out = torch.where(has_mem, (1 - g) * local + g * mem_out, local)
        with torch.no_grad():
            share = (g * has_mem).float()  # (B, H, T, 1)
            stats = MemoryReadStats(gate=g.float().mean(), memory_share=share.mean())
            if self.reach_edges:
                stats.reach = reach_of_read(read_probs, found, has_mem, memory, self.reach_edges)
        return self.merge_heads(out), stats


class SideNet(nn.Module):
    """``num_layers`` blocks initialised from backbone blocks ``r*(j+1)-1``; block
    ``memory_layer // r`` uses :class:`JointAttention`."""

    def __init__(self, backbone: GPT2Backbone, reduction_factor: int, memory_layer: int,
                 dropout: float, attention_dropout: float, init: str = "paper",
                 gate_init: float = 0.0, gate_lr_scale: float = 1.0):
        super().__init__()
        if init not in SIDENET_INITS:
            raise ValueError(f"--sidenet-init {init!r}: expected one of {', '.join(SIDENET_INITS)}")
        backbone_dims = backbone.dims
        if reduction_factor < 1 or backbone_dims.num_layers % reduction_factor:
            raise ValueError(
                f"--reduction-factor ({reduction_factor}) must be >= 1 and divide the backbone's "
                f"{backbone_dims.num_layers} layers"
            )
        if not 0 <= memory_layer < backbone_dims.num_layers:
            raise ValueError(
                f"--memory-layer ({memory_layer}) must be a 0-based backbone layer in "
                f"[0, {backbone_dims.num_layers - 1}]"
            )
        self.r = reduction_factor
        self.memory_layer = memory_layer
        self.side_memory_layer = memory_layer // reduction_factor
        dims = GPT2Dims(**{**vars(backbone_dims), "dropout": dropout,
                           "attention_dropout": attention_dropout})
        self.dims = dims
        num_layers = backbone_dims.num_layers // reduction_factor
        self.h = nn.ModuleList(
            Block(dims, attn=JointAttention(dims) if j == self.side_memory_layer else None)
            for j in range(num_layers)
        )
        self.ln_f = nn.LayerNorm(dims.embed_dim, eps=dims.layer_norm_eps)
        self.init_from_backbone(backbone, zero_out=init == "zero-out")
        if gate_lr_scale <= 0:
            raise ValueError(f"--gate-lr-scale must be > 0, got {gate_lr_scale}")
        joint = self.memory_attention
        joint.gate_scale = float(gate_lr_scale)
        with torch.no_grad():
            joint.gate.fill_(gate_init / gate_lr_scale)  # the logit starts at gate_init

    @torch.no_grad()
    def init_from_backbone(self, backbone: GPT2Backbone, zero_out: bool = False):
        for j, block in enumerate(self.h):
            source = backbone.h[self.r * (j + 1) - 1].state_dict()
            # the memory block's gate is ours alone (initialised 0); all else is copied
            missing, unexpected = block.load_state_dict(source, strict=False)
            assert not unexpected and set(missing) <= {"attn.gate"}, (missing, unexpected)
            if zero_out:
                for proj in (block.attn.c_proj, block.mlp.c_proj):
                    proj.weight.zero_()
                    proj.bias.zero_()
        self.ln_f.load_state_dict(backbone.ln_f.state_dict())

    @property
    def memory_attention(self) -> JointAttention:
        return self.h[self.side_memory_layer].attn

    def new_caches(self, batch: int, capacity: int, template: torch.Tensor) -> List[KVCache]:
        """One empty :class:`KVCache` of ``capacity`` tokens per side block, on ``template``'s
        device and in its dtype."""
        d = self.dims
        return [KVCache(batch, d.num_heads, capacity, d.head_dim, template) for _ in self.h]

    def forward(self, hiddens: List[torch.Tensor], memory=None, retrieved_tokens: int = 0,
                caches: Optional[List[KVCache]] = None
                ) -> Tuple[torch.Tensor, Optional[MemoryReadStats]]:
        """``hiddens`` are the backbone's ``[h_0 .. h_L']``; returns ``ln_f(s_L)`` (B x T x C) and
        the memory block's :class:`MemoryReadStats` (None without a memory). With ``caches``
        (one per side block) the tokens continue the cached ones (incremental decoding)."""
        s, stats = hiddens[0], None
        for i, block in enumerate(self.h, start=1):
            cached = {} if caches is None else {"cache": caches[i - 1]}
            if i - 1 == self.side_memory_layer:
                s, stats = block(s, memory=memory, retrieved_tokens=retrieved_tokens, **cached)
            else:
                s, _ = block(s, **cached)
            s = s + (hiddens[self.r * i] - hiddens[self.r * (i - 1)])  # cross-network residual
        return self.ln_f(s), stats
