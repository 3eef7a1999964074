"""Tables and checks of a long_context_lm run, read from its logs only.

    python examples/long_context_lm/summarize.py OUT     # OUT = run.sh's output folder

reads ``OUT/logs`` (``eval_*.log`` from fairseq-eval-lm, ``positions_*.json`` from
score_positions.py, ``times.tsv``, ``hardware.txt``), checks that every condition scored the same
number of tokens and that the position and recurrence buckets add up to the whole, prints markdown
tables and writes them to ``OUT/results.md`` and the numbers to ``OUT/results.json`` (read by
examples/plot_results.py). With matplotlib installed it also draws ``OUT/recurrence_gain.png``:
the loss gain of (d) over memory off and over the sliding window by recurrence distance. Exit
status 1 when a check fails.
"""

import argparse
import glob
import json
import math
import os
import re
import sys

CONDITIONS = {  # name: (label, short label for plots)
    "backbone": ("(a) backbone alone, {T}-token segments", "(a) backbone"),
    "backbone_window": ("(b) backbone, sliding window (context {C} + {S} new tokens)",
                        "(b) sliding window"),
    "memory_off": ("(c) LongMem, memory off (same weights)", "(c) memory off"),
    # run.sh with FREE_READ_LAYERS: the backbone's own blocks read a memory, no SideNet
    "free": ("(e) backbone reading the memory itself (training-free, blocks {L})",
             "(e) training-free"),
}
MEMORY = re.compile(r"memory_(\d+)_csz(\d+)$")
# longmem_cross_entropy's recurrence buckets (none, local, 1, 2_4, ..., 17_end) and reach shares
REC_TOKENS = re.compile(r"ntokens_rec(none|local|\d+(?:_(?:\d+|end))?)$")
REACH = re.compile(r"mem_(reach|chunks|stored)(\d+(?:_(?:\d+|end))?)(?:_h(\d+))?$")
REACH_KINDS = {"reach": "mass", "chunks": "chunks", "stored": "stored"}
REC_CONDITIONS = ("backbone", "backbone_window", "memory_off", "free")  # the rows before (d)


def read_eval_lm(path):
    text = open(path, encoding="utf-8").read()
    tokens = re.search(r"Evaluated ([\d,]+) tokens in ([\d.]+)s", text)
    loss = re.search(r"Loss \(base 2\): ([\d.]+), Perplexity: ([\d.]+)", text)
    if not tokens or not loss:
        raise ValueError(f"{path}: no 'Evaluated ... tokens' / 'Loss (base 2)' line: did fairseq-eval-lm finish?")
    return {"tokens": int(tokens.group(1).replace(",", "")), "seconds": float(tokens.group(2)),
            "loss": float(loss.group(1)), "ppl": float(loss.group(2))}


SUFFIX = re.compile(r"suffix_(backbone|memory_off|memory|free)_(\d+)$")
SUFFIX_LABELS = {"backbone": "backbone alone", "memory_off": "LongMem, memory off",
                 "memory": "LongMem with memory", "free": "backbone reading the memory (e)"}


def read_suffix(path):
    """Accuracy of a longmem_suffix run (fairseq-generate's scorer line) and its example count."""
    text = open(path, encoding="utf-8").read()
    acc = re.search(r"Generate test with beam=\d+: Accuracy ([\d.]+) \((\d+)/(\d+)\)", text)
    info = re.search(r"(\d+) examples, (\d+) candidates each", text)
    if not acc or not info:
        raise ValueError(f"{path}: no accuracy line: did fairseq-generate finish?")
    return {"accuracy": float(acc.group(1)), "right": int(acc.group(2)),
            "total": int(acc.group(3)), "candidates": int(info.group(2))}


def read_settings(logs):
    """T and the sliding window from the eval commands (the .cmd files run.sh writes)."""
    cmd = open(os.path.join(logs, "eval_backbone_window.cmd"), encoding="utf-8").read().split()
    T = int(cmd[cmd.index("--tokens-per-sample") + 1])
    C = int(cmd[cmd.index("--context-window") + 1])
    L = ""  # the reading blocks of (e), where it ran
    free = os.path.join(logs, "eval_free.cmd")
    if os.path.isfile(free):
        cmd = open(free, encoding="utf-8").read().split()
        L = cmd[cmd.index("--free-read-layers") + 1]
    return {"T": T, "C": C, "S": T - C, "L": L}


def labels(name, settings, main):
    """(label, short label) of a condition."""
    if name in CONDITIONS:
        return tuple(text.format(**settings) for text in CONDITIONS[name])
    msz, csz = MEMORY.match(name).groups()
    prefix = "(d) " if name == main else ""
    return (f"{prefix}LongMem with memory, msz {int(msz):,}, csz {csz}",
            f"{prefix}memory {int(msz):,}, csz {csz}")


def summarize(out):
    logs = os.path.join(out, "logs")
    settings = read_settings(logs)
    evals = {os.path.basename(p)[5:-4]: read_eval_lm(p)
             for p in sorted(glob.glob(os.path.join(logs, "eval_*.log")))}
    positions = {os.path.basename(p)[10:-5]: json.load(open(p, encoding="utf-8"))
                 for p in sorted(glob.glob(os.path.join(logs, "positions_*.json")))}
    mains = [n for n in positions if MEMORY.match(n)]
    main = mains[0] if mains else None
    problems = []
    counts = {n: e["tokens"] for n, e in evals.items()}
    if len(set(counts.values())) > 1:
        problems.append(f"conditions scored different numbers of tokens: {counts}")
    buckets = {}
    for name, values in positions.items():
        rows = {}
        for key, n in values.items():
            if key.startswith("ntokens_pos"):
                b = key[len("ntokens_pos"):]
                loss = values.get(f"loss_pos{b}")
                rows[b] = {"tokens": int(n), "loss": loss, "ppl": 2 ** loss if loss is not None else None}
        buckets[name] = dict(sorted(rows.items(), key=lambda kv: int(kv[0].split("_")[0])))
        total = sum(r["tokens"] for r in rows.values())
        if name in evals and total != evals[name]["tokens"]:
            problems.append(f"positions_{name}: buckets hold {total} tokens, eval-lm scored {evals[name]['tokens']}")
        # (b) here keeps its window inside each book, eval-lm's lets it run on across books
        if name in evals and name != "backbone_window" \
                and abs(values["loss"] - evals[name]["loss"]) > 1e-3:
            problems.append(f"positions_{name}: loss {values['loss']:.4f} but eval-lm's {evals[name]['loss']:.4f}")
    recurrence = {n: rec_buckets(v) for n, v in positions.items() if rec_buckets(v)}
    for name, rows in recurrence.items():
        total = rows["all"]["tokens"]
        if name in evals and total != evals[name]["tokens"]:
            problems.append(f"positions_{name}: recurrence buckets hold {total} tokens, eval-lm "
                            f"scored {evals[name]['tokens']}")
    counts = {n: {b: row["tokens"] for b, row in rows.items()} for n, rows in recurrence.items()}
    if len({json.dumps(c) for c in counts.values()}) > 1:
        problems.append(f"conditions scored different tokens per recurrence bucket: {counts}")
    times = {}
    if os.path.exists(os.path.join(logs, "times.tsv")):
        for line in open(os.path.join(logs, "times.tsv"), encoding="utf-8"):
            step, sec = line.split("\t")
            times[step] = times.get(step, 0) + int(sec)
    hardware = open(os.path.join(logs, "hardware.txt"), encoding="utf-8").read().strip() \
        if os.path.exists(os.path.join(logs, "hardware.txt")) else ""
    suffix = {}
    for path in sorted(glob.glob(os.path.join(logs, "suffix_*.log"))):
        m = SUFFIX.match(os.path.basename(path)[:-4])
        if m:
            suffix.setdefault(int(m.group(2)), {})[m.group(1)] = read_suffix(path)
    for prefix, runs in suffix.items():
        if len({r["total"] for r in runs.values()}) > 1:
            problems.append(f"suffix identification at prefix {prefix}: conditions scored "
                            f"different numbers of examples: {runs}")
    sweeps = {"memory_size": {}, "chunk_size": {}}
    if main:
        main_msz, main_csz = MEMORY.match(main).groups()
        for name, e in evals.items():
            m = MEMORY.match(name)
            if m and m.group(2) == main_csz:
                sweeps["memory_size"][int(m.group(1))] = e["ppl"]
            if m and m.group(1) == main_msz:
                sweeps["chunk_size"][int(m.group(2))] = e["ppl"]
    return {
        "settings": settings, "main": main, "hardware": hardware, "seconds": times,
        "conditions": {n: dict(e, **dict(zip(("label", "short"), labels(n, settings, main))))
                       for n, e in evals.items()},
        "sweeps": {k: dict(sorted(v.items())) for k, v in sweeps.items()},
        "positions": buckets, "suffix": dict(sorted(suffix.items())), "problems": problems,
        "recurrence": recurrence, "recurrence_gain": gains(recurrence, main),
        "reach": reach(positions.get(main, {})),
    }


def rec_order(label):
    """none, local, then by the bucket's first number."""
    return {"none": -2, "local": -1}[label] if label in ("none", "local") else int(label.split("_")[0])


def rec_buckets(values):
    """{label: {"tokens", "loss" (bits)}} of one positions file's recurrence buckets, in order,
    then "all" (the whole, from the same file); {} without recurrence buckets."""
    rows = {m.group(1): {"tokens": int(n), "loss": values.get(f"loss_rec{m.group(1)}")}
            for key, n in values.items() for m in [REC_TOKENS.match(key)] if m}
    if not rows:
        return {}
    rows = dict(sorted(rows.items(), key=lambda kv: rec_order(kv[0])))
    rows["all"] = {"tokens": sum(r["tokens"] for r in rows.values()), "loss": values["loss"]}
    return rows


def gains(recurrence, main):
    """{reference: {label: % lower loss of (d) than the reference}} per recurrence bucket, for
    references memory off (c) and the sliding window (b)."""
    out = {}
    for ref in ("memory_off", "backbone_window"):
        if main in recurrence and ref in recurrence:
            ref_loss = {b: row["loss"] for b, row in recurrence[ref].items()}
            out[ref] = {b: 100 * (1 - row["loss"] / ref_loss[b])
                        for b, row in recurrence[main].items()
                        if row["loss"] is not None and ref_loss.get(b)}
    return out


def reach(values):
    """Where (d)'s memory reads reach: {"mass": {label: share}, "chunks": {...}, "stored": {...}
    (the memory's contents, chance), "heads": {h: {label: share}}} from its positions file
    (``--memory-reach-buckets``); {} without."""
    out = {}
    for key, v in values.items():
        m = REACH.match(key)
        if m:
            kind, label, head = m.groups()
            if head is None:
                out.setdefault(REACH_KINDS[kind], {})[label] = v
            elif kind == "reach":
                out.setdefault("heads", {}).setdefault(int(head), {})[label] = v
    for key in ("mass", "chunks", "stored"):
        if key in out:
            out[key] = dict(sorted(out[key].items(), key=lambda kv: rec_order(kv[0])))
    if "heads" in out:
        out["heads"] = {h: dict(sorted(row.items(), key=lambda kv: rec_order(kv[0])))
                        for h, row in sorted(out["heads"].items())}
    return out


def rec_name(label):
    """A recurrence bucket's column name: none -> first, local -> same segment, 2_4 -> 2-4,
    17_end -> >16."""
    if label in ("none", "local", "all"):
        return {"none": "first", "local": "same segment", "all": "all"}[label]
    lo, _, hi = label.partition("_")
    return lo if not hi else f">{int(lo) - 1}" if hi == "end" else f"{lo}-{hi}"


def order(names, main):
    fixed = [n for n in REC_CONDITIONS if n in names]
    rest = sorted((n for n in names if MEMORY.match(n)), key=lambda n: tuple(map(int, MEMORY.match(n).groups())))
    return fixed + ([main] if main in rest else []) + [n for n in rest if n != main]


def bucket_name(b):
    lo, hi = b.split("_")
    return f"[{int(lo):,}, {'end' if hi == 'end' else f'{int(hi):,}'})"


def markdown(r):
    c, main = r["conditions"], r["main"]
    ref = c.get("memory_off", {}).get("ppl")
    lines = ["| condition | tokens | loss (bits) | perplexity | vs (c) |", "|---|---|---|---|---|"]
    for n in order(c, main):
        e = c[n]
        rel = f"{100 * (e['ppl'] / ref - 1):+.1f}%" if ref else ""
        lines.append(f"| {e['label']} | {e['tokens']:,} | {e['loss']:.4f} | {e['ppl']:.2f} | {rel} |")
    out = ["### Perplexity on the test documents", ""] + lines
    for key, title in (("memory_size", "Memory size (csz fixed)"), ("chunk_size", "Chunk size (msz fixed)")):
        if len(r["sweeps"][key]) > 1:  # one memory size (or chunk size) is no sweep
            out += ["", f"### {title}", "", f"| {key.replace('_', ' ')} | perplexity |", "|---|---|"]
            out += [f"| {k:,} | {v:.2f} |" for k, v in r["sweeps"][key].items()]
    if r["positions"]:
        names = [n for n in order(r["positions"], main)]
        first = r["positions"][names[0]]
        out += ["", "### Perplexity by position in the document", "",
                "| tokens at positions | tokens | " + " | ".join(c[n]["short"] if n in c else n for n in names) + " |",
                "|---|---|" + "---|" * len(names)]
        for b, row in first.items():
            cells = [f"{r['positions'][n][b]['ppl']:.2f}" if r["positions"][n][b]["ppl"] else "-" for n in names]
            out.append(f"| {bucket_name(b)} | {row['tokens']:,} | " + " | ".join(cells) + " |")
    out += recurrence_markdown(r)
    if r.get("suffix"):
        prefixes = list(r["suffix"])
        first = next(iter(r["suffix"].values()))
        any_run = next(iter(first.values()))
        out += ["", "### Suffix identification (chapter boundaries of the test books)", "",
                f"{any_run['total']} examples, {any_run['candidates']} candidates each (chance "
                f"{100 / any_run['candidates']:.1f}%); accuracy (%) by prefix length in tokens:", "",
                "| condition | " + " | ".join(f"prefix {p:,}" for p in prefixes) + " |",
                "|---|" + "---|" * len(prefixes)]
        for name, label in SUFFIX_LABELS.items():
            if not any(name in r["suffix"][p] for p in prefixes):
                continue  # a condition this run did not score (e.g. (e) before it existed)
            cells = [f"{r['suffix'][p][name]['accuracy']:.2f} ({r['suffix'][p][name]['right']}/"
                     f"{r['suffix'][p][name]['total']})" if name in r["suffix"][p] else "-"
                     for p in prefixes]
            out.append(f"| {label} | " + " | ".join(cells) + " |")
    if r["seconds"]:
        total = sum(r["seconds"].values())
        out += ["", f"Wall time: {total / 60:.1f} min (" + ", ".join(f"{k} {v}s" for k, v in r["seconds"].items()) + ")"]
    return "\n".join(out) + "\n"


def recurrence_markdown(r):
    """The recurrence table ((a)-(d) by recurrence bucket, and the gains of (d)) and the table of
    where (d)'s memory reads reach; [] for a run without them."""
    rec, main, out = r.get("recurrence") or {}, r.get("main"), []
    if rec:
        names = [n for n in REC_CONDITIONS if n in rec] + ([main] if main in rec else [])
        first = rec[names[0]]
        short = {n: labels(n, r["settings"], main)[1] for n in names}
        out += ["", "### Loss by recurrence distance", "",
                "Columns: how many segments back the token's bigram (previous token, token) last "
                "occurred in its document (first: never before); loss in bits per token.", "",
                "| | " + " | ".join(rec_name(b) for b in first) + " |",
                "|---|" + "---|" * len(first),
                "| tokens | " + " | ".join(f"{row['tokens']:,}" for row in first.values()) + " |"]
        for n in names:
            out.append(f"| {short[n]} | " + " | ".join(
                f"{rec[n][b]['loss']:.3f}" if rec[n][b]["loss"] is not None else "-" for b in first)
                + " |")
        for ref, gain in r["recurrence_gain"].items():
            out.append(f"| gain of (d) over {short[ref]} | " + " | ".join(
                f"{gain[b]:+.2f}%" if b in gain else "-" for b in first) + " |")
    shares = r.get("reach") or {}
    if shares.get("mass"):
        cols = list(shares["mass"])
        out += ["", "### Where the memory reads reach ((d))", "",
                "Share of the memory attention's mass (and of the retrieved chunks) by how many "
                "segments back the chunk read was written; chance: the share of the memory's "
                "own chunks in each bucket at the time of the read (where reads of stored "
                "chunks drawn at random would land).", "",
                "| | " + " | ".join(rec_name(b) for b in cols) + " |", "|---|" + "---|" * len(cols),
                "| attention mass | " + " | ".join(f"{100 * shares['mass'][b]:.1f}%" for b in cols) + " |"]
        if shares.get("chunks"):
            out.append("| retrieved chunks | " + " | ".join(
                f"{100 * shares['chunks'].get(b, 0):.1f}%" for b in cols) + " |")
        if shares.get("stored"):
            out.append("| chance: the memory's contents | " + " | ".join(
                f"{100 * shares['stored'].get(b, 0):.1f}%" for b in cols) + " |")
        for h, row in shares.get("heads", {}).items():
            out.append(f"| head {h}: attention mass | " + " | ".join(
                f"{100 * row.get(b, 0):.1f}%" for b in cols) + " |")
    return out


def recurrence_plot(plt, r, path, tag=""):
    """Bars of the loss gain (%) of (d) over memory off and over the sliding window, one group
    per recurrence bucket holding tokens (its token count in the label), then all tokens."""
    from matplotlib.ticker import ScalarFormatter

    rec, main, gain = r["recurrence"], r["main"], r["recurrence_gain"]
    buckets = [b for b, row in rec[main].items() if row["tokens"]]
    fig, ax = plt.subplots(figsize=(8.5, 4.4))
    width = 0.8 / len(gain)
    for i, (ref, values) in enumerate(gain.items()):
        xs = [j + (i - (len(gain) - 1) / 2) * width for j in range(len(buckets))]
        ax.bar(xs, [values.get(b, 0.0) for b in buckets], width, color=f"C{i}",
               label=f"(d) over {labels(ref, r['settings'], main)[1]}")
    ax.axhline(0, color="k", lw=0.8)
    fmt = ScalarFormatter(useOffset=False)
    fmt.set_scientific(False)
    ax.yaxis.set_major_formatter(fmt)
    # the token count on a line of its own, short (thousands), so that 8 groups fit side by side
    def count(n):
        return f"{n} tok." if n < 1000 else f"{n / 1000:.1f}k tok."

    ax.set_xticks(range(len(buckets)),
                  [f"{rec_name(b)}\n{count(rec[main][b]['tokens'])}" for b in buckets], fontsize=8)
    ax.set_xlabel("segments back to the previous occurrence of the token's bigram")
    ax.set_ylabel("loss gain of (d), % (higher: (d) better)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Where the memory pays: {labels(main, r['settings'], main)[1]}"
                 + (f" ({tag})" if tag else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="run.sh's output folder (holds logs/)")
    args = p.parse_args(argv)
    r = summarize(args.out)
    text = markdown(r)
    print(text, end="")
    with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(r, f, indent=1)
    if r["recurrence_gain"]:
        try:
            import matplotlib
        except ImportError:
            print("recurrence plot not drawn: it needs matplotlib (pip install -e .[plots])",
                  file=sys.stderr)
        else:
            matplotlib.use("Agg")  # files only, no display
            import matplotlib.pyplot as plt

            path = os.path.join(args.out, "recurrence_gain.png")
            plt.close(recurrence_plot(plt, r, path))
            print(f"wrote {path}")
    for problem in r["problems"]:
        print(f"error: {problem}", file=sys.stderr)
    if not r["problems"]:
        n = {e["tokens"] for e in r["conditions"].values()}
        print(f"check: all {len(r['conditions'])} conditions scored the same {n.pop():,} tokens; "
              "position" + (" and recurrence" if r["recurrence"] else "") + " buckets add up to them")
    return 1 if r["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
