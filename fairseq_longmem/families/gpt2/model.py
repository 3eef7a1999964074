"""The GPT-2 family's fairseq models: ``gpt2_lm`` (a plain GPT-2 language model: train from
scratch, evaluate, convert to) and ``longmem_gpt2`` (LongMem over a frozen ``gpt2_lm``), with archs
``{gpt2_lm,longmem_gpt2}_{tiny,small,medium,large,xl}`` of OpenAI's sizes."""

from dataclasses import dataclass, field
from typing import Optional

from fairseq.dataclass import FairseqDataclass
from fairseq.models import register_model, register_model_architecture
from omegaconf import II

from ...models.backbone_lm import BackboneLanguageModel
from ...models.common import fingerprint_field
from ...models.longmem import LongMemModel, LongMemOptions
from .modules import GPT2_SIZES, GPT2Dims

# 0-based backbone layer whose keys/values fill the memory, per size: odd, about 3/4 deep
# (the paper reads layer 17 of GPT-2 medium's 24)
DEFAULT_MEMORY_LAYER = {"tiny": 3, "small": 9, "medium": 17, "large": 25, "xl": 35}


@dataclass
class GPT2LMConfig(FairseqDataclass):
    embed_dim: int = field(default=768, metadata={"help": "model width (n_embd)"})
    num_layers: int = field(default=12, metadata={"help": "number of transformer blocks (n_layer)"})
    num_heads: int = field(default=12, metadata={"help": "attention heads per block (n_head)"})
    max_positions: int = field(
        default=1024, metadata={"help": "learned position embeddings (n_positions)"}
    )
    dropout: float = field(default=0.1, metadata={"help": "residual and embedding dropout"})
    attention_dropout: float = field(default=0.1, metadata={"help": "attention-weight dropout"})
    layer_norm_eps: float = field(default=1e-5, metadata={"help": "LayerNorm epsilon"})
    mask_special_logits: bool = field(
        default=False,
        metadata={
            "help": "give <s>, <pad> and <unk> a logit of -inf; set by the HF converter because "
            "GPT-2 has no such tokens and their tied embedding rows would otherwise take mass"
        },
    )
    dictionary_fingerprint: str = fingerprint_field()
    max_target_positions: Optional[int] = II("task.tokens_per_sample")


def dims_from_config(cfg, vocab_size: int) -> GPT2Dims:
    return GPT2Dims(
        vocab_size=vocab_size,
        embed_dim=cfg.embed_dim,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        max_positions=cfg.max_positions,
        dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout,
        layer_norm_eps=cfg.layer_norm_eps,
    )



@register_model("gpt2_lm", dataclass=GPT2LMConfig)
class GPT2LanguageModel(BackboneLanguageModel):
    family = "gpt2"
    dims_from_config = staticmethod(dims_from_config)


@dataclass
class LongMemGPT2Config(LongMemOptions):
    embed_dim: int = field(default=768, metadata={"help": "backbone width (set by --arch)"})
    num_layers: int = field(default=12, metadata={"help": "backbone layers L' (set by --arch)"})
    num_heads: int = field(default=12, metadata={"help": "backbone heads (set by --arch)"})
    max_positions: int = field(default=1024, metadata={"help": "backbone positions"})
    layer_norm_eps: float = field(default=1e-5, metadata={"help": "LayerNorm epsilon"})
    max_target_positions: Optional[int] = II("task.tokens_per_sample")


@register_model("longmem_gpt2", dataclass=LongMemGPT2Config)
class LongMemGPT2Model(LongMemModel):
    family = "gpt2"
    SIZE_OPTIONS = ("embed_dim", "num_layers", "num_heads")
    COPIED_OPTIONS = ("max_positions", "layer_norm_eps")
    dims_from_config = staticmethod(dims_from_config)


def register_size_archs(model_name: str, prefix: str, extra=None):
    """Register ``{prefix}_{size}`` for every size in GPT2_SIZES; an arch fills only unset
    fields. ``extra(args, size)``, if given, sets model-specific defaults."""

    def make(size):
        dim, layers, heads = GPT2_SIZES[size]

        def arch(args):
            args.embed_dim = getattr(args, "embed_dim", dim)
            args.num_layers = getattr(args, "num_layers", layers)
            args.num_heads = getattr(args, "num_heads", heads)
            args.max_positions = getattr(args, "max_positions", 1024)
            if extra is not None:
                extra(args, size)

        return arch

    for size in GPT2_SIZES:
        register_model_architecture(model_name, f"{prefix}_{size}")(make(size))


def _memory_layer_default(args, size):
    if getattr(args, "memory_layer", -1) in (None, -1):
        args.memory_layer = DEFAULT_MEMORY_LAYER[size]


register_size_archs("gpt2_lm", "gpt2_lm")
register_size_archs("longmem_gpt2", "longmem_gpt2", extra=_memory_layer_default)
