"""fairseq-longmem: LongMem (Wang et al. 2023) as a plugin for stock fairseq.

Load with ``--user-dir $(python -m fairseq_longmem.user_dir)``; importing this package registers
the task, models and criterion with fairseq.
"""

import logging

# fairseq.tasks.text_to_speech logs an INFO line about tensorboardX on every import, through a
# root handler it installs itself; it is noise for a text-only plugin
logging.getLogger("fairseq.tasks.text_to_speech").setLevel(logging.WARNING)

try:
    import fairseq  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "fairseq_longmem needs fairseq: `pip install --no-deps ve-fairseq==0.12.3` "
        "(see README.md, 'Install')"
    ) from e

from . import compat

compat.install()

from . import criterions, models, scoring, tasks  # noqa: E402,F401

__version__ = "0.1.0"
