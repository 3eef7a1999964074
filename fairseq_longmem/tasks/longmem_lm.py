"""``longmem_lm``: language modelling over whole documents streamed in order, one stream per row.

Documents follow fairseq's ``complete_doc`` convention (one empty line between documents, so a
binarized item of size 1 ends a document). Each rank owns ``--batch-size`` streams; batch ``t`` of
a rank holds segment ``t`` of each of its streams, and a per-row flag says that the segment starts
a new document, so that the model clears that row's memory before reading it.
"""

import logging
import os
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch
from fairseq import utils
from fairseq.data import Dictionary, FairseqDataset, data_utils, iterators
from fairseq.dataclass import FairseqDataclass
from fairseq.distributed import utils as dist_utils
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II

from ..models.longmem_gpt2 import BuildsLongMemFromCheckpoints

logger = logging.getLogger(__name__)


@dataclass
class LongMemLMConfig(FairseqDataclass):
    data: str = field(default="???", metadata={"help": "path to data directory (fairseq-preprocess output)"})
    tokens_per_sample: int = field(
        default=1024, metadata={"help": "segment length T: tokens scored per row and batch"}
    )
    batch_size: Optional[int] = II("dataset.batch_size")
    max_target_positions: Optional[int] = II("task.tokens_per_sample")
    # filled in from torch.distributed when not given
    data_parallel_rank: Optional[int] = None
    data_parallel_size: Optional[int] = None


def split_documents(sizes: np.ndarray) -> List[tuple]:
    """Item ranges ``[start, end)`` of the documents; an item of size 1 (an empty line's lone
    ``</s>``) separates documents and belongs to none. Empty documents are dropped."""
    seps = np.flatnonzero(sizes == 1)
    bounds = np.concatenate([[-1], seps, [len(sizes)]])
    return [(int(a) + 1, int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a + 1]


def assign_streams(doc_segments: List[int], num_streams: int) -> List[List[int]]:
    """Deal documents, in order, to the stream with the fewest segments so far (lowest index on
    ties). Streams end up within one document's length of each other."""
    streams = [[] for _ in range(num_streams)]
    load = np.zeros(num_streams, dtype=np.int64)
    for d, n in enumerate(doc_segments):
        s = int(np.argmin(load))
        streams[s].append(d)
        load[s] += n
    return streams


class DocumentStreamDataset(FairseqDataset):
    """Item ``t`` is batch ``t`` of this rank: segment ``t`` of each of its streams.

    With 3 documents of 3, 1 and 2 segments, ``bsz_per_shard=1`` and ``num_shards=2``, the
    streams are [doc0] and [doc1, doc2]; every rank gets 3 batches. Rank 0 sees doc0 segments
    0, 1, 2; rank 1 sees doc1 segment 0 (new document), doc2 segment 0 (new document), doc2
    segment 1. A stream that runs out gets empty rows (all padding, flagged as new).
    """

    def __init__(self, documents: List[torch.Tensor], pad: int, eos: int, segment_len: int,
                 bsz_per_shard: int, shard_id: int, num_shards: int):
        super().__init__()
        self.documents = documents
        self.pad, self.eos = pad, eos
        self.T = segment_len
        doc_segments = [-(-len(d) // segment_len) for d in documents]
        streams = assign_streams(doc_segments, bsz_per_shard * num_shards)
        # (doc, segment) pairs of every stream, in order
        self.streams = [
            [(d, s) for d in docs for s in range(doc_segments[d])] for docs in streams
        ]
        self.num_batches = max((len(s) for s in self.streams), default=0)
        self.my_streams = self.streams[shard_id * bsz_per_shard:(shard_id + 1) * bsz_per_shard]

    def __len__(self):
        return self.num_batches

    def segment(self, doc: int, seg: int):
        """Source and target of one segment: the target is the document itself, the source the
        document shifted right by one behind ``</s>``, so every token is scored exactly once."""
        tokens = self.documents[doc]
        a, b = seg * self.T, min((seg + 1) * self.T, len(tokens))
        target = tokens[a:b].long()
        prev = tokens[a - 1:a].long() if a > 0 else target.new_tensor([self.eos])
        source = torch.cat([prev, target[:-1]])
        return source, target

    def __getitem__(self, t):
        rows = []
        for stream in self.my_streams:
            if t < len(stream):
                doc, seg = stream[t]
                source, target = self.segment(doc, seg)
                rows.append((source, target, seg == 0, doc, seg))
            else:
                rows.append((None, None, True, -1, -1))
        return t, rows

    def collater(self, items):
        assert len(items) == 1, "each dataset item is already a batch"
        t, rows = items[0]
        pad = self.pad
        T = max((len(r[0]) for r in rows if r[0] is not None), default=1)
        src = torch.full((len(rows), T), pad, dtype=torch.long)
        tgt = torch.full((len(rows), T), pad, dtype=torch.long)
        lengths = torch.zeros(len(rows), dtype=torch.long)
        for b, (source, target, _, _, _) in enumerate(rows):
            if source is not None:
                src[b, :len(source)] = source
                tgt[b, :len(target)] = target
                lengths[b] = len(source)
        return {
            "id": torch.arange(len(rows)) + t * len(rows),
            "net_input": {
                "src_tokens": src,
                "src_lengths": lengths,
                "new_document": torch.tensor([r[2] for r in rows]),
            },
            "target": tgt,
            "nsentences": int((lengths > 0).sum()),
            "ntokens": int(lengths.sum()),
            # where each row is in its stream, for logs and tests
            "document": torch.tensor([r[3] for r in rows]),
            "segment": torch.tensor([r[4] for r in rows]),
        }


@register_task("longmem_lm", dataclass=LongMemLMConfig)
class LongMemLMTask(BuildsLongMemFromCheckpoints, FairseqTask):
    def __init__(self, cfg: LongMemLMConfig, dictionary: Dictionary):
        super().__init__(cfg)
        self.dictionary = dictionary

    @classmethod
    def setup_task(cls, cfg: LongMemLMConfig, **kwargs):
        paths = utils.split_paths(cfg.data)
        if not paths:
            raise ValueError("--data: no data directory given")
        dict_path = os.path.join(paths[0], "dict.txt")
        if not os.path.isfile(dict_path):
            raise FileNotFoundError(f"Dictionary not found: {dict_path}")
        dictionary = Dictionary.load(dict_path)
        logger.info("dictionary: %d types", len(dictionary))
        return cls(cfg, dictionary)

    def _shard(self):
        cfg = self.cfg
        if cfg.data_parallel_rank is not None and cfg.data_parallel_size is not None:
            return cfg.data_parallel_rank, cfg.data_parallel_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return dist_utils.get_data_parallel_rank(), dist_utils.get_data_parallel_world_size()
        return 0, 1

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        if not self.cfg.batch_size:
            raise ValueError(
                "--task longmem_lm needs --batch-size (streams per GPU); --max-tokens is not used"
            )
        paths = utils.split_paths(self.cfg.data)
        split_path = os.path.join(paths[(epoch - 1) % len(paths)], split)
        data = data_utils.load_indexed_dataset(split_path, self.dictionary, combine=combine)
        if data is None:
            raise FileNotFoundError(f"Dataset not found: {split} ({split_path})")
        documents = [
            torch.cat([data[i] for i in range(a, b)]).to(torch.int32)
            for a, b in split_documents(np.asarray(data.sizes))
        ]
        rank, world = self._shard()
        dataset = DocumentStreamDataset(
            documents, self.dictionary.pad(), self.dictionary.eos(), self.cfg.tokens_per_sample,
            self.cfg.batch_size, rank, world,
        )
        logger.info(
            "%s: %d documents, %d tokens, %d streams per rank x %d ranks, %d batches",
            split, len(documents), sum(len(d) for d in documents), self.cfg.batch_size, world,
            len(dataset),
        )
        self.datasets[split] = dataset

    def _layout(self):
        rank, world = self._shard()
        return {"streams": self.cfg.batch_size * world, "tokens_per_sample": self.cfg.tokens_per_sample}

    def get_checkpoint_dict(self):
        # saved in the checkpoint's extra_state, read back on resume by set_checkpoint_dict
        return {type(self).__name__: {"stream_layout": self._layout()}}

    def set_checkpoint_dict(self, state):
        """On resume fairseq restores the iterator position, which only means the same batches
        under the same stream layout: refuse a changed one rather than skip or replay data."""
        saved = state.get("stream_layout")
        if saved is not None and saved != self._layout():
            raise ValueError(
                f"the checkpoint was trained with {saved['streams']} streams (batch size x "
                f"world size) of {saved['tokens_per_sample']}-token segments, this run has "
                f"{self._layout()['streams']} of {self.cfg.tokens_per_sample}: resuming would "
                "skip or replay data; keep the layout, or pass --reset-dataloader to restart "
                "the epoch's streams"
            )

    def get_batch_iterator(self, dataset, num_workers=0, epoch=1, data_buffer_size=0,
                           skip_remainder_batch=False, **kwargs):
        # every item is a whole batch, already sharded by rank; order is time, so no shuffling.
        # Items are slices of tensors in memory: loader workers would only add start-up and
        # shutdown cost (a worker per validation pass stalled each checkpoint save by 5 s).
        return iterators.EpochBatchIterator(
            dataset=dataset,
            collate_fn=dataset.collater,
            num_workers=0,
            epoch=epoch,
            buffer_size=data_buffer_size,
            batch_sampler=[[i] for i in range(len(dataset))],
            disable_shuffling=True,
            skip_remainder_batch=skip_remainder_batch,
        )

    def eval_lm_dataloader(self, dataset, max_tokens=None, batch_size=None, max_positions=None,
                           num_shards=1, shard_id=0, num_workers=1, data_buffer_size=10,
                           context_window=0):
        if context_window > 0:
            raise ValueError(
                "--context-window does not apply to longmem_lm: the past is read from memory"
            )
        return self.get_batch_iterator(
            dataset, num_workers=num_workers, data_buffer_size=data_buffer_size
        ).next_epoch_itr(shuffle=False)

    @property
    def source_dictionary(self):
        return self.dictionary

    @property
    def target_dictionary(self):
        return self.dictionary
