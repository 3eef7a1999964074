"""``python -m fairseq_longmem.convert_hf_gpt2 HF_DIR OUT_DIR [--force]``: the older GPT-2-only
converter, kept as a command. Its code lives with the GPT-2 family
(:mod:`fairseq_longmem.families.gpt2.hf`) and the converters' shared part
(:mod:`fairseq_longmem.convert.common`); this module re-exports the names imported from it, with
``gpt2_dict_ids``/``write_gpt2_dict`` the GPT-2 names of ``model_dict_ids``/``write_model_dict``.
"""

import sys

from .convert.common import ConversionError, read_weights
from .convert.common import model_dict_ids as gpt2_dict_ids
from .convert.common import write_model_dict as write_gpt2_dict
from .families.gpt2.hf import (
    build_cfg,
    check_representable,
    convert,
    expected_shapes,
    main,
    map_state_dict,
    normalized_config,
    summary,
)

__all__ = ["ConversionError", "build_cfg", "check_representable", "convert", "expected_shapes",
           "gpt2_dict_ids", "main", "map_state_dict", "normalized_config", "read_weights",
           "summary", "write_gpt2_dict"]

if __name__ == "__main__":
    sys.exit(main())
