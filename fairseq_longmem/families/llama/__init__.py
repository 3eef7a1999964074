"""The Llama family (Llama 2/3, SmolLM2, Mistral without sliding windows)."""

from ..base import Family
from .modules import LlamaAttention, LlamaBackbone, LlamaBlock, LlamaDims

FAMILY = Family(name="llama", dims=LlamaDims, backbone=LlamaBackbone, block=LlamaBlock,
                attention=LlamaAttention, lm_model="llama_lm", longmem_model="longmem_llama",
                hf_model_types=("llama", "mistral"), hf_embedding="model.embed_tokens.weight",
                convert_hf=f"{__name__}.hf:convert_llama")
