"""The base of every task here: one dictionary, a language model's, for source and target, and
LongMem checkpoints rebuilt with the backbone they hold (:class:`BuildsLongMemFromCheckpoints`)."""

import os

from fairseq.data import Dictionary
from fairseq.tasks import FairseqTask


class BuildsLongMemFromCheckpoints:
    """Task mixin: tells ``longmem_gpt2.build_model`` when fairseq rebuilds a saved model, so
    that the backbone comes from the LongMem checkpoint itself and --backbone-path is not read
    (fairseq passes ``from_checkpoint`` to the task, not to the model)."""

    building_from_checkpoint = False

    def build_model(self, cfg, from_checkpoint=False):
        self.building_from_checkpoint = from_checkpoint
        try:
            return super().build_model(cfg, from_checkpoint)
        finally:
            self.building_from_checkpoint = False


def load_dictionary(data_dir: str, what: str = "", cls=Dictionary) -> Dictionary:
    """``data_dir/dict.txt`` as a ``cls``, or fairseq's one-line FileNotFoundError naming it
    (``what`` says which dictionary is expected there)."""
    path = os.path.join(data_dir, "dict.txt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Dictionary not found: {path}{f' ({what})' if what else ''}")
    return cls.load(path)


class OneDictionaryTask(BuildsLongMemFromCheckpoints, FairseqTask):
    def __init__(self, cfg, dictionary: Dictionary):
        super().__init__(cfg)
        self.dictionary = dictionary

    @property
    def source_dictionary(self):
        return self.dictionary

    @property
    def target_dictionary(self):
        return self.dictionary
