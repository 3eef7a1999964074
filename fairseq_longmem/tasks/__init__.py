from .. import require_fairseq

require_fairseq("fairseq_longmem.tasks")

# every task registers on ``import fairseq_longmem``: fairseq scans a --user-dir's tasks/ folder
# only when it imports the package itself, not when the package was imported before
from . import longmem_lm, scoring  # noqa: E402,F401
