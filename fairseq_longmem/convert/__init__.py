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

Each family declares the ``model_type`` values it converts and its converter
(:class:`~fairseq_longmem.families.base.Family`'s ``hf_model_types`` and ``convert_hf``, in
``families/<family>/hf.py``); what they share (reading the folder, dict.txt, the fairseq config,
writing the checkpoint) is :mod:`.common`.
"""

import argparse
import json
import os
from typing import Dict, Optional

from .. import require_fairseq
from ..families import FAMILIES
from .common import (
    ConversionError,
    checkpoint_path,
    read_config,
    read_weights,
    run_cli,
    write_checkpoint,
    write_dict,
)

END_OF_TEXT = "<|endoftext|>"
# config.json's model_type -> the family that converts it (each family declares its own)
FAMILY_OF_MODEL_TYPE = {t: f for f in FAMILIES.values() for t in f.hf_model_types}


def is_gguf(path: str) -> bool:
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


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


def read_source(src: str):
    """(config, tensors by Hugging Face name, tokenizer.json text or None) of SRC."""
    if os.path.isdir(src):
        config = read_config(src, model_types=tuple(FAMILY_OF_MODEL_TYPE))
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
    ckpt_path = checkpoint_path(out_dir, force)
    config, tensors, tokenizer_json = read_source(src)
    family = FAMILY_OF_MODEL_TYPE[config.get("model_type")]
    if not isinstance(config.get("vocab_size"), int):
        embed = tensors.get(family.hf_embedding)
        if embed is None:
            raise ConversionError("config.json has no vocab_size and no embedding to read it from")
        config["vocab_size"] = embed.size(0)
    eos = end_of_text_id(config, tokenizer_vocab(tokenizer_json), end_of_text)

    os.makedirs(out_dir, exist_ok=True)
    cfg, weights, summary = family.hf_converter()(
        config, tensors, eos, out_dir, lambda V: write_dict(out_dir, V, eos))
    V = config["vocab_size"]
    readme = (f"{summary}; dict.txt lists {V - 1} model ids, fairseq index = id + 4 below "
              f"{eos}, id + 3 above; </s> (2) = end of text (id {eos}); <s>, <pad>, <unk> "
              f"masked to -inf; tokenizer.json: "
              f"{'--bpe hf_tokenizer --tokenizer-file OUT/tokenizer.json' if tokenizer_json else 'none in the source'}\n")
    write_checkpoint(ckpt_path, cfg, weights, src, readme, tokenizer_json)
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
    return run_cli(lambda: convert(args.src, args.out_dir, force=args.force,
                                   end_of_text=args.end_of_text), args.out_dir)
