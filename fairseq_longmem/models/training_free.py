"""The training-free memory read, condition (e): the frozen backbone reads a memory itself, with no
SideNet and no training (InfLLM's idea; docs/DESIGN.md, "The training-free read").

Each reading layer keeps its own memory of its own keys and values (position-free, per key-value
head) and attends, in one softmax, to its causal local context and to the tokens it retrieves
(chunk search as LongMem's: top ``K / csz`` chunks by ``<q, mean key>``), every retrieved token
placed ``memory_distance`` positions before the query. Used through the ``longmem_lm`` task on a
backbone checkpoint (``gpt2_lm``, ``llama_lm``)::

    fairseq-eval-lm DATA --task longmem_lm --path BACKBONE/checkpoint.pt --training-free-memory \\
        --free-read-layers 15-29 --free-memory-size 16384 --free-chunk-size 4 \\
        --free-retrieved-tokens 32 --tokens-per-sample 256 --batch-size 1

A segment is scored, then every reading layer's keys and values of it are written into that
layer's memory (write after read), as LongMem's stream memories; a row's memory is cleared when
its stream starts a new document. Nothing is trained: the model is built for evaluation only.
"""

import dataclasses
import logging
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from fairseq.models import FairseqLanguageModel

from ..families import family_of
from ..families.base import Backbone
from ..memory.layered import LayeredMemory, is_search_every
from ..modules.memory_attention import free_read_attention_class
from .common import BackboneDecoder, check_vocab, format_layers, parse_layers
from .longmem import check_memory_sizes
from .stream_memory import StreamMemoryMixin

logger = logging.getLogger(__name__)


@dataclass
class FreeReadConfig:
    """What the read needs; named as LongMem's options where both have one, so that scoring code
    written for LongMem (in-context learning, suffix identification) reads it alike."""

    layers: Tuple[int, ...]  # 0-based blocks that read (a spec such as "15-29" before around())
    memory_size: int = 16384
    chunk_size: int = 4
    retrieved_tokens: int = 32
    memory_distance: int = 0  # 0: max_target_positions (the segment length)
    search_backend: str = "auto"
    max_target_positions: Optional[int] = None
    disable_memory: bool = False
    search_every: int = 1  # reading layers per memory search (LayeredMemory.shared_search)

    @property
    def memory_layer(self) -> str:
        """The reading layers, e.g. '15-29' (what a saved in-context memory records)."""
        return format_layers(self.layers)


def validate(cfg: FreeReadConfig):
    check_memory_sizes(cfg.memory_size, cfg.chunk_size, cfg.retrieved_tokens, prefix="free-")
    every = cfg.search_every
    if not is_search_every(every):
        raise ValueError(f"--free-search-every {every!r}: expected an integer >= 1 (reading "
                         "layers per memory search)")
    if cfg.memory_distance < 0:
        raise ValueError(f"--free-memory-distance must be >= 0 (0: the segment length), got "
                         f"{cfg.memory_distance}")


class TrainingFreeDecoder(StreamMemoryMixin, BackboneDecoder):
    """A frozen backbone whose ``cfg.layers`` blocks read a :class:`LayeredMemory`."""

    def __init__(self, dictionary, backbone: Backbone, mask_special_logits: bool,
                 cfg: FreeReadConfig):
        super().__init__(dictionary, backbone, mask_special_logits)
        validate(cfg)
        self.cfg = cfg
        family = family_of(backbone)
        reader = free_read_attention_class(family.attention)
        distance = cfg.memory_distance or cfg.max_target_positions or backbone.dims.max_positions
        for i in cfg.layers:  # the same parameters under the same names, read differently
            block = family.block(backbone.dims, attn=reader(backbone.dims))
            block.load_state_dict(backbone.blocks[i].state_dict())
            block.attn.memory_distance = distance
            backbone.blocks[i] = block.to(backbone.output_weight)
        self.backbone.requires_grad_(False)
        self.init_stream_memories()

    @property
    def memory_label(self) -> str:
        """The reading layers as '15-29' (what saved memories record)."""
        return self.cfg.memory_layer

    def new_memory(self, num_rows: int, memory_size: int, template: torch.Tensor,
                   fingerprint: str = "") -> LayeredMemory:
        """An empty memory for this model: one bank per reading layer, ``num_rows`` rows."""
        dims = self.backbone.dims
        return LayeredMemory(
            self.cfg.layers, num_rows=num_rows, num_heads=dims.num_kv_heads,
            head_dim=dims.head_dim, chunk_size=self.cfg.chunk_size, memory_size=memory_size,
            dtype=template.dtype, device=template.device, backend=self.cfg.search_backend,
            fingerprint=fingerprint)

    def _run(self, src_tokens, memory: Optional[LayeredMemory]):
        """Final-norm features (B, T, C) and the reading layers' keys and values, stacked
        (layers, B, Hkv, T, hd) each."""
        x = self.backbone.embed(src_tokens)
        keys, values = [], []
        banks = memory.shared_search(self.cfg.search_every) if memory is not None else None
        for i, block in enumerate(self.backbone.blocks):
            if i in self.cfg.layers:
                bank = banks[i] if banks is not None else None
                x, (k, v) = block(x, memory=bank, retrieved_tokens=self.cfg.retrieved_tokens)
                keys.append(k)
                values.append(v)
            else:
                x, _ = block(x)
        return self.backbone.final_norm(x), torch.stack(keys), torch.stack(values)

    @torch.no_grad()
    def memory_keys_values(self, src_tokens):
        """The reading layers' keys and values of ``src_tokens`` read without a memory (as LongMem
        writes its frozen backbone's): (layers, B, Hkv, T, hd) each, for :meth:`LayeredMemory.add`."""
        _, k, v = self._run(src_tokens, None)
        return k, v

    @torch.no_grad()
    def forward(self, src_tokens, src_lengths=None, new_document=None, memory=None,
                write_memory: bool = True, features_only: bool = False,
                incremental_state=None, **unused):
        """Score a segment (B, T) as :class:`~.longmem.LongMemDecoder` does: each row reads and
        then extends its stream's memory (cleared for rows flagged in ``new_document``), or reads
        a ``memory`` the caller passes (``write_memory=False`` to leave it as it is)."""
        if incremental_state is not None:
            raise ValueError(
                "--training-free-memory scores text (fairseq-eval-lm, longmem_icl, "
                "longmem_suffix); generation with it is not implemented")
        B = src_tokens.size(0)
        if memory is not None:
            if write_memory and memory.num_rows != B:
                raise ValueError(f"a memory of {memory.num_rows} row(s) shared by {B} batch rows "
                                 "is read-only: pass write_memory=False")
            bank = memory
        else:
            bank = self.stream_batch_memory(B, self.backbone.output_weight, new_document)
        x, k, v = self._run(src_tokens, bank)
        if write_memory:
            lengths = src_lengths
            if lengths is None:
                lengths = src_tokens.ne(self.dictionary.pad()).sum(dim=1)
            bank.add(k, v, lengths=lengths)  # write after read
        extra = {"inner_states": None, "memory_stats": {"fill": bank.fill().float().mean()}}
        return (x if features_only else self.output_layer(x)), extra


class TrainingFreeMemoryModel(FairseqLanguageModel):
    """A backbone checkpoint's model, read with a memory (never trained, never saved)."""

    @classmethod
    def around(cls, model: FairseqLanguageModel, cfg: FreeReadConfig) -> "TrainingFreeMemoryModel":
        """Wrap a plain LM (``gpt2_lm``, ``llama_lm``); its weights are kept as they are."""
        decoder = model.decoder
        if not isinstance(getattr(decoder, "backbone", None), Backbone) \
                or hasattr(decoder, "sidenet"):
            raise ValueError(
                "--training-free-memory reads a backbone checkpoint (gpt2_lm, llama_lm); this is "
                f"a {type(model).__name__}: score a LongMem checkpoint without it")
        if isinstance(cfg.layers, str):  # e.g. "15-29" from the command line
            cfg = dataclasses.replace(
                cfg, layers=parse_layers(cfg.layers, decoder.backbone.dims.num_layers,
                                    "--free-read-layers"))
        model = cls(TrainingFreeDecoder(decoder.dictionary, decoder.backbone,
                                        decoder.special_mask is not None, cfg))
        c = model.decoder.cfg
        logger.info(
            "training-free memory: blocks %s of the %d-layer backbone read their own memories "
            "(%d tokens per stream each, chunks of %d, %d tokens retrieved per query and head%s)",
            format_layers(c.layers), decoder.backbone.dims.num_layers, c.memory_size,
            c.chunk_size, c.retrieved_tokens,
            f"; one memory search per {c.search_every} of them" if c.search_every > 1 else "")
        return model

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        key = "decoder.backbone." + self.decoder.backbone.token_embedding
        check_vocab(state_dict, key, self.decoder.dictionary, "checkpoint")
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)

    def max_positions(self):
        return self.decoder.max_positions()

