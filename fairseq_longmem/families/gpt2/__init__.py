"""The GPT-2 family (OpenAI's GPT-2 and models of its layout)."""

from ..base import Family
from .modules import Block, CausalSelfAttention, GPT2Backbone, GPT2Dims

FAMILY = Family(name="gpt2", dims=GPT2Dims, backbone=GPT2Backbone, block=Block,
                attention=CausalSelfAttention, lm_model="gpt2_lm", longmem_model="longmem_gpt2",
                hf_model_types=("gpt2",), hf_embedding="wte.weight",
                convert_hf=f"{__name__}.hf:convert_gpt2")
