"""``icl_accuracy``: fairseq-generate's scorer for ``--task longmem_icl``.

It compares each example's top hypothesis with its gold label word, as decoded text with the
surrounding whitespace removed: equal under ``--icl-decision labels``; under ``vocab`` (the
LongMem authors' rule) right when the predicted token is not blank and the gold label starts with
it. Prints ``Accuracy 91.06 (794/872)``.
"""

from dataclasses import dataclass

from fairseq.dataclass import FairseqDataclass
from fairseq.scoring import BaseScorer, register_scorer
from omegaconf import II
from omegaconf.errors import OmegaConfBaseException


@dataclass
class ICLAccuracyConfig(FairseqDataclass):
    icl_decision: str = II("task.icl_decision")


@register_scorer("icl_accuracy", dataclass=ICLAccuracyConfig)
class ICLAccuracyScorer(BaseScorer):
    def __init__(self, cfg):
        super().__init__(cfg)
        try:
            self.decision = str(cfg.icl_decision)
        except OmegaConfBaseException:
            raise ValueError("--scoring icl_accuracy scores --task longmem_icl") from None
        self.correct = 0

    def add_string(self, ref, pred):
        super().add_string(ref, pred)
        ref, pred = ref.strip(), pred.strip()
        if self.decision == "vocab":
            self.correct += bool(pred) and ref.startswith(pred)
        else:
            self.correct += ref == pred

    def score(self) -> float:
        return 100.0 * self.correct / len(self.ref) if self.ref else 0.0

    def result_string(self) -> str:
        return f"Accuracy {self.score():.2f} ({self.correct}/{len(self.ref)})"
