"""``longmem_lm``: language modelling over whole documents streamed in order, one stream per row.

Documents follow fairseq's ``complete_doc`` convention (one empty line between documents, so a
binarized item of size 1 ends a document). Each rank owns ``--batch-size`` streams; batch ``t`` of
a rank holds segment ``t`` of each of its streams, and a per-row flag says that the segment starts
a new document, so that the model clears that row's memory before reading it.
"""

import copy
import logging
import os
from dataclasses import dataclass, field
from typing import Any, List, Optional

import numpy as np
import torch
from fairseq import utils
from fairseq.data import Dictionary, data_utils, iterators
from fairseq.dataclass import FairseqDataclass
from fairseq.distributed import utils as dist_utils
from fairseq.tasks import register_task
from omegaconf import II

from .base import OneDictionaryTask, TrainingFreeMemoryOptions, load_dictionary
from .document_stream import (
    DocumentStreamDataset,
    raise_no_documents,
    split_documents,
    split_fingerprint,
)
from .scoring.candidate_scoring import ExamplesDataset
from .split_files import check_mmap_split, split_shards

logger = logging.getLogger(__name__)


@dataclass
class LongMemLMConfig(TrainingFreeMemoryOptions):
    data: str = field(default="???", metadata={"help": "path to data directory (fairseq-preprocess output)"})
    tokens_per_sample: int = field(
        default=1024, metadata={"help": "segment length T: tokens scored per row and batch"}
    )
    batch_size: Optional[int] = II("dataset.batch_size")
    max_target_positions: Optional[int] = II("task.tokens_per_sample")
    # read from the common and dataset options, for checks before anything is allocated
    cpu: bool = II("common.cpu")
    fp16: bool = II("common.fp16")
    bf16: bool = II("common.bf16")
    train_subset: str = II("dataset.train_subset")
    # filled in from torch.distributed when not given
    data_parallel_rank: Optional[int] = None
    data_parallel_size: Optional[int] = None
    # generation (fairseq-generate, fairseq-interactive; docs/GENERATION.md)
    prompt_tokens: int = field(
        default=0,
        metadata={"help": "fairseq-generate: each document's first N tokens are the prompt, fed "
                  "segment by segment into memory and the local window, then continued"},
    )
    stop_at_eos: bool = field(
        default=False,
        metadata={"help": "end a hypothesis at the first </s>; by default </s> (a line end in "
                  "these corpora) is an ordinary token and hypotheses run to --max-len-b"},
    )
    line_end_marker: str = field(
        default="\u23ce",
        metadata={"help": "how printed lines (S-, H-, D-) show </s>, a line end; empty: leave it "
                  "out as fairseq does (always so with --bpe gpt2 or hf_tokenizer, whose </s> is the model's end of text)"},
    )
    memory_file: Optional[str] = field(
        default=None,
        metadata={"help": "fairseq-interactive/-generate: every prompt starts from this saved "
                  "memory (read-only; written by --save-memory with the same model)"},
    )
    save_memory: Optional[str] = field(
        default=None,
        metadata={"help": "write the memory after the first prompt to this NEW file (never "
                  "overwritten), for --memory-file"},
    )
    bpe_cfg: Any = II("bpe")


class LineEndDictionary(Dictionary):
    """A dictionary whose strings show ``</s>`` as ``line_end`` (e.g. a visible marker) where
    fairseq's leave it out: in these corpora it ends a line, and generated text runs across
    lines. Empty ``line_end``: fairseq's own behaviour."""

    line_end = ""

    def string(self, tensor, bpe_symbol=None, escape_unk=False, extra_symbols_to_ignore=None,
               unk_string=None, include_eos=False, separator=" "):
        if not self.line_end:
            return super().string(tensor, bpe_symbol, escape_unk, extra_symbols_to_ignore,
                                  unk_string, include_eos, separator)
        symbol = self.symbols[self.eos_index]
        self.symbols[self.eos_index] = self.line_end
        try:
            return super().string(tensor, bpe_symbol, escape_unk, extra_symbols_to_ignore,
                                  unk_string, True, separator)
        finally:
            self.symbols[self.eos_index] = symbol


class PromptDataset(ExamplesDataset):
    """Prompts to continue (1-D token tensors, without the ``</s>`` the model reads before a
    document), in order; batches hold consecutive prompts of equal length (``prompt_batches``)."""

    def __init__(self, prompts: List[torch.Tensor], pad: int):
        super().__init__([len(p) for p in prompts])
        self.prompts = [p.long() for p in prompts]
        self.pad = pad

    def collater(self, indices):
        if not indices:
            return {}
        src = torch.stack([self.prompts[i] for i in indices])  # (B, n): equal lengths
        return {
            "id": torch.tensor(indices, dtype=torch.long),
            "net_input": {"src_tokens": src,
                          "src_lengths": torch.full((len(indices),), src.size(1))},
            "target": None,
            "nsentences": len(indices),
            "ntokens": int(src.numel()),
        }


def prompt_batches(sizes, batch_size: int) -> List[List[int]]:
    """Consecutive prompts of equal length, at most ``batch_size`` per batch, in order."""
    batches = []
    for i, n in enumerate(sizes):
        if batches and len(batches[-1]) < batch_size and sizes[batches[-1][0]] == n:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@register_task("longmem_lm", dataclass=LongMemLMConfig)
class LongMemLMTask(OneDictionaryTask):
    def __init__(self, cfg: LongMemLMConfig, dictionary: Dictionary):
        super().__init__(cfg, dictionary)
        self.split_fingerprints = {}  # split -> what its documents are, see split_fingerprint
        self._train_iterator = None  # the latest, for set_checkpoint_dict
        self.track_recurrence = False  # set by a criterion that needs recurrence distances

    @classmethod
    def setup_task(cls, cfg: LongMemLMConfig, **kwargs):
        if cfg.tokens_per_sample is None or cfg.tokens_per_sample < 1:
            raise ValueError(
                f"--tokens-per-sample must be a positive segment length (tokens per row and "
                f"batch, e.g. 1024), got {cfg.tokens_per_sample}"
            )
        if not cfg.batch_size:
            raise ValueError(
                "--task longmem_lm needs --batch-size (streams per GPU); --max-tokens is not used"
            )
        if cfg.batch_size < 1:
            raise ValueError(
                f"--batch-size must be a positive number of streams per GPU, got {cfg.batch_size}"
            )
        paths = utils.split_paths(cfg.data)
        if not paths:
            raise ValueError("--data: no data directory given")
        dictionary = load_dictionary(paths[0], cls=LineEndDictionary)
        bpe = cfg.bpe_cfg.get("_name") if cfg.bpe_cfg is not None else None
        dictionary.line_end = "" if bpe in ("gpt2", "hf_tokenizer") else cfg.line_end_marker
        if cfg.prompt_tokens < 0:
            raise ValueError(f"--prompt-tokens must be >= 0 (0: no prompts), got "
                             f"{cfg.prompt_tokens}")
        logger.info("dictionary: %d types", len(dictionary))
        return cls(cfg, dictionary)

    def _rank_and_world_size(self):
        cfg = self.cfg
        if cfg.data_parallel_rank is not None and cfg.data_parallel_size is not None:
            return cfg.data_parallel_rank, cfg.data_parallel_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return dist_utils.get_data_parallel_rank(), dist_utils.get_data_parallel_world_size()
        return 0, 1

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        paths = utils.split_paths(self.cfg.data)
        split_path = os.path.join(paths[(epoch - 1) % len(paths)], split)
        # fairseq would mmap these and fail on an empty or truncated file without naming it
        shards = split_shards(split_path, combine)
        for shard in shards:
            if check_mmap_split(shard) == 0:
                raise_no_documents(split, shard, 0)
        data = data_utils.load_indexed_dataset(split_path, self.dictionary, combine=combine)
        if data is None:
            raise FileNotFoundError(f"Dataset not found: {split} ({split_path})")
        documents = [
            torch.cat([data[i] for i in range(a, b)]).to(torch.int32)
            for a, b in split_documents(np.asarray(data.sizes))
        ]
        if not documents:
            raise_no_documents(split, split_path, len(data))
        max_id = max(int(d.max()) for d in documents)
        if max_id >= len(self.dictionary):
            dict_path = os.path.join(paths[0], "dict.txt")
            raise ValueError(
                f"{split_path}.bin holds token id {max_id} but {dict_path} has only "
                f"{len(self.dictionary)} symbols (ids 0 to {len(self.dictionary) - 1}): the split "
                "was binarized with another dictionary; use the dict.txt that fairseq-preprocess "
                "wrote beside it"
            )
        if self.cfg.prompt_tokens > 0:
            self.datasets[split] = self.prompt_dataset(split_path, documents)
            return
        rank, world = self._rank_and_world_size()
        dataset = DocumentStreamDataset(
            documents, self.dictionary.pad(), self.dictionary.eos(), self.cfg.tokens_per_sample,
            self.cfg.batch_size, rank, world,
        )
        logger.info(
            "%s: %d documents, %d tokens, %d streams per rank x %d ranks, %d batches",
            split, len(documents), sum(len(d) for d in documents), self.cfg.batch_size, world,
            len(dataset),
        )
        idle = sum(not stream for stream in dataset.streams)
        if idle:
            logger.warning(
                "%s has %d documents for %d streams (--batch-size %d x %d ranks): %d streams get "
                "no document and compute only padding; a --batch-size of at most %d uses them all",
                split, len(documents), len(dataset.streams), self.cfg.batch_size, world, idle,
                max(1, len(documents) // world),
            )
        dataset.track_recurrence = self.track_recurrence
        self.datasets[split] = dataset
        self.split_fingerprints[split] = split_fingerprint(split_path, documents)

    def prompt_dataset(self, split_path: str, documents: List[torch.Tensor]) -> PromptDataset:
        """Each document's first --prompt-tokens tokens, refused in one line if a document is
        shorter."""
        n = self.cfg.prompt_tokens
        lengths = [len(d) for d in documents]
        short = [i for i, k in enumerate(lengths) if k < n]
        if short:
            raise ValueError(
                f"--prompt-tokens {n} is larger than {len(short)} of the {len(documents)} "
                f"documents of {split_path} (document {short[0]} holds {lengths[short[0]]} "
                f"tokens, the shortest {min(lengths)}): pass --prompt-tokens {min(lengths)} or less"
            )
        logger.info("%s: %d prompts of %d tokens (each document's first)", split_path,
                    len(documents), n)
        return PromptDataset([d[:n] for d in documents], self.dictionary.pad())

    def build_dataset_for_inference(self, src_tokens, src_lengths, **kwargs):
        return PromptDataset(src_tokens, self.dictionary.pad())

    def get_interactive_tokens_and_lengths(self, lines, encode_fn):
        # a prompt continues its text: no </s> after it (the model reads one before it)
        tokens = [self.dictionary.encode_line(encode_fn(line), add_if_not_exist=False,
                                              append_eos=False).long() for line in lines]
        return tokens, [t.numel() for t in tokens]

    def build_criterion(self, cfg, from_checkpoint=False):
        """A criterion with ``needs_recurrence`` (``longmem_cross_entropy --recurrence-buckets``)
        gets ``recurrence_distance`` in every batch, of datasets loaded before or after it
        (fairseq-train loads the validation split first, fairseq-validate after)."""
        criterion = super().build_criterion(cfg, from_checkpoint)
        if getattr(criterion, "needs_recurrence", False):
            self.track_recurrence = True
            for dataset in self.datasets.values():
                dataset.track_recurrence = True
        return criterion

    def _stream_layout(self):
        """What a saved iterator position is a position in: all ranks' streams and their
        segment length."""
        _, world = self._rank_and_world_size()
        return {"streams": self.cfg.batch_size * world,
                "tokens_per_sample": self.cfg.tokens_per_sample}

    def get_checkpoint_dict(self):
        # saved in the checkpoint's extra_state, read back on resume by set_checkpoint_dict
        state = {"stream_layout": self._stream_layout()}
        train = self.split_fingerprints.get(self.cfg.train_subset)
        if train is not None:
            state["train_data"] = train
        return {type(self).__name__: state}

    def set_checkpoint_dict(self, state):
        """On resume fairseq restores the iterator position, which only means the same batches
        under the same stream layout and over the same documents: refuse a changed layout or
        training split rather than skip, replay or mix data. (Not called with
        --reset-dataloader, which restarts the epoch.)"""
        saved_layout = state.get("stream_layout")
        if saved_layout is not None and saved_layout != self._stream_layout():
            raise ValueError(
                f"the checkpoint was trained with {saved_layout['streams']} streams (batch size x "
                f"world size) of {saved_layout['tokens_per_sample']}-token segments, this run has "
                f"{self._stream_layout()['streams']} of {self.cfg.tokens_per_sample}: resuming "
                "would skip or replay data; keep the layout, or pass --reset-dataloader to "
                "restart the epoch's streams"
            )
        saved_data = state.get("train_data")
        this_data = self.split_fingerprints.get(self.cfg.train_subset)
        itr = self._train_iterator
        mid_epoch = itr is None or itr.iterations_in_epoch > 0  # at 0, any data may follow
        if (saved_data and this_data and mid_epoch
                and saved_data["documents_sha256"] != this_data["documents_sha256"]):
            raise ValueError(
                f"the checkpoint stopped mid-epoch in {saved_data['path']} "
                f"({saved_data['documents']} documents, sizes sha256 "
                f"{saved_data['documents_sha256'][:12]}), but this run's {this_data['path']} holds "
                f"{this_data['documents']} documents (sha256 "
                f"{this_data['documents_sha256'][:12]}): its saved position would point into other "
                "data; resume on the same data, or pass --reset-dataloader to start the epoch "
                "over on this one"
            )

    def build_model(self, cfg, from_checkpoint=False):
        half = "--fp16" if self.cfg.fp16 else "--bf16" if self.cfg.bf16 else None
        if half and not from_checkpoint and (self.cfg.cpu or not torch.cuda.is_available()):
            # fairseq's fp16 trainer asserts CUDA; with bf16 and no CUDA it assumes a TPU
            where = "--cpu" if self.cfg.cpu else "no CUDA device is available"
            raise ValueError(
                f"{half} training needs a CUDA GPU ({where}): drop {half} to train in 32-bit "
                "floats on the CPU"
            )
        return super().build_model(cfg, from_checkpoint)

    def get_batch_iterator(self, dataset, num_workers=0, epoch=1, data_buffer_size=0,
                           skip_remainder_batch=False, max_sentences=None, **kwargs):
        if isinstance(dataset, PromptDataset):
            return iterators.EpochBatchIterator(
                dataset=dataset, collate_fn=dataset.collater, epoch=epoch,
                batch_sampler=prompt_batches(dataset.sizes, max_sentences or 1),
                disable_shuffling=True,
            )
        # every item is a whole batch, already sharded by rank; order is time, so no shuffling.
        # Items are slices of tensors in memory: loader workers would only add start-up and
        # shutdown cost (a worker per validation pass stalls each checkpoint save by about 5 s).
        itr = iterators.EpochBatchIterator(
            dataset=dataset,
            collate_fn=dataset.collater,
            num_workers=0,
            epoch=epoch,
            buffer_size=data_buffer_size,
            batch_sampler=[[i] for i in range(len(dataset))],
            disable_shuffling=True,
            skip_remainder_batch=skip_remainder_batch,
        )
        if dataset is self.datasets.get(self.cfg.train_subset):
            self._train_iterator = itr
        return itr

    def build_generator(self, models, args, seq_gen_cls=None, extra_gen_cls_kwargs=None,
                        **kwargs):
        # fairseq-generate and fairseq-interactive call this before they read any input
        from .generation import (
            LongMemSequenceGenerator,
            check_new_file,
            load_prompt_memory,
            save_prompt_memory,
        )

        if len(models) != 1:
            raise ValueError(f"--task longmem_lm generates with one model, got {len(models)} "
                             "(--path a:b)")
        decoder = models[0].decoder
        if not hasattr(decoder, "prefill"):
            raise ValueError(
                f"--task longmem_lm generates with a longmem_gpt2 checkpoint, --path holds a "
                f"{type(models[0]).__name__} (gpt2_lm or another model): generate from a "
                "gpt2_lm backbone with --task language_modeling"
            )
        cfg = self.cfg
        if any(isinstance(d, DocumentStreamDataset) for d in self.datasets.values()):
            raise ValueError(
                "fairseq-generate --task longmem_lm continues prompts: pass --prompt-tokens N "
                "(each document's first N tokens)"
            )
        if cfg.save_memory:
            check_new_file(cfg.save_memory, "--save-memory")
        T, memory_saved = cfg.tokens_per_sample, []  # non-empty once the file is written
        if cfg.memory_file and decoder.cfg.disable_memory:
            raise ValueError(f"--memory-file {cfg.memory_file}: this model runs with "
                             "disable_memory and reads no memory")
        if cfg.memory_file and not os.path.isfile(cfg.memory_file):
            raise FileNotFoundError(f"--memory-file: no file at {cfg.memory_file}")
        file_memory = cfg.memory_file and load_prompt_memory(
            cfg.memory_file, decoder, T, next(models[0].parameters()))

        def start_memory(rows, template):
            return copy.copy(file_memory).select_rows([0] * rows)  # the file's memory stays as read

        def save_memory(dec, state, prompts):
            if memory_saved:
                logger.warning("--save-memory %s holds the first prompt's memory; later "
                               "prompts are not saved", cfg.save_memory)
                return
            save_prompt_memory(cfg.save_memory, dec, state, prompts[0])
            memory_saved.append(True)

        gen_kwargs = dict(
            segment_len=T, stop_at_eos=cfg.stop_at_eos, max_len=2**62,
            start_memory=start_memory if cfg.memory_file else None,
            save_memory=save_memory if cfg.save_memory else None,
        )
        return super().build_generator(models, args, seq_gen_cls=LongMemSequenceGenerator,
                                       extra_gen_cls_kwargs=gen_kwargs)

    def eval_lm_dataloader(self, dataset, max_tokens=None, batch_size=None, max_positions=None,
                           num_shards=1, shard_id=0, num_workers=1, data_buffer_size=10,
                           context_window=0):
        if context_window > 0:
            raise ValueError(
                "--context-window does not apply to longmem_lm: the past is read from memory"
            )
        if isinstance(dataset, PromptDataset):
            raise ValueError("--prompt-tokens is for fairseq-generate; fairseq-eval-lm scores "
                             "whole documents: leave it out")
        return self.get_batch_iterator(
            dataset, num_workers=num_workers, data_buffer_size=data_buffer_size
        ).next_epoch_itr(shuffle=False)
