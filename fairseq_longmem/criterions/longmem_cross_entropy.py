"""``longmem_cross_entropy``: fairseq's summed cross-entropy plus memory statistics in the logs.

``--sentence-avg`` divides by the batch's sentences, as fairseq's ``cross_entropy`` does; under
``longmem_lm`` a sentence is a segment: a non-empty row of the batch (a row whose stream has run
out is all padding and is not counted, since it holds nothing to average over).

Logged besides loss/ppl: ``mem_fill`` (mean tokens in a row's memory when read), ``mem_gate``
(mean sigmoid gate of the memory heads) and ``mem_share`` (mean share of attention mass the
memory layer puts on memory; 0 for queries that found no memory). With ``--position-buckets``,
also the loss per bucket of a token's position in its document (``loss_pos0_4096``,
``ppl_pos0_4096``, ``ntokens_pos0_4096``, ..., the last bucket ending in ``_end``).
"""

import math
from dataclasses import dataclass, field
from typing import List, Tuple

import torch
from fairseq import metrics, utils
from fairseq.criterions import register_criterion
from fairseq.criterions.cross_entropy import CrossEntropyCriterion, CrossEntropyCriterionConfig
from omegaconf import II

STATS = {"fill": "mem_fill", "gate": "mem_gate", "memory_share": "mem_share"}
BUCKET_COUNT = "ntokens_pos"  # logging-output prefix of a bucket's token count
BUCKET_LOSS = "lossnat_pos"  # ... and of its summed loss in nats (reduced to loss_pos*)


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
    tokens_per_sample: int = II("task.tokens_per_sample")


def parse_buckets(spec: str) -> List[Tuple[int, float]]:
    """``"1024,4096"`` -> ``[(0, 1024), (1024, 4096), (4096, inf)]``; ``""`` -> ``[]``."""
    if not spec:
        return []
    try:
        bounds = [int(b) for b in str(spec).split(",")]
    except ValueError:
        bounds = []
    if not bounds or bounds[0] <= 0 or any(a >= b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(
            f"--position-buckets {spec!r}: expected increasing positive token positions "
            "separated by commas, e.g. 1024,4096"
        )
    edges = [0] + bounds + [math.inf]
    return list(zip(edges[:-1], edges[1:]))


def bucket_label(lo, hi) -> str:
    return f"{lo}_{'end' if hi == math.inf else hi}"


@register_criterion("longmem_cross_entropy", dataclass=LongMemCrossEntropyConfig)
class LongMemCrossEntropyCriterion(CrossEntropyCriterion):
    def __init__(self, task, sentence_avg, position_buckets="", tokens_per_sample=None):
        super().__init__(task, sentence_avg)
        self.buckets = parse_buckets(position_buckets)
        self.tokens_per_sample = tokens_per_sample

    def forward(self, model, sample, reduce=True):
        # not the parent's forward, which keeps the model's output (and so its memory statistics)
        # to itself and counts all-padding rows as sentences; its compute_loss does the rest
        net_output = model(**sample["net_input"])
        if self.buckets:
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
        if self.buckets:
            logging_output.update(self.bucket_sums(token_loss, sample))
        stats = net_output[1].get("memory_stats")
        if stats is not None:
            # summed over batches here and averaged in reduce_metrics, so that data-parallel
            # workers (whose logging outputs are summed) average correctly too
            logging_output["mem_batches"] = 1
            for key, name in STATS.items():
                logging_output[name] = float(stats[key])
        return loss, sample_size, logging_output

    def bucket_sums(self, token_loss, sample):
        """Summed loss (nats) and token count per position bucket of the batch."""
        target = sample["target"]  # (B, W), W <= T: a document's last segment may be shorter
        if "segment" not in sample:
            raise ValueError(
                "--position-buckets needs --task longmem_lm: this batch does not say where its "
                "rows are in their documents"
            )
        B, W = target.shape
        T = self.tokens_per_sample
        if not T or W > T:
            raise ValueError(
                f"--position-buckets: the batch has {W}-token rows but tokens_per_sample is {T}; "
                "pass the --tokens-per-sample the data is streamed with"
            )
        offset = torch.arange(W, device=target.device)
        pos = sample["segment"].to(target.device).unsqueeze(1) * T + offset  # (B, W)
        scored = target.ne(self.padding_idx)
        token_loss = token_loss.view(B, W).detach()
        out = {}
        for lo, hi in self.buckets:
            mask = scored & (pos >= lo) & (pos < hi)
            label = bucket_label(lo, hi)
            out[BUCKET_LOSS + label] = float(token_loss[mask].sum())
            out[BUCKET_COUNT + label] = int(mask.sum())
        return out

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        CrossEntropyCriterion.reduce_metrics(logging_outputs)
        n = sum(log.get("mem_batches", 0) for log in logging_outputs)
        if n:
            for name in STATS.values():
                total = sum(log.get(name, 0.0) for log in logging_outputs)
                metrics.log_scalar(name, total / n, n, round=3)
        labels = sorted(
            {k[len(BUCKET_COUNT):] for log in logging_outputs for k in log if k.startswith(BUCKET_COUNT)},
            key=lambda label: int(label.split("_")[0]),
        )
        for label in labels:
            count = sum(log.get(BUCKET_COUNT + label, 0) for log in logging_outputs)
            metrics.log_scalar_sum(BUCKET_COUNT + label, count)
            if count:
                nats = sum(log.get(BUCKET_LOSS + label, 0.0) for log in logging_outputs)
                metrics.log_scalar(f"loss_pos{label}", nats / count / math.log(2), count, round=3)
                metrics.log_derived(
                    f"ppl_pos{label}",
                    lambda meters, key=f"loss_pos{label}": utils.get_perplexity(meters[key].avg),
                )

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
