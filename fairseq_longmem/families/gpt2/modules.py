"""The GPT-2 family as plain torch modules, with the parameter names of Hugging Face's
GPT2LMHeadModel: learned positions added to the embeddings, LayerNorm, fused q/k/v, tanh GELU.

Our own attention (not fairseq's MultiheadAttention) so that each layer's per-head keys/values
and every hidden state are available to LongMem. Layout is B x T x C throughout. For incremental
decoding every attention takes an optional :class:`KVCache` of the tokens before its input.
"""

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..base import Backbone, KVCache, causal_attention

# OpenAI's sizes (embed dim, layers, heads), plus a tiny one for tests and CPU runs.
GPT2_SIZES = {
    "tiny": (128, 4, 4),
    "small": (768, 12, 12),
    "medium": (1024, 24, 16),
    "large": (1280, 36, 20),
    "xl": (1600, 48, 25),
}


@dataclass
class GPT2Dims:
    vocab_size: int
    embed_dim: int = 768
    num_layers: int = 12
    num_heads: int = 12
    max_positions: int = 1024
    dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})"
            )

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads


def gelu_tanh(x):
    # GPT-2's "gelu_new"
    return F.gelu(x, approximate="tanh")


class CausalSelfAttention(nn.Module):
    def __init__(self, dims: GPT2Dims):
        super().__init__()
        self.num_heads = dims.num_heads
        self.head_dim = dims.head_dim
        self.c_attn = nn.Linear(dims.embed_dim, 3 * dims.embed_dim)  # fused q, k, v
        self.c_proj = nn.Linear(dims.embed_dim, dims.embed_dim)
        self.attention_dropout = dims.attention_dropout
        self.resid_dropout = nn.Dropout(dims.dropout)

    def project_qkv(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        v = v.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        return q, k, v

    def positioned(self, q, k, v, cache: Optional[KVCache] = None):
        """(q, k, v, past): the cached and new keys and values (B, H, past + n, hd) that q
        (B, H, n, hd) attends to (k, v are appended to the ``cache`` if one is given); GPT-2's
        positions are in the embeddings, so nothing is rotated."""
        past = cache.len if cache is not None else 0
        if cache is not None:
            k, v = cache.append(k, v)  # (B, H, past + n, hd)
        return q, k, v, past

    def local_attention(self, q, k, v, cache: Optional[KVCache] = None):
        """Causal attention of q over k, v (B, H, n, hd each), after the ``cache``d tokens if one
        is given (:meth:`positioned`)."""
        p = self.attention_dropout if self.training else 0.0
        return causal_attention(*self.positioned(q, k, v, cache), p)

    def memory_queries(self, q):
        """The queries that search and read LongMem's memory: GPT-2's keys carry no position,
        so its queries as they are."""
        return q

    def merge_heads(self, a):
        B, H, T, hd = a.shape
        out = a.transpose(1, 2).reshape(B, T, H * hd)  # (B, T, C)
        return self.resid_dropout(self.c_proj(out))

    def forward(self, x, cache: Optional[KVCache] = None
                ) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        q, k, v = self.project_qkv(x)
        return self.merge_heads(self.local_attention(q, k, v, cache)), (k, v)


class MLP(nn.Module):
    def __init__(self, dims: GPT2Dims):
        super().__init__()
        self.c_fc = nn.Linear(dims.embed_dim, 4 * dims.embed_dim)
        self.c_proj = nn.Linear(4 * dims.embed_dim, dims.embed_dim)
        self.dropout = nn.Dropout(dims.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(gelu_tanh(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block; ``attn`` may be swapped for a memory-reading variant.
    Returns the new hidden state and what the attention returns beside its output (the keys and
    values of :class:`CausalSelfAttention`)."""

    def __init__(self, dims: GPT2Dims, attn: Optional[nn.Module] = None):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dims.embed_dim, eps=dims.layer_norm_eps)
        self.attn = attn if attn is not None else CausalSelfAttention(dims)
        self.ln_2 = nn.LayerNorm(dims.embed_dim, eps=dims.layer_norm_eps)
        self.mlp = MLP(dims)

    def output_projections(self):
        """The layers whose output is added to the residual stream (zeroed by LongMem's
        ``--sidenet-init zero-out``)."""
        return [self.attn.c_proj, self.mlp.c_proj]

    def forward(self, x, **attn_kwargs):
        a, aside = self.attn(self.ln_1(x), **attn_kwargs)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, aside


class GPT2Backbone(Backbone):
    """Token + learned position embeddings, ``num_layers`` blocks, final LayerNorm, tied output."""

    family = "gpt2"
    token_embedding = "wte.weight"

    def __init__(self, dims: GPT2Dims):
        super().__init__()
        self.dims = dims
        self.wte = nn.Embedding(dims.vocab_size, dims.embed_dim)
        self.wpe = nn.Embedding(dims.max_positions, dims.embed_dim)
        self.drop = nn.Dropout(dims.dropout)
        self.h = nn.ModuleList(Block(dims) for _ in range(dims.num_layers))
        self.ln_f = nn.LayerNorm(dims.embed_dim, eps=dims.layer_norm_eps)
        self.reset_parameters()

    @property
    def blocks(self) -> nn.ModuleList:
        return self.h

    @property
    def final_norm(self) -> nn.Module:
        return self.ln_f

    @property
    def output_weight(self) -> torch.Tensor:
        return self.wte.weight

    def reset_parameters(self):
        # GPT-2's initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 * layers)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif ".ln_" in name or name.startswith("ln_f"):
                nn.init.ones_(p)
            elif name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.dims.num_layers))
            else:
                nn.init.normal_(p, std=0.02)

    def embed(self, tokens, start: int = 0):
        """Token plus position embeddings of ``tokens`` (B, T) at positions start..start+T-1."""
        T = tokens.size(1)
        self.check_positions(start + T)
        pos = torch.arange(start, start + T, device=tokens.device)
        return self.drop(self.wte(tokens) + self.wpe(pos))  # (B, T, C)
