"""Hugging Face's LlamaForCausalLM layout -> the Llama family: its config.json (``rope_theta`` or
transformers 5's ``rope_parameters``) checked and turned into :class:`LlamaDims`, and its tensor
names (``model.layers.N.self_attn.q_proj.weight`` ...) into our backbone's (the same without
``model.``), and :func:`convert_llama`, the family's converter of ``python -m
fairseq_longmem.convert``. Functions a model computes differently from ours are refused, never
approximated."""

from typing import Dict, Tuple

import torch

from ...convert.common import NUM_FAIRSEQ_SPECIALS, ConversionError, lm_cfg, remap_rows
from . import FAMILY
from .modules import LlamaBackbone, LlamaDims

MODEL_TYPES = FAMILY.hf_model_types  # ("llama", "mistral")


class HFConfigError(ValueError):
    """A config.json or weights this family cannot represent; one line."""


def _positive_int(config: dict, key: str, default=None) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HFConfigError(f"{key}={value!r} is not a positive integer")
    return value


def rope_theta(config: dict) -> float:
    """The rotary base, as ``rope_theta`` (transformers < 5) or inside ``rope_parameters``
    (transformers 5); refuses rotary scaling, which our attention does not compute."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    for what in (params, scaling):
        kind = what.get("rope_type", what.get("type", "default"))
        if kind != "default":
            raise HFConfigError(f"rope type {kind!r} is not supported (only unscaled rotary "
                                "positions, rope_type 'default')")
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise HFConfigError(f"rope_theta={theta!r} is not a positive number")
    return float(theta)


def dims_from_hf(config: dict, vocab_size: int) -> LlamaDims:
    """:class:`LlamaDims` of a Hugging Face Llama config.json (``vocab_size``: the fairseq
    dictionary's, which the converter's embedding has)."""
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise HFConfigError(f"model_type={model_type!r} is not a Llama-family model "
                            f"({', '.join(MODEL_TYPES)})")
    if config.get("hidden_act", "silu") != "silu":
        raise HFConfigError(f"hidden_act={config.get('hidden_act')!r} is not supported (SwiGLU "
                            "with silu)")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key, False):
            raise HFConfigError(f"{key}=true is not supported (the Llama family has no biases)")
    if config.get("sliding_window"):
        raise HFConfigError(f"sliding_window={config['sliding_window']} is not supported")
    d = _positive_int(config, "hidden_size")
    heads = _positive_int(config, "num_attention_heads")
    kv = _positive_int(config, "num_key_value_heads", heads)
    head_dim = config.get("head_dim") or d // heads
    if head_dim * heads != d:
        raise HFConfigError(f"head_dim={head_dim} x {heads} heads != hidden_size={d}: not "
                            "supported")
    try:
        return LlamaDims(
            vocab_size=vocab_size, embed_dim=d,
            num_layers=_positive_int(config, "num_hidden_layers"), num_heads=heads,
            num_kv_heads=kv, ffn_dim=_positive_int(config, "intermediate_size"),
            max_positions=_positive_int(config, "max_position_embeddings", 2048),
            rope_theta=rope_theta(config), rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)))
    except ValueError as e:
        raise HFConfigError(str(e)) from None


def expected_shapes(dims: LlamaDims) -> Dict[str, Tuple[int, ...]]:
    """Our backbone's tensor names and shapes, built on the meta device (no memory)."""
    with torch.device("meta"):
        backbone = LlamaBackbone(dims)
    return {name: tuple(t.shape) for name, t in backbone.state_dict().items()}


def backbone_state(tensors: Dict[str, torch.Tensor], dims: LlamaDims, vocab_rows: int
                   ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """Split Hugging Face tensors (``model.*``, ``lm_head.weight``) into our backbone's names,
    the embedding and output rows still in the model's ids (``vocab_rows`` of them). Returns
    (tensors, the ones indexed by token id: ``embed_tokens.weight``, ``lm_head.weight``)."""
    out = {}
    for key, t in tensors.items():
        name = key[len("model."):] if key.startswith("model.") else key
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer some versions save; recomputed from rope_theta
        out[name] = t
    if dims.tie_embeddings and "lm_head.weight" in out:
        if not torch.equal(out["lm_head.weight"], out["embed_tokens.weight"]):
            raise HFConfigError("lm_head.weight differs from embed_tokens.weight although "
                                "tie_word_embeddings is true")
        del out["lm_head.weight"]
    shapes = expected_shapes(dims)
    by_token = {k for k in ("embed_tokens.weight", "lm_head.weight") if k in shapes}
    for name, shape in shapes.items():
        if name not in out:
            raise HFConfigError(f"tensor {name} is missing from the weights")
        want = (vocab_rows, shape[1]) if name in by_token else shape
        if tuple(out[name].shape) != want:
            raise HFConfigError(f"tensor {name} has shape {list(out[name].shape)}, expected "
                                f"{list(want)}")
    unexpected = sorted(set(out) - set(shapes))
    if unexpected:
        raise HFConfigError(f"unexpected tensor {unexpected[0]} ({len(unexpected)} in all): "
                            "not a LlamaForCausalLM?")
    rest = {k: v for k, v in out.items() if k not in by_token}
    return rest, {k: out[k] for k in by_token}


def llama_cfg(dims, out_dir: str, fingerprint: str) -> dict:
    """A fairseq cfg (plain dicts) for model ``llama_lm`` and task ``language_modeling``."""
    from .model import LlamaLMConfig

    model = LlamaLMConfig(
        embed_dim=dims.embed_dim, num_layers=dims.num_layers, num_heads=dims.num_heads,
        num_kv_heads=dims.num_kv_heads, ffn_dim=dims.ffn_dim, max_positions=dims.max_positions,
        rope_theta=dims.rope_theta, rms_norm_eps=dims.rms_norm_eps,
        tie_embeddings=dims.tie_embeddings, mask_special_logits=True,
        dictionary_fingerprint=fingerprint)
    return lm_cfg(model, "llama_lm", out_dir, dims.max_positions)


def convert_llama(config: dict, tensors: Dict[str, torch.Tensor], eos: int, out_dir: str,
                  fingerprint_of):
    """The family's converter for ``python -m fairseq_longmem.convert``: (cfg, weights, summary)
    of a llama_lm checkpoint; ``fingerprint_of(V)`` writes dict.txt for V model ids and returns
    its fingerprint."""
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
