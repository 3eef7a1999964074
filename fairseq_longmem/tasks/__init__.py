from .. import require_fairseq

require_fairseq("fairseq_longmem.tasks")

from . import longmem_lm  # noqa: E402,F401
