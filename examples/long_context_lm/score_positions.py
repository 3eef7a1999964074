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
        _, _, log_output = task.valid_step(sample, model, criterion)
        log_outputs.append(log_output)
    with metrics.aggregate() as agg:
        task.reduce_metrics(log_outputs, criterion)
        summary = agg.get_smoothed_values()
    progress.print(summary, tag=subset)
    if args.results_json:
        with open(args.results_json, "w", encoding="utf-8") as f:
            json.dump(unrounded(agg), f, indent=1)
    return 0


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
