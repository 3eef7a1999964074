"""Test-only fairseq ``--user-dir``: the fairseq_longmem plugin plus a criterion that records what
each data-parallel rank trained on and its final weights, so tests can compare the ranks.

fairseq logs and saves checkpoints on rank 0 only; this criterion writes ``rank{R}.pt`` into
``--probe-dir`` on every rank, each time validation starts (so the last write holds the weights
after the last update): the rank, its world size, the (document, segment) rows of every training
batch it ran, and its model's state dict.
"""

import os
from dataclasses import dataclass, field

import torch
from fairseq.criterions import register_criterion

import fairseq_longmem  # noqa: F401  (registers the task, models and criterion)
from fairseq_longmem.checkpoint import guard as checkpoint_guard
from fairseq_longmem.criterions.longmem_cross_entropy import (
    LongMemCrossEntropyConfig,
    LongMemCrossEntropyCriterion,
)


@dataclass
class RankProbeConfig(LongMemCrossEntropyConfig):
    probe_dir: str = field(default="", metadata={"help": "folder for rank{R}.pt"})


# it evaluates nothing from its config: its checkpoints may be resumed from
checkpoint_guard.allow("criterion", "longmem_rank_probe")


@register_criterion("longmem_rank_probe", dataclass=RankProbeConfig)
class LongMemRankProbeCriterion(LongMemCrossEntropyCriterion):
    def __init__(self, task, sentence_avg, probe_dir):
        super().__init__(task, sentence_avg)
        if not probe_dir:
            raise ValueError("--probe-dir is required")
        self.probe_dir = probe_dir
        self.train_rows = []  # per training batch: [(document, segment), ...] of its rows
        self.dumped_at = None

    def forward(self, model, sample, reduce=True):
        if model.training:
            self.train_rows.append(
                list(zip(sample["document"].tolist(), sample["segment"].tolist()))
            )
        elif self.dumped_at != len(self.train_rows):
            self.dumped_at = len(self.train_rows)
            self._dump(model)
        return super().forward(model, sample, reduce=reduce)

    def _dump(self, model):
        dist = torch.distributed
        on = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if on else (0, 1)
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        path = os.path.join(self.probe_dir, f"rank{rank}.pt")
        torch.save(
            {"rank": rank, "world": world, "train_rows": self.train_rows, "state": state},
            path + ".tmp",
        )
        os.replace(path + ".tmp", path)
