"""The base of every task here: one dictionary, a language model's, for source and target, and
LongMem checkpoints rebuilt with the backbone they hold (:class:`BuildsLongMemFromCheckpoints`)."""

import os
from dataclasses import dataclass, field

from fairseq.data import Dictionary
from fairseq.dataclass import FairseqDataclass
from fairseq.tasks import FairseqTask


@dataclass
class TrainingFreeMemoryOptions(FairseqDataclass):
    """Condition (e): a backbone checkpoint read with a memory by its own layers, no training
    (fairseq_longmem.models.training_free). The memory's options mirror LongMem's --memory-size,
    --chunk-size, --retrieved-tokens under --free-* names: a task's options and a model's share
    one command line in fairseq-train, so the same names cannot be used twice."""

    training_free_memory: bool = field(
        default=False,
        metadata={"help": "evaluation only: read --path (a gpt2_lm/llama_lm backbone) with a "
                  "memory of its own keys/values, no SideNet, no training"},
    )
    free_read_layers: str = field(
        default="",
        metadata={"help": "--training-free-memory: the 0-based blocks that read, e.g. '15-29' "
                  "or '8,12,16' (each keeps its own memory); empty: the second half"},
    )
    free_memory_size: int = field(
        default=16384, metadata={"help": "--training-free-memory: memory tokens per stream"})
    free_chunk_size: int = field(
        default=4, metadata={"help": "--training-free-memory: tokens per memory chunk"})
    free_retrieved_tokens: int = field(
        default=32, metadata={"help": "--training-free-memory: tokens read per query and head"})
    free_memory_distance: int = field(
        default=0,
        metadata={"help": "--training-free-memory, rotary families: retrieved tokens are read as "
                  "this many positions before the query (0: --tokens-per-sample)"},
    )
    free_search_every: int = field(
        default=1,
        metadata={"help": "--training-free-memory: one memory search per N consecutive reading "
                  "layers, as LongMem's --search-every (1: each layer searches its own memory)"},
    )


class BuildsLongMemFromCheckpoints:
    """Task mixin: tells ``longmem_gpt2.build_model`` when fairseq rebuilds a saved model, so
    that the backbone comes from the LongMem checkpoint itself and --backbone-path is not read
    (fairseq passes ``from_checkpoint`` to the task, not to the model)."""

    building_from_checkpoint = False

    def build_model(self, cfg, from_checkpoint=False):
        free = getattr(self.cfg, "training_free_memory", False)
        if free and not from_checkpoint:
            raise ValueError("--training-free-memory evaluates a backbone checkpoint "
                             "(fairseq-eval-lm, fairseq-generate --path); it has nothing to train")
        self.building_from_checkpoint = from_checkpoint
        try:
            model = super().build_model(cfg, from_checkpoint)
        finally:
            self.building_from_checkpoint = False
        if free:
            from ..models.training_free import FreeReadConfig, TrainingFreeMemoryModel

            c = self.cfg
            model = TrainingFreeMemoryModel.around(model, FreeReadConfig(
                layers=c.free_read_layers, memory_size=c.free_memory_size,
                chunk_size=c.free_chunk_size, retrieved_tokens=c.free_retrieved_tokens,
                memory_distance=c.free_memory_distance, search_every=c.free_search_every,
                max_target_positions=getattr(c, "tokens_per_sample", None)))
        return model


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
