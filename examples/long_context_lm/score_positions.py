"""Loss per position bucket, or per recurrence bucket, of any checkpoint on longmem_lm's
document streams.

``fairseq-validate`` builds its task and criterion from the checkpoint, so a ``gpt2_lm`` backbone
trained with ``--task language_modeling`` would be scored in that task's blocks, without the
document positions. This runs fairseq-validate's loop with the task and criterion of the command
line instead (fairseq's own validation parser, loader and ``task.valid_step``)::

    python examples/long_context_lm/score_positions.py DATA --user-dir $UD --path CK \\
        --task longmem_lm --tokens-per-sample 256 --batch-size 2 --valid-subset test \\
        --criterion longmem_cross_entropy --position-buckets 1024,4096 --cpu \\
        [--model-overrides "{'disable_memory': True}"]

It prints fairseq-validate's summary line (``loss``, ``ppl``, ``loss_pos0_1024``,
``ppl_pos0_1024``, ``ntokens_pos0_1024``, ...) and, with ``--results-json FILE``, writes the same
values to FILE, unrounded. For a LongMem checkpoint trained with this version of the criterion,
``fairseq-validate --position-buckets ...`` gives the same numbers.

``--recurrence-buckets 1,4,16`` instead (or besides) scores the tokens by how far back their
bigram last occurred (``loss_recnone``, ``loss_reclocal``, ``loss_rec1``, ``loss_rec2_4``, ...).
A ``gpt2_lm`` backbone is then scored on the same T-token segments of the same streams, each
segment from an empty context (eval-lm's condition (a)), so that the backbone and LongMem are
compared on identical tokens; a LongMem model with ``--model-overrides "{'memory_reach_buckets':
'1,4,16'}"`` also reports where its memory reads reach (``mem_reach1``, ...).

``--context-window C`` (a ``gpt2_lm`` model only) scores the same tokens as a sliding window,
exactly as ``fairseq-eval-lm --task language_modeling --sample-break-mode none
--tokens-per-sample T --context-window C`` scores one document on its own: the document is cut
into blocks of ``T - C`` tokens from its first token, and each block is read after the ``C``
tokens before it (fewer at the document's start), never across a document boundary. Each
``T``-token segment of the streams is thus scored block by block, so the position and
recurrence buckets of the sliding window (condition (b)) count exactly the tokens of (a).
"""

import json
import logging
import os
import sys

import torch
from fairseq import checkpoint_utils, options, tasks, utils
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.logging import meters, metrics, progress_bar

logging.basicConfig(
    format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
    datefmt="%Y-%m-%d %H:%M:%S",
    level=os.environ.get("LOGLEVEL", "INFO").upper(),
    stream=sys.stdout,
)
logger = logging.getLogger("score_positions")


def main(argv=None) -> int:
    parser = options.get_validation_parser()
    parser.add_argument("--results-json", help="also write the summary (unrounded) to this file")
    parser.add_argument(
        "--context-window", type=int, default=0, metavar="C",
        help="gpt2_lm model only: score every token after up to C earlier tokens of its document, "
        "in blocks of tokens-per-sample - C, as fairseq-eval-lm --context-window C scores one "
        "document",
    )
    args = options.parse_args_and_arch(parser, input_args=argv)
    cfg = convert_namespace_to_omegaconf(args)
    if "sentence_avg" in cfg.criterion:
        # the validation parser has no --sentence-avg, and fairseq's converter then turns the
        # criterion's unresolved "${optimization.sentence_avg}" into bool("${...}"), i.e. True:
        # score per token, as fairseq-validate does with the checkpoint's criterion
        cfg.criterion.sentence_avg = False
    utils.import_user_module(cfg.common)
    use_cuda = torch.cuda.is_available() and not cfg.common.cpu

    task = tasks.setup_task(cfg.task)  # the command line's task, not the checkpoint's
    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [cfg.common_eval.path], arg_overrides=eval(cfg.common_eval.model_overrides), task=task,
    )
    model = models[0].eval()
    if cfg.common.fp16:
        model.half()
    if use_cuda:
        model.cuda()
    criterion = task.build_criterion(cfg.criterion)  # ... and its criterion
    criterion.eval()

    subset = cfg.dataset.valid_subset
    task.load_dataset(subset, combine=False, epoch=1)
    scorer = SlidingWindow(model, task.dataset(subset), args.context_window) \
        if args.context_window else model
    itr = task.get_batch_iterator(
        dataset=task.dataset(subset),
        max_tokens=cfg.dataset.max_tokens,
        max_sentences=cfg.dataset.batch_size,
        max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
        ignore_invalid_inputs=cfg.dataset.skip_invalid_size_inputs_valid_test,
        seed=cfg.common.seed,
        num_workers=cfg.dataset.num_workers,
    ).next_epoch_itr(shuffle=False)
    progress = progress_bar.progress_bar(
        itr, log_format=cfg.common.log_format, log_interval=cfg.common.log_interval,
        prefix=f"valid on '{subset}' subset",
        default_log_format="tqdm" if not cfg.common.no_progress_bar else "simple",
    )
    log_outputs = []
    for sample in progress:
        sample = utils.move_to_cuda(sample) if use_cuda else sample
        if args.context_window:  # the window reads each row's document before its segment
            sample["net_input"].update(document=sample["document"], segment=sample["segment"])
        _, _, log_output = task.valid_step(sample, scorer, criterion)
        log_outputs.append(log_output)
    with metrics.aggregate() as agg:
        task.reduce_metrics(log_outputs, criterion)
        summary = agg.get_smoothed_values()
    progress.print(summary, tag=subset)
    if args.results_json:
        with open(args.results_json, "w", encoding="utf-8") as f:
            json.dump(unrounded(agg), f, indent=1)
    return 0


class SlidingWindow(torch.nn.Module):
    """A plain backbone LM (``gpt2_lm``, ``llama_lm``) that scores the rows of a longmem_lm batch as fairseq-eval-lm's
    ``--context-window C`` scores each document alone (``LMContextWindowDataset`` over blocks of
    ``S = T - C`` tokens): the token at document position ``p`` is predicted in block
    ``k = p // S``, whose input is the document's source (``</s>`` then the document shifted
    right) from ``max(0, k S - C)`` to ``(k + 1) S``. With T = 8 and C = 4 a document's tokens
    4-7 are read after tokens 0-3 (source positions 0-7) and tokens 8-11 after 4-7; segment 1
    (tokens 8-15) is scored in blocks 2 and 3."""

    def __init__(self, model, dataset, context_window: int):
        super().__init__()
        from fairseq_longmem.models.backbone_lm import BackboneLanguageModel
        from fairseq_longmem.tasks.document_stream import DocumentStreamDataset

        C = context_window
        if not isinstance(model, BackboneLanguageModel):
            raise ValueError(f"--context-window {C} is for a backbone LM (gpt2_lm, llama_lm); "
                             f"--path holds a {type(model).__name__}, which reads the past from "
                             "its memory")
        if not isinstance(dataset, DocumentStreamDataset):
            raise ValueError(f"--context-window {C} scores longmem_lm's document streams: pass "
                             "--task longmem_lm")
        T = dataset.T
        if not 0 < C < T:
            raise ValueError(f"--context-window {C}: expected 0 < C < --tokens-per-sample ({T}), "
                             f"e.g. {T // 2}")
        self.model, self.dataset, self.C, self.S = model, dataset, C, T - C

    def forward(self, src_tokens, src_lengths, document, segment, **unused):
        """Logits (B, W, V) of the batch's rows, each block of each row in one padded batch."""
        B, W = src_tokens.shape
        T, S, C = self.dataset.T, self.S, self.C
        eos, pad = self.dataset.eos, self.dataset.pad
        blocks, where = [], []  # model inputs; (row, first target, last target + 1, input offset)
        for b in range(B):
            n = int(src_lengths[b])
            if n == 0:
                continue  # a stream that ran out: all padding
            tokens = self.dataset.documents[int(document[b])].long()
            source = torch.cat([tokens.new_tensor([eos]), tokens[:-1]])
            a = int(segment[b]) * T
            for k in range(a // S, (a + n - 1) // S + 1):
                lo, hi = max(k * S, a), min((k + 1) * S, a + n)  # targets of this block in the row
                start = max(0, k * S - C)
                blocks.append(source[start:(k + 1) * S])
                where.append((b, lo - a, hi - a, lo - start))
        x = torch.full((len(blocks), max(len(t) for t in blocks)), pad, dtype=torch.long)
        for i, t in enumerate(blocks):  # right padding: a causal model's earlier outputs ignore it
            x[i, :len(t)] = t
        logits, _ = self.model(x.to(src_tokens.device))  # (blocks, L, V)
        out = logits.new_zeros(B, W, logits.shape[-1])
        for i, (b, lo, hi, offset) in enumerate(where):
            out[b, lo:hi] = logits[i, offset:offset + hi - lo]
        return out, {}

    def get_normalized_probs(self, net_output, log_probs, sample=None):
        return self.model.get_normalized_probs(net_output, log_probs, sample)

    def get_targets(self, sample, net_output):
        return self.model.get_targets(sample, net_output)


def unrounded(agg) -> dict:
    """The aggregated meters without the display rounding: averages (losses, base 2), sums
    (token counts), and a perplexity for every loss."""
    values = {}
    for key, meter in agg.items():
        if isinstance(meter, meters.AverageMeter):
            values[key] = float(meter.avg)
        elif isinstance(meter, meters.SumMeter):
            values[key] = int(meter.sum)
    for key in [k for k in values if k == "loss" or k.startswith(("loss_pos", "loss_rec"))]:
        values["ppl" + key[len("loss"):]] = 2 ** values[key]
    return values


if __name__ == "__main__":
    sys.exit(main())
