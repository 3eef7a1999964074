from .. import require_fairseq

require_fairseq("fairseq_longmem.models")

from . import gpt2_lm, longmem_gpt2  # noqa: E402,F401
