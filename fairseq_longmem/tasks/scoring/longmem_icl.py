"""``longmem_icl``: memory-augmented in-context learning, scored through stock ``fairseq-generate``.

Per seed, ``--demos-in-context`` demonstrations are drawn from the train set and put before
every test query, and ``--demos-in-memory`` more are written into a read-only memory before any
query is scored (LongMem's protocol; :mod:`fairseq_longmem.tasks.scoring.icl_data`). Each test
example is then scored per label word: fairseq-generate prints ``S-`` (the query), ``T-`` (the
gold label), one ``H-``/``P-`` pair per candidate (``--nbest``), and the accuracy of the
registered scorer ``icl_accuracy``.

Token layout (``</s>`` is fairseq's end of line, GPT-2's ``<|endoftext|>``; each formatted
demonstration is one line)::

    prompt = </s> demo_1 </s> demo_2 ... </s> demo_k </s> query        (context)
    memory = </s> mdemo_1 </s> mdemo_2 ... </s> mdemo_N                 (T-token segments)

and a candidate is the label word with the whitespace the template puts before it
(``" positive"``). A prompt longer than ``--tokens-per-sample`` loses its oldest demonstrations
(whole ones), then, if the query alone is still too long, the query's first tokens.

``--icl-calibration content-free`` (Zhao et al. 2021, "Calibrate Before Use"): the label words'
probabilities after the same demonstrations (and memory) with content-free queries in place of
the text (``--icl-content-free``, default ``N/A``, the empty text and ``[MASK]``), normalised
over the labels and averaged, are divided out of every example's: the decision is the label
maximising log p(label | prompt) - log p_cf(label). A small model that says one label after any
prompt (SmolLM2-135M says " negative" after every SST-2 prompt) is then scored on how its
preference moves with the text. The H- score is the calibrated one; P- keeps the raw per-token
log-probabilities.
"""

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch
from fairseq.dataclass import ChoiceEnum
from fairseq.tasks import register_task

from . import icl_data, memory_scoring
from ...memory.file_format import read_identity
from .candidate_scoring import (
    CandidateScorer,
    CandidateScoringConfig,
    CandidateScoringTask,
    ExamplesDataset,
    hypothesis,
)

logger = logging.getLogger(__name__)

DECISIONS = ChoiceEnum(["labels", "vocab"])
CALIBRATIONS = ChoiceEnum(["none", "content-free"])
MEMORY_FILE_KIND = "fairseq_longmem.icl_memory/1"


@dataclass
class LongMemICLConfig(CandidateScoringConfig):
    icl_dataset: ChoiceEnum(sorted(icl_data.SETS)) = field(
        default="sst2",
        metadata={"help": "evaluation set: sst2, sst5, mr, subj, mpqa in the LongMem authors' "
                  "layout, or tsv (train.tsv/test.tsv of 'label<TAB>text' lines)"},
    )
    icl_data_dir: str = field(
        default="???",
        metadata={"help": "the authors' data/icl/original folder (holding SST-2/, mr/, ...), "
                  "or the set's own folder"},
    )
    icl_labels: Optional[str] = field(
        default=None,
        metadata={"help": "comma-separated label words by class index (required for tsv; "
                  "replaces a set's own words)"},
    )
    icl_template: Optional[str] = field(
        default=None,
        metadata={"help": "demonstration template with {x} (text) and {y} (label word); default "
                  "'Review: {x} Sentiment: {y}. ' ('Input: {x} Type: {y}. ' for subj)"},
    )
    demos_in_context: int = field(
        default=20, metadata={"help": "k: demonstrations before every query"}
    )
    icl_test_examples: int = field(
        default=0,
        metadata={"help": "score only this many examples of the evaluation file, the same ones "
                  "for every condition and --icl-seed (a fixed draw, in file order); 0: all"},
    )
    demos_in_memory: int = field(
        default=2000, metadata={"help": "N: demonstrations written into memory (0: none)"}
    )
    icl_seed: int = field(
        default=1, metadata={"help": "seed that draws the demonstrations (the paper: 1-6)"}
    )
    icl_decision: DECISIONS = field(
        default="labels",
        metadata={"help": "labels: the label word with the highest log-probability; vocab: the "
                  "authors' rule, the argmax over the whole vocabulary at the last position, "
                  "right when the gold label starts with it (needs one-token label words)"},
    )
    icl_calibration: CALIBRATIONS = field(
        default="none",
        metadata={"help": "content-free: divide the label words' probabilities by their "
                  "probabilities after the same demonstrations and memory with content-free "
                  "queries (--icl-content-free), as in Zhao et al. 2021; needs --icl-decision "
                  "labels"},
    )
    icl_content_free: str = field(
        default="N/A,,[MASK]",
        metadata={"help": "comma-separated content-free texts for --icl-calibration "
                  "content-free (an empty item is the empty text)"},
    )
    memory_file: Optional[str] = field(
        default=None,
        metadata={"help": "reuse the demonstration memory saved here if it matches this run "
                  "(model, set, seed, N, chunk size); build and save it if the file is absent"},
    )


class ICLDataset(ExamplesDataset):
    """Test examples as prompts (demonstrations + query) with their gold label."""

    def __init__(self, prompts: List[torch.Tensor], queries: List[torch.Tensor],
                 labels: List[int], candidates: List[torch.Tensor], pad: int):
        longest = max(len(c) for c in candidates)
        super().__init__([len(p) + longest - 1 for p in prompts])
        self.prompts, self.queries, self.labels = prompts, queries, labels
        self.candidates = candidates
        self.pad = pad

    def collater(self, indices):
        if not indices:
            return {}
        prompts, prompt_lengths = memory_scoring.pad_rows([self.prompts[i] for i in indices],
                                                          self.pad)
        queries, query_lengths = memory_scoring.pad_rows([self.queries[i] for i in indices],
                                                         self.pad)
        targets, _ = memory_scoring.pad_rows(
            [self.candidates[self.labels[i]] for i in indices], self.pad)
        return {
            "id": torch.tensor(indices, dtype=torch.long),
            "nsentences": len(indices),
            "ntokens": int(prompt_lengths.sum()),
            # fairseq-generate prints src_tokens as S-: the query, not the whole prompt
            "net_input": {"src_tokens": queries, "src_lengths": query_lengths,
                          "prompt_tokens": prompts, "prompt_lengths": prompt_lengths},
            "target": targets,
            "label": torch.tensor([self.labels[i] for i in indices], dtype=torch.long),
        }


@register_task("longmem_icl", dataclass=LongMemICLConfig)
class LongMemICLTask(CandidateScoringTask):
    def __init__(self, cfg: LongMemICLConfig, dictionary, bpe):
        super().__init__(cfg, dictionary, bpe)
        self.icl = None  # the set, once loaded
        self.memory_demos = []  # demonstration lines (text) for the memory
        self.memory_stream = None  # their tokens, as written into memory
        self.content_free_prompts = []  # --icl-calibration content-free: demos + empty queries

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        cfg = self.cfg
        if split != "test":
            raise ValueError(
                f"--gen-subset {split}: longmem_icl scores the set's evaluation file, "
                "--gen-subset test (sst2 and sst5 use their dev file, as the paper does)"
            )
        labels = cfg.icl_labels.split(",") if cfg.icl_labels else None
        self.icl = icl_data.load_set(str(cfg.icl_dataset), cfg.icl_data_dir, labels,
                                     cfg.icl_template)
        template = icl_data.Template(self.icl.template)
        context, in_memory = icl_data.sample_demonstrations(
            self.icl.train, cfg.demos_in_context, cfg.demos_in_memory, cfg.icl_seed)

        candidates = [self.encode(template.continuation(w)) for w in self.icl.labels]
        for word, c in zip(self.icl.labels, candidates):
            if len(c) == 0:
                raise ValueError(f"label word {word!r} encodes to no token")
            if str(cfg.icl_decision) == "vocab" and len(c) != 1:
                pieces = self.bpe.decode(self.dictionary.string(c)) if self.bpe else c.tolist()
                raise ValueError(
                    f"--icl-decision vocab compares one predicted token with the label, but "
                    f"{template.continuation(word)!r} is {len(c)} tokens ({pieces!r}): choose "
                    "one-token label words (--icl-labels) or --icl-decision labels"
                )
        if len({tuple(c.tolist()) for c in candidates}) != len(candidates):
            raise ValueError(f"label words {self.icl.labels} do not encode to distinct tokens")
        calibration = str(getattr(cfg, "icl_calibration", "none"))  # absent: older configs
        if calibration != "none" and str(cfg.icl_decision) != "labels":
            raise ValueError(f"--icl-calibration {calibration} reweights the label words' "
                             "probabilities: it needs --icl-decision labels")

        demos = [self.encode(template.demonstration(x.text, self.icl.labels[x.label]))
                 for x in context]
        limit = cfg.tokens_per_sample - (max(len(c) for c in candidates) - 1)
        test, wanted = self.icl.test, getattr(cfg, "icl_test_examples", 0)  # absent: older configs
        if wanted < 0:
            raise ValueError(f"--icl-test-examples must be >= 0, got {wanted}")
        if 0 < wanted < len(test):
            # seed 0, whatever --icl-seed: every condition and seed scores the same examples
            keep = np.sort(np.random.RandomState(0).permutation(len(test))[:wanted])
            test = [test[i] for i in keep]
        prompts, queries, dropped, shortened, cut = [], [], 0, 0, 0
        for x in test:
            query = self.encode(template.query(x.text))
            prompt, n_dropped, n_cut = self.fit_prompt(demos, query, limit)
            prompts.append(prompt)
            queries.append(query)
            dropped += n_dropped
            shortened += n_dropped > 0
            cut += n_cut > 0
        self.count_unknowns(prompts, "prompts")
        self.content_free_prompts = []
        if calibration == "content-free":
            texts = cfg.icl_content_free.split(",")
            self.content_free_prompts = [
                self.fit_prompt(demos, self.encode(template.query(t)), limit)[0] for t in texts]
            logger.info("calibration: content-free queries %s", texts)

        self.memory_demos = [template.demonstration(x.text, self.icl.labels[x.label])
                             for x in in_memory]
        self.memory_stream = self.lines([self.encode(d) for d in self.memory_demos])
        self.count_unknowns([self.memory_stream], "memory")
        self.datasets[split] = ICLDataset(prompts, queries, [x.label for x in test],
                                          candidates, self.dictionary.pad())
        logger.info(
            "%s: %d test examples, labels %s, %d demonstrations in context, %d in memory "
            "(%d tokens), seed %d, decision rule %s",
            self.icl.name, len(prompts), self.icl.labels, len(demos), len(self.memory_demos),
            len(self.memory_stream), cfg.icl_seed, cfg.icl_decision,
        )
        if shortened or cut:
            logger.warning(
                "prompts longer than --tokens-per-sample %d: %d of %d lost demonstrations "
                "(%d dropped in all, oldest first); %d queries lost their first tokens",
                cfg.tokens_per_sample, shortened, len(prompts), dropped, cut,
            )

    def fit_prompt(self, demos: List[torch.Tensor], query: torch.Tensor, limit: int):
        """``</s> d_j </s> ... </s> query`` with the oldest demonstrations dropped until it has at
        most ``limit`` tokens; returns (prompt, demonstrations dropped, query tokens cut)."""
        lengths = [len(d) + 1 for d in demos]  # each with its </s>
        need = len(query) + 1
        first = 0
        while first < len(demos) and need + sum(lengths[first:]) > limit:
            first += 1
        cut = max(0, need - limit)
        prompt = self.lines(demos[first:] + [query[cut:]])
        return prompt, first, cut


class ICLScorer(CandidateScorer):
    """fairseq-generate's "generator" for longmem_icl: owns the read-only demonstration memory
    (filled once, at construction) and scores every label word of every test example."""

    def __init__(self, task: LongMemICLTask, models, nbest: int):
        super().__init__(task, models, nbest)
        cfg = task.cfg
        self.decision = str(cfg.icl_decision)
        self.memory = None
        n = len(task.memory_demos)
        if memory_scoring.reads_memory(self.model):
            self.memory = self.build_memory()
        elif n:
            logger.warning(
                "this model reads no memory (a gpt2_lm backbone, or disable_memory): the %d "
                "demonstrations for memory are not used; scoring with %d in context only",
                n, cfg.demos_in_context)
        elif cfg.memory_file:
            logger.warning("--memory-file is ignored: this model reads no memory")
        self.calibration = None  # log p_cf per label, subtracted from each example's score
        if task.content_free_prompts:
            self.calibration = self.content_free_logprobs(task.content_free_prompts)
            logger.info("calibration: p_cf %s", ", ".join(
                f"{w} {p:.6f}" for w, p in zip(task.icl.labels, self.calibration.exp().tolist())))

    def content_free_logprobs(self, prompts) -> torch.Tensor:
        """log p_cf per label: each content-free prompt's label probabilities normalised over
        the labels, averaged over the prompts (float64)."""
        cands = self.task.datasets["test"].candidates
        rows = memory_scoring.continuation_logprobs(self.model, prompts, [cands] * len(prompts),
                                                    self.pad, self.read_memory())
        logp = torch.tensor([[float(lp.double().sum()) for lp in row] for row in rows],
                            dtype=torch.float64)
        return logp.log_softmax(dim=-1).exp().mean(dim=0).log()

    # ------------------------------------------------------------------ memory

    def identity(self) -> dict:
        """What the memory's content depends on; saved with it and compared on reuse."""
        task, decoder = self.task, self.model.decoder
        return {
            "kind": MEMORY_FILE_KIND,
            "backbone": memory_scoring.backbone_digest(decoder.backbone),
            "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
            "memory_layer": decoder.memory_label,
            "chunk_size": decoder.cfg.chunk_size,
            "dataset": task.icl.name,
            "seed": task.cfg.icl_seed,
            "demos_in_memory": len(task.memory_demos),
            "segment_tokens": task.cfg.tokens_per_sample,
            "tokens": hashlib.sha256(
                task.memory_stream.numpy().astype(np.int64).tobytes()).hexdigest()[:16],
        }

    def build_memory(self):
        task, decoder, cfg = self.task, self.model.decoder, self.task.cfg
        wanted = self.identity()
        fingerprint = json.dumps(wanted, sort_keys=True)
        size = memory_scoring.memory_size_for(len(task.memory_stream), decoder.cfg.chunk_size,
                                              decoder.cfg.retrieved_tokens)
        path = cfg.memory_file
        memory = decoder.new_memory(1, size, self.model_parameter, fingerprint=fingerprint)
        if path and os.path.exists(path):
            try:
                saved = read_identity(path, MEMORY_FILE_KIND)
            except ValueError as e:
                raise ValueError(f"--memory-file {path} is not an in-context-learning memory of "
                                 f"fairseq-longmem ({e}): pass another --memory-file") from None
            if saved != wanted:
                diff = ", ".join(f"{k} (file {saved.get(k)!r}, this run {wanted.get(k)!r})"
                                 for k in sorted(set(saved) | set(wanted))
                                 if saved.get(k) != wanted.get(k))
                raise ValueError(
                    f"--memory-file {path} holds another memory; it differs in: {diff}. Pass "
                    "another --memory-file, or delete this one to rebuild it"
                )
            start = time.perf_counter()
            memory.load(path)
            logger.info("memory: %d demonstrations (%d tokens) loaded from %s in %.1fs",
                        len(task.memory_demos), len(task.memory_stream), path,
                        time.perf_counter() - start)
            return memory
        start = time.perf_counter()
        memory_scoring.write_stream(self.model, memory, task.memory_stream,
                                    cfg.tokens_per_sample, self.pad)
        logger.info(
            "memory: %d demonstrations (%d tokens) written in %d segments of %d tokens in "
            "%.1fs; chunk size %d, %d tokens searchable", len(task.memory_demos),
            len(task.memory_stream), -(-len(task.memory_stream) // cfg.tokens_per_sample),
            cfg.tokens_per_sample, time.perf_counter() - start, decoder.cfg.chunk_size,
            int(memory.fill()[0]))
        if path:
            start = time.perf_counter()
            memory.save(path)
            logger.info("memory saved to %s in %.1fs", path, time.perf_counter() - start)
        return memory

    # ------------------------------------------------------------------ scoring

    def generate(self, sample):
        net = sample["net_input"]
        prompt_lengths = net["prompt_lengths"]
        prompts = [net["prompt_tokens"][i, :prompt_lengths[i]].cpu()
                   for i in range(len(prompt_lengths))]
        memory = self.read_memory()
        if self.decision == "vocab":
            tokens, lengths = memory_scoring.pad_rows(prompts, self.pad)
            logprobs = memory_scoring.next_token_logprobs(self.model, tokens, lengths, memory).cpu()
            top = logprobs.topk(self.nbest, dim=-1)
            return [[hypothesis(top.indices[b, j].view(1), top.values[b, j].view(1))
                     for j in range(self.nbest)] for b in range(len(prompts))]
        cands = self.task.datasets["test"].candidates
        scores = memory_scoring.continuation_logprobs(self.model, prompts,
                                                      [cands] * len(prompts), self.pad, memory)
        if self.calibration is None:
            return [self.ranked(cands, row) for row in scores]
        return [self.calibrated(cands, row) for row in scores]

    def read_memory(self):
        """The memory every prompt reads: the demonstrations', or, with none, an empty one
        (which reads as memory off); None for a model without memory."""
        if self.memory is None and memory_scoring.reads_memory(self.model):
            self.memory = self.model.decoder.new_memory(
                1, self.model.decoder.cfg.retrieved_tokens, self.model_parameter)
        return self.memory

    def calibrated(self, candidates, logprobs) -> List[dict]:
        """Hypotheses ranked by log p(label) - log p_cf(label), that difference as their score;
        positional scores stay the raw log-probabilities."""
        score = [float(lp.double().sum()) - float(self.calibration[c])
                 for c, lp in enumerate(logprobs)]
        order = sorted(range(len(candidates)), key=lambda c: -score[c])
        return [dict(hypothesis(candidates[c], logprobs[c]), score=score[c]) for c in order]


# what the task's build_generator (CandidateScoringTask's) hands fairseq-generate
LongMemICLTask.scorer_class = ICLScorer
