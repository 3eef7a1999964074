"""One PNG per experiment of docs/RESULTS.md, drawn from the runs' logs (needs ``pip install -e .[plots]``).

    python examples/plot_results.py --long-context runs/long_context_lm/cpu \\
        --recall runs/recall_distance/recall_distance.jsonl --out docs/results

``--long-context DIR``: a folder written by examples/long_context_lm/run.sh (its ``logs/`` are
read again through summarize.py) -> ``long_context_lm.png`` (perplexity per condition),
``long_context_lm_sweeps.png`` (memory size, chunk size), ``long_context_lm_positions.png``
(perplexity per position bucket), ``long_context_lm_suffix.png`` and, where the run has
recurrence buckets, ``long_context_lm_recurrence.png`` (the loss gain of (d) over memory off and
over the sliding window by how far back each token's bigram last occurred). ``--recall FILE``: the JSON lines of examples/recall_distance.py
-> ``recall_distance.png``. ``--tag smoke`` appends ``_smoke`` to the file names and titles.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "long_context_lm"))
import summarize  # noqa: E402  (examples/long_context_lm/summarize.py: the logs' parser)


def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "examples/plot_results.py needs matplotlib: pip install -e .[plots]"
        ) from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def save(fig, out, name, tag, rect=(0, 0, 1, 1)):
    path = os.path.join(out, f"{name}{'_' + tag if tag else ''}.png")
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
    return path


def plain_numbers(ax, axis="y"):
    """Tick labels as plain numbers: no "+1.774e2" offset, which turns 0.1 of perplexity into a cliff."""
    from matplotlib.ticker import ScalarFormatter

    fmt = ScalarFormatter(useOffset=False)
    fmt.set_scientific(False)
    (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(fmt)


def wilson(right, total, z=1.96):
    """95% Wilson score interval of a proportion, in percent: (low, high)."""
    if total == 0:
        return 0.0, 0.0
    p = right / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * ((p * (1 - p) / total + z * z / (4 * total * total)) ** 0.5) / (1 + z * z / total)
    return 100 * (centre - half), 100 * (centre + half)


def long_context(plt, run_dir, out, tag):
    from matplotlib.lines import Line2D

    r = summarize.summarize(run_dir)
    suffix = f" ({tag})" if tag else ""
    names = summarize.order(r["conditions"], r["main"])
    ppl = [r["conditions"][n]["ppl"] for n in names]
    # dots, not bars: the differences are a few percent of perplexities far from zero
    fig, ax = plt.subplots(figsize=(7.5, 0.35 * len(names) + 2.0))
    with_memory = [bool(summarize.MEMORY.match(n)) for n in names]
    colors = ["C0" if m else "0.4" for m in with_memory]
    ax.scatter(ppl, range(len(names)), color=colors, marker="o", zorder=3)
    for i, p in enumerate(ppl):
        ax.annotate(f"{p:.2f}", (p, i), textcoords="offset points", xytext=(6, -3), fontsize=8)
    ax.set_yticks(range(len(names)), [r["conditions"][n]["short"] for n in names])
    ax.invert_yaxis()
    span = max(ppl) - min(ppl) or 1.0
    ax.set_xlim(min(ppl) - 0.1 * span, max(ppl) + 0.3 * span)
    plain_numbers(ax, "x")
    ax.grid(axis="x", alpha=0.3)
    ax.set_xlabel(f"perplexity on the test books ({r['conditions'][names[0]]['tokens']:,} tokens; "
                  "lower is better)")
    ax.legend(handles=[Line2D([], [], color="C0", marker="o", ls="", label="LongMem reading its memory"),
                       Line2D([], [], color="0.4", marker="o", ls="", label="no memory")],
              loc="lower right", fontsize=8)
    ax.set_title("Long-book perplexity" + suffix)
    save(fig, out, "long_context_lm", tag)

    sweeps = [(k, v) for k, v in r["sweeps"].items() if v]
    if sweeps:
        # one y axis for both panels: the two sweeps are compared with each other and with memory off
        fig, axes = plt.subplots(1, len(sweeps), figsize=(5 * len(sweeps), 3.8), squeeze=False,
                                 sharey=True)
        off = r["conditions"].get("memory_off", {}).get("ppl")
        for ax, (key, values) in zip(axes[0], sweeps):
            xs = list(values)
            ax.plot(xs, [values[x] for x in xs], "o-", color="C0", label="LongMem with memory")
            for x in xs:
                ax.annotate(f"{values[x]:.2f}", (x, values[x]), textcoords="offset points",
                            xytext=(0, 7), ha="center", fontsize=8)
            if off is not None:
                ax.axhline(off, color="0.5", ls="--", label=f"memory off ({off:.2f})")
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [f"{x:,}" for x in xs])
            ax.minorticks_off()
            ax.set_xlabel(key.replace("_", " ") + (" (tokens)" if key == "memory_size" else " (tokens per chunk)"))
            plain_numbers(ax)
            ax.grid(axis="y", alpha=0.3)
        axes[0][0].set_ylabel("perplexity on the test books")
        allv = [v for _, vals in sweeps for v in vals.values()] + ([off] if off is not None else [])
        pad = max(0.5, 0.15 * (max(allv) - min(allv)))
        axes[0][0].set_ylim(min(allv) - pad, max(allv) + pad)
        # one legend below both panels, where it covers no point
        fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=9)
        fig.suptitle("Memory-size and chunk-size sweeps of one trained model (evaluation-time overrides)"
                     + suffix)
        save(fig, out, "long_context_lm_sweeps", tag, rect=(0, 0.08, 1, 1))

    if r["positions"]:
        pos_names = summarize.order(r["positions"], r["main"])
        buckets = [b for b, row in r["positions"][pos_names[0]].items() if row["tokens"]]
        tokens = [r["positions"][pos_names[0]][b]["tokens"] for b in buckets]
        labels = [f"{summarize.bucket_name(b)}\n{t:,} tokens" for b, t in zip(buckets, tokens)]
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 6.2), sharex=True,
                                          gridspec_kw={"height_ratios": [3, 2]})
        styles = ["o-", "s--", "^:", "D-.", "v-"]
        for i, n in enumerate(pos_names):
            label = r["conditions"][n]["short"] if n in r["conditions"] else n
            top.plot(range(len(buckets)), [r["positions"][n][b]["ppl"] for b in buckets],
                     styles[i % len(styles)], color=f"C{i}", label=label, alpha=0.85)
        top.set_ylabel("perplexity")
        top.legend(fontsize=8)
        top.grid(alpha=0.3)
        plain_numbers(top)
        top.set_title("Perplexity by position in the book" + suffix)
        # the lines lie within a few percent of each other: the differences get their own panel
        ref = "memory_off" if "memory_off" in r["positions"] else pos_names[0]
        ref_label = r["conditions"][ref]["short"] if ref in r["conditions"] else ref
        for i, n in enumerate(pos_names):
            if n == ref:
                continue
            label = r["conditions"][n]["short"] if n in r["conditions"] else n
            rel = [100 * (r["positions"][n][b]["ppl"] / r["positions"][ref][b]["ppl"] - 1) for b in buckets]
            bottom.plot(range(len(buckets)), rel, styles[i % len(styles)], color=f"C{i}", label=label)
        bottom.axhline(0, color="0.5", lw=0.8)
        bottom.set_ylabel(f"% against\n{ref_label}")
        bottom.legend(fontsize=8)
        bottom.grid(alpha=0.3)
        bottom.set_xticks(range(len(buckets)), labels)
        bottom.set_xlabel("token position in its book (buckets of unequal size; tokens scored per bucket)")
        save(fig, out, "long_context_lm_positions", tag)

    if r.get("suffix"):
        # grouped bars: one group per prefix length, one bar per condition, 95% intervals, chance
        prefixes = list(r["suffix"])
        first = next(iter(r["suffix"][prefixes[0]].values()))
        names = [n for n in summarize.SUFFIX_LABELS if any(n in r["suffix"][p] for p in prefixes)]
        fig, ax = plt.subplots(figsize=(7.5, 4.6))
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(prefixes))]
            rows = [r["suffix"][p].get(name) for p in prefixes]
            acc = [row["accuracy"] if row else 0.0 for row in rows]
            lo_hi = [wilson(row["right"], row["total"]) if row else (0.0, 0.0) for row in rows]
            err = [[a - lo for a, (lo, _) in zip(acc, lo_hi)], [hi - a for a, (_, hi) in zip(acc, lo_hi)]]
            ax.bar(xs, acc, width, yerr=err, capsize=3, label=summarize.SUFFIX_LABELS[name])
        chance = 100 / first["candidates"]
        ax.axhline(chance, color="k", ls=":", label=f"chance ({chance:.1f}%: 1 in {first['candidates']})")
        ax.set_xticks(range(len(prefixes)), [f"prefix {p:,} tokens" for p in prefixes])
        ax.set_ylabel(f"accuracy (%) of {first['total']} examples")
        ax.set_ylim(0, 50)
        ax.legend(fontsize=8, loc="upper right", title="error bars: 95% Wilson interval",
                  title_fontsize=8)
        ax.set_title("Suffix identification, test books' chapter boundaries" + suffix)
        save(fig, out, "long_context_lm_suffix", tag)

    if r.get("recurrence_gain"):
        # loss gain of (d) over memory off and over the sliding window, by recurrence distance
        fig = summarize.recurrence_plot(plt, r, os.devnull, tag)
        save(fig, out, "long_context_lm_recurrence", tag)


def recall_curve(plt, path, out, tag):
    records = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    settings = records[0]["settings"]
    curves = {}
    for r in records:
        if "distance" in r:
            curves.setdefault(r["label"], []).append((r["distance"], r["recall"]))
    fig, ax = plt.subplots(figsize=(7.5, 4.0))
    styles = ["o-", "s--", "^:", "D-."]
    for i, (label, points) in enumerate(curves.items()):
        points.sort()
        ax.plot([d for d, _ in points], [100 * a for _, a in points], styles[i % len(styles)],
                label=label, alpha=0.85)
    ax.axhline(100 * settings["chance"], color="k", ls=":",
               label=f"chance ({100 * settings['chance']:.1f}%)")
    distances = settings["distances"]
    ax.set_xscale("log", base=2)
    ax.set_xticks(distances, [str(d) for d in distances])
    ax.minorticks_off()
    ax.set_ylim(0, 105)
    ax.set_xlabel(f"distance between fact and question (segments of {settings['segment']} tokens)")
    ax.set_ylabel("values recalled (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left")
    ax.set_title("Key-value recall against distance" + (f" ({tag})" if tag else ""))
    save(fig, out, "recall_distance", tag)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--long-context", help="output folder of examples/long_context_lm/run.sh")
    p.add_argument("--recall", help="recall_distance.jsonl written by examples/recall_distance.py")
    p.add_argument("--out", default="docs/results", help="folder for the PNG files")
    p.add_argument("--tag", default="", help="appended to file names and titles, e.g. smoke")
    args = p.parse_args(argv)
    if not args.long_context and not args.recall:
        p.error("nothing to plot: give --long-context and/or --recall")
    plt = pyplot()
    os.makedirs(args.out, exist_ok=True)
    if args.long_context:
        long_context(plt, args.long_context, args.out, args.tag)
    if args.recall:
        recall_curve(plt, args.recall, args.out, args.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
