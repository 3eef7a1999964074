"""The frozen backbone of a LongMem model, loaded from a checkpoint of its family's plain LM
(``--backbone-path``: ``gpt2_lm``, ``llama_lm``) and checked against the arch and the task's
dictionary."""

import os

from fairseq.models import ARCH_MODEL_REGISTRY, MODEL_REGISTRY

from ..checkpoint.read import read_checkpoint
from ..families import FAMILIES
from .common import FINGERPRINT, check_fingerprint, check_vocab, record_in_config, task_dict_path


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def load_backbone(model_class, cfg, task):
    """Build the backbone of ``model_class`` (a LongMemModel subclass) from ``cfg.backbone_path``:
    refuse a checkpoint of another model or family, sizes that disagree with the options that
    were set (``SIZE_OPTIONS``; unset ones, 0, are taken from it) and another dictionary; take
    ``COPIED_OPTIONS`` from it and record all of them in ``cfg`` (saved with the LongMem
    checkpoint, which then needs no --backbone-path). Returns the backbone and its model config."""
    family = FAMILIES[model_class.family]
    path = cfg.backbone_path
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
    if ARCH_MODEL_REGISTRY.get(name) is not MODEL_REGISTRY[family.lm_model] or not weights:
        raise ValueError(
            f"--backbone-path {path} is not a {family.lm_model} checkpoint (model "
            f"{name!r}); train one with --arch {family.lm_model}_* or convert one with "
            "python -m fairseq_longmem.convert"
        )
    sizes = [k for k in model_class.SIZE_OPTIONS if getattr(cfg, k)]
    found = tuple(model_cfg.get(k) for k in sizes)
    wanted = tuple(getattr(cfg, k) for k in sizes)
    if found != wanted:
        raise ValueError(
            f"--backbone-path {path} is a {family.lm_model} of {'/'.join(sizes)} {found} but "
            f"the arch expects {wanted}; pick the matching --arch {family.longmem_model}* or set "
            f"{'/'.join(_option(k) for k in sizes)}"
        )
    for key in model_class.SIZE_OPTIONS + model_class.COPIED_OPTIONS:
        if key in model_cfg:
            record_in_config(cfg, key, model_cfg[key])
    check_vocab(weights, family.backbone.token_embedding, dictionary, f"--backbone-path {path}")
    check_fingerprint(
        model_cfg.get(FINGERPRINT), dictionary, f"--backbone-path {path}", task_dict_path(task)
    )
    backbone = family.backbone(model_class.backbone_dims(cfg, len(dictionary)))
    backbone.load_state_dict(weights)
    return backbone, model_cfg


def read_backbone_checkpoint(path: str):
    """A plain LM checkpoint of any family (``gpt2_lm``, ``llama_lm``) as ``(backbone, model
    config)``, outside fairseq's loading (benchmarks, notebooks): the family is the one whose
    plain LM wrote it; no dictionary is checked."""
    import argparse

    state = read_checkpoint(path, "checkpoint")
    model_cfg = (state.get("cfg") or {}).get("model") or {}
    name = model_cfg.get("_name")
    family = next((f for f in FAMILIES.values()
                   if ARCH_MODEL_REGISTRY.get(name) is MODEL_REGISTRY[f.lm_model]), None)
    if family is None:
        raise ValueError(f"{path} is a {name!r} checkpoint; expected a plain LM of one of the "
                         f"families ({', '.join(f.lm_model for f in FAMILIES.values())})")
    weights = {k[len("decoder.backbone."):]: v for k, v in state["model"].items()
               if k.startswith("decoder.backbone.")}
    vocab = weights[family.backbone.token_embedding].shape[0]
    dims = MODEL_REGISTRY[family.lm_model].dims_from_config(argparse.Namespace(**model_cfg), vocab)
    backbone = family.backbone(dims)
    backbone.load_state_dict(weights)
    return backbone.eval(), model_cfg
