"""LongMem's residual SideNet (docs/DESIGN.md, section 1), for a backbone of any family.

The SideNet runs beside a frozen backbone: side layer i takes the previous side state plus the
backbone's change over its ``r`` layers, and one side layer, a copy of the family's block whose
attention reads the long-term memory (:mod:`.memory_attention`), reads it (or several, one memory
each: ``read_layers``). Layout is B x T x C.
"""

import copy
import dataclasses
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..families import family_of
from ..families.base import Backbone, KVCache
from ..memory.layered import is_search_every
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


# how a side block's output continues the side state (--sidenet-residual): "cross", the paper's
# cross-network residual s_{j+1} = block_j(s_j) + (h_{S+r(j+1)} - h_{S+rj}); "none",
# s_{j+1} = block_j(s_j): the side blocks stand in for the backbone blocks from S on (with r = 1
# and full copies, --sidenet-init paper, the SideNet then starts as the backbone itself)
SIDENET_RESIDUALS = ("cross", "none")
# how a reading side block reads the memory (--memory-read): "gated", the paper's per-head
# mixture of local and memory attention; "joint", one softmax over both, memory tokens weighted
# by the gate's logit (0 at the start: the block's own attention extended to the memory, as the
# training-free read; modules.memory_attention.joint_read)
MEMORY_READS = ("gated", "joint")


def merge_stats(stats: List[MemoryReadStats]) -> Optional[MemoryReadStats]:
    """The reads of several side blocks as one: gate and memory share averaged, reach summed."""
    stats = [st for st in stats if st is not None]
    if len(stats) <= 1:
        return stats[0] if stats else None
    merged = MemoryReadStats(gate=torch.stack([st.gate for st in stats]).mean(),
                             memory_share=torch.stack([st.memory_share for st in stats]).mean())
    reaches = [st.reach for st in stats if st.reach is not None]
    if reaches:
        merged.reach = {key: sum(r[key] for r in reaches) for key in reaches[0]}
    return merged


class SideNet(nn.Module):
    """``(L - start) / r`` blocks of the backbone's family beside backbone blocks ``start``..L-1,
    side block j initialised from backbone block ``start + r*(j+1) - 1`` (``copy_from="first"``:
    ``start + r*j``) and fed ``h_start``; the side block beside backbone layer m reads the memory
    of layer m, for m in ``read_layers`` (default: ``memory_layer`` alone)."""

    def __init__(self, backbone: Backbone, reduction_factor: int, memory_layer: int,
                 dropout: float, attention_dropout: float, init: str = "paper",
                 gate_init: float = 0.0, gate_lr_scale: float = 1.0, memory_distance: int = 0,
                 copy_from: str = "last", start: int = 0, read_layers: Sequence[int] = (),
                 residual: str = "cross", read_mode: str = "gated", search_every: int = 1):
        super().__init__()
        if init not in SIDENET_INITS:
            raise ValueError(f"--sidenet-init {init!r}: expected one of {', '.join(SIDENET_INITS)}")
        if copy_from not in SIDENET_COPIES:
            raise ValueError(f"--sidenet-copy {copy_from!r}: expected one of {', '.join(SIDENET_COPIES)}")
        if residual not in SIDENET_RESIDUALS:
            raise ValueError(f"--sidenet-residual {residual!r}: expected one of "
                             f"{', '.join(SIDENET_RESIDUALS)}")
        if read_mode not in MEMORY_READS:
            raise ValueError(f"--memory-read {read_mode!r}: expected one of {', '.join(MEMORY_READS)}")
        if read_mode == "joint" and init == "read-delta":
            raise ValueError("--sidenet-init read-delta adds g*(A_mem - A_local), a gated read: it "
                             "does not combine with --memory-read joint")
        backbone_dims = backbone.dims
        L = backbone_dims.num_layers
        if not 0 <= start < L:
            raise ValueError(f"--sidenet-from ({start}) must be a 0-based backbone layer in "
                             f"[0, {L - 1}]")
        if reduction_factor < 1 or (L - start) % reduction_factor:
            raise ValueError(
                f"--reduction-factor ({reduction_factor}) must be >= 1 and divide the "
                f"{L - start} backbone layers the SideNet stands beside ({start} to {L - 1})"
            )
        read_layers = tuple(sorted(read_layers)) if read_layers else (memory_layer,)
        for m in read_layers:
            if not start <= m < L:
                raise ValueError(
                    f"memory layer {m} must be a 0-based backbone layer the SideNet stands beside "
                    f"([{start}, {L - 1}] with --sidenet-from {start})")
        side_blocks = [(m - start) // reduction_factor for m in read_layers]
        if len(set(side_blocks)) != len(side_blocks):
            raise ValueError(f"memory layers {list(read_layers)} fall beside the same side block "
                             f"(--reduction-factor {reduction_factor}): one memory per side block")
        family = family_of(backbone)
        self.r = reduction_factor
        self.start = start
        self.residual = residual
        self.copy_offset = reduction_factor - 1 if copy_from == "last" else 0
        self.memory_layer = read_layers[0]
        self.read_layers = read_layers
        self.readers = dict(zip(side_blocks, read_layers))  # side block -> backbone layer
        self.side_memory_layer = side_blocks[0]
        if not is_search_every(search_every):
            raise ValueError(f"--search-every must be an integer >= 1, got {search_every!r}")
        self.search_every = search_every  # memory layers per search (LayeredMemory.shared_search)
        dims = dataclasses.replace(backbone_dims, dropout=dropout,
                                   attention_dropout=attention_dropout)
        self.dims = dims
        num_layers = (L - start) // reduction_factor
        joint = joint_attention_class(family.attention)
        self.h = nn.ModuleList(
            family.block(dims, attn=joint(dims) if j in self.readers else None)
            for j in range(num_layers)
        )
        self.ln_f = copy.deepcopy(backbone.final_norm).requires_grad_(True)
        self.init_from_backbone(backbone, zero_out=init in ("zero-out", "read-delta"),
                                keep_read=init == "read-delta")
        if gate_lr_scale <= 0:
            raise ValueError(f"--gate-lr-scale must be > 0, got {gate_lr_scale}")
        for reader in self.memory_attentions:
            reader.delta = init == "read-delta"
            reader.read_mode = read_mode
            reader.gate_scale = float(gate_lr_scale)
            reader.memory_distance = memory_distance
            with torch.no_grad():
                reader.gate.fill_(gate_init / gate_lr_scale)  # the logit starts at gate_init

    @torch.no_grad()
    def init_from_backbone(self, backbone: Backbone, zero_out: bool = False,
                           keep_read: bool = False):
        """Copy backbone blocks into the side blocks; ``zero_out`` zeroes their output projections,
        except, with ``keep_read``, the reading blocks' attention projection weights (read-delta;
        their bias is zeroed: it would add to every token)."""
        for j, block in enumerate(self.h):
            source = backbone.blocks[self.start + self.r * j + self.copy_offset].state_dict()
            # a reading block's gate is ours alone (initialised 0); all else is copied
            missing, unexpected = block.load_state_dict(source, strict=False)
            assert not unexpected and all(k.endswith("attn.gate") for k in missing), (
                missing, unexpected)
            if zero_out:
                for i, proj in enumerate(block.output_projections()):
                    if not (keep_read and i == 0 and j in self.readers):
                        proj.weight.zero_()
                    if proj.bias is not None:
                        proj.bias.zero_()
        self.ln_f.load_state_dict(backbone.final_norm.state_dict())

    @property
    def memory_attention(self) -> nn.Module:
        """The (first) reading block's attention."""
        return self.h[self.side_memory_layer].attn

    @property
    def memory_attentions(self) -> List[nn.Module]:
        """Every reading block's attention, bottom up (one per memory layer)."""
        return [self.h[j].attn for j in sorted(self.readers)]

    def new_caches(self, batch: int, capacity: int, template: torch.Tensor) -> List[KVCache]:
        """One empty :class:`KVCache` of ``capacity`` tokens per side block, on ``template``'s
        device and in its dtype."""
        d = self.dims
        return [KVCache(batch, d.num_kv_heads, capacity, d.head_dim, template) for _ in self.h]

    def hiddens_read(self) -> Tuple[int, ...]:
        """The indices into the backbone's ``[h_0 .. h_L]`` that :meth:`forward` reads (its
        ``keep``): the SideNet's input, and with the cross-network residual every r-th after it."""
        S, r = self.start, self.r
        if self.residual != "cross":
            return (S,)
        return tuple(S + r * j for j in range(len(self.h) + 1))

    def forward(self, hiddens: List[torch.Tensor], memory=None, retrieved_tokens: int = 0,
                caches: Optional[List[KVCache]] = None
                ) -> Tuple[torch.Tensor, Optional[MemoryReadStats]]:
        """``hiddens`` are the backbone's ``[h_0 .. h_L]``; ``memory`` is one memory (one memory
        layer) or a :class:`~fairseq_longmem.memory.layered.LayeredMemory` of the memory layers.
        Returns the final norm of the last side state (B x T x C) and the reading blocks'
        :class:`MemoryReadStats` merged (None without a memory). With ``caches`` (one per side
        block) the tokens continue the cached ones (incremental decoding)."""
        S, r = self.start, self.r
        s, stats = hiddens[S], []
        several = len(self.read_layers) > 1
        banks = (memory.shared_search(self.search_every)
                 if several and memory is not None else None)  # layer -> what it reads
        for j, block in enumerate(self.h):
            cached = {} if caches is None else {"cache": caches[j]}
            if j in self.readers:
                bank = banks[self.readers[j]] if banks is not None else memory
                s, st = block(s, memory=bank, retrieved_tokens=retrieved_tokens, **cached)
                stats.append(st)
            else:
                s, _ = block(s, **cached)
            if self.residual == "cross":
                s = s + (hiddens[S + r * (j + 1)] - hiddens[S + r * j])  # cross-network residual
        return self.ln_f(s), merge_stats(stats)
