"""``longmem_cross_entropy``: fairseq's summed cross-entropy plus memory statistics in the logs.

Logged besides loss/ppl: ``mem_fill`` (mean tokens in a row's memory when read), ``mem_gate``
(mean sigmoid gate of the memory heads) and ``mem_share`` (mean share of attention mass the
memory layer puts on memory; 0 for queries that found no memory).
"""

from dataclasses import dataclass

from fairseq import metrics
from fairseq.criterions import register_criterion
from fairseq.criterions.cross_entropy import CrossEntropyCriterion, CrossEntropyCriterionConfig

STATS = {"fill": "mem_fill", "gate": "mem_gate", "memory_share": "mem_share"}


@dataclass
class LongMemCrossEntropyConfig(CrossEntropyCriterionConfig):
    pass


@register_criterion("longmem_cross_entropy", dataclass=LongMemCrossEntropyConfig)
class LongMemCrossEntropyCriterion(CrossEntropyCriterion):
    def forward(self, model, sample, reduce=True):
        net_output = model(**sample["net_input"])
        loss, _ = self.compute_loss(model, net_output, sample, reduce=reduce)
        sample_size = sample["ntokens"]
        logging_output = {
            "loss": loss.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["nsentences"],
            "sample_size": sample_size,
        }
        stats = net_output[1].get("memory_stats")
        if stats is not None:
            # summed over batches here and averaged in reduce_metrics, so that data-parallel
            # workers (whose logging outputs are summed) average correctly too
            logging_output["mem_batches"] = 1
            for key, name in STATS.items():
                logging_output[name] = float(stats[key])
        return loss, sample_size, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        CrossEntropyCriterion.reduce_metrics(logging_outputs)
        n = sum(log.get("mem_batches", 0) for log in logging_outputs)
        if n:
            for name in STATS.values():
                total = sum(log.get(name, 0.0) for log in logging_outputs)
                metrics.log_scalar(name, total / n, n, round=3)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
