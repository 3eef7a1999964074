"""LongMem's residual SideNet (docs/DESIGN.md, section 1), for a backbone of any family.

The SideNet runs beside a frozen backbone: side layer i takes the previous side state plus the
backbone's change over its ``r`` layers, and one side layer, a copy of the family's block whose
attention reads the long-term memory (:mod:`.memory_attention`), reads it. Layout is B x T x C.
"""

import copy
import dataclasses
from typing import List, Optional, Tuple

import torch
from torch import nn

from ..families import family_of
from ..families.base import Backbone, KVCache
from .memory_attention import MemoryReadStats, joint_attention_class

# SideNet initialisations (--sidenet-init): "paper" copies backbone blocks as they are;
# "zero-out" also zeroes every side block's output projections (the attention's and the MLP's),
# so that each block adds nothing and, through the cross-network residual, the SideNet's output
# is the backbone's at the start (up to the rounding of h_0 + (h_2 - h_0) + ...); "read-delta" is
# zero-out except the memory block's attention, which keeps its copied output projection and adds
# only what the memory changes in it, o(g * (A_mem - A_local)) (JointAttentionMixin.delta): the
# SideNet starts as the backbone whose block m reads the memory, and equals it on an empty memory
SIDENET_INITS = ("paper", "zero-out", "read-delta")
# which backbone block side block j copies (--sidenet-copy): "last", the paper's r*(j+1)-1, or
# "first", r*j: the block whose input h_{rj} the side block is fed at the start with zero-out
SIDENET_COPIES = ("last", "first")


class SideNet(nn.Module):
    """``num_layers`` blocks of the backbone's family initialised from backbone blocks
    ``r*(j+1)-1`` (``copy_from="first"``: ``r*j``); block ``memory_layer // r`` reads the memory."""

    def __init__(self, backbone: Backbone, reduction_factor: int, memory_layer: int,
                 dropout: float, attention_dropout: float, init: str = "paper",
                 gate_init: float = 0.0, gate_lr_scale: float = 1.0, memory_distance: int = 0,
                 copy_from: str = "last"):
        super().__init__()
        if init not in SIDENET_INITS:
            raise ValueError(f"--sidenet-init {init!r}: expected one of {', '.join(SIDENET_INITS)}")
        if copy_from not in SIDENET_COPIES:
            raise ValueError(f"--sidenet-copy {copy_from!r}: expected one of {', '.join(SIDENET_COPIES)}")
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
        family = family_of(backbone)
        self.r = reduction_factor
        self.copy_offset = reduction_factor - 1 if copy_from == "last" else 0
        self.memory_layer = memory_layer
        self.side_memory_layer = memory_layer // reduction_factor
        dims = dataclasses.replace(backbone_dims, dropout=dropout,
                                   attention_dropout=attention_dropout)
        self.dims = dims
        num_layers = backbone_dims.num_layers // reduction_factor
        joint = joint_attention_class(family.attention)
        self.h = nn.ModuleList(
            family.block(dims, attn=joint(dims) if j == self.side_memory_layer else None)
            for j in range(num_layers)
        )
        self.ln_f = copy.deepcopy(backbone.final_norm).requires_grad_(True)
        self.init_from_backbone(backbone, zero_out=init in ("zero-out", "read-delta"),
                                keep_read=init == "read-delta")
        self.memory_attention.delta = init == "read-delta"
        if gate_lr_scale <= 0:
            raise ValueError(f"--gate-lr-scale must be > 0, got {gate_lr_scale}")
        reader = self.memory_attention
        reader.gate_scale = float(gate_lr_scale)
        reader.memory_distance = memory_distance
        with torch.no_grad():
            reader.gate.fill_(gate_init / gate_lr_scale)  # the logit starts at gate_init

    @torch.no_grad()
    def init_from_backbone(self, backbone: Backbone, zero_out: bool = False,
                           keep_read: bool = False):
        """Copy backbone blocks into the side blocks; ``zero_out`` zeroes their output projections,
        except, with ``keep_read``, the memory block's attention projection weight (read-delta;
        its bias is zeroed: it would add to every token)."""
        for j, block in enumerate(self.h):
            source = backbone.blocks[self.r * j + self.copy_offset].state_dict()
            # the memory block's gate is ours alone (initialised 0); all else is copied
            missing, unexpected = block.load_state_dict(source, strict=False)
            assert not unexpected and all(k.endswith("attn.gate") for k in missing), (
                missing, unexpected)
            if zero_out:
                for i, proj in enumerate(block.output_projections()):
                    if not (keep_read and i == 0 and j == self.side_memory_layer):
                        proj.weight.zero_()
                    if proj.bias is not None:
                        proj.bias.zero_()
        self.ln_f.load_state_dict(backbone.final_norm.state_dict())

    @property
    def memory_attention(self) -> nn.Module:
        return self.h[self.side_memory_layer].attn

    def new_caches(self, batch: int, capacity: int, template: torch.Tensor) -> List[KVCache]:
        """One empty :class:`KVCache` of ``capacity`` tokens per side block, on ``template``'s
        device and in its dtype."""
        d = self.dims
        return [KVCache(batch, d.num_kv_heads, capacity, d.head_dim, template) for _ in self.h]

    def forward(self, hiddens: List[torch.Tensor], memory=None, retrieved_tokens: int = 0,
                caches: Optional[List[KVCache]] = None
                ) -> Tuple[torch.Tensor, Optional[MemoryReadStats]]:
        """``hiddens`` are the backbone's ``[h_0 .. h_L']``; returns the final norm of ``s_L``
        (B x T x C) and the memory block's :class:`MemoryReadStats` (None without a memory).
        With ``caches`` (one per side block) the tokens continue the cached ones (incremental
        decoding)."""
        s, stats = hiddens[0], None
        for i, block in enumerate(self.h, start=1):
            cached = {} if caches is None else {"cache": caches[i - 1]}
            if i - 1 == self.side_memory_layer:
                s, stats = block(s, memory=memory, retrieved_tokens=retrieved_tokens, **cached)
            else:
                s, _ = block(s, **cached)
            s = s + (hiddens[self.r * i] - hiddens[self.r * (i - 1)])  # cross-network residual
        return self.ln_f(s), stats

