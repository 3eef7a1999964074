from . import gpt2_lm  # noqa: F401
