"""One PNG per experiment of docs/RESULTS.md, drawn from the runs' logs (needs ``pip install -e .[plots]``).

    python examples/plot_results.py --long-context runs/long_context_lm/cpu \\
        --recall runs/recall_distance/recall_distance.jsonl --out docs/results

``--long-context DIR``: a folder written by examples/long_context_lm/run.sh (its ``logs/`` are
read again through summarize.py) -> ``long_context_lm.png`` (perplexity per condition),
``long_context_lm_sweeps.png`` (memory size, chunk size), ``long_context_lm_positions.png``
(perplexity per position bucket). ``--recall FILE``: the JSON lines of examples/recall_distance.py
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


def save(fig, out, name, tag):
    path = os.path.join(out, f"{name}{'_' + tag if tag else ''}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
    return path


def long_context(plt, run_dir, out, tag):
    r = summarize.summarize(run_dir)
    suffix = f" ({tag})" if tag else ""
    names = summarize.order(r["conditions"], r["main"])
    ppl = [r["conditions"][n]["ppl"] for n in names]
    # dots, not bars: the differences are a few percent of perplexities far from zero
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1.5))
    colors = ["C0" if summarize.MEMORY.match(n) else "0.4" for n in names]
    ax.scatter(ppl, range(len(names)), color=colors, zorder=3)
    for i, p in enumerate(ppl):
        ax.annotate(f"{p:.2f}", (p, i), textcoords="offset points", xytext=(6, -3), fontsize=8)
    ax.set_yticks(range(len(names)), [r["conditions"][n]["short"] for n in names])
    ax.invert_yaxis()
    span = max(ppl) - min(ppl) or 1.0
    ax.set_xlim(min(ppl) - 0.1 * span, max(ppl) + 0.3 * span)
    ax.grid(axis="x", alpha=0.3)
    ax.set_xlabel(f"perplexity on the test books ({r['conditions'][names[0]]['tokens']:,} tokens)")
    ax.set_title("Long-book perplexity" + suffix)
    save(fig, out, "long_context_lm", tag)

    sweeps = [(k, v) for k, v in r["sweeps"].items() if v]
    if sweeps:
        fig, axes = plt.subplots(1, len(sweeps), figsize=(5 * len(sweeps), 3.5), squeeze=False)
        for ax, (key, values) in zip(axes[0], sweeps):
            xs = list(values)
            ax.plot(xs, [values[x] for x in xs], "o-", label="LongMem with memory")
            if "memory_off" in r["conditions"]:
                ax.axhline(r["conditions"]["memory_off"]["ppl"], color="0.5", ls="--", label="memory off")
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [f"{x:,}" for x in xs])
            ax.set_xlabel(key.replace("_", " ") + (" (tokens)" if key == "memory_size" else ""))
            ax.set_ylabel("perplexity")
            ax.legend()
        fig.suptitle("Memory-size and chunk-size sweeps (evaluation-time overrides)" + suffix)
        save(fig, out, "long_context_lm_sweeps", tag)

    if r["positions"]:
        fig, ax = plt.subplots(figsize=(7, 3.8))
        pos_names = summarize.order(r["positions"], r["main"])
        buckets = [b for b, row in r["positions"][pos_names[0]].items() if row["tokens"]]
        for n in pos_names:
            label = r["conditions"][n]["short"] if n in r["conditions"] else n
            ax.plot(range(len(buckets)), [r["positions"][n][b]["ppl"] for b in buckets], "o-", label=label)
        ax.set_xticks(range(len(buckets)), [summarize.bucket_name(b) for b in buckets])
        ax.set_xlabel("token position in its book")
        ax.set_ylabel("perplexity")
        ax.legend(fontsize=8)
        ax.set_title("Perplexity by position in the book" + suffix)
        save(fig, out, "long_context_lm_positions", tag)

    if r.get("suffix"):
        # grouped bars: one group per prefix length, one bar per condition, the chance line
        prefixes = list(r["suffix"])
        first = next(iter(r["suffix"][prefixes[0]].values()))
        names = [n for n in summarize.SUFFIX_LABELS if any(n in r["suffix"][p] for p in prefixes)]
        fig, ax = plt.subplots(figsize=(7, 3.8))
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(prefixes))]
            acc = [r["suffix"][p][name]["accuracy"] if name in r["suffix"][p] else 0.0 for p in prefixes]
            ax.bar(xs, acc, width, label=summarize.SUFFIX_LABELS[name])
        ax.axhline(100 / first["candidates"], color="0.5", ls=":", label="chance")
        ax.set_xticks(range(len(prefixes)), [f"prefix {p:,} tokens" for p in prefixes])
        ax.set_ylabel(f"accuracy (%), {first['total']} examples")
        ax.legend(fontsize=8)
        ax.set_title("Suffix identification, test books' chapter boundaries" + suffix)
        save(fig, out, "long_context_lm_suffix", tag)


def recall_curve(plt, path, out, tag):
    records = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    settings = records[0]["settings"]
    curves = {}
    for r in records:
        if "distance" in r:
            curves.setdefault(r["label"], []).append((r["distance"], r["recall"]))
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for label, points in curves.items():
        points.sort()
        ax.plot([d for d, _ in points], [a for _, a in points], "o-", label=label)
    ax.axhline(settings["chance"], color="0.5", ls=":", label="chance")
    distances = settings["distances"]
    ax.set_xscale("log", base=2)
    ax.set_xticks(distances, [str(d) for d in distances])
    ax.set_ylim(0, 1.05)
    ax.set_xlabel(f"distance between fact and question (segments of {settings['segment']} tokens)")
    ax.set_ylabel("recall")
    ax.legend(fontsize=8)
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
