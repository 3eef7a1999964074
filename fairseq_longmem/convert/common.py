"""What every family's converter shares: reading a Hugging Face folder (``config.json``, the
weights), fairseq's ``dict.txt`` of model ids and the embedding rows in its order, the fairseq
config of a plain LM, and writing the converted checkpoint. A family's own mapping lives in its
folder (``families/<family>/hf.py``); this module imports no family.

Vocabulary mapping (every family; the module docstring of :mod:`fairseq_longmem.convert`):
fairseq's Dictionary starts with ``<s>=0, <pad>=1, </s>=2, <unk>=3``; dict.txt lists the model's
ids ``"0" .. "V-1"`` as strings in id order, leaving out the end-of-text id, which fairseq's
``</s>`` stands for; ``<s>``, ``<pad>`` and ``<unk>`` get the end-of-text row.
"""

import os
import sys
from typing import Callable, Dict, List, Optional

import torch

from ..fileio import atomic_write, read_json

NUM_FAIRSEQ_SPECIALS = 4  # <s>, <pad>, </s>, <unk>


class ConversionError(ValueError):
    """An input the converter refuses; its message is printed as one ``error:`` line."""


def model_dict_ids(vocab_size: int, eos_id: Optional[int] = None) -> List[int]:
    """Model ids in dict.txt order: every id except ``eos_id`` (default ``vocab_size - 1``)."""
    eos_id = vocab_size - 1 if eos_id is None else eos_id
    return [i for i in range(vocab_size) if i != eos_id]


def write_model_dict(path: str, vocab_size: int = 50257, eos_id: Optional[int] = None) -> int:
    """Write fairseq's dict.txt for model ids (``"<id> 1"`` per line); return the number of
    lines."""
    ids = model_dict_ids(vocab_size, eos_id)
    atomic_write(path, lambda f: f.write("".join(f"{i} 1\n" for i in ids).encode("utf-8")))
    return len(ids)


def remap_rows(weight: torch.Tensor, end_of_text: int) -> torch.Tensor:
    """(V, d) rows by model id -> (4 + V - 1, d) rows by fairseq index (module docstring)."""
    ids = torch.tensor(model_dict_ids(weight.size(0), end_of_text))
    out = torch.empty(NUM_FAIRSEQ_SPECIALS + len(ids), weight.size(1), dtype=weight.dtype)
    out[:NUM_FAIRSEQ_SPECIALS] = weight[end_of_text]
    out[NUM_FAIRSEQ_SPECIALS:] = weight[ids]
    return out


# --------------------------------------------------------------------------- reading HF files


def read_config(hf_dir: str, model_types, refusal: Optional[str] = None) -> dict:
    """HF_DIR's config.json, refused unless its ``model_type`` is one of ``model_types``;
    ``refusal`` says so in the message (default: the list of them)."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{path} not found: HF_DIR must be a Hugging Face model folder")
    try:
        config = read_json(path, "HF_DIR's config.json")
    except ValueError as e:
        raise ConversionError(str(e)) from None
    if not isinstance(config, dict):
        raise ConversionError(
            f"{path} holds a JSON {type(config).__name__}, expected an object of model settings "
            "(a Hugging Face config.json)"
        )
    model_type = config.get("model_type")
    if model_type not in model_types:
        refusal = refusal or f"the families that convert are {', '.join(model_types)}"
        raise ConversionError(f"{path} has model_type={model_type!r}; {refusal}")
    return config


def _load_safetensors(path: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ConversionError(f"cannot read {path} (truncated or corrupt?): {_first_line(e)}") from None


def _load_torch_bin(path: str) -> Dict[str, torch.Tensor]:
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip/pickle errors of a damaged or non-weights file
        raise ConversionError(f"cannot read {path} (truncated or corrupt?): {_first_line(e)}") from None
    if not isinstance(state_dict, dict):
        raise ConversionError(
            f"{path} does not hold a state dict (found {type(state_dict).__name__})")
    return state_dict


def _first_line(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def read_weights(hf_dir: str) -> Dict[str, torch.Tensor]:
    """model.safetensors (preferred), a sharded safetensors index, or pytorch_model.bin."""
    single = os.path.join(hf_dir, "model.safetensors")
    if os.path.isfile(single):
        return _load_safetensors(single)
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            index_json = read_json(index, "the sharded checkpoint's index")
        except ValueError as e:  # already names the file and what is wrong
            raise ConversionError(str(e)) from None
        try:
            shards = sorted(set(index_json["weight_map"].values()))
        except (KeyError, TypeError, AttributeError) as e:
            raise ConversionError(f"cannot read {index}: {_first_line(e)}") from None
        state_dict = {}
        for shard in shards:
            state_dict.update(_load_safetensors(os.path.join(hf_dir, shard)))
        return state_dict
    pickled = os.path.join(hf_dir, "pytorch_model.bin")
    if os.path.isfile(pickled):
        return _load_torch_bin(pickled)
    raise ConversionError(f"{hf_dir} holds neither model.safetensors nor pytorch_model.bin")


# --------------------------------------------------------------------------- writing the output


def checkpoint_path(out_dir: str, force: bool) -> str:
    """OUT's checkpoint.pt, refused if it exists and ``force`` is not set."""
    path = os.path.join(out_dir, "checkpoint.pt")
    if os.path.exists(path) and not force:
        raise ConversionError(f"{path} already exists; pass --force to overwrite it")
    return path


def write_dict(out_dir: str, vocab_size: int, end_of_text: int) -> str:
    """Write OUT/dict.txt of ``vocab_size`` model ids; return its fingerprint (the one the
    converted model checks whenever it is loaded)."""
    from fairseq.data import Dictionary

    from ..models.common import dictionary_fingerprint

    path = os.path.join(out_dir, "dict.txt")
    write_model_dict(path, vocab_size, end_of_text)
    return dictionary_fingerprint(Dictionary.load(path))


def lm_cfg(model, model_name: str, out_dir: str, tokens_per_sample: int) -> dict:
    """A fairseq cfg (plain dicts) for ``model`` (a filled-in model config dataclass, registered
    as ``model_name``) and task ``language_modeling`` over OUT."""
    from fairseq.dataclass.configs import FairseqConfig
    from fairseq.tasks.language_modeling import LanguageModelingConfig
    from omegaconf import OmegaConf

    cfg = OmegaConf.structured(FairseqConfig())
    cfg.task = OmegaConf.structured(
        LanguageModelingConfig(data=os.path.abspath(out_dir), tokens_per_sample=tokens_per_sample)
    )
    cfg.task._name = "language_modeling"
    cfg.model = OmegaConf.structured(model)
    cfg.model._name = model_name
    cfg.criterion = {"_name": "cross_entropy"}
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def write_checkpoint(ckpt_path: str, cfg: dict, weights: Dict[str, torch.Tensor], source: str,
                     readme: str, tokenizer_json: Optional[str] = None) -> None:
    """Write checkpoint.pt (a fairseq checkpoint of ``cfg`` and ``weights``, converted from
    ``source``), then tokenizer.json if given and README.txt beside it, each atomically."""
    out_dir = os.path.dirname(ckpt_path)
    state = {
        "args": None, "cfg": cfg, "model": weights, "criterion": None,
        "optimizer_history": [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": "none",
                               "lr_scheduler_state": {}, "num_updates": 0}],
        "task_state": {}, "extra_state": {"converted_from": os.path.abspath(source)},
        "last_optimizer_state": None,
    }
    atomic_write(ckpt_path, lambda f: torch.save(state, f))
    if tokenizer_json is not None:
        data = tokenizer_json.encode("utf-8")
        atomic_write(os.path.join(out_dir, "tokenizer.json"), lambda f: f.write(data))
    atomic_write(os.path.join(out_dir, "README.txt"), lambda f: f.write(readme.encode("utf-8")))


def run_cli(convert: Callable[[], str], out_dir: str) -> int:
    """A converter command's end: run ``convert`` (returns the checkpoint's path); print a
    refusal as one ``error:`` line (exit status 2), else what was written (OUT/README.txt)."""
    try:
        path = convert()
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with open(os.path.join(out_dir, "README.txt"), encoding="utf-8") as f:
        print(f"wrote {path}: {f.read().strip()}")
    return 0
