from .. import require_fairseq

require_fairseq("fairseq_longmem.criterions")

from . import longmem_cross_entropy  # noqa: E402,F401
