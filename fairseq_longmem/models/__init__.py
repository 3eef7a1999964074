from . import gpt2_lm, longmem_gpt2  # noqa: F401
