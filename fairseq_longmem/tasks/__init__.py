from . import longmem_lm  # noqa: F401
