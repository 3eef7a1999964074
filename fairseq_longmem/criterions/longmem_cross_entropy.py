"""``longmem_cross_entropy``: fairseq's summed cross-entropy plus memory statistics in the logs.

``--sentence-avg`` divides by the batch's sentences, as fairseq's ``cross_entropy`` does; under
``longmem_lm`` a sentence is a segment: a non-empty row of the batch (a row whose stream has run
out is all padding and is not counted, since it holds nothing to average over).

Logged besides loss/ppl: ``mem_fill`` (mean tokens in a row's memory when read), ``mem_gate``
(mean sigmoid gate of the memory heads) and ``mem_share`` (mean share of attention mass the
memory layer puts on memory; 0 for queries that found no memory). With ``--position-buckets``,
also the loss per bucket of a token's position in its document (``loss_pos0_4096``,
``ppl_pos0_4096``, ``ntokens_pos0_4096``, ..., the last bucket ending in ``_end``).

With ``--recurrence-buckets 1,4,16``, also the loss per bucket of how far back, in segments, the
previous occurrence of a token's bigram (previous token, token) lies in its document: ``rec_none``
(first occurrence), ``rec_local`` (in the token's own T-token segment, where the local attention
sees it), ``rec1`` (in the previous segment), ``rec2_4``, ``rec5_16``, ``rec17_end``
(``loss_rec...``, ``ppl_rec...``, ``ntokens_rec...``; the counts sum to ``ntokens``). "k
segments back" compares segment indices: a token at document position i and its bigram's
previous occurrence at j are ``i // T - j // T`` segments apart.

With a model that logs where its memory reads reach (``longmem_gpt2 --memory-reach-buckets``),
also ``mem_reach<label>``: the share of the memory attention's mass on chunks written ``label``
segments back (summed over heads and queries that read memory; the shares sum to 1),
``mem_reach<label>_h<h>`` the same per head, ``mem_chunks<label>`` the share of retrieved
chunks, and ``mem_stored<label>`` the share of the memory's own chunks written ``label`` segments
back at the time of each read (weighted as the mass is): where reads that picked stored chunks at
random would land, the chance level of the other two.
"""

import math
from dataclasses import dataclass, field
from typing import List

import torch
from fairseq import metrics, utils
from fairseq.criterions import register_criterion
from fairseq.criterions.cross_entropy import CrossEntropyCriterion, CrossEntropyCriterionConfig
from omegaconf import II

from ..buckets import (bucket_label, parse_position_buckets, parse_segment_buckets, segment_label,
                       segments_back_bucket)

MEMORY_STATS = {"fill": "mem_fill", "gate": "mem_gate", "memory_share": "mem_share"}
POS_COUNT = "ntokens_pos"  # logging-output prefix of a position bucket's token count
POS_LOSS = "lossnat_pos"  # ... and of its summed loss in nats (reduced to loss_pos*)
REC_COUNT, REC_LOSS = "ntokens_rec", "lossnat_rec"  # the same per recurrence bucket
REACH_MASS, REACH_CHUNKS = "reachmass_", "reachchunks_"  # summed mass/chunks, + label_h<head>
REACH_STORED = "reachstored_"  # + label: the memory's contents by bucket, summed over the reads


@dataclass
class LongMemCrossEntropyConfig(CrossEntropyCriterionConfig):
    position_buckets: str = field(
        default="",
        metadata={
            "help": "comma-separated positions in the document, e.g. '4096' or '1024,4096': "
            "also log loss and ppl of the tokens in [0, 4096) and [4096, end). Needs "
            "--task longmem_lm, whose batches carry each row's segment index (position = "
            "segment x tokens-per-sample + offset)"
        },
    )
    recurrence_buckets: str = field(
        default="",
        metadata={
            "help": "comma-separated distances in segments, e.g. '1,4,16': also log loss and "
            "ppl of the tokens by how far back the previous occurrence of their bigram lies in "
            "the document: none, inside the token's own segment (local), 1, 2-4, 5-16, more "
            "than 16 segments back. Needs --task longmem_lm"
        },
    )
    tokens_per_sample: int = II("task.tokens_per_sample")


def recurrence_labels(buckets) -> List[str]:
    return ["none", "local"] + [segment_label(lo, hi) for lo, hi in buckets]


@register_criterion("longmem_cross_entropy", dataclass=LongMemCrossEntropyConfig)
class LongMemCrossEntropyCriterion(CrossEntropyCriterion):
    def __init__(self, task, sentence_avg, position_buckets="", recurrence_buckets="",
                 tokens_per_sample=None):
        super().__init__(task, sentence_avg)
        self.position_buckets = parse_position_buckets(position_buckets)
        self.recurrence_buckets = parse_segment_buckets(recurrence_buckets)
        self.tokens_per_sample = tokens_per_sample

    @property
    def needs_recurrence(self) -> bool:
        """Asks ``longmem_lm`` for each token's bigram recurrence distance (it computes them only
        when asked)."""
        return bool(self.recurrence_buckets)

    def forward(self, model, sample, reduce=True):
        # not the parent's forward, which keeps the model's output (and so its memory statistics)
        # to itself and counts all-padding rows as sentences; its compute_loss does the rest
        net_output = model(**sample["net_input"])
        if self.position_buckets or self.recurrence_buckets:
            token_loss, _ = self.compute_loss(model, net_output, sample, reduce=False)
            loss = token_loss.sum()
        else:
            loss, _ = self.compute_loss(model, net_output, sample, reduce=reduce)
        sample_size = sample["nsentences"] if self.sentence_avg else sample["ntokens"]
        logging_output = {
            "loss": loss.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["nsentences"],
            "sample_size": sample_size,
        }
        if self.position_buckets:
            logging_output.update(self.position_sums(token_loss, sample))
        if self.recurrence_buckets:
            logging_output.update(self.recurrence_sums(token_loss, sample))
        stats = net_output[1].get("memory_stats")
        if stats is not None:
            # summed over batches here and averaged in reduce_metrics, so that data-parallel
            # workers (whose logging outputs are summed) average correctly too
            logging_output["mem_batches"] = 1
            for key, name in MEMORY_STATS.items():
                if key in stats:  # the training-free read has a fill, no gate
                    logging_output[name] = float(stats[key])
            reach = stats.get("reach")
            if reach is not None:
                logging_output.update(reach_sums(reach))
        return loss, sample_size, logging_output

    def segment_length(self, sample, option):
        """T, checked against the batch's rows (a document's last segment may be shorter)."""
        if "segment" not in sample:
            raise ValueError(
                f"{option} needs --task longmem_lm: this batch does not say where its rows are "
                "in their documents"
            )
        W = sample["target"].shape[1]
        T = self.tokens_per_sample
        if not T or W > T:
            raise ValueError(
                f"{option}: the batch has {W}-token rows but tokens_per_sample is {T}; pass the "
                "--tokens-per-sample the data is streamed with"
            )
        return T

    def positions(self, sample, option):
        """(B, W) position of every target token in its document: segment x T + offset."""
        T = self.segment_length(sample, option)
        target = sample["target"]
        offset = torch.arange(target.shape[1], device=target.device)
        return sample["segment"].to(target.device).unsqueeze(1) * T + offset, T

    def sums_by_bucket(self, token_loss, sample, masks, loss_prefix, count_prefix):
        """Summed loss (nats) and count of the scored (non-padding) tokens under each
        ``label -> (B, W) mask`` of ``masks``."""
        target = sample["target"]
        scored = target.ne(self.padding_idx)
        token_loss = token_loss.view(target.shape).detach()
        out = {}
        for label, mask in masks:
            mask = scored & mask
            out[loss_prefix + label] = float(token_loss[mask].sum())
            out[count_prefix + label] = int(mask.sum())
        return out

    def recurrence_sums(self, token_loss, sample):
        """Summed loss (nats) and token count per recurrence bucket of the batch."""
        pos, T = self.positions(sample, "--recurrence-buckets")
        if "recurrence_distance" not in sample:
            raise ValueError(
                "--recurrence-buckets: the batch carries no recurrence_distance; the task must "
                "be longmem_lm, which adds it for a criterion that asks (build_criterion)"
            )
        dist = sample["recurrence_distance"].to(pos.device)  # (B, W) tokens back, 0 = none
        back = pos // T - (pos - dist) // T  # segments between the two occurrences
        # bucket 0: none, 1: local (same segment), 2..: the segment buckets
        buckets = self.recurrence_buckets
        index = torch.where(
            dist == 0, 0,
            torch.where(back == 0, 1, 2 + segments_back_bucket(back.clamp_min(1), buckets)))
        masks = ((label, index == i) for i, label in enumerate(recurrence_labels(buckets)))
        return self.sums_by_bucket(token_loss, sample, masks, REC_LOSS, REC_COUNT)

    def position_sums(self, token_loss, sample):
        """Summed loss (nats) and token count per position bucket of the batch."""
        # W <= T: a document's last segment may be shorter
        pos, _ = self.positions(sample, "--position-buckets")
        masks = ((bucket_label(lo, hi), (pos >= lo) & (pos < hi))
                 for lo, hi in self.position_buckets)
        return self.sums_by_bucket(token_loss, sample, masks, POS_LOSS, POS_COUNT)

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        CrossEntropyCriterion.reduce_metrics(logging_outputs)
        n = sum(log.get("mem_batches", 0) for log in logging_outputs)
        if n:
            for name in MEMORY_STATS.values():
                if any(name in log for log in logging_outputs):
                    total = sum(log.get(name, 0.0) for log in logging_outputs)
                    metrics.log_scalar(name, total / n, n, round=3)
        log_bucket_losses(logging_outputs, "pos", POS_COUNT, POS_LOSS)
        log_bucket_losses(logging_outputs, "rec", REC_COUNT, REC_LOSS)
        log_reach_shares(logging_outputs)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True


def label_order(label: str):
    """none, local, then by the bucket's first number."""
    return {"none": (0, 0), "local": (1, 0)}.get(label) or (2, int(label.split("_")[0]))


def log_bucket_losses(logging_outputs, name: str, count_prefix: str, loss_prefix: str):
    """``loss_<name><label>`` (base 2), ``ppl_...`` and ``ntokens_...`` of every bucket."""
    labels = sorted(
        {k[len(count_prefix):] for log in logging_outputs for k in log
         if k.startswith(count_prefix)},
        key=label_order,
    )
    for label in labels:
        count = sum(log.get(count_prefix + label, 0) for log in logging_outputs)
        metrics.log_scalar_sum(count_prefix + label, count)
        if count:
            nats = sum(log.get(loss_prefix + label, 0.0) for log in logging_outputs)
            key = f"loss_{name}{label}"
            metrics.log_scalar(key, nats / count / math.log(2), count, round=3)
            metrics.log_derived(
                f"ppl_{name}{label}", lambda meters, key=key: utils.get_perplexity(meters[key].avg)
            )


def reach_sums(reach) -> dict:
    """The model's per-head, per-bucket memory mass and chunk counts as summable scalars."""
    out = {}
    for h, (mass, chunks) in enumerate(zip(reach["mass"].tolist(), reach["chunks"].tolist())):
        for label, m, c in zip(reach["labels"], mass, chunks):
            out[f"{REACH_MASS}{label}_h{h}"] = float(m)
            out[f"{REACH_CHUNKS}{label}_h{h}"] = float(c)
    for label, share in zip(reach["labels"], reach["stored"].tolist()):
        out[f"{REACH_STORED}{label}"] = float(share)
    return out


def log_reach_shares(logging_outputs):
    """``mem_reach<label>`` (share of memory-attention mass), ``mem_reach<label>_h<h>`` (per
    head), ``mem_chunks<label>`` (share of retrieved chunks) and ``mem_stored<label>`` (share of
    the memory's contents, the chance level): each family sums to 1."""
    mass, chunks, stored = {}, {}, {}  # (label, head) -> sum; label -> sum
    for log in logging_outputs:
        for k, v in log.items():
            if k.startswith(REACH_STORED):
                label = k[len(REACH_STORED):]
                stored[label] = stored.get(label, 0.0) + v
                continue
            for prefix, into in ((REACH_MASS, mass), (REACH_CHUNKS, chunks)):
                if k.startswith(prefix):
                    label, head = k[len(prefix):].rsplit("_h", 1)
                    into[label, int(head)] = into.get((label, int(head)), 0.0) + v
    total = sum(mass.values())
    if not total:
        return
    labels = sorted({label for label, _ in mass}, key=label_order)
    heads = sorted({head for _, head in mass})
    total_chunks = sum(chunks.values())
    total_stored = sum(stored.values())
    for label in labels:
        if total_stored:
            metrics.log_scalar(f"mem_stored{label}", stored.get(label, 0.0) / total_stored,
                               total, round=3)
        metrics.log_scalar(f"mem_reach{label}",
                           sum(mass[label, h] for h in heads) / total, total, round=3)
        if total_chunks:
            metrics.log_scalar(f"mem_chunks{label}",
                               sum(chunks[label, h] for h in heads) / total_chunks, total, round=3)
    for h in heads:
        head_total = sum(mass[label, h] for label in labels)
        if head_total:
            for label in labels:
                metrics.log_scalar(f"mem_reach{label}_h{h}", mass[label, h] / head_total,
                                   head_total, round=3)
