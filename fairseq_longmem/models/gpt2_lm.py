"""``gpt2_lm``: a plain GPT-2 language model for fairseq (train from scratch, evaluate, convert to).

Archs ``gpt2_lm_{tiny,small,medium,large,xl}`` carry OpenAI's sizes. The converter
(:mod:`fairseq_longmem.convert_hf_gpt2`) writes checkpoints of this model.
"""

import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from fairseq import utils
from fairseq.dataclass import FairseqDataclass
from fairseq.models import (
    FairseqDecoder,
    FairseqLanguageModel,
    register_model,
    register_model_architecture,
)
from omegaconf import II, OmegaConf

from ..modules.gpt2 import GPT2_SIZES, GPT2Backbone, GPT2Dims

logger = logging.getLogger(__name__)


def fingerprint_field():
    """The model option that holds the fingerprint of the dictionary a model was trained with."""
    return field(
        default="",
        metadata={
            "help": "sha256 of the dictionary's symbols in order; recorded in the checkpoint when "
            "the model is built, checked against the task's dict.txt when it is loaded (leave unset)"
        },
    )


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


def special_logit_mask(dictionary, vocab_size: int) -> torch.Tensor:
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[[dictionary.bos(), dictionary.pad(), dictionary.unk()]] = True
    return mask


def check_vocab(state_dict, key: str, dictionary, what: str):
    """Refuse a checkpoint whose embedding does not match the task's dictionary, in one line."""
    w = state_dict.get(key)
    if w is not None and w.size(0) != len(dictionary):
        raise ValueError(
            f"{what} has a vocabulary of {w.size(0)} entries but the task's dictionary has "
            f"{len(dictionary)}: use the dict.txt that came with the checkpoint"
        )


FINGERPRINT = "dictionary_fingerprint"


def dictionary_fingerprint(dictionary) -> str:
    """sha256 of the dictionary's symbols in order (counts left out): two dictionaries give every
    token the same id exactly when their fingerprints agree."""
    h = hashlib.sha256()
    for symbol in dictionary.symbols:
        h.update(symbol.encode("utf-8") + b"\n")
    return h.hexdigest()


def task_dict_path(task) -> str:
    """Where the task's dictionary came from, for messages."""
    # fairseq's own language_modeling task keeps its options in ``args`` (LegacyFairseqTask)
    options = getattr(task, "cfg", None) or getattr(task, "args", None)
    data = getattr(options, "data", None)
    paths = utils.split_paths(data) if isinstance(data, str) else []
    return os.path.join(paths[0], "dict.txt") if paths else "the task's dictionary"


def check_fingerprint(recorded: Optional[str], dictionary, source: str, dict_path: str):
    """Refuse ``dictionary`` if ``source`` (a checkpoint) recorded another fingerprint; warn if it
    recorded none (checkpoints written before fingerprints), since then nothing can be checked."""
    if not recorded:
        logger.warning(
            "%s records no dictionary fingerprint (written by an older fairseq-longmem): cannot "
            "check that %s is the dictionary it was trained with",
            source, dict_path,
        )
        return
    actual = dictionary_fingerprint(dictionary)
    if recorded != actual:
        raise ValueError(
            f"{source} was trained with a dictionary of fingerprint {recorded[:12]}, but "
            f"{dict_path} ({len(dictionary)} symbols) has fingerprint {actual[:12]}: other "
            "symbols or the same ones in another order, so token ids would mean other words; "
            "binarize the data with the dict.txt that came with the checkpoint "
            "(fairseq-preprocess --srcdict)"
        )


def saved_model_config(cfg):
    """The model config node that a checkpoint held or that this run will save.

    fairseq hands a model whose ``_name`` is a registered model (``--arch gpt2_lm`` or hydra's
    ``_name: gpt2_lm``, not a sized arch) a merged copy of ``cfg.model`` whose parent is the run's
    root config; the root's own ``model`` node is the one a checkpoint is read from or saved."""
    if OmegaConf.is_config(cfg):
        parent = cfg._get_parent()
        if OmegaConf.is_dict(parent) and OmegaConf.is_dict(parent.get("model")):
            return parent.model
    return cfg


def record_in_config(cfg, key: str, value):
    """Set a model option that ``build_model`` worked out, where checkpoints will save it too."""
    for node in {id(n): n for n in (cfg, saved_model_config(cfg))}.values():
        setattr(node, key, value)


def bind_dictionary(cfg, task, source: str):
    """In ``build_model``: check the fingerprint that a loaded checkpoint's model config recorded
    against the task's dictionary (none: written before fingerprints), or record it in a new
    run's config, where it is empty."""
    node = saved_model_config(cfg)
    if OmegaConf.is_config(node):
        recorded = node.get(FINGERPRINT)  # None: the key is absent
    else:
        recorded = getattr(node, FINGERPRINT, None)
    if recorded is None or recorded:
        check_fingerprint(recorded, task.target_dictionary, source, task_dict_path(task))
    else:
        record_in_config(cfg, FINGERPRINT, dictionary_fingerprint(task.target_dictionary))


class GPT2HeadDecoder(FairseqDecoder):
    """What every decoder here shares: a GPT-2 ``backbone`` whose token embedding is the tied
    output layer, and -inf logits for <s>/<pad>/<unk> when ``mask_special_logits`` (a converted
    GPT-2 has no such tokens). ``forward(..., features_only=True)`` returns the final
    LayerNorm's output; :meth:`output_layer` turns any slice of it into logits."""

    def __init__(self, dictionary, backbone: GPT2Backbone, mask_special_logits: bool):
        super().__init__(dictionary)
        self.backbone = backbone
        mask = special_logit_mask(dictionary, len(dictionary)) if mask_special_logits else None
        self.register_buffer("special_mask", mask, persistent=False)

    def output_layer(self, features):
        logits = F.linear(features, self.backbone.wte.weight)  # (..., V)
        if self.special_mask is not None:
            logits = logits.masked_fill(self.special_mask, float("-inf"))
        return logits

    def max_positions(self):
        return self.backbone.dims.max_positions


class GPT2Decoder(GPT2HeadDecoder):
    def __init__(self, cfg: GPT2LMConfig, dictionary):
        backbone = GPT2Backbone(dims_from_config(cfg, len(dictionary)))
        super().__init__(dictionary, backbone, cfg.mask_special_logits)

    def forward(self, src_tokens, features_only: bool = False, **unused):
        hiddens, _ = self.backbone(src_tokens)
        x = self.backbone.ln_f(hiddens[-1])  # (B, T, C)
        return (x if features_only else self.output_layer(x)), {"inner_states": hiddens}


@register_model("gpt2_lm", dataclass=GPT2LMConfig)
class GPT2LanguageModel(FairseqLanguageModel):
    @classmethod
    def build_model(cls, cfg: GPT2LMConfig, task):
        if (cfg.max_target_positions or 0) > cfg.max_positions:
            raise ValueError(
                f"--tokens-per-sample ({cfg.max_target_positions}) exceeds the model's "
                f"--max-positions ({cfg.max_positions})"
            )
        bind_dictionary(cfg, task, "the gpt2_lm checkpoint")
        return cls(GPT2Decoder(cfg, task.target_dictionary))

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        check_vocab(state_dict, "decoder.backbone.wte.weight", self.decoder.dictionary, "checkpoint")
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)


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


register_size_archs("gpt2_lm", "gpt2_lm")
