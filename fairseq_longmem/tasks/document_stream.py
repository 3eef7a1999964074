"""The ``longmem_lm`` task's data: documents split out of a binarized split and streamed in
order, segment by segment, one stream per batch row (:class:`DocumentStreamDataset`), with the
distances to each bigram's previous occurrence that the recurrence buckets read."""

import hashlib
from typing import List

import numpy as np
import torch
from fairseq.data import FairseqDataset

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


def raise_no_documents(split: str, split_path: str, items: int):
    """A split without documents has nothing to score (eval-lm would print a perplexity of 1.00
    and validate divide by zero): refuse it."""
    what = f"its {items} items are all empty lines" if items else "it holds no item"
    raise ValueError(
        f"{split} ({split_path}.bin) holds no document ({what}): binarize a text with documents "
        "(one paragraph per line, one empty line between documents), or leave the split out"
    )


def split_fingerprint(split_path: str, documents: List[torch.Tensor]) -> dict:
    """Identifies a split's documents by their count and lengths (cheap at any corpus size), so
    that a resume can tell it is still reading the data its position was saved in."""
    lengths = np.array([len(d) for d in documents], dtype=np.int64)
    return {
        "path": split_path,
        "documents": len(documents),
        "documents_sha256": hashlib.sha256(lengths.tobytes()).hexdigest(),
    }


def previous_bigram_distance(tokens: np.ndarray, first_prev: int) -> np.ndarray:
    """Per position ``i`` of a document, ``i - j`` for the latest ``j < i`` whose bigram (previous
    token, token) is the same as position ``i``'s, or 0 when there is none (a first occurrence).

    Position 0's previous token is ``first_prev`` (the ``</s>`` the model reads before a
    document), every other position's is the document's own previous token, across segment
    boundaries: what the model's source holds at that position. A stable sort groups equal
    bigrams in position order, so each occurrence's predecessor is its neighbour in the sort.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    n = len(tokens)
    dist = np.zeros(n, dtype=np.int64)
    if n < 2:
        return dist
    prev = np.concatenate([[first_prev], tokens[:-1]])
    keys = prev * (int(max(tokens.max(), first_prev)) + 1) + tokens  # one int per bigram
    order = np.argsort(keys, kind="stable")
    same = keys[order[1:]] == keys[order[:-1]]
    later, earlier = order[1:][same], order[:-1][same]
    dist[later] = later - earlier
    return dist


class DocumentStreamDataset(FairseqDataset):
    """Item ``t`` is batch ``t`` of this rank: segment ``t`` of each of its streams.

    With 3 documents of 3, 1 and 2 segments, ``bsz_per_shard=1`` and ``num_shards=2``, the
    streams are [doc0] and [doc1, doc2]; every rank gets 3 batches. Rank 0 sees doc0 segments
    0, 1, 2; rank 1 sees doc1 segment 0 (new document), doc2 segment 0 (new document), doc2
    segment 1. A stream that runs out gets empty rows (all padding, flagged as new).

    With ``track_recurrence`` set (by a criterion that asks for it, see
    ``LongMemLMTask.build_criterion``), batches also carry ``recurrence_distance`` (B, W): per
    target token, the distance back in tokens to the previous occurrence of its bigram in its
    document (:func:`previous_bigram_distance`; 0 = none, and for padding), computed once per
    document when first needed.
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
        self.track_recurrence = False
        self._distances = {}  # doc -> previous_bigram_distance, filled as documents are read

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

    def recurrence_distance(self, doc: int, seg: int) -> torch.Tensor:
        if doc not in self._distances:
            self._distances[doc] = torch.from_numpy(
                previous_bigram_distance(self.documents[doc].numpy(), self.eos))
        return self._distances[doc][seg * self.T:(seg + 1) * self.T]

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
        # the longest row: T, or less when every stream is in a document's last segment
        width = max((len(r[0]) for r in rows if r[0] is not None), default=1)
        src = torch.full((len(rows), width), pad, dtype=torch.long)
        tgt = torch.full((len(rows), width), pad, dtype=torch.long)
        lengths = torch.zeros(len(rows), dtype=torch.long)
        dist = torch.zeros((len(rows), width), dtype=torch.long) if self.track_recurrence else None
        for b, (source, target, _, doc, seg) in enumerate(rows):
            if source is not None:
                src[b, :len(source)] = source
                tgt[b, :len(target)] = target
                lengths[b] = len(source)
                if dist is not None:
                    dist[b, :len(target)] = self.recurrence_distance(doc, seg)
        batch = {
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
        if dist is not None:
            batch["recurrence_distance"] = dist
        return batch
