"""The frozen backbone of a ``longmem_gpt2`` model, loaded from a ``gpt2_lm`` checkpoint
(``--backbone-path``) and checked against the arch and the task's dictionary."""

import os

from fairseq.models import ARCH_MODEL_REGISTRY

from ..checkpoint.read import read_checkpoint
from ..modules.gpt2 import GPT2Backbone, GPT2Dims
from .gpt2_lm import FINGERPRINT, GPT2LanguageModel, check_fingerprint, check_vocab, task_dict_path


def load_backbone(path: str, dims: GPT2Dims, task):
    """Build the backbone from a gpt2_lm checkpoint and check it is the one --arch describes and
    that it was trained with the task's dictionary; returns the backbone and its model config."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--backbone-path: no checkpoint at {path} (evaluating a LongMem checkpoint? pass "
            "--task longmem_lm, which takes the backbone from the checkpoint itself)"
        )
    dictionary = task.target_dictionary
    state = read_checkpoint(path, "--backbone-path")
    model_cfg = (state.get("cfg") or {}).get("model") or {}
    weights = {
        k[len("decoder.backbone."):]: v
        for k, v in state.get("model", {}).items()
        if k.startswith("decoder.backbone.")
    }
    name = model_cfg.get("_name")
    if ARCH_MODEL_REGISTRY.get(name) is not GPT2LanguageModel or not weights:
        raise ValueError(
            f"--backbone-path {path} is not a gpt2_lm checkpoint (model "
            f"{name!r}); train one with --arch gpt2_lm_* or convert one with "
            "python -m fairseq_longmem.convert_hf_gpt2"
        )
    found = tuple(model_cfg.get(k) for k in ("embed_dim", "num_layers", "num_heads"))
    wanted = (dims.embed_dim, dims.num_layers, dims.num_heads)
    if found != wanted:
        raise ValueError(
            f"--backbone-path {path} is a GPT-2 of width/layers/heads {found} but the arch "
            f"expects {wanted}; pick the matching --arch longmem_gpt2_* or set "
            "--embed-dim/--num-layers/--num-heads"
        )
    check_vocab(weights, "wte.weight", dictionary, f"--backbone-path {path}")
    check_fingerprint(
        model_cfg.get(FINGERPRINT), dictionary, f"--backbone-path {path}", task_dict_path(task)
    )
    dims.max_positions = model_cfg.get("max_positions", dims.max_positions)
    dims.layer_norm_eps = model_cfg.get("layer_norm_eps", dims.layer_norm_eps)
    backbone = GPT2Backbone(dims)
    backbone.load_state_dict(weights)
    return backbone, model_cfg
