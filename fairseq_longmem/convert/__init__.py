"""One converter for every backbone family: ``python -m fairseq_longmem.convert SRC OUT [--force]``.

SRC is a Hugging Face folder (``config.json`` with ``model_type`` gpt2 or llama/mistral, plus
``model.safetensors``, a sharded safetensors index or ``pytorch_model.bin``) or a GGUF file
(llama.cpp's format, read and dequantized to fp32 with the ``gguf`` package:
:mod:`.gguf_reader`). OUT receives ``checkpoint.pt`` (a ``gpt2_lm`` or ``llama_lm`` checkpoint,
the frozen backbone of ``longmem_gpt2``/``longmem_llama``), ``dict.txt``, ``tokenizer.json``
(copied from the folder, or built from the GGUF's tokenizer; none for a folder without one) and
``README.txt``, each through the atomic write; an existing checkpoint is kept unless ``--force``.

Vocabulary (every family): fairseq's Dictionary starts with ``<s>, <pad>, </s>, <unk>``; dict.txt
lists the model's ids ``"0" .. "V-1"`` as strings in id order, leaving out its end-of-text id,
which fairseq's ``</s>`` stands for. So fairseq's index of model id i is ``dict.index(str(i))``
(i + 4 below the end-of-text id, i + 3 above it); ``<s>``, ``<pad>`` and ``<unk>`` get the
end-of-text row and ``mask_special_logits`` gives them -inf, so the distribution over the model's
V tokens is the source's. The end-of-text id: ``<|endoftext|>`` when the vocabulary has it (GPT-2,
SmolLM2: the token between pretraining documents; an Instruct GGUF's ``eos_token_id`` is the end
of a chat turn instead), else the config's ``eos_token_id``; ``--end-of-text ID`` overrides it.
"""

import argparse
import json
import os
import sys
from typing import Dict, Optional

import torch

from .. import require_fairseq
from ..convert_hf_gpt2 import (
    ConversionError,
    gpt2_dict_ids,
    read_config,
    read_weights,
    write_gpt2_dict,
)
from ..fileio import atomic_write

NUM_FAIRSEQ_SPECIALS = 4  # <s>, <pad>, </s>, <unk>
END_OF_TEXT = "<|endoftext|>"


def is_gguf(path: str) -> bool:
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def remap_rows(weight: torch.Tensor, end_of_text: int) -> torch.Tensor:
    """(V, d) rows by model id -> (4 + V - 1, d) rows by fairseq index (module docstring)."""
    ids = torch.tensor(gpt2_dict_ids(weight.size(0), end_of_text))
    out = torch.empty(NUM_FAIRSEQ_SPECIALS + len(ids), weight.size(1), dtype=weight.dtype)
    out[:NUM_FAIRSEQ_SPECIALS] = weight[end_of_text]
    out[NUM_FAIRSEQ_SPECIALS:] = weight[ids]
    return out


def end_of_text_id(config: dict, vocab: Optional[Dict[str, int]], override: Optional[int]) -> int:
    V = config["vocab_size"]
    if override is not None:
        eos = override
    elif vocab and END_OF_TEXT in vocab:
        eos = vocab[END_OF_TEXT]
    else:
        eos = config.get("eos_token_id")
        if isinstance(eos, list) and eos:
            eos = eos[0]
    if isinstance(eos, bool) or not isinstance(eos, int) or not 0 <= eos < V:
        raise ConversionError(f"end-of-text id {eos!r} is not an id below vocab_size={V}: pass "
                              "--end-of-text ID")
    return eos


def tokenizer_vocab(tokenizer_json: Optional[str]) -> Optional[Dict[str, int]]:
    """Token -> id of a tokenizer.json (its model's vocabulary and added tokens)."""
    if tokenizer_json is None:
        return None
    data = json.loads(tokenizer_json)
    vocab = dict((data.get("model") or {}).get("vocab") or {})
    vocab.update({t["content"]: t["id"] for t in data.get("added_tokens") or []})
    return vocab


def llama_cfg(dims, out_dir: str, fingerprint: str) -> dict:
    """A fairseq cfg (plain dicts) for model ``llama_lm`` and task ``language_modeling``."""
    from fairseq.dataclass.configs import FairseqConfig
    from fairseq.tasks.language_modeling import LanguageModelingConfig
    from omegaconf import OmegaConf

    from ..families.llama.model import LlamaLMConfig

    cfg = OmegaConf.structured(FairseqConfig())
    cfg.task = OmegaConf.structured(LanguageModelingConfig(
        data=os.path.abspath(out_dir), tokens_per_sample=dims.max_positions))
    cfg.task._name = "language_modeling"
    cfg.model = OmegaConf.structured(LlamaLMConfig(
        embed_dim=dims.embed_dim, num_layers=dims.num_layers, num_heads=dims.num_heads,
        num_kv_heads=dims.num_kv_heads, ffn_dim=dims.ffn_dim, max_positions=dims.max_positions,
        rope_theta=dims.rope_theta, rms_norm_eps=dims.rms_norm_eps,
        tie_embeddings=dims.tie_embeddings, mask_special_logits=True,
        dictionary_fingerprint=fingerprint))
    cfg.model._name = "llama_lm"
    cfg.criterion = {"_name": "cross_entropy"}
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def convert_llama(config: dict, tensors: Dict[str, torch.Tensor], eos: int, out_dir: str,
                  fingerprint_of):
    """(cfg, weights, summary) of a llama_lm checkpoint; ``fingerprint_of(V)`` writes dict.txt
    for V model ids and returns its fingerprint."""
    from ..families.llama.hf import HFConfigError, backbone_state, dims_from_hf

    V = config["vocab_size"]
    try:
        dims = dims_from_hf(config, NUM_FAIRSEQ_SPECIALS + V - 1)
        rest, by_token = backbone_state(tensors, dims, V)
    except HFConfigError as e:
        raise ConversionError(str(e)) from None
    weights = {**rest, **{k: remap_rows(v, eos) for k, v in by_token.items()}}
    weights = {f"decoder.backbone.{k}": v.float().contiguous().clone() for k, v in weights.items()}
    cfg = llama_cfg(dims, out_dir, fingerprint_of(V))
    summary = (f"llama_lm {dims.num_layers}x{dims.embed_dim}/{dims.num_heads} heads "
               f"({dims.num_kv_heads} key-value), SwiGLU {dims.ffn_dim}, rope base "
               f"{dims.rope_theta:g}, {dims.max_positions} positions, "
               f"{'tied' if dims.tie_embeddings else 'untied'} output")
    return cfg, weights, summary


def convert_gpt2(config: dict, tensors: Dict[str, torch.Tensor], eos: int, out_dir: str,
                 fingerprint_of):
    from .. import convert_hf_gpt2 as gpt2

    config = gpt2.normalized_config({**config, "eos_token_id": eos})
    gpt2.check_representable(config)
    weights = gpt2.map_state_dict(config, tensors)
    cfg = gpt2.build_cfg(config, out_dir, fingerprint_of(config["vocab_size"]))
    summary = (f"gpt2_lm {config['n_layer']}x{config['n_embd']}/{config['n_head']} heads, "
               f"{config['n_positions']} positions")
    return cfg, weights, summary


FAMILY_CONVERTERS = {"gpt2": convert_gpt2, "llama": convert_llama, "mistral": convert_llama}


def read_source(src: str):
    """(config, tensors by Hugging Face name, tokenizer.json text or None) of SRC."""
    if os.path.isdir(src):
        config = read_config(src, model_types=tuple(FAMILY_CONVERTERS))
        tokenizer = os.path.join(src, "tokenizer.json")
        text = open(tokenizer, encoding="utf-8").read() if os.path.isfile(tokenizer) else None
        return config, read_weights(src), text
    if is_gguf(src):
        from ..tokenizer_files import tokenizer_json_from_gguf
        from .gguf_reader import GGUFError, read_gguf

        try:
            model = read_gguf(src)
        except GGUFError as e:
            raise ConversionError(str(e)) from None
        try:
            text = tokenizer_json_from_gguf(model.metadata)
        except ValueError as e:
            raise ConversionError(f"{src}: its tokenizer cannot be converted ({e})") from None
        return model.config, model.tensors, text
    if os.path.isfile(src):
        raise ConversionError(f"{src} is neither a GGUF file nor a Hugging Face model folder")
    raise ConversionError(f"{src}: no such file or folder (expected a Hugging Face model folder "
                          "or a .gguf file)")


def convert(src: str, out_dir: str, force: bool = False,
            end_of_text: Optional[int] = None) -> str:
    """Convert SRC into OUT (module docstring); return the checkpoint's path."""
    require_fairseq("python -m fairseq_longmem.convert")  # it writes a fairseq config
    ckpt_path = os.path.join(out_dir, "checkpoint.pt")
    if os.path.exists(ckpt_path) and not force:
        raise ConversionError(f"{ckpt_path} already exists; pass --force to overwrite it")
    config, tensors, tokenizer_json = read_source(src)
    model_type = config.get("model_type")
    if not isinstance(config.get("vocab_size"), int):
        embed = tensors.get("model.embed_tokens.weight", tensors.get("wte.weight"))
        if embed is None:
            raise ConversionError("config.json has no vocab_size and no embedding to read it from")
        config["vocab_size"] = embed.size(0)
    eos = end_of_text_id(config, tokenizer_vocab(tokenizer_json), end_of_text)

    from fairseq.data import Dictionary

    from ..models.common import dictionary_fingerprint

    os.makedirs(out_dir, exist_ok=True)
    dict_path = os.path.join(out_dir, "dict.txt")

    def fingerprint_of(V: int) -> str:
        write_gpt2_dict(dict_path, V, eos)
        return dictionary_fingerprint(Dictionary.load(dict_path))

    cfg, weights, summary = FAMILY_CONVERTERS[model_type](config, tensors, eos, out_dir,
                                                          fingerprint_of)
    state = {
        "args": None, "cfg": cfg, "model": weights, "criterion": None,
        "optimizer_history": [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": "none",
                               "lr_scheduler_state": {}, "num_updates": 0}],
        "task_state": {}, "extra_state": {"converted_from": os.path.abspath(src)},
        "last_optimizer_state": None,
    }
    atomic_write(ckpt_path, lambda f: torch.save(state, f))
    if tokenizer_json is not None:
        data = tokenizer_json.encode("utf-8")
        atomic_write(os.path.join(out_dir, "tokenizer.json"), lambda f: f.write(data))
    V = config["vocab_size"]
    readme = (f"{summary}; dict.txt lists {V - 1} model ids, fairseq index = id + 4 below "
              f"{eos}, id + 3 above; </s> (2) = end of text (id {eos}); <s>, <pad>, <unk> "
              f"masked to -inf; tokenizer.json: "
              f"{'--bpe hf_tokenizer --tokenizer-file OUT/tokenizer.json' if tokenizer_json else 'none in the source'}\n")
    atomic_write(os.path.join(out_dir, "README.txt"), lambda f: f.write(readme.encode("utf-8")))
    return ckpt_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fairseq_longmem.convert",
        description="Convert a Hugging Face folder (GPT-2, Llama) or a GGUF file into a fairseq "
                    "gpt2_lm / llama_lm checkpoint with its dict.txt and tokenizer.json.")
    parser.add_argument("src", help="a Hugging Face model folder or a .gguf file")
    parser.add_argument("out_dir", help="writes checkpoint.pt, dict.txt, tokenizer.json, "
                        "README.txt here")
    parser.add_argument("--force", action="store_true", help="overwrite an existing checkpoint.pt")
    parser.add_argument("--end-of-text", type=int, default=None,
                        help="the model id fairseq's </s> stands for (default: <|endoftext|> if "
                        "the vocabulary has it, else the config's eos_token_id)")
    args = parser.parse_args(argv)
    try:
        path = convert(args.src, args.out_dir, force=args.force, end_of_text=args.end_of_text)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with open(os.path.join(args.out_dir, "README.txt"), encoding="utf-8") as f:
        print(f"wrote {path}: {f.read().strip()}")
    return 0
