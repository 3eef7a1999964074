"""What every backbone family provides to LongMem (docs/DESIGN.md, "Backbone families"): its
dimensions, the per-layer key/value caches of incremental decoding, and a backbone whose forward
pass, output layer and caches are written once here against three hooks of the family's own
(``embed``, ``blocks``, ``final_norm``; ``output_weight``).

Layout is B x T x C; per-head tensors are B x H x T x hd with H query heads and Hkv key-value
heads (Hkv = H without grouped-query attention). Keys in caches and in LongMem's memory are
position-free: as the memory stores them (GPT-2's keys carry no position; a rotary family rotates
keys when it attends, never in storage).
"""

import importlib
from dataclasses import dataclass
from typing import Callable, Collection, List, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn


class KVCache:
    """One attention layer's keys and values of the tokens seen so far in the current segment,
    in fixed buffers of ``capacity`` tokens, so that its size never depends on how much was
    generated: (B, Hkv, capacity, hd) each, the first ``len`` tokens valid, with the device and
    dtype of ``template`` (any tensor, e.g. a model parameter)."""

    def __init__(self, batch: int, num_heads: int, capacity: int, head_dim: int,
                 template: torch.Tensor):
        self.k = template.new_zeros(batch, num_heads, capacity, head_dim)  # (B, Hkv, capacity, hd)
        self.v = template.new_zeros(batch, num_heads, capacity, head_dim)  # (B, Hkv, capacity, hd)
        self.len = 0

    def append(self, k, v):
        """Store k, v (B, Hkv, n, hd) after the cached tokens; returns all valid keys and values."""
        n = k.size(2)
        if self.len + n > self.k.size(2):
            raise ValueError(f"KVCache: {self.len} + {n} tokens exceed its {self.k.size(2)}")
        self.k[:, :, self.len:self.len + n] = k
        self.v[:, :, self.len:self.len + n] = v
        self.len += n
        return self.k[:, :, :self.len], self.v[:, :, :self.len]  # (B, Hkv, len, hd) each

    def reset(self):
        self.len = 0

    def reorder(self, order: torch.Tensor):
        """Rows follow ``order`` (a beam search's choice of hypotheses)."""
        self.k = self.k.index_select(0, order)
        self.v = self.v.index_select(0, order)


def causal_attention(q, k, v, past: int, dropout: float):
    """Causal attention of q (B, H, n, hd) over k, v (B, Hkv, past + n, hd), the first ``past``
    of them cached: query i sees keys up to past + i. Hkv may divide H (grouped-query attention:
    key-value head j serves query heads j * H/Hkv .. (j + 1) * H/Hkv - 1, read in place by SDPA,
    not copied). Without a past it takes SDPA's causal path, so a segment's first forward is
    bit-identical with and without a cache."""
    gqa = {"enable_gqa": True} if k.size(1) != q.size(1) else {}
    if past == 0:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, **gqa)
    n = q.size(2)
    if n == 1:  # one new token sees every cached one
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, **gqa)  # (B, H, 1, hd)
    allowed = (torch.arange(n, device=q.device)[:, None] + past
               >= torch.arange(past + n, device=q.device)[None, :])  # (n, past + n)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout, **gqa)


def expand_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hkv, n, hd) -> (B, Hkv * groups, n, hd): key-value head j serves query heads
    j * groups .. (j + 1) * groups - 1 (grouped-query attention; Hugging Face's ``repeat_kv``)."""
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


class Backbone(nn.Module):
    """A frozen-able decoder-only LM: ``embed(tokens, start)``, ``blocks`` (each called as
    ``block(x, cache=None) -> (x, (k, v))``), ``final_norm`` and the output embedding
    ``output_weight``. A subclass also sets ``family`` (its :class:`~.Family` name) and
    ``dims`` (with ``num_layers``, ``num_heads``, ``num_kv_heads``, ``head_dim``,
    ``max_positions``, ``vocab_size``)."""

    family = ""
    token_embedding = ""  # its parameter's name, e.g. "wte.weight"

    @property
    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    @property
    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    @property
    def output_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def embed(self, tokens, start: int = 0):
        raise NotImplementedError

    def check_positions(self, end: int):
        if end > self.dims.max_positions:
            raise ValueError(f"segment of {end} tokens is longer than the model's "
                             f"{self.dims.max_positions} positions")

    def new_caches(self, batch: int, capacity: int, template: torch.Tensor) -> List[KVCache]:
        """One empty :class:`KVCache` of ``capacity`` tokens per block, on ``template``'s device
        and in its dtype."""
        d = self.dims
        return [KVCache(batch, d.num_kv_heads, capacity, d.head_dim, template) for _ in self.blocks]

    def forward(
        self, tokens, kv_layer=None, stop_at_kv_layer: bool = False,
        caches: Optional[List[KVCache]] = None, keep: Optional[Collection[int]] = None,
    ) -> Tuple[List[Optional[torch.Tensor]], Optional[Tuple[torch.Tensor, torch.Tensor]]]:
        """Return all hidden states ``[h_0 .. h_L]`` (each B x T x C, before the final norm) and
        the keys/values (B, Hkv, T, hd, position-free) of block ``kv_layer`` (0-based) if asked
        for; ``kv_layer`` a tuple of blocks: theirs stacked, (layers, B, Hkv, T, hd) each.
        ``stop_at_kv_layer`` skips the blocks after the (last) ``kv_layer`` (when only its K/V are
        needed). With ``caches`` (one per block), ``tokens`` continue the cached ones: positions
        start after them and each block attends to them too (incremental decoding). ``keep``: the
        indices into ``[h_0 .. h_L]`` the caller reads (None: all); the others are None in the
        list, so each is freed once the next block has read it (a forward to the logits keeps one
        (B, T, C) state alive instead of L + 1)."""
        start = caches[0].len if caches is not None else 0
        several = isinstance(kv_layer, (tuple, list))
        wanted = tuple(kv_layer) if several else (() if kv_layer is None else (kv_layer,))
        x = self.embed(tokens, start)
        hiddens, kvs = [x if keep is None or 0 in keep else None], []
        for i, block in enumerate(self.blocks):
            x, kv = block(x) if caches is None else block(x, cache=caches[i])
            hiddens.append(x if keep is None or i + 1 in keep else None)
            if i in wanted:
                kvs.append(kv)
                if stop_at_kv_layer and len(kvs) == len(wanted):
                    break
        if not kvs:
            return hiddens, None
        if several:
            return hiddens, (torch.stack([k for k, _ in kvs]), torch.stack([v for _, v in kvs]))
        return hiddens, kvs[0]

    def project(self, features):
        """Normed features (the final norm's output) -> logits (..., V): the output embedding,
        tied or not. The one place logits are made (``BackboneDecoder.output_layer`` masks
        special tokens on top)."""
        return F.linear(features, self.output_weight)

    def logits(self, hidden):
        """A block's output (e.g. ``hiddens[-1]``) -> logits: the final norm, then :meth:`project`;
        the raw model's, with no special-token mask."""
        return self.project(self.final_norm(hidden))  # (B, T, V)


@dataclass(frozen=True)
class Family:
    name: str
    dims: type  # dataclass of sizes: vocab_size, embed_dim, num_layers, num_heads, ... (base.py)
    backbone: Type[nn.Module]  # a base.Backbone
    block: Type[nn.Module]  # block(dims, attn=None): the backbone's block, attention swappable
    attention: Type[nn.Module]  # the block's attention: project_qkv, local_attention, ...
    lm_model: str  # the registered fairseq model of the plain LM (backbone checkpoints)
    longmem_model: str  # the registered fairseq model of LongMem over it
    # Hugging Face conversion (python -m fairseq_longmem.convert): the config.json model_types
    # the family converts, the tensor whose rows give vocab_size when a config lacks it, and its
    # converter as "module:function" (imported only when converting: it imports the converter's
    # common part, which sits above the families); see hf_converter
    hf_model_types: Tuple[str, ...] = ()
    hf_embedding: str = ""
    convert_hf: str = ""

    def hf_converter(self) -> Callable:
        """The family's converter, ``convert_hf(config, tensors, eos, out_dir, fingerprint_of)
        -> (cfg, weights, summary)``: config.json and the tensors by Hugging Face name in,
        a fairseq cfg, the ``decoder.backbone.*`` weights and a one-line description out;
        ``fingerprint_of(V)`` writes dict.txt for V model ids and returns its fingerprint."""
        module, _, name = self.convert_hf.partition(":")
        return getattr(importlib.import_module(module), name)
