from . import longmem_cross_entropy  # noqa: F401
