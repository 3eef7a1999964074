"""The Llama family's fairseq models: ``llama_lm`` (a plain Llama language model; the converter
writes its checkpoints, ``llama_lm_tiny`` trains one from scratch for tests) and
``longmem_llama`` (LongMem over a frozen ``llama_lm``, its sizes read from ``--backbone-path``)."""

from dataclasses import dataclass, field
from typing import Optional

from fairseq.dataclass import FairseqDataclass
from fairseq.models import register_model, register_model_architecture
from omegaconf import II

from ...models.backbone_lm import BackboneLanguageModel
from ...models.common import fingerprint_field
from ...models.longmem import LongMemModel, LongMemOptions
from .modules import LlamaDims

SIZE_OPTIONS = ("embed_dim", "num_layers", "num_heads", "num_kv_heads", "ffn_dim")
COPIED_OPTIONS = ("max_positions", "rope_theta", "rms_norm_eps", "tie_embeddings")


@dataclass
class LlamaSizes(FairseqDataclass):
    """A Llama backbone's sizes (Hugging Face's config names in brackets)."""

    embed_dim: int = field(default=0, metadata={"help": "width (hidden_size)"})
    num_layers: int = field(default=0, metadata={"help": "blocks (num_hidden_layers)"})
    num_heads: int = field(default=0, metadata={"help": "query heads (num_attention_heads)"})
    num_kv_heads: int = field(
        default=0, metadata={"help": "key-value heads (num_key_value_heads); fewer than "
                             "--num-heads: grouped-query attention"})
    ffn_dim: int = field(default=0, metadata={"help": "SwiGLU width (intermediate_size)"})
    max_positions: int = field(default=2048, metadata={"help": "context (max_position_embeddings)"})
    rope_theta: float = field(default=10000.0, metadata={"help": "rotary base (rope_theta)"})
    rms_norm_eps: float = field(default=1e-5, metadata={"help": "RMSNorm epsilon (rms_norm_eps)"})
    tie_embeddings: bool = field(
        default=True, metadata={"help": "output layer = token embedding (tie_word_embeddings)"})


@dataclass
class LlamaLMConfig(LlamaSizes):
    dropout: float = field(default=0.0, metadata={"help": "residual and embedding dropout"})
    attention_dropout: float = field(default=0.0, metadata={"help": "attention-weight dropout"})
    mask_special_logits: bool = field(
        default=False,
        metadata={"help": "give <s>, <pad> and <unk> a logit of -inf; set by the converter "
                  "because the model has no such tokens"},
    )
    dictionary_fingerprint: str = fingerprint_field()
    max_target_positions: Optional[int] = II("task.tokens_per_sample")


def dims_from_config(cfg, vocab_size: int) -> LlamaDims:
    return LlamaDims(
        vocab_size=vocab_size, embed_dim=cfg.embed_dim, num_layers=cfg.num_layers,
        num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, ffn_dim=cfg.ffn_dim,
        max_positions=cfg.max_positions, rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_norm_eps, tie_embeddings=cfg.tie_embeddings, dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout,
    )


@register_model("llama_lm", dataclass=LlamaLMConfig)
class LlamaLanguageModel(BackboneLanguageModel):
    family = "llama"
    dims_from_config = staticmethod(dims_from_config)

    @classmethod
    def build_model(cls, cfg, task):
        missing = [k for k in SIZE_OPTIONS if not getattr(cfg, k)]
        if missing:
            raise ValueError(f"llama_lm needs its sizes: set {', '.join(missing)} "
                             "(--arch llama_lm_tiny sets them all)")
        return super().build_model(cfg, task)


@register_model_architecture("llama_lm", "llama_lm_tiny")
def llama_lm_tiny(args):
    """A 4-layer Llama of width 128 with grouped-query attention (4 query heads, 2 key-value
    heads), for tests and CPU runs."""
    args.embed_dim = getattr(args, "embed_dim", 0) or 128
    args.num_layers = getattr(args, "num_layers", 0) or 4
    args.num_heads = getattr(args, "num_heads", 0) or 4
    args.num_kv_heads = getattr(args, "num_kv_heads", 0) or 2
    args.ffn_dim = getattr(args, "ffn_dim", 0) or 344
    args.max_positions = getattr(args, "max_positions", 2048)


@dataclass
class LongMemLlamaConfig(LlamaSizes, LongMemOptions):
    memory_distance: int = field(
        default=0,
        metadata={"help": "rotary positions of the memory: every retrieved token is read as if "
                  "this many positions before its query (its key is stored unrotated); 0: "
                  "--tokens-per-sample (docs/DESIGN.md)"},
    )
    max_target_positions: Optional[int] = II("task.tokens_per_sample")


@register_model("longmem_llama", dataclass=LongMemLlamaConfig)
class LongMemLlamaModel(LongMemModel):
    family = "llama"
    SIZE_OPTIONS = SIZE_OPTIONS
    COPIED_OPTIONS = COPIED_OPTIONS
    dims_from_config = staticmethod(dims_from_config)

    @classmethod
    def default_memory_layer(cls, cfg) -> int:
        if cfg.memory_layer != -1:
            return cfg.memory_layer
        # about 3/4 deep, and the backbone block that the memory's side layer m // r copies
        r = cfg.reduction_factor
        if getattr(cfg, "sidenet_copy", "last") == "first":
            return cfg.num_layers * 3 // 4 // r * r
        return (cfg.num_layers * 3 // 4 + 1) // r * r - 1
