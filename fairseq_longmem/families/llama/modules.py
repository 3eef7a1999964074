"""The Llama family as plain torch modules, with the parameter names of Hugging Face's
LlamaForCausalLM: RMSNorm, rotary position embeddings, grouped-query attention, SwiGLU, tied or
untied output embedding (SmolLM2, Llama 2/3, Mistral without sliding windows).

Keys are kept position-free (in caches and in LongMem's memory) and rotated when attended to, so
that the memory stores what the layer computed and a reader chooses the positions
(docs/DESIGN.md, "Rotary positions and the memory"). Layout is B x T x C throughout.
"""

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..base import Backbone, KVCache, causal_attention, expand_kv


@dataclass
class LlamaDims:
    vocab_size: int
    embed_dim: int = 576
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    ffn_dim: int = 1536
    max_positions: int = 8192
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = 0.0
    attention_dropout: float = 0.0

    def __post_init__(self):
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head size, got {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # in fp32, as Hugging Face's LlamaRMSNorm, then back to the input's dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


_ROTARY_TABLES: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}


def rotary_tables(theta: float, hd: int, length: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos and sin (L, hd), L >= ``length``, of position p's angles p * theta^(-2i/hd) (each
    repeated for the pair's two halves), computed once per (theta, hd, device) and grown by
    doubling: every layer of every forward reuses them (each entry is the same product as if
    computed alone)."""
    key = (float(theta), hd, str(device))
    tables = _ROTARY_TABLES.get(key)
    if tables is None or tables[0].size(0) < length:
        size = max(1024, 1 << max(0, length - 1).bit_length())
        inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd)
        angles = torch.arange(size, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
        angles = torch.cat([angles, angles], dim=-1)  # (size, hd)
        tables = _ROTARY_TABLES[key] = (angles.cos(), angles.sin())
    return tables


def rotate(x, positions, theta: float, bound: Optional[int] = None):
    """Rotary position embedding of x (B, H, n, hd) at ``positions`` (n,), non-negative and below
    ``bound`` (default: read off ``positions``), with fp32 angles: pairs (i, i + hd/2) turn by
    position * theta^(-2i/hd) (Hugging Face's ``rotate_half`` layout)."""
    hd = x.size(-1)
    if bound is None:
        bound = int(positions.max()) + 1 if positions.numel() else 1
    cos, sin = rotary_tables(theta, hd, bound, x.device)
    cos, sin = cos[positions].to(x.dtype), sin[positions].to(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class LlamaAttention(nn.Module):
    def __init__(self, dims: LlamaDims):
        super().__init__()
        self.num_heads, self.num_kv_heads = dims.num_heads, dims.num_kv_heads
        self.head_dim = dims.head_dim
        self.theta = dims.rope_theta
        self.q_proj = nn.Linear(dims.embed_dim, dims.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dims.embed_dim, dims.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dims.embed_dim, dims.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(dims.num_heads * self.head_dim, dims.embed_dim, bias=False)
        self.attention_dropout = dims.attention_dropout
        self.resid_dropout = nn.Dropout(dims.dropout)
        # where a memory-reading copy of this layer puts every retrieved token: this many
        # positions before its query (set by LongMem; docs/DESIGN.md)
        self.memory_distance = 0

    def project_qkv(self, x):
        """Position-free q (B, H, T, hd), k and v (B, Hkv, T, hd)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def rotated(self, q, k, v, cache: Optional[KVCache] = None):
        """(q, k, v, past): q (B, H, n, hd) at positions past..past+n-1 and the cached and new
        keys and values (B, Hkv, past + n, hd), rotated here (stored unrotated)."""
        past = cache.len if cache is not None else 0
        if cache is not None:
            k, v = cache.append(k, v)  # (B, Hkv, past + n, hd)
        n = q.size(2)
        positions = torch.arange(past + n, device=q.device)
        q = rotate(q, positions[past:], self.theta, past + n)
        k = rotate(k, positions, self.theta, past + n)
        return q, k, v, past

    def positioned(self, q, k, v, cache: Optional[KVCache] = None):
        """:meth:`rotated` with the keys and values expanded from the key-value heads to the
        query heads (B, H, past + n, hd): what an attention over them with memory reads."""
        q, k, v, past = self.rotated(q, k, v, cache)
        groups = self.num_heads // self.num_kv_heads
        return q, expand_kv(k, groups), expand_kv(v, groups), past

    def local_attention(self, q, k, v, cache: Optional[KVCache] = None):
        """Causal attention of q (B, H, n, hd) at positions past..past+n-1 over the cached and
        new keys, the key-value heads read in place (grouped-query SDPA)."""
        p = self.attention_dropout if self.training else 0.0
        return causal_attention(*self.rotated(q, k, v, cache), p)

    def memory_queries(self, q):
        """The queries that search and read LongMem's memory: rotated as if every memory key sat
        ``memory_distance`` positions before them (the keys stay unrotated):
        <R(p) q, R(p - D) k> = <R(D) q, k>."""
        D = torch.tensor([self.memory_distance], device=q.device)
        return rotate(q, D, self.theta, self.memory_distance + 1)

    def merge_heads(self, a):
        B, H, T, hd = a.shape
        return self.resid_dropout(self.o_proj(a.transpose(1, 2).reshape(B, T, H * hd)))

    def forward(self, x, cache: Optional[KVCache] = None
                ) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        q, k, v = self.project_qkv(x)
        return self.merge_heads(self.local_attention(q, k, v, cache)), (k, v)


class LlamaMLP(nn.Module):
    def __init__(self, dims: LlamaDims):
        super().__init__()
        self.gate_proj = nn.Linear(dims.embed_dim, dims.ffn_dim, bias=False)
        self.up_proj = nn.Linear(dims.embed_dim, dims.ffn_dim, bias=False)
        self.down_proj = nn.Linear(dims.ffn_dim, dims.embed_dim, bias=False)
        self.dropout = nn.Dropout(dims.dropout)

    def forward(self, x):
        gate, up = self.gate_proj(x), self.up_proj(x)
        if gate.requires_grad or up.requires_grad:
            hidden = F.silu(gate) * up
        else:
            # no autograd graph to keep (no_grad, or nothing upstream needs a gradient): in place,
            # the same values with two fewer (B, T, ffn) buffers per block (fresh CPU buffers of
            # this size cost page faults)
            hidden = F.silu(gate, inplace=True).mul_(up)
        return self.dropout(self.down_proj(hidden))


class LlamaBlock(nn.Module):
    """Pre-RMSNorm block; ``self_attn`` may be swapped for a memory-reading variant."""

    def __init__(self, dims: LlamaDims, attn: Optional[nn.Module] = None):
        super().__init__()
        self.input_layernorm = RMSNorm(dims.embed_dim, dims.rms_norm_eps)
        self.self_attn = attn if attn is not None else LlamaAttention(dims)
        self.post_attention_layernorm = RMSNorm(dims.embed_dim, dims.rms_norm_eps)
        self.mlp = LlamaMLP(dims)

    @property
    def attn(self) -> nn.Module:
        return self.self_attn

    def output_projections(self):
        """The layers whose output is added to the residual stream (zeroed by LongMem's
        ``--sidenet-init zero-out``)."""
        return [self.self_attn.o_proj, self.mlp.down_proj]

    def forward(self, x, **attn_kwargs):
        a, aside = self.self_attn(self.input_layernorm(x), **attn_kwargs)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, aside


class LlamaBackbone(Backbone):
    """Token embeddings (no learned positions: rotary ones inside attention), ``num_layers``
    blocks, final RMSNorm, tied (``embed_tokens``) or untied (``lm_head``) output."""

    family = "llama"
    token_embedding = "embed_tokens.weight"

    def __init__(self, dims: LlamaDims):
        super().__init__()
        self.dims = dims
        self.embed_tokens = nn.Embedding(dims.vocab_size, dims.embed_dim)
        self.drop = nn.Dropout(dims.dropout)
        self.layers = nn.ModuleList(LlamaBlock(dims) for _ in range(dims.num_layers))
        self.norm = RMSNorm(dims.embed_dim, dims.rms_norm_eps)
        self.lm_head = (None if dims.tie_embeddings
                        else nn.Linear(dims.embed_dim, dims.vocab_size, bias=False))
        self.reset_parameters()

    @property
    def blocks(self) -> nn.ModuleList:
        return self.layers

    @property
    def final_norm(self) -> nn.Module:
        return self.norm

    @property
    def output_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def reset_parameters(self):
        # Llama's initialisation: N(0, 0.02) for every matrix, norms at 1
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, std=0.02)

    def embed(self, tokens, start: int = 0):
        """Token embeddings of ``tokens`` (B, T); their positions start..start+T-1 are applied
        by each attention."""
        self.check_positions(start + tokens.size(1))
        return self.drop(self.embed_tokens(tokens))  # (B, T, C)
