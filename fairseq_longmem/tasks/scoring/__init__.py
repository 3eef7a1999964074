"""The two scoring tasks, ``longmem_icl`` (in-context learning) and ``longmem_suffix`` (pick the
true continuation), what they share (:mod:`.candidate_scoring`, :mod:`.memory_scoring`), the ICL
sets' readers (:mod:`.icl_data`) and their scorers (:mod:`.scorers`)."""

from . import longmem_icl, longmem_suffix, scorers  # noqa: F401
