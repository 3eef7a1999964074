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
from ..memory.layered import LayeredMemory, is_search_every
from ..modules.sidenet import MEMORY_READS, SIDENET_COPIES, SIDENET_INITS, SIDENET_RESIDUALS, SideNet
from .backbone import load_backbone
from .common import (
    BackboneDecoder,
    bind_dictionary,
    check_segment_length,
    check_vocab,
    fingerprint_field,
    format_layers,
    read_layers,
    record_in_config,
)
from .memory_fit import check_memory_fits
from .stream_memory import StreamMemoryMixin

logger = logging.getLogger(__name__)

SEARCH_BACKENDS = ChoiceEnum(list(ChunkedMemoryBank.BACKENDS))
SIDENET_INIT_CHOICES = ChoiceEnum(list(SIDENET_INITS))
SIDENET_COPY_CHOICES = ChoiceEnum(list(SIDENET_COPIES))
SIDENET_RESIDUAL_CHOICES = ChoiceEnum(list(SIDENET_RESIDUALS))
MEMORY_READ_CHOICES = ChoiceEnum(list(MEMORY_READS))


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
    read_layers: str = field(
        default="",
        metadata={"help": "several memory layers, e.g. '15-29' or '16,20,24' (0-based backbone "
                  "layers): each fills a memory of its own, read by the side block beside it "
                  "(one per side block; overrides --memory-layer); empty: --memory-layer alone"},
    )
    search_every: int = field(
        default=1,
        metadata={"help": "with several memory layers (--read-layers): one memory search per N "
                  "consecutive memory layers; the lowest of each group searches with its queries "
                  "and the group's other layers read the chunks it chose from their own memories "
                  "(their own keys, values and attention). 1: every memory layer searches its "
                  "own; N >= the number of memory layers: one search (docs/BENCHMARKS.md)"},
    )
    sidenet_from: int = field(
        default=0,
        metadata={"help": "S: the SideNet stands beside backbone layers S..L-1 and starts from "
                  "their input h_S ((L-S)/r side layers; 0: the paper's, from the embeddings)"},
    )
    sidenet_residual: SIDENET_RESIDUAL_CHOICES = field(
        default="cross",
        metadata={"help": "cross: the paper's cross-network residual, side layer j adds the "
                  "backbone's change over its r layers; none: side layers continue the side state "
                  "alone (with r = 1 and --sidenet-init paper the SideNet starts as the backbone's "
                  "layers S..L-1 themselves)"},
    )
    memory_read: MEMORY_READ_CHOICES = field(
        default="gated",
        metadata={"help": "gated: the paper's per-head mix of local and memory attention, "
                  "sigmoid(g_h); joint: one softmax over the retrieved tokens and the local "
                  "context, the memory tokens' scores plus g_h (0 at the start: the layer's own "
                  "attention extended to the memory, as --training-free-memory reads it)"},
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
            start=getattr(cfg, "sidenet_from", 0),
            read_layers=read_layers(cfg, backbone.dims.num_layers),
            residual=str(getattr(cfg, "sidenet_residual", "cross")),
            read_mode=str(getattr(cfg, "memory_read", "gated")),
            search_every=getattr(cfg, "search_every", 1),
        )
        self.read_layers = self.sidenet.read_layers
        every = self.sidenet.search_every
        if every > 1 and len(self.read_layers) > 1:
            logger.info("memory layers %s: one memory search per %d of them (--search-every %d); "
                        "searches per forward pass: %d instead of %d", format_layers(self.read_layers),
                        every, every, -(-len(self.read_layers) // every), len(self.read_layers))
        elif every > 1:
            logger.warning("--search-every %d has no effect with one memory layer (%d): it "
                           "shares a search between the memory layers of --read-layers", every,
                           self.read_layers[0])
        # the blocks whose keys/values fill the memory: one (a ChunkedMemoryBank) or several
        # (a LayeredMemory, one bank each; keys and values stacked on a leading axis)
        self.kv_layers = self.read_layers if len(self.read_layers) > 1 else self.read_layers[0]
        self.reach_labels = []
        spec = getattr(cfg, "memory_reach_buckets", "")
        if spec:
            buckets = parse_segment_buckets(spec, "--memory-reach-buckets")
            for reader in self.sidenet.memory_attentions:
                reader.reach_buckets = buckets
            self.reach_labels = [segment_label(lo, hi) for lo, hi in buckets]
        if cfg.disable_memory:
            # an unused parameter would stall data-parallel gradient reduction
            for reader in self.sidenet.memory_attentions:
                reader.gate.requires_grad_(False)
        self.init_stream_memories()

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen: no dropout, ever
        return self

    @property
    def memory_label(self):
        """The memory layer (an int), or the memory layers as '15-29': what saved memories
        record."""
        if len(self.read_layers) == 1:
            return self.read_layers[0]
        return format_layers(self.read_layers)

    def new_memory(self, num_rows: int, memory_size: int, template: torch.Tensor,
                   fingerprint: str = ""):
        """An empty memory shaped for this model (heads, head size, chunk size, search backend),
        with ``template``'s device and dtype, that the caller owns and passes to :meth:`forward`:
        a :class:`ChunkedMemoryBank`, or with several memory layers a :class:`LayeredMemory`
        of one bank per layer."""
        dims = self.backbone.dims
        options = dict(num_rows=num_rows, num_heads=dims.num_kv_heads, head_dim=dims.head_dim,
                       chunk_size=self.cfg.chunk_size, memory_size=memory_size,
                       dtype=template.dtype, device=template.device,
                       backend=self.cfg.search_backend, fingerprint=fingerprint)
        if len(self.read_layers) > 1:
            return LayeredMemory(self.read_layers, **options)
        return ChunkedMemoryBank(**options)

    @torch.no_grad()
    def memory_keys_values(self, src_tokens):
        """The frozen backbone's layer-m keys and values (B, Hkv, T, hd) of ``src_tokens`` (with
        several memory layers, theirs stacked: (layers, B, Hkv, T, hd)): what the forward pass
        writes into memory, computed without the SideNet or later layers."""
        _, kv = self.backbone(src_tokens, kv_layer=self.kv_layers, stop_at_kv_layer=True)
        return kv

    def memory_from_caches(self, caches, rows=slice(None), length: Optional[int] = None):
        """The memory layers' keys and values in the backbone's decoding ``caches`` (rows
        ``rows``, the first ``length`` tokens; all valid ones by default), as :meth:`forward`
        writes them: (B, Hkv, n, hd) each, or stacked (layers, ...) for several layers."""
        def one(layer):
            cache = caches[layer]
            n = cache.len if length is None else length
            return cache.k[rows, :, :n], cache.v[rows, :, :n]

        if len(self.read_layers) == 1:
            return one(self.read_layers[0])
        pairs = [one(layer) for layer in self.read_layers]
        return torch.stack([k for k, _ in pairs]), torch.stack([v for _, v in pairs])

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
        hiddens, _ = self.backbone(tokens, caches=state.backbone, keep=self.sidenet.hiddens_read())
        x, _ = self.sidenet(hiddens, memory=state.memory,
                            retrieved_tokens=self.cfg.retrieved_tokens, caches=state.side)
        if state.pos == T:
            if state.memory is not None:
                state.memory.add(*self.memory_from_caches(state.backbone))  # (B, Hkv, T, hd) each
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
            hiddens, (mem_k, mem_v) = self.backbone(src_tokens, kv_layer=self.kv_layers,
                                                    keep=self.sidenet.hiddens_read())
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
            layers = read_layers(cfg, backbone.dims.num_layers)
            # with --read-layers, the first of them stands for the memory layer
            cfg.memory_layer = layers[0] if layers else cls.default_memory_layer(cfg)
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
    layers_read = read_layers(cfg, layers)  # set: they override --memory-layer
    need(layers_read or 0 <= cfg.memory_layer < layers,
         f"--memory-layer {cfg.memory_layer} is not a layer of the {layers}-layer backbone: "
         f"expected 0 to {layers - 1} (0-based), or leave it unset with an arch that picks one "
         "about 3/4 deep (longmem_gpt2_tiny ... _xl, longmem_llama)")
    every = getattr(cfg, "search_every", 1)
    need(is_search_every(every),
         f"--search-every {every!r}: expected an integer >= 1 (memory layers per search)")
    start = getattr(cfg, "sidenet_from", 0)
    need(0 <= start < layers, f"--sidenet-from {start} is not a layer of the {layers}-layer "
         f"backbone: expected 0 to {layers - 1}")
    need(all(m >= start for m in layers_read or (cfg.memory_layer,)),
         f"--sidenet-from {start}: the SideNet must stand beside its memory layers "
         f"({format_layers(layers_read or (cfg.memory_layer,))})")
