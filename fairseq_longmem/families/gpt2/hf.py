"""Hugging Face's GPT-2 layout -> the GPT-2 family: its config.json checked and normalized, its
tensors (``transformer.h.N.attn.c_attn.weight`` ...) mapped onto our backbone, and the two commands
that use them: :func:`convert_gpt2` (the family's converter of ``python -m fairseq_longmem.convert``)
and the older GPT-2-only command ``python -m fairseq_longmem.convert_hf_gpt2 HF_DIR OUT_DIR
[--force]`` (:func:`main`). Needs no ``transformers``.

Vocabulary mapping (:mod:`fairseq_longmem.convert.common`). fairseq's Dictionary always starts
with ``<s>=0, <pad>=1, </s>=2, <unk>=3``. dict.txt lists the GPT-2 ids ``"0" .. "V-1"`` as strings
in id order, leaving out ``<|endoftext|>`` (the config's ``eos_token_id``, ``V-1`` for every OpenAI
GPT-2), because fairseq's ``</s>`` stands for it. So for GPT-2, fairseq index = GPT-2 id + 4 and no
embedding row moves; the ``</s>`` row is ``wte[eos]``. ``<s>``, ``<pad>`` and ``<unk>`` (which
GPT-2 does not have) also get ``wte[eos]``; the checkpoint sets ``mask_special_logits=True`` so
their logits are ``-inf`` and the distribution over the remaining ``V`` symbols equals Hugging
Face's.

Numerics: ``reorder_and_upcast_attn`` only changes the precision of HF's attention product, so it
is accepted and ignored; ``scale_attn_by_inverse_layer_idx``, ``scale_attn_weights=False``, other
activations and an ``n_inner`` other than ``4 * n_embd`` change the function and are refused.
"""

import argparse
import os
from typing import Dict

import torch

from ... import require_fairseq
from ...convert.common import (
    ConversionError,
    checkpoint_path,
    lm_cfg,
    read_config,
    read_weights,
    remap_rows,
    run_cli,
    write_checkpoint,
    write_dict,
)
from . import FAMILY
from .modules import GPT2Backbone, GPT2Dims

SUPPORTED_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")
# HF buffers that are not parameters: the causal mask and the masked-score constant.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
# HF keeps these in Conv1D modules, whose weight is (in, out): the transpose of nn.Linear's
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def check_representable(config: dict) -> None:
    """Refuse GPT-2 variants whose function our backbone does not compute."""
    act = config.get("activation_function", "gelu_new")
    if act not in SUPPORTED_ACTIVATIONS:
        raise ConversionError(
            f"activation_function={act!r} is not supported (the backbone uses tanh GELU: "
            f"{' or '.join(SUPPORTED_ACTIVATIONS)})"
        )
    if config.get("scale_attn_by_inverse_layer_idx", False):
        raise ConversionError("scale_attn_by_inverse_layer_idx=true is not supported by the backbone")
    if not config.get("scale_attn_weights", True):
        raise ConversionError("scale_attn_weights=false is not supported by the backbone")
    if config.get("add_cross_attention", False):
        raise ConversionError("add_cross_attention=true (an encoder-decoder GPT-2) is not supported")
    n_embd, n_inner = config.get("n_embd", 768), config.get("n_inner")
    if n_inner is not None and n_inner != 4 * n_embd:
        raise ConversionError(
            f"n_inner={n_inner} is not supported: the backbone's MLP is 4 * n_embd = {4 * n_embd}"
        )
    if config.get("n_embd", 768) % config.get("n_head", 12):
        raise ConversionError(f"n_embd={n_embd} is not divisible by n_head={config.get('n_head')}")


# --------------------------------------------------------------------------- mapping


def is_conv1d(name: str) -> bool:
    return name.split(".", 2)[-1] in CONV1D_WEIGHTS  # h.<i>.attn.c_attn.weight -> attn.c_attn...


def expected_shapes(config: dict) -> Dict[str, tuple]:
    """HF tensor names (without ``transformer.``) and their HF shapes, read off our backbone
    built on the ``meta`` device (no memory, no initialisation): its parameters carry HF's
    names; the Conv1D weights are stored transposed there (in x out)."""
    dims = GPT2Dims(vocab_size=config["vocab_size"], embed_dim=config["n_embd"],
                    num_layers=config["n_layer"], num_heads=config["n_head"],
                    max_positions=config["n_positions"])
    with torch.device("meta"):
        backbone = GPT2Backbone(dims)
    return {name: tuple(t.shape[::-1] if is_conv1d(name) else t.shape)
            for name, t in backbone.state_dict().items()}


def normalize_keys(state_dict: Dict[str, torch.Tensor]):
    """Strip ``transformer.`` (GPT2LMHeadModel) so both layouts match; split off ``lm_head``."""
    out, lm_head = {}, None
    for key, t in state_dict.items():
        if key == "lm_head.weight":
            lm_head = t
            continue
        name = key[len("transformer.") :] if key.startswith("transformer.") else key
        if name.endswith(IGNORED_SUFFIXES):
            continue
        out[name] = t
    return out, lm_head


def map_state_dict(config: dict, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Check every tensor against ``config`` and return the ``decoder.backbone.*`` state dict."""
    tensors, lm_head = normalize_keys(state_dict)
    shapes = expected_shapes(config)
    for name, shape in shapes.items():
        if name not in tensors:
            raise ConversionError(f"tensor {name} is missing from the weights file")
        found = tuple(tensors[name].shape)
        if found != shape:
            raise ConversionError(f"tensor {name} has shape {list(found)}, expected {list(shape)}")
    unexpected = sorted(set(tensors) - set(shapes))
    if unexpected:
        raise ConversionError(
            f"unexpected tensor {unexpected[0]} ({len(unexpected)} in all): not a GPT2LMHeadModel?"
        )
    wte = tensors["wte.weight"]
    if lm_head is not None and not torch.equal(lm_head, wte):
        raise ConversionError("tensor lm_head.weight differs from wte.weight: untied output embeddings")

    # </s> is <|endoftext|>; <s>, <pad>, <unk> are masked
    new_wte = remap_rows(wte, config["eos_token_id"])

    out = {}
    for name in shapes:
        t = new_wte if name == "wte.weight" else tensors[name]
        if is_conv1d(name):
            t = t.t()  # Conv1D (in, out) -> nn.Linear (out, in)
        out[f"decoder.backbone.{name}"] = t.contiguous().clone()
    return out


def build_cfg(config: dict, out_dir: str, dictionary_fingerprint: str) -> dict:
    """A fairseq cfg (plain dicts) for model ``gpt2_lm`` and task ``language_modeling``;
    ``dictionary_fingerprint`` is the written dict.txt's (checked whenever the model is loaded)."""
    from .model import GPT2LMConfig

    model = GPT2LMConfig(
        embed_dim=config["n_embd"],
        num_layers=config["n_layer"],
        num_heads=config["n_head"],
        max_positions=config["n_positions"],
        dropout=config.get("resid_pdrop", 0.1),
        attention_dropout=config.get("attn_pdrop", 0.1),
        layer_norm_eps=config.get("layer_norm_epsilon", 1e-5),
        mask_special_logits=True,
        dictionary_fingerprint=dictionary_fingerprint,
    )
    return lm_cfg(model, "gpt2_lm", out_dir, config["n_positions"])


# config.json fields the conversion computes with, and what each must be
POSITIVE_INTS = ("n_embd", "n_layer", "n_head", "vocab_size", "n_positions")
NUMBERS = ("layer_norm_epsilon", "resid_pdrop", "attn_pdrop")


def normalized_config(config: dict, source: str = "config.json") -> dict:
    """``config`` with GPT-2's defaults filled in; refuses a field of the wrong type or range
    (``source`` names the file in the message)."""
    fix = "fix it, or take config.json from the model's Hugging Face folder again"
    config = dict(config)
    config.setdefault("n_embd", 768)
    config.setdefault("n_layer", 12)
    config.setdefault("n_head", 12)
    config.setdefault("vocab_size", 50257)
    config.setdefault("n_positions", config.get("n_ctx", 1024))
    for key in POSITIVE_INTS:
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConversionError(f"{source}: {key}={value!r} is not a positive integer; {fix}")
    for key in NUMBERS:
        value = config.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConversionError(f"{source}: {key}={value!r} is not a non-negative number; {fix}")
    n_inner = config.get("n_inner")
    if n_inner is not None and (isinstance(n_inner, bool) or not isinstance(n_inner, int)):
        raise ConversionError(f"{source}: n_inner={n_inner!r} is not an integer or null; {fix}")
    eos = config.get("eos_token_id")
    if eos is None:
        eos = config["vocab_size"] - 1
    if not isinstance(eos, int) or not 0 <= eos < config["vocab_size"]:
        raise ConversionError(f"eos_token_id={eos!r} is not an id below vocab_size={config['vocab_size']}")
    config["eos_token_id"] = eos
    return config


def describe(config: dict) -> str:
    """``gpt2_lm LxD/H heads, P positions`` of a normalized config."""
    return (f"gpt2_lm {config['n_layer']}x{config['n_embd']}/{config['n_head']} heads, "
            f"{config['n_positions']} positions")


# --------------------------------------------------------------------------- the converters


def convert_gpt2(config: dict, tensors: Dict[str, torch.Tensor], eos: int, out_dir: str,
                 fingerprint_of):
    """The family's converter for ``python -m fairseq_longmem.convert``: (cfg, weights, summary)
    of a gpt2_lm checkpoint; ``fingerprint_of(V)`` writes dict.txt for V model ids and returns
    its fingerprint."""
    config = normalized_config({**config, "eos_token_id": eos})
    check_representable(config)
    weights = map_state_dict(config, tensors)
    cfg = build_cfg(config, out_dir, fingerprint_of(config["vocab_size"]))
    return cfg, weights, describe(config)


def convert(hf_dir: str, out_dir: str, force: bool = False) -> str:
    """Convert ``hf_dir`` into ``out_dir``/{checkpoint.pt,dict.txt,README.txt}; return the checkpoint."""
    require_fairseq("python -m fairseq_longmem.convert_hf_gpt2")  # it writes a fairseq config
    ckpt_path = checkpoint_path(out_dir, force)
    refusal = ("only GPT-2 checkpoints (model_type 'gpt2', e.g. gpt2, gpt2-medium, distilgpt2) "
               "can be converted")
    config = normalized_config(read_config(hf_dir, FAMILY.hf_model_types, refusal),
                               os.path.join(hf_dir, "config.json"))
    check_representable(config)
    model_weights = map_state_dict(config, read_weights(hf_dir))

    os.makedirs(out_dir, exist_ok=True)
    fingerprint = write_dict(out_dir, config["vocab_size"], config["eos_token_id"])
    write_checkpoint(ckpt_path, build_cfg(config, out_dir, fingerprint), model_weights, hf_dir,
                     summary(config, config["vocab_size"] - 1) + "\n")
    return ckpt_path


def summary(config: dict, n_symbols: int) -> str:
    eos = config["eos_token_id"]
    tail = "id + 4" if eos == config["vocab_size"] - 1 else f"id + 4 below {eos}, id + 3 above"
    return (
        f"{describe(config)}; dict.txt lists {n_symbols} GPT-2 ids, fairseq index = "
        f"GPT-2 {tail}; </s> (2) = <|endoftext|> ({eos}); <s>, <pad>, <unk> masked to -inf"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fairseq_longmem.convert_hf_gpt2",
        description="Convert a Hugging Face GPT-2 folder into a fairseq gpt2_lm checkpoint.",
    )
    parser.add_argument("hf_dir", help="folder with config.json and model.safetensors or pytorch_model.bin")
    parser.add_argument("out_dir", help="writes checkpoint.pt, dict.txt and README.txt here")
    parser.add_argument("--force", action="store_true", help="overwrite an existing checkpoint.pt")
    args = parser.parse_args(argv)
    return run_cli(lambda: convert(args.hf_dir, args.out_dir, force=args.force), args.out_dir)
