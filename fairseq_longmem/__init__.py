"""fairseq-longmem: LongMem (Wang et al. 2023) as a plugin for stock fairseq.

Load with ``--user-dir $(python -m fairseq_longmem.user_dir)``; importing this package registers
the tasks, models, criterion and scorers with fairseq when fairseq is installed. The memory
(:mod:`fairseq_longmem.memory`) and the GPT-2 modules (:mod:`fairseq_longmem.modules`) need only
torch.
"""

import importlib.util
import logging

__version__ = "0.1.0"

FAIRSEQ_INSTALL = "pip install --no-deps ve-fairseq==0.12.3 (see README.md, 'Install')"


def fairseq_installed() -> bool:
    return importlib.util.find_spec("fairseq") is not None


def require_fairseq(what: str) -> None:
    """Raise an ImportError that says what to install when fairseq is absent (``what``: the part
    of this package that needs it)."""
    if not fairseq_installed():
        raise ImportError(
            f"{what} needs fairseq, which is not installed: {FAIRSEQ_INSTALL}; the memory bank "
            "(fairseq_longmem.memory) works without it"
        )


if fairseq_installed():
    # fairseq.tasks.text_to_speech logs an INFO line about tensorboardX on every import, through a
    # root handler it installs itself; it is noise for a text-only plugin
    logging.getLogger("fairseq.tasks.text_to_speech").setLevel(logging.WARNING)

    from . import fairseq_patches

    fairseq_patches.install()

    from . import criterions, hf_tokenizer_bpe, models, tasks  # noqa: E402,F401
