"""The table of examples/long_context_lm/levers.sh's runs: perplexity with memory on and off,
loss (base 2) by recurrence bucket with memory on and its change against memory off, the gate
and where memory reads reach::

    python examples/long_context_lm/levers_table.py WORK NAME [NAME ...]
"""

import json
import os
import re
import sys

BUCKETS = ["none", "local", "1", "2_4", "5_16", "17_128", "129_end"]  # levers.sh's REC
REACH = BUCKETS[2:]


def read(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def last_gate(train_log):
    """mem_gate of the last training log line."""
    with open(train_log, encoding="utf-8") as f:
        found = re.findall(r"mem_gate=([\d.]+)", f.read())
    return float(found[-1]) if found else float("nan")


def main(work, names):
    backbone = read(os.path.join(work, "backbone.json"))
    head = ["condition", "ppl on", "ppl off"] + [f"rec {b} (Δ off)" for b in BUCKETS] + [
        "gate (train)"] + [f"reach {r}" for r in REACH]
    rows = [["backbone", f"{backbone['ppl']:.2f}", ""]
            + [f"{backbone['loss_rec' + b]:.3f}" for b in BUCKETS] + [""] * (1 + len(REACH))]
    counts = [f"{backbone['ntokens_rec' + b]}" for b in BUCKETS]
    for name in names:
        on = read(os.path.join(work, name, "on.json"))
        off = read(os.path.join(work, name, "off.json"))
        row = [name, f"{on['ppl']:.2f}", f"{off['ppl']:.2f}"]
        for b in BUCKETS:
            delta = 100 * (on["loss_rec" + b] - off["loss_rec" + b]) / off["loss_rec" + b]
            row.append(f"{on['loss_rec' + b]:.3f} ({delta:+.1f}%)")
        row.append(f"{last_gate(os.path.join(work, name, 'train.log')):.3f}")
        row += [f"{on.get('mem_reach' + r, float('nan')):.3f}" for r in REACH]
        rows.append(row)
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\ntokens per bucket ({', '.join(BUCKETS)}): {', '.join(counts)}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
