"""The base of every task here: one dictionary, a language model's, for source and target, and
LongMem checkpoints rebuilt with the backbone they hold (:class:`BuildsLongMemFromCheckpoints`)."""

from fairseq.data import Dictionary
from fairseq.tasks import FairseqTask

from ..models.longmem_gpt2 import BuildsLongMemFromCheckpoints


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
