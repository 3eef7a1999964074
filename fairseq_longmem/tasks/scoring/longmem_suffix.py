"""``longmem_suffix``: suffix identification (the ChapterBreak protocol) through ``fairseq-generate``.

An example is a long prefix that ends at a chapter boundary, the true beginning of the next
chapter (``pos``) and beginnings of other chapters of the same book (``negs``). The prefix's
last ``--context-tokens`` tokens are the context and everything before them is written into the
example's own memory; each candidate is scored by its summed log-probability after the context,
reading that memory without writing it. fairseq-generate prints ``T-`` (the true beginning), one
``H-``/``P-`` pair per candidate (``--nbest``), and ``candidate_accuracy``'s line.

Input: ChapterBreak's JSON, ``{work_id: [{"ctx": str, "pos": str, "negs": [str, ...]}, ...]}``,
or its release files, which hold one such mapping per split (``{"pg19": {...}, "ao3": {...}}``:
pick one with ``--suffix-split``). ``examples/suffix/build_chapterbreak.py`` writes the format
from the books of our corpus.

Token layout: text is encoded line by line, each line (paragraph) ending in ``</s>`` as the LMs
here are trained::

    </s> p_1 </s> p_2 ... </s> p_n </s> | c_1 </s> c_2 ...     (prefix | candidate)
    \\_____ memory _____/\\__ context __/

Candidates are cut to ``--suffix-tokens`` from the right, prefixes to ``--prefix-tokens`` from
the left (ChapterBreak's own rule), and the candidates of an example are shown in a seeded random
order, so that ties never favour the true one.
"""

import logging
import random
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from fairseq.tasks import register_task

from . import memory_scoring
from ...fileio import read_json
from .icl_data import first_few
from .candidate_scoring import (
    CandidateScorer,
    CandidateScoringConfig,
    CandidateScoringTask,
    ExamplesDataset,
)

logger = logging.getLogger(__name__)


@dataclass
class LongMemSuffixConfig(CandidateScoringConfig):
    suffix_data: str = field(
        default="???", metadata={"help": "ChapterBreak-format JSON file"}
    )
    suffix_split: Optional[str] = field(
        default=None,
        metadata={"help": "the split to read (pg19, ao3) when the file holds several"},
    )
    prefix_tokens: int = field(
        default=0,
        metadata={"help": "keep the last N tokens of each prefix (0: all of it)"},
    )
    context_tokens: int = field(
        default=0,
        metadata={"help": "prefix tokens in context; the rest goes into memory (0: "
                  "--tokens-per-sample minus --suffix-tokens)"},
    )
    suffix_tokens: int = field(
        default=128, metadata={"help": "candidates are cut to this many tokens"}
    )
    suffix_seed: int = field(
        default=1, metadata={"help": "seed of the order in which candidates are shown"}
    )


class SuffixDataset(ExamplesDataset):
    def __init__(self, names, memories, contexts, candidates, answers, pad, shown_tokens=64):
        super().__init__([len(c) + max(len(x) for x in cands) - 1
                          for c, cands in zip(contexts, candidates)])
        self.names = names  # "work_id/index"
        self.memories, self.contexts = memories, contexts
        self.candidates, self.answers = candidates, answers
        self.pad, self.shown_tokens = pad, shown_tokens

    def collater(self, indices):
        if not indices:
            return {}
        contexts, lengths = memory_scoring.pad_rows([self.contexts[i] for i in indices], self.pad)
        shown, shown_lengths = memory_scoring.pad_rows(
            [self.contexts[i][-self.shown_tokens:] for i in indices], self.pad)
        targets, _ = memory_scoring.pad_rows(
            [self.candidates[i][self.answers[i]] for i in indices], self.pad)
        return {
            "id": torch.tensor(indices, dtype=torch.long),
            "nsentences": len(indices),
            "ntokens": int(lengths.sum()),
            # fairseq-generate prints src_tokens as S-: the end of the prefix
            "net_input": {"src_tokens": shown, "src_lengths": shown_lengths,
                          "context_tokens": contexts, "context_lengths": lengths},
            "target": targets,
        }


def read_chapterbreak(path: str, split: Optional[str]):
    """[(work_id, index, ctx, pos, negs)] of a ChapterBreak-format file; one-line errors. An
    example whose prefix or any candidate is empty (blank) is left out, and counted in one
    warning: dropping only an empty negative would change that example's chance level."""
    data = read_json(path, "--suffix-data")
    if not isinstance(data, dict) or not data:
        raise ValueError(f"--suffix-data {path}: expected a JSON object of works, got "
                         f"{type(data).__name__}")
    if all(isinstance(v, dict) for v in data.values()):  # a release file: {split: {work: [...]}}
        if split is None and len(data) > 1:
            raise ValueError(f"--suffix-data {path} holds the splits {sorted(data)}: pick one "
                             "with --suffix-split")
        split = split or next(iter(data))
        if split not in data:
            raise ValueError(f"--suffix-split {split}: {path} holds {sorted(data)}")
        data = data[split]
    out, empty = [], []  # empty: "work/index" of the examples left out
    for work, examples in data.items():
        if not isinstance(examples, list):
            raise ValueError(f"--suffix-data {path}: work {work!r}: expected a list of "
                             f"examples, got {type(examples).__name__}")
        for i, ex in enumerate(examples):
            ok = (isinstance(ex, dict) and isinstance(ex.get("ctx"), str)
                  and isinstance(ex.get("pos"), str) and isinstance(ex.get("negs"), list)
                  and ex["negs"] and all(isinstance(n, str) for n in ex["negs"]))
            if not ok:
                raise ValueError(
                    f"--suffix-data {path}: work {work!r} example {i}: expected "
                    "{'ctx': str, 'pos': str, 'negs': [str, ...]}"
                )
            if all(t.strip() for t in [ex["ctx"], ex["pos"]] + ex["negs"]):
                out.append((str(work), i, ex["ctx"], ex["pos"], ex["negs"]))
            else:
                empty.append(f"{work}/{i}")
    where = first_few(empty)
    if not out:
        raise ValueError(f"--suffix-data {path}: no examples" + (
            f": all {len(empty)} have an empty prefix or candidate ({where})" if empty else ""))
    if empty:
        logger.warning("--suffix-data %s: %d example%s with an empty prefix or candidate left out "
                       "of scoring (%s); accuracy is over the %d examples scored", path,
                       len(empty), "s" * (len(empty) != 1), where, len(out))
    return out


@register_task("longmem_suffix", dataclass=LongMemSuffixConfig)
class LongMemSuffixTask(CandidateScoringTask):
    def text_lines(self, text: str) -> List[torch.Tensor]:
        return [self.encode(line) for line in text.split("\n") if line.strip()]

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        cfg = self.cfg
        if split != "test":
            raise ValueError(f"--gen-subset {split}: longmem_suffix scores --suffix-data, "
                             "--gen-subset test")
        for name in ("prefix_tokens", "context_tokens"):
            if getattr(cfg, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
        if not 0 < cfg.suffix_tokens < cfg.tokens_per_sample:
            raise ValueError(f"--suffix-tokens {cfg.suffix_tokens}: expected 1 to "
                             f"--tokens-per-sample - 1 ({cfg.tokens_per_sample - 1})")
        n_ctx = cfg.context_tokens or cfg.tokens_per_sample - cfg.suffix_tokens
        if n_ctx + cfg.suffix_tokens - 1 > cfg.tokens_per_sample:
            raise ValueError(
                f"--context-tokens {n_ctx} + --suffix-tokens {cfg.suffix_tokens} exceed "
                f"--tokens-per-sample {cfg.tokens_per_sample} + 1"
            )
        eos = torch.tensor([self.dictionary.eos()])
        names, memories, contexts, candidates, answers = [], [], [], [], []
        for k, (work, i, ctx, pos, negs) in enumerate(
                read_chapterbreak(cfg.suffix_data, cfg.suffix_split)):
            prefix = torch.cat([self.lines(self.text_lines(ctx)), eos])  # ends in the line's </s>
            if cfg.prefix_tokens:
                prefix = prefix[-cfg.prefix_tokens:]
            if len(prefix) <= n_ctx:
                raise ValueError(
                    f"--suffix-data {cfg.suffix_data}: work {work!r} example {i}: the prefix has "
                    f"{len(prefix)} tokens, not more than the {n_ctx} in context, so nothing would "
                    "reach the memory: lower --context-tokens or give longer prefixes"
                )
            cands = []
            for text in [pos] + list(negs):
                lines = self.text_lines(text)
                tokens = torch.cat([t for j, line in enumerate(lines)
                                    for t in ((line,) if j == 0 else (eos, line))])
                if len(tokens) == 0:
                    raise ValueError(f"--suffix-data {cfg.suffix_data}: work {work!r} example "
                                     f"{i}: an empty candidate")
                cands.append(tokens[:cfg.suffix_tokens])
            order = list(range(len(cands)))
            random.Random(cfg.suffix_seed * 1_000_003 + k).shuffle(order)
            names.append(f"{work}/{i}")
            memories.append(prefix[:-n_ctx])
            contexts.append(prefix[-n_ctx:])
            candidates.append([cands[j] for j in order])
            answers.append(order.index(0))
        self.count_unknowns(contexts + memories, "prefixes")
        unequal = sum(len({len(c) for c in cands}) > 1 for cands in candidates)
        if unequal:
            logger.warning(
                "%d of %d examples have candidates of unequal length after the cut to "
                "--suffix-tokens %d: summed log-probabilities favour the shorter ones",
                unequal, len(candidates), cfg.suffix_tokens)
        self.datasets[split] = SuffixDataset(names, memories, contexts, candidates, answers,
                                             self.dictionary.pad())
        n = len(names)
        logger.info(
            "%s: %d examples, %d candidates each (chance %.1f%%), prefixes of %d tokens on "
            "average: %d in context, %d in memory on average; candidates cut to %d tokens",
            cfg.suffix_data, n, len(candidates[0]), 100 / len(candidates[0]),
            sum(len(m) + len(c) for m, c in zip(memories, contexts)) // n, n_ctx,
            sum(len(m) for m in memories) // n, cfg.suffix_tokens,
        )


class SuffixScorer(CandidateScorer):
    """Per batch: write each example's prefix into its own memory row (once), then score its
    candidates reading that row without writing it."""

    def __init__(self, task, models, nbest):
        super().__init__(task, models, nbest)
        if not memory_scoring.reads_memory(self.model):
            logger.warning("this model reads no memory (a gpt2_lm backbone, or disable_memory): "
                           "candidates are scored after the context alone")

    def generate(self, sample):
        dataset = self.task.datasets["test"]
        ids = sample["id"].tolist()
        net = sample["net_input"]
        lengths = net["context_lengths"]
        contexts = [net["context_tokens"][b, :lengths[b]].cpu() for b in range(len(ids))]
        memory = None
        if memory_scoring.reads_memory(self.model):
            decoder = self.model.decoder
            streams = [dataset.memories[i] for i in ids]
            size = memory_scoring.memory_size_for(max(len(s) for s in streams),
                                                  decoder.cfg.chunk_size,
                                                  decoder.cfg.retrieved_tokens)
            memory = decoder.new_memory(len(ids), size, self.model_parameter)
            memory_scoring.write_streams(self.model, memory, streams,
                                         self.task.cfg.tokens_per_sample, self.pad)
        cands = [dataset.candidates[i] for i in ids]
        scores = memory_scoring.continuation_logprobs(self.model, contexts, cands, self.pad,
                                                      memory)
        return [self.ranked(c, row) for c, row in zip(cands, scores)]


# what the task's build_generator (CandidateScoringTask's) hands fairseq-generate
LongMemSuffixTask.scorer_class = SuffixScorer
