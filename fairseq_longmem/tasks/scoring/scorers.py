"""fairseq-generate scorers of the scoring tasks: the share of examples whose top hypothesis is
right, compared as decoded text with the surrounding whitespace removed.

``candidate_accuracy``: right when the top candidate equals the target (``longmem_suffix``).
``icl_accuracy`` (``longmem_icl``): the same under ``--icl-decision labels``; under ``vocab``
(the LongMem authors' rule) right when the predicted token is not blank and the gold label starts
with it. Both print ``Accuracy 91.06 (794/872)``.
"""

from dataclasses import dataclass

from ... import require_fairseq

require_fairseq("fairseq_longmem.tasks.scoring.scorers")

from fairseq.dataclass import FairseqDataclass  # noqa: E402
from fairseq.scoring import BaseScorer, register_scorer  # noqa: E402
from omegaconf import II  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402


@dataclass
class CandidateAccuracyConfig(FairseqDataclass):
    pass


@register_scorer("candidate_accuracy", dataclass=CandidateAccuracyConfig)
class CandidateAccuracyScorer(BaseScorer):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.correct = 0

    def is_correct(self, ref: str, pred: str) -> bool:
        return ref == pred

    def add_string(self, ref, pred):
        super().add_string(ref, pred)
        self.correct += self.is_correct(ref.strip(), pred.strip())

    def score(self) -> float:
        return 100.0 * self.correct / len(self.ref) if self.ref else 0.0

    def result_string(self) -> str:
        return f"Accuracy {self.score():.2f} ({self.correct}/{len(self.ref)})"


@dataclass
class ICLAccuracyConfig(FairseqDataclass):
    icl_decision: str = II("task.icl_decision")


@register_scorer("icl_accuracy", dataclass=ICLAccuracyConfig)
class ICLAccuracyScorer(CandidateAccuracyScorer):
    def __init__(self, cfg):
        super().__init__(cfg)
        try:
            self.decision = str(cfg.icl_decision)
        except OmegaConfBaseException:
            raise ValueError("--scoring icl_accuracy scores --task longmem_icl") from None

    def is_correct(self, ref: str, pred: str) -> bool:
        if self.decision == "vocab":
            return bool(pred) and ref.startswith(pred)
        return ref == pred
