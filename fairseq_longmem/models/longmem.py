"""LongMem over a frozen backbone of any family (docs/DESIGN.md, "Backbone families"): the
backbone, a trainable SideNet of the same family and a per-row memory bank.

Each batch row is one stream (see the ``longmem_lm`` task): the model clears a row's memory when
the batch flags that row as starting a new document, reads the memory, scores the segment, then
appends the backbone's layer-``m`` keys/values to that row's memory (write after read).
Training and evaluation keep separate memories, so validation never reads training text. The
families register ``longmem_gpt2`` and ``longmem_llama`` (:mod:`fairseq_longmem.families`).
"""

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import FairseqIncrementalDecoder, FairseqLanguageModel
from omegaconf import II

from ..buckets import parse_segment_buckets, segment_label
from ..families import FAMILIES
from ..families.base import Backbone
from ..memory.bank import ChunkedMemoryBank
from ..modules.decoding_state import DecodingState
from ..modules.sidenet import SIDENET_COPIES, SIDENET_INITS, SideNet
from .backbone import load_backbone
from .common import (
    BackboneDecoder,
    bind_dictionary,
    check_segment_length,
    check_vocab,
    fingerprint_field,
    record_in_config,
)
from .memory_fit import check_memory_fits
from .stream_memory import StreamMemoryMixin

logger = logging.getLogger(__name__)

SEARCH_BACKENDS = ChoiceEnum(list(ChunkedMemoryBank.BACKENDS))
SIDENET_INIT_CHOICES = ChoiceEnum(list(SIDENET_INITS))
SIDENET_COPY_CHOICES = ChoiceEnum(list(SIDENET_COPIES))


@dataclass
class LongMemOptions(FairseqDataclass):
    """The options of LongMem over any backbone family; each family's config adds its sizes."""

    backbone_path: str = field(
        default="",
        metadata={
            "help": "frozen backbone: a checkpoint of the family's plain LM (gpt2_lm, llama_lm; "
            "trained with fairseq-train or written by python -m fairseq_longmem.convert); not "
            "read when a LongMem checkpoint is loaded, since that holds the backbone weights"
        },
    )
    mask_special_logits: bool = field(
        default=False,
        metadata={"help": "-inf logits for <s>/<pad>/<unk>; copied from a converted backbone"},
    )
    reduction_factor: int = field(
        default=2, metadata={"help": "r: the SideNet has L'/r layers, side layer j copies backbone layer r*(j+1)-1"}
    )
    memory_layer: int = field(
        default=-1,
        metadata={"help": "0-based backbone layer m whose keys/values fill the memory; SideNet "
                  "layer m//r reads it (-1: the arch's default, about 3/4 deep and odd)"},
    )
    memory_size: int = field(default=65536, metadata={"help": "msz: memory tokens per stream (FIFO)"})
    chunk_size: int = field(default=4, metadata={"help": "csz: tokens per memory chunk"})
    retrieved_tokens: int = field(
        default=64, metadata={"help": "K: memory tokens read per query and head (K/csz chunks)"}
    )
    search_backend: SEARCH_BACKENDS = field(
        default="auto",
        metadata={"help": "exact memory search: torch (two-stage block-max selection), matmul (all "
                  "scores + topk), triton (fused CUDA kernels), faiss, or auto (= torch on every "
                  "device; docs/BENCHMARKS.md compares them)"}
    )
    disable_memory: bool = field(
        default=False,
        metadata={"help": "neither read nor write memory (same weights): the no-memory baseline; "
                  "usable at eval time with --model-overrides \"{'disable_memory': True}\""},
    )
    sidenet_init: SIDENET_INIT_CHOICES = field(
        default="paper",
        metadata={"help": "SideNet initialisation: paper (side block j copies backbone block "
                  "r*(j+1)-1), zero-out (the same, with every side block's attention and MLP "
                  "output projection zeroed, so that the SideNet starts equal to the backbone) or "
                  "read-delta (zero-out, but the memory block's attention keeps its projection and "
                  "adds only what the memory changes, g*(A_mem - A_local): the SideNet starts as the "
                  "backbone whose block m reads the memory)"},
    )
    sidenet_copy: SIDENET_COPY_CHOICES = field(
        default="last",
        metadata={"help": "which backbone block side block j copies: last (the paper's, block "
                  "r*(j+1)-1, the last of the r it stands beside) or first (block r*j, whose input "
                  "the side block is fed at the start with zero-out, so that its attention starts "
                  "as the backbone's own; with --memory-layer a multiple of r the memory block's "
                  "queries then match the memory's keys exactly)"},
    )
    gate_init: float = field(
        default=0.0,
        metadata={"help": "initial logit g_h of every memory head's gate (the paper's: 0, an "
                  "even mix of local and memory attention)"},
    )
    gate_lr_scale: float = field(
        default=1.0,
        metadata={"help": "multiplies the gates' learning rate (the logit is a parameter times "
                  "this scale; with Adam a logit then moves up to scale x lr per update)"},
    )
    memory_reach_buckets: str = field(
        default="",
        metadata={"help": "e.g. '1,4,16': log where memory reads reach, the share of memory "
                  "attention on chunks written 1, 2-4, 5-16, 17+ segments back (mem_reach* with "
                  "longmem_cross_entropy); empty: not computed"},
    )
    dropout: float = field(default=0.1, metadata={"help": "SideNet dropout"})
    attention_dropout: float = field(default=0.0, metadata={"help": "SideNet attention dropout"})
    dictionary_fingerprint: str = fingerprint_field()
    max_target_positions: Optional[int] = II("task.tokens_per_sample")


class LongMemDecoder(StreamMemoryMixin, BackboneDecoder, FairseqIncrementalDecoder):
    """Scores segments (``forward``) and decodes incrementally (``incremental_state``, fairseq's
    protocol; :meth:`prefill` and :meth:`advance`; docs/GENERATION.md)."""

    def __init__(self, cfg, dictionary, backbone: Backbone):
        super().__init__(dictionary, backbone, cfg.mask_special_logits)
        self.cfg = cfg
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        self.sidenet = SideNet(
            backbone, cfg.reduction_factor, cfg.memory_layer, cfg.dropout, cfg.attention_dropout,
            init=str(getattr(cfg, "sidenet_init", "paper")),
            copy_from=str(getattr(cfg, "sidenet_copy", "last")),
            gate_init=getattr(cfg, "gate_init", 0.0),
            gate_lr_scale=getattr(cfg, "gate_lr_scale", 1.0),
            memory_distance=memory_distance(cfg),
        )
        self.reach_labels = []
        spec = getattr(cfg, "memory_reach_buckets", "")
        if spec:
            buckets = parse_segment_buckets(spec, "--memory-reach-buckets")
            self.sidenet.memory_attention.reach_buckets = buckets
            self.reach_labels = [segment_label(lo, hi) for lo, hi in buckets]
        if cfg.disable_memory:
            # an unused parameter would stall data-parallel gradient reduction
            self.sidenet.memory_attention.gate.requires_grad_(False)
        self.init_stream_memories()

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen: no dropout, ever
        return self

    def new_memory(self, num_rows: int, memory_size: int, template: torch.Tensor,
                   fingerprint: str = "") -> ChunkedMemoryBank:
        """An empty memory shaped for this model (heads, head size, chunk size, search backend),
        with ``template``'s device and dtype, that the caller owns and passes to :meth:`forward`."""
        dims = self.backbone.dims
        return ChunkedMemoryBank(
            num_rows, dims.num_kv_heads, dims.head_dim, self.cfg.chunk_size, memory_size,
            dtype=template.dtype, device=template.device, backend=self.cfg.search_backend,
            fingerprint=fingerprint,
        )

    @torch.no_grad()
    def memory_keys_values(self, src_tokens):
        """The frozen backbone's layer-m keys and values (B, Hkv, T, hd) of ``src_tokens``: what
        the forward pass writes into memory, computed without the SideNet or later layers."""
        _, kv = self.backbone(src_tokens, kv_layer=self.cfg.memory_layer, stop_at_kv_layer=True)
        return kv

    # ------------------------------------------------------------------ incremental decoding

    def start_decoding(self, batch: int, template: torch.Tensor,
                       memory: Optional[ChunkedMemoryBank] = None,
                       segment_len: Optional[int] = None) -> DecodingState:
        """A state at the start of a document, on ``template``'s device and in its dtype (any
        tensor, e.g. a model parameter): empty caches of ``segment_len`` (T, by default
        the --tokens-per-sample the model was built with) tokens and ``memory`` (``batch`` rows;
        a new empty one if None; none at all with ``disable_memory``), which decoding extends."""
        T = segment_len or self.cfg.max_target_positions or self.backbone.dims.max_positions
        check_segment_length(T, self.backbone.dims.max_positions, "the backbone's")
        if self.cfg.disable_memory:
            memory = None
        elif memory is None:
            memory = self.new_memory(batch, self.cfg.memory_size, template)
        return DecodingState(self.backbone.new_caches(batch, T, template),
                             self.sidenet.new_caches(batch, T, template), memory)

    @torch.no_grad()
    def advance(self, tokens, state: DecodingState, features_only: bool = False):
        """Feed ``tokens`` (B, n), the next input tokens of every row, which must not cross a
        segment boundary; returns logits (B, n, V). When the segment becomes full, its layer-m
        keys/values go into the memory (write after read) and the caches restart."""
        T, n = state.segment_len, tokens.size(1)
        if state.pos + n > T:
            raise ValueError(f"advance: {n} tokens after {state.pos} cross the {T}-token segment")
        hiddens, _ = self.backbone(tokens, caches=state.backbone)
        x, _ = self.sidenet(hiddens, memory=state.memory,
                            retrieved_tokens=self.cfg.retrieved_tokens, caches=state.side)
        if state.pos == T:
            if state.memory is not None:
                cache = state.backbone[self.cfg.memory_layer]
                state.memory.add(cache.k, cache.v)  # (B, Hkv, T, hd) each
            state.restart_segment()
        return x if features_only else self.output_layer(x)

    @torch.no_grad()
    def prefill(self, tokens, state: DecodingState):
        """Feed a whole prompt (B, n) segment by segment, as eval-lm would; returns the logits
        (B, V) after its last token."""
        T, start, last = state.segment_len, 0, None
        while start < tokens.size(1):
            n = min(T - state.pos, tokens.size(1) - start)
            last = self.advance(tokens[:, start:start + n], state, features_only=True)[:, -1]
            start += n
        if last is None:
            raise ValueError("prefill: an empty prompt (at least one token, e.g. </s>)")
        return self.output_layer(last)  # (B, V)

    def reorder_incremental_state(self, incremental_state, new_order):
        state = self.get_incremental_state(incremental_state, "decoding")
        if state is not None:
            state.reorder(new_order)

    def decoding_state(self, incremental_state) -> Optional[DecodingState]:
        return self.get_incremental_state(incremental_state, "decoding")

    def set_decoding_state(self, incremental_state, state: DecodingState):
        self.set_incremental_state(incremental_state, "decoding", state)

    # ------------------------------------------------------------------ scoring

    def forward(self, src_tokens, src_lengths=None, new_document=None, memory=None,
                write_memory: bool = True, features_only: bool = False,
                incremental_state=None, **unused):
        """Score a segment (B, T); returns logits (B, T, V) and an ``extra`` dict.

        By default each row reads and then extends its own stream's memory, cleared first for
        rows flagged in ``new_document``. A caller may pass its own ``memory`` instead (a
        :class:`ChunkedMemoryBank` from :meth:`new_memory` with B rows, or one row that every
        row reads) and ``write_memory=False`` to read without writing, as scoring does.

        With ``incremental_state`` (fairseq's generators), ``src_tokens`` are all tokens so far
        and only the last is fed (:meth:`advance`); a state not yet set starts a document with
        an empty memory.
        """
        if incremental_state is not None:
            state = self.decoding_state(incremental_state)
            if state is None:
                state = self.start_decoding(src_tokens.size(0), self.backbone.output_weight)
                self.set_decoding_state(incremental_state, state)
            out = self.advance(src_tokens[:, -1:], state, features_only)
            return out, {"inner_states": None}
        B, T = src_tokens.shape
        cfg = self.cfg
        with torch.no_grad():
            hiddens, (mem_k, mem_v) = self.backbone(src_tokens, kv_layer=cfg.memory_layer)
        bank = None
        if memory is not None:
            if cfg.disable_memory:
                raise ValueError("this model runs with disable_memory: it reads no memory")
            if write_memory and memory.num_rows != B:
                raise ValueError(
                    f"a memory of {memory.num_rows} row(s) shared by {B} batch rows is "
                    "read-only: pass write_memory=False"
                )
            bank = memory
        elif not cfg.disable_memory:
            bank = self.stream_batch_memory(B, mem_k, new_document)
        x, stats = self.sidenet(hiddens, memory=bank, retrieved_tokens=cfg.retrieved_tokens)

        extra = {"inner_states": [x]}
        if bank is not None:
            extra["memory_stats"] = {
                "fill": bank.fill().float().mean(),
                "gate": stats.gate,
                "memory_share": stats.memory_share,
            }
            if stats.reach is not None:
                extra["memory_stats"]["reach"] = dict(stats.reach, labels=self.reach_labels)
            if write_memory:
                lengths = src_lengths
                if lengths is None:
                    lengths = src_tokens.ne(self.dictionary.pad()).sum(dim=1)
                bank.add(mem_k, mem_v, lengths=lengths)  # write after read
        return (x if features_only else self.output_layer(x)), extra


class LongMemModel(FairseqLanguageModel):
    """LongMem over a backbone family; each family registers a subclass that sets ``family``,
    ``dims_from_config(cfg, vocab_size)`` and the options that say which backbone it is
    (:func:`~.backbone.load_backbone`)."""

    family = ""
    # options a --backbone-path must agree with when they are set (0: taken from it) ...
    SIZE_OPTIONS = ()
    # ... and options always taken from it
    COPIED_OPTIONS = ()

    @staticmethod
    def dims_from_config(cfg, vocab_size: int):
        raise NotImplementedError

    @classmethod
    def default_memory_layer(cls, cfg) -> int:
        """--memory-layer when it is left at -1 (after the backbone's sizes are known)."""
        return cfg.memory_layer

    @classmethod
    def build_model(cls, cfg, task):
        family = FAMILIES[cls.family]
        if cfg.num_layers:  # known before the backbone is read: refuse bad options first
            validate_config(cfg)
        if getattr(task, "building_from_checkpoint", False):
            # weights come with the LongMem checkpoint; the sizes were saved in its config
            backbone = family.backbone(cls.backbone_dims(cfg, len(task.target_dictionary)))
        elif not cfg.backbone_path:
            raise ValueError(
                f"--backbone-path is required: a {family.lm_model} checkpoint to freeze as the "
                "backbone"
            )
        else:
            backbone, backbone_cfg = load_backbone(cls, cfg, task)
            cfg.memory_layer = cls.default_memory_layer(cfg)
            record_in_config(cfg, "memory_layer", cfg.memory_layer)
            validate_config(cfg)
            record_in_config(cfg, "mask_special_logits",
                             bool(backbone_cfg.get("mask_special_logits", False)))
        dims = backbone.dims
        check_segment_length(cfg.max_target_positions, dims.max_positions, "the backbone's")
        bind_dictionary(cfg, task, f"the {family.longmem_model} checkpoint")
        check_memory_fits(cfg, dims, task)
        return cls(LongMemDecoder(cfg, task.target_dictionary, backbone))

    @classmethod
    def backbone_dims(cls, cfg, vocab_size: int):
        # cfg.dropout is the SideNet's; the frozen backbone has none
        return dataclasses.replace(cls.dims_from_config(cfg, vocab_size), dropout=0.0,
                                   attention_dropout=0.0)

    @classmethod
    def from_backbone(cls, cfg, dictionary, backbone: Backbone):
        """Build around an in-memory backbone (tests, notebooks)."""
        validate_config(cfg, num_layers=backbone.dims.num_layers)
        check_segment_length(cfg.max_target_positions, backbone.dims.max_positions, "the backbone's")
        return cls(LongMemDecoder(cfg, dictionary, backbone))

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        key = "decoder.backbone." + self.decoder.backbone.token_embedding
        check_vocab(state_dict, key, self.decoder.dictionary, "checkpoint")
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)


def memory_distance(cfg) -> int:
    """How many positions before its query a rotary family's memory read places every retrieved
    token (--memory-distance; 0: the segment length --tokens-per-sample, i.e. just before the
    local window's first token as seen from its last)."""
    if not hasattr(cfg, "memory_distance"):
        return 0  # a family without rotary positions
    distance = cfg.memory_distance or cfg.max_target_positions
    if not isinstance(distance, int) or distance < 1:
        raise ValueError(f"--memory-distance {cfg.memory_distance!r}: expected a positive number "
                         "of positions, or 0 with --tokens-per-sample set")
    return distance


def check_memory_sizes(memory_size: int, chunk_size: int, retrieved_tokens: int, prefix: str = ""):
    """msz, csz and K as a memory can hold them, or a one-line error naming the options
    (``prefix``: "free-" for the training-free read's --free-memory-size ...)."""
    msz, csz, k = (f"--{prefix}{name}" for name in ("memory-size", "chunk-size", "retrieved-tokens"))
    if chunk_size <= 0:
        raise ValueError(f"{csz} must be > 0, got {chunk_size}")
    if memory_size <= 0 or memory_size % chunk_size:
        raise ValueError(f"{msz} ({memory_size}) must be a positive multiple of {csz} "
                         f"({chunk_size})")
    if retrieved_tokens <= 0 or retrieved_tokens % chunk_size:
        raise ValueError(f"{k} ({retrieved_tokens}) must be a positive multiple of {csz} "
                         f"({chunk_size})")
    if retrieved_tokens > memory_size:
        raise ValueError(f"{k} ({retrieved_tokens}) exceeds {msz} ({memory_size})")


def validate_config(cfg, num_layers: Optional[int] = None):
    """Refuse option values the model cannot run with, in one line each (``num_layers``: the
    backbone's, when it is known better than ``cfg.num_layers``)."""
    def need(ok, msg):
        if not ok:
            raise ValueError(msg)

    layers = cfg.num_layers if num_layers is None else num_layers
    check_memory_sizes(cfg.memory_size, cfg.chunk_size, cfg.retrieved_tokens)
    need(0 <= cfg.memory_layer < layers,
         f"--memory-layer {cfg.memory_layer} is not a layer of the {layers}-layer backbone: "
         f"expected 0 to {layers - 1} (0-based), or leave it unset with an arch that picks one "
         "about 3/4 deep (longmem_gpt2_tiny ... _xl, longmem_llama)")
