"""Convert a Hugging Face GPT-2 folder into a fairseq ``gpt2_lm`` checkpoint plus its dict.txt.

``python -m fairseq_longmem.convert_hf_gpt2 HF_DIR OUT_DIR [--force]``. Needs no ``transformers``.

Vocabulary mapping. fairseq's Dictionary always starts with ``<s>=0, <pad>=1, </s>=2, <unk>=3``.
dict.txt lists the GPT-2 ids ``"0" .. "V-1"`` as strings in id order, leaving out
``<|endoftext|>`` (the config's ``eos_token_id``, ``V-1`` for every OpenAI GPT-2), because fairseq's
``</s>`` stands for it. So for GPT-2, fairseq index = GPT-2 id + 4 and no embedding row moves; the
``</s>`` row is ``wte[eos]``. ``<s>``, ``<pad>`` and ``<unk>`` (which GPT-2 does not have) also get
``wte[eos]``; the checkpoint sets ``mask_special_logits=True`` so their logits are ``-inf`` and the
distribution over the remaining ``V`` symbols equals Hugging Face's.

Numerics: ``reorder_and_upcast_attn`` only changes the precision of HF's attention product, so it
is accepted and ignored; ``scale_attn_by_inverse_layer_idx``, ``scale_attn_weights=False``, other
activations and an ``n_inner`` other than ``4 * n_embd`` change the function and are refused.
"""

import argparse
import os
import sys
from typing import Dict, List, Optional

import torch

from . import require_fairseq
from .fileio import atomic_write, read_json
from .families.gpt2.modules import GPT2Backbone, GPT2Dims

SUPPORTED_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")
# HF buffers that are not parameters: the causal mask and the masked-score constant.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
# HF keeps these in Conv1D modules, whose weight is (in, out): the transpose of nn.Linear's
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
NUM_FAIRSEQ_SPECIALS = 4  # <s>, <pad>, </s>, <unk>


class ConversionError(ValueError):
    """An input the converter refuses; its message is printed as one ``error:`` line."""


def gpt2_dict_ids(vocab_size: int, eos_id: Optional[int] = None) -> List[int]:
    """GPT-2 ids in dict.txt order: every id except ``eos_id`` (default ``vocab_size - 1``)."""
    eos_id = vocab_size - 1 if eos_id is None else eos_id
    return [i for i in range(vocab_size) if i != eos_id]


def write_gpt2_dict(path: str, vocab_size: int = 50257, eos_id: Optional[int] = None) -> int:
    """Write fairseq's dict.txt for GPT-2 ids (``"<id> 1"`` per line); return the number of lines."""
    ids = gpt2_dict_ids(vocab_size, eos_id)
    atomic_write(path, lambda f: f.write("".join(f"{i} 1\n" for i in ids).encode("utf-8")))
    return len(ids)


# --------------------------------------------------------------------------- reading HF files


def read_config(hf_dir: str, model_types=("gpt2",)) -> dict:
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
    if model_type not in model_types and model_types != ("gpt2",):
        raise ConversionError(
            f"{path} has model_type={model_type!r}; the families that convert are "
            f"{', '.join(model_types)}"
        )
    if model_type not in model_types:
        raise ConversionError(
            f"{path} has model_type={model_type!r}; only GPT-2 checkpoints (model_type 'gpt2', "
            f"e.g. gpt2, gpt2-medium, distilgpt2) can be converted"
        )
    return config


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

    V = config["vocab_size"]
    eos = config["eos_token_id"]
    ids = torch.tensor(gpt2_dict_ids(V, eos))
    new_wte = torch.empty(NUM_FAIRSEQ_SPECIALS + len(ids), wte.size(1), dtype=wte.dtype)
    new_wte[:NUM_FAIRSEQ_SPECIALS] = wte[eos]  # </s> is <|endoftext|>; <s>, <pad>, <unk> are masked
    new_wte[NUM_FAIRSEQ_SPECIALS:] = wte[ids]

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
    from fairseq.dataclass.configs import FairseqConfig
    from fairseq.tasks.language_modeling import LanguageModelingConfig
    from omegaconf import OmegaConf

    from .families.gpt2.model import GPT2LMConfig

    n_positions = config["n_positions"]
    cfg = OmegaConf.structured(FairseqConfig())
    cfg.task = OmegaConf.structured(
        LanguageModelingConfig(data=os.path.abspath(out_dir), tokens_per_sample=n_positions)
    )
    cfg.task._name = "language_modeling"
    cfg.model = OmegaConf.structured(
        GPT2LMConfig(
            embed_dim=config["n_embd"],
            num_layers=config["n_layer"],
            num_heads=config["n_head"],
            max_positions=n_positions,
            dropout=config.get("resid_pdrop", 0.1),
            attention_dropout=config.get("attn_pdrop", 0.1),
            layer_norm_eps=config.get("layer_norm_epsilon", 1e-5),
            mask_special_logits=True,
            dictionary_fingerprint=dictionary_fingerprint,
        )
    )
    cfg.model._name = "gpt2_lm"
    cfg.criterion = {"_name": "cross_entropy"}
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


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


def convert(hf_dir: str, out_dir: str, force: bool = False) -> str:
    """Convert ``hf_dir`` into ``out_dir``/{checkpoint.pt,dict.txt,README.txt}; return the checkpoint."""
    require_fairseq("python -m fairseq_longmem.convert_hf_gpt2")  # it writes a fairseq config
    ckpt_path = os.path.join(out_dir, "checkpoint.pt")
    if os.path.exists(ckpt_path) and not force:
        raise ConversionError(f"{ckpt_path} already exists; pass --force to overwrite it")
    config = normalized_config(read_config(hf_dir), os.path.join(hf_dir, "config.json"))
    check_representable(config)
    model_weights = map_state_dict(config, read_weights(hf_dir))

    from fairseq.data import Dictionary

    from .models.common import dictionary_fingerprint

    os.makedirs(out_dir, exist_ok=True)
    dict_path = os.path.join(out_dir, "dict.txt")
    n_symbols = write_gpt2_dict(dict_path, config["vocab_size"], config["eos_token_id"])
    state = {
        "args": None,
        "cfg": build_cfg(config, out_dir, dictionary_fingerprint(Dictionary.load(dict_path))),
        "model": model_weights,
        "criterion": None,
        "optimizer_history": [
            {
                "criterion_name": "CrossEntropyCriterion",
                "optimizer_name": "none",
                "lr_scheduler_state": {},
                "num_updates": 0,
            }
        ],
        "task_state": {},
        "extra_state": {"converted_from": os.path.abspath(hf_dir)},
        "last_optimizer_state": None,
    }
    atomic_write(ckpt_path, lambda f: torch.save(state, f))
    readme = (summary(config, n_symbols) + "\n").encode("utf-8")
    atomic_write(os.path.join(out_dir, "README.txt"), lambda f: f.write(readme))
    return ckpt_path


def summary(config: dict, n_symbols: int) -> str:
    eos = config["eos_token_id"]
    tail = "id + 4" if eos == config["vocab_size"] - 1 else f"id + 4 below {eos}, id + 3 above"
    return (
        f"gpt2_lm {config['n_layer']}x{config['n_embd']}/{config['n_head']} heads, "
        f"{config['n_positions']} positions; dict.txt lists {n_symbols} GPT-2 ids, fairseq index = "
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
    try:
        path = convert(args.hf_dir, args.out_dir, force=args.force)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with open(os.path.join(args.out_dir, "README.txt"), encoding="utf-8") as f:
        print(f"wrote {path}: {f.read().strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
