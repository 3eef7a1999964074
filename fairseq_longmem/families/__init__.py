"""Backbone families: every decoder architecture LongMem can sit on, each one folder
(``gpt2/``, ``llama/``) that provides a :class:`Family`. LongMem's memory attention, SideNet,
decoding state and loading are written once against it (docs/DESIGN.md, "Backbone families").

A family's ``modules`` need only torch; its fairseq models (``<family>.model``) register the plain
language model (``gpt2_lm``, ``llama_lm``) and LongMem over it (``longmem_gpt2``,
``longmem_llama``).
"""

from typing import Dict

from torch import nn

from .base import Family


def _families() -> Dict[str, Family]:
    from .gpt2 import FAMILY as gpt2
    from .llama import FAMILY as llama

    return {f.name: f for f in (gpt2, llama)}


FAMILIES = _families()


def family_of(backbone: nn.Module) -> Family:
    """The family of a backbone module."""
    return FAMILIES[backbone.family]
