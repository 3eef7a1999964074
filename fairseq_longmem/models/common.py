"""What every model of the plugin shares, whatever its backbone family: the dictionary a model
was trained with (fingerprints, vocabulary checks), options worked out at build time and saved
with checkpoints, and the decoder head over a backbone's output embedding."""

import hashlib
import logging
import os
from dataclasses import field
from typing import Optional, Tuple

import torch
from fairseq import utils
from fairseq.models import FairseqDecoder
from omegaconf import OmegaConf

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


def check_segment_length(tokens_per_sample: Optional[int], max_positions: int, whose: str):
    """The one check of a segment length against a model's positions when a model is built or a
    decoding state made (the forward checks each segment again: ``Backbone.check_positions``).
    A config built outside fairseq may still hold the unresolved "${task.tokens_per_sample}"."""
    if isinstance(tokens_per_sample, int) and tokens_per_sample > max_positions:
        raise ValueError(f"--tokens-per-sample ({tokens_per_sample}) exceeds {whose} "
                         f"{max_positions} positions")


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


class BackboneDecoder(FairseqDecoder):
    """What every decoder here shares: a ``backbone`` (any family) whose output embedding
    (tied or not) gives the logits, and -inf logits for <s>/<pad>/<unk> when
    ``mask_special_logits`` (a converted model has no such tokens). ``forward(...,
    features_only=True)`` returns the final norm's output; :meth:`output_layer` turns any slice
    of it into logits."""

    def __init__(self, dictionary, backbone, mask_special_logits: bool):
        super().__init__(dictionary)
        self.backbone = backbone
        mask = special_logit_mask(dictionary, len(dictionary)) if mask_special_logits else None
        self.register_buffer("special_mask", mask, persistent=False)

    def output_layer(self, features):
        logits = self.backbone.project(features)  # (..., V)
        if self.special_mask is not None:
            logits = logits.masked_fill(self.special_mask, float("-inf"))
        return logits

    def max_positions(self):
        return self.backbone.dims.max_positions


def parse_layers(spec: str, num_layers: int, option: str) -> Tuple[int, ...]:
    """'15-29', '8,12,16' or '20' (0-based blocks) -> sorted layers; '' -> the second half.
    ``option`` names the option in errors."""
    if not spec:
        return tuple(range(num_layers // 2, num_layers))
    layers = set()
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            lo, hi = int(lo), int(hi) if hi else int(lo)
            if lo > hi:
                raise ValueError
            layers.update(range(lo, hi + 1))
    except ValueError:
        raise ValueError(f"{option} {spec!r}: expected 0-based layers such as '15-29' "
                         "or '8,12,16'") from None
    bad = sorted(i for i in layers if not 0 <= i < num_layers)
    if bad:
        raise ValueError(f"{option} {spec!r}: layer {bad[0]} is not a block of the "
                         f"{num_layers}-layer backbone (0 to {num_layers - 1})")
    return tuple(sorted(layers))


def format_layers(layers: Tuple[int, ...]) -> str:
    """(15, 16, ..., 29) -> '15-29'; (8, 12, 16) -> '8,12,16'."""
    runs, start = [], None
    for n, i in enumerate(layers):
        if start is None:
            start = i
        if n + 1 == len(layers) or layers[n + 1] != i + 1:
            runs.append(f"{start}-{i}" if i > start else f"{i}")
            start = None
    return ",".join(runs)


def read_layers(cfg, num_layers: int) -> Tuple[int, ...]:
    """LongMem's memory layers of --read-layers, sorted (() when it is unset: --memory-layer
    alone)."""
    spec = str(getattr(cfg, "read_layers", "") or "")
    return parse_layers(spec, num_layers, "--read-layers") if spec.strip() else ()
