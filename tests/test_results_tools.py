"""The results tooling: recall_distance.py's documents, summarize.py's checks, and docs/RESULTS.md
against the committed logs (every table there is regenerated from docs/results/logs)."""

import glob
import json
import os
import random
import re
import shlex
import shutil

import pytest

from conftest import REPO, load_example

RESULTS_MD = os.path.join(REPO, "docs", "RESULTS.md")
LOGS = os.path.join(REPO, "docs", "results", "logs")


recall_distance = load_example("recall_distance.py")
recall_task = load_example("recall_task.py")  # recall_distance.py's documents and scoring
summarize = load_example(os.path.join("long_context_lm", "summarize.py"))
run_icl = load_example(os.path.join("icl", "run_icl.py"))


# ---------------------------------------------------------------------------------------------
# recall_distance.py


@pytest.mark.parametrize("distance", [0, 1, 4, 32])
def test_recall_document_asks_each_fact_once_distance_segments_later(distance):
    rd = recall_task
    v = rd.Vocab()
    doc = rd.make_document(v, random.Random(distance), distance).tolist()
    T = rd.T
    assert len(doc) == T * max(distance + 1, 1)
    fact_of = {t: ij for ij, t in v.fact.items()}
    facts = {fact_of[t][0]: fact_of[t][1] for t in doc if t in fact_of}
    fact_positions = [p for p, t in enumerate(doc) if t in fact_of]
    asks = [(p, v.keys.index(t), v.values.index(doc[p + 1]))
            for p, t in enumerate(doc[:-1]) if t in v.keys]
    assert len(facts) == rd.FACTS and len(fact_positions) == rd.FACTS
    assert sorted(i for _, i, _ in asks) == sorted(facts)  # every fact asked exactly once
    assert all(facts[i] == j for _, i, j in asks)  # with its own value
    if distance == 0:  # in-segment lookup: facts in the first half, asks in the second
        assert max(fact_positions) < T // 2 <= min(p for p, _, _ in asks)
    else:  # facts in segment 0, asks in segment `distance`, filler in between
        assert max(fact_positions) < T
        assert all(distance * T <= p < (distance + 1) * T for p, _, _ in asks)
        assert all(t in v.filler for t in doc[T:distance * T])


def test_recall_answers_mask_marks_exactly_the_asked_values():
    rd = recall_task
    v = rd.Vocab()
    samples = rd.batches(v, (2,), rd.ROWS, seed=3)
    assert len(samples) == 3  # 3 segments per document, one document per row
    asked = [rd.answers(v, s).sum().item() for s in samples]
    assert asked == [0, 0, rd.ROWS * rd.FACTS]


# ---------------------------------------------------------------------------------------------
# summarize.py


def write_run(root, tokens=(1000, 1000, 1000), buckets=(400, 600)):
    """A fake run folder: three eval-lm logs, one positions file, the window's command."""
    logs = os.path.join(root, "logs")
    os.makedirs(logs)
    for name, n, loss in zip(("backbone", "memory_off", "memory_16384_csz4"), tokens, (7.0, 6.9, 6.8)):
        with open(os.path.join(logs, f"eval_{name}.log"), "w") as f:
            f.write(f"... | Evaluated {n:,} tokens in 3.0s (333.33 tokens/s)\n"
                    f"... | Loss (base 2): {loss:.4f}, Perplexity: {2 ** loss:.2f}\n")
    with open(os.path.join(logs, "eval_backbone_window.log"), "w") as f:
        f.write(f"Evaluated {tokens[0]:,} tokens in 3.0s\nLoss (base 2): 6.9500, Perplexity: 123.63\n")
    with open(os.path.join(logs, "eval_backbone_window.cmd"), "w") as f:
        f.write("fairseq-eval-lm data --tokens-per-sample 256 --context-window 128 --cpu\n")
    with open(os.path.join(logs, "positions_memory_16384_csz4.json"), "w") as f:
        json.dump({"loss": 6.8, "ntokens_pos0_1024": buckets[0], "loss_pos0_1024": 6.9,
                   "ntokens_pos1024_end": buckets[1], "loss_pos1024_end": 6.7333333}, f)
    return root


def test_summarize_checks_token_counts(tmp_path):
    good = summarize.summarize(write_run(str(tmp_path / "good")))
    assert good["problems"] == []
    assert good["settings"] == {"T": 256, "C": 128, "S": 128, "L": ""}
    assert good["main"] == "memory_16384_csz4"
    assert good["sweeps"] == {"memory_size": {16384: 111.43}, "chunk_size": {4: 111.43}}
    table = summarize.markdown(good)
    assert "| (b) backbone, sliding window (context 128 + 128 new tokens) | 1,000 | 6.9500 | 123.63 |" in table
    assert "| [1,024, end) | 600 |" in table
    # one memory size and one chunk size are no sweep: no table for them
    assert "### Memory size" not in table and "### Chunk size" not in table
    logs = os.path.join(str(tmp_path / "good"), "logs")
    shutil.copy(os.path.join(logs, "eval_memory_16384_csz4.log"), os.path.join(logs, "eval_memory_4096_csz4.log"))
    table = summarize.markdown(summarize.summarize(str(tmp_path / "good")))
    assert "### Memory size (csz fixed)" in table and "| 4,096 | 111.43 |" in table
    assert "### Chunk size" not in table

    bad = summarize.summarize(write_run(str(tmp_path / "bad"), tokens=(1000, 999, 1000), buckets=(400, 599)))
    assert len(bad["problems"]) == 2
    assert bad["problems"][0].startswith("conditions scored different numbers of tokens")
    assert "buckets hold 999 tokens, eval-lm scored 1000" in bad["problems"][1]
    assert summarize.main([str(tmp_path / "bad")]) == 1


def test_summarize_reads_suffix_identification(tmp_path):
    root = write_run(str(tmp_path / "run"))
    for name, right, total in (("backbone", 10, 43), ("memory_off", 11, 43), ("memory", 14, 43),
                               ("memory", 9, 40)):
        prefix = 4096 if total == 43 else 8192
        with open(os.path.join(root, "logs", f"suffix_{name}_{prefix}.log"), "a") as f:
            f.write(f"INFO | s.json: {total} examples, 6 candidates each (chance 16.7%), ...\n"
                    f"Generate test with beam=1: Accuracy {100 * right / total:.2f} "
                    f"({right}/{total})\n")
    r = summarize.summarize(root)
    assert r["suffix"][4096]["memory"] == {"accuracy": 32.56, "right": 14, "total": 43,
                                           "candidates": 6}
    assert r["problems"] == []
    table = summarize.markdown(r)
    assert "| LongMem with memory | 32.56 (14/43) | 22.50 (9/40) |" in table
    assert "| backbone alone | 23.26 (10/43) | - |" in table
    with open(os.path.join(root, "logs", "suffix_backbone_8192.log"), "w") as f:
        f.write("INFO | s.json: 41 examples, 6 candidates each\n"
                "Generate test with beam=1: Accuracy 10.00 (4/41)\n")
    assert "different numbers of examples" in summarize.summarize(root)["problems"][0]


def test_summarize_reads_the_training_free_condition(tmp_path):
    root = write_run(str(tmp_path / "run"))
    logs = os.path.join(root, "logs")
    with open(os.path.join(logs, "eval_free.log"), "w") as f:
        f.write("Evaluated 1,000 tokens in 5.0s\nLoss (base 2): 6.8500, Perplexity: 115.36\n")
    with open(os.path.join(logs, "eval_free.cmd"), "w") as f:
        f.write("fairseq-eval-lm data --training-free-memory --free-read-layers 15-29 --cpu\n")
    with open(os.path.join(logs, "suffix_free_4096.log"), "w") as f:
        f.write("INFO | s.json: 43 examples, 6 candidates each (chance 16.7%), ...\n"
                "Generate test with beam=1: Accuracy 25.58 (11/43)\n")
    r = summarize.summarize(root)
    assert r["problems"] == [] and r["settings"]["L"] == "15-29"
    rows = [line for line in summarize.markdown(r).splitlines() if line.startswith("| (")]
    # (e) after (c), before (d); its perplexity compared with (c)'s like every row
    assert [row.split(" |")[0] for row in rows[:5]] == [
        "| (a) backbone alone, 256-token segments",
        "| (b) backbone, sliding window (context 128 + 128 new tokens)",
        "| (c) LongMem, memory off (same weights)",
        "| (e) backbone reading the memory itself (training-free, blocks 15-29)",
        "| (d) LongMem with memory, msz 16,384, csz 4"]
    assert rows[3].endswith("| 6.8500 | 115.36 | -3.4% |")  # 115.36 / 119.43 - 1
    assert "| backbone reading the memory (e) | 25.58 (11/43) |" in summarize.markdown(r)


REC_TOKENS = {"none": 500, "local": 300, "1": 100, "2_4": 60, "5_16": 40, "17_end": 0}
# loss in bits per bucket (none, local, 1, 2-4, 5-16) and overall, per condition
REC_LOSSES = {
    "backbone": ([8.0, 4.0, 6.0, 6.0, 5.0], 7.0),
    "backbone_window": ([8.0, 3.2, 6.0, 5.0, 5.0], 6.95),
    "memory_off": ([8.0, 4.0, 6.0, 5.0, 4.0], 6.9),
    "memory_16384_csz4": ([8.0, 4.0, 5.4, 4.0, 3.0], 6.8),
}


def write_recurrence(root, tokens=REC_TOKENS):
    """write_run's folder with positions files holding recurrence buckets as score_positions.py
    writes them (an empty bucket has a count and no loss) for (a)-(d), and (d)'s reach shares."""
    for name, (losses, loss) in REC_LOSSES.items():
        values = {"loss": loss, "ntokens_pos0_1024": 400, "loss_pos0_1024": 6.9,
                  "ntokens_pos1024_end": 600, "loss_pos1024_end": 6.7}
        for (label, n), bits in zip(tokens.items(), losses + [None]):
            values[f"ntokens_rec{label}"] = n
            if n:
                values[f"loss_rec{label}"] = bits
        if name.startswith("memory_1"):
            for label, mass, chunks, stored, h0, h1 in (
                    ("1", 0.5, 0.4, 0.05, 0.75, 0.25), ("2_4", 0.25, 0.3, 0.15, 0.25, 0.25),
                    ("5_16", 0.125, 0.2, 0.3, 0.0, 0.25), ("17_end", 0.125, 0.1, 0.5, 0.0, 0.25)):
                values.update({f"mem_reach{label}": mass, f"mem_chunks{label}": chunks,
                               f"mem_stored{label}": stored,
                               f"mem_reach{label}_h0": h0, f"mem_reach{label}_h1": h1})
        with open(os.path.join(root, "logs", f"positions_{name}.json"), "w") as f:
            json.dump(values, f)
    return root


def table_under(text, title):
    """The rows of the first markdown table after the line ``title``."""
    lines = text.splitlines()[text.splitlines().index(title):]
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def test_summarize_recurrence_and_reach_tables(tmp_path):
    r = summarize.summarize(write_recurrence(write_run(str(tmp_path / "run"))))
    assert r["problems"] == []
    assert list(r["recurrence"]["backbone_window"]) == ["none", "local", "1", "2_4", "5_16",
                                                        "17_end", "all"]
    assert r["recurrence"]["memory_off"]["2_4"] == {"tokens": 60, "loss": 5.0}
    assert r["recurrence"]["memory_off"]["17_end"] == {"tokens": 0, "loss": None}
    assert r["recurrence"]["memory_off"]["all"] == {"tokens": 1000, "loss": 6.9}
    gain = r["recurrence_gain"]
    assert list(gain) == ["memory_off", "backbone_window"]
    assert gain["memory_off"] == pytest.approx(
        {"none": 0, "local": 0, "1": 10, "2_4": 20, "5_16": 25, "all": 100 * (1 - 6.8 / 6.9)})
    assert gain["backbone_window"] == pytest.approx(
        {"none": 0, "local": -25, "1": 10, "2_4": 20, "5_16": 40, "all": 100 * (1 - 6.8 / 6.95)})
    assert r["reach"]["mass"] == {"1": 0.5, "2_4": 0.25, "5_16": 0.125, "17_end": 0.125}
    assert r["reach"]["heads"][1]["17_end"] == 0.25
    assert r["reach"]["stored"] == {"1": 0.05, "2_4": 0.15, "5_16": 0.3, "17_end": 0.5}
    text = summarize.markdown(r)
    assert table_under(text, "### Loss by recurrence distance") == [
        "| | first | same segment | 1 | 2-4 | 5-16 | >16 | all |",
        "|---|---|---|---|---|---|---|---|",
        "| tokens | 500 | 300 | 100 | 60 | 40 | 0 | 1,000 |",
        "| (a) backbone | 8.000 | 4.000 | 6.000 | 6.000 | 5.000 | - | 7.000 |",
        "| (b) sliding window | 8.000 | 3.200 | 6.000 | 5.000 | 5.000 | - | 6.950 |",
        "| (c) memory off | 8.000 | 4.000 | 6.000 | 5.000 | 4.000 | - | 6.900 |",
        "| (d) memory 16,384, csz 4 | 8.000 | 4.000 | 5.400 | 4.000 | 3.000 | - | 6.800 |",
        "| gain of (d) over (c) memory off | +0.00% | +0.00% | +10.00% | +20.00% | +25.00% | - | +1.45% |",
        "| gain of (d) over (b) sliding window | +0.00% | -25.00% | +10.00% | +20.00% | +40.00% | - | +2.16% |",
    ]
    assert table_under(text, "### Where the memory reads reach ((d))") == [
        "| | 1 | 2-4 | 5-16 | >16 |",
        "|---|---|---|---|---|",
        "| attention mass | 50.0% | 25.0% | 12.5% | 12.5% |",
        "| retrieved chunks | 40.0% | 30.0% | 20.0% | 10.0% |",
        "| chance: the memory's contents | 5.0% | 15.0% | 30.0% | 50.0% |",
        "| head 0: attention mass | 75.0% | 25.0% | 0.0% | 0.0% |",
        "| head 1: attention mass | 25.0% | 25.0% | 25.0% | 25.0% |",
    ]


def test_summarize_checks_recurrence_token_counts(tmp_path):
    root = write_run(str(tmp_path / "run"))
    write_recurrence(root)
    # (b)'s window reads each book alone, eval-lm's runs across books: its loss may differ
    assert summarize.summarize(root)["conditions"]["backbone_window"]["loss"] == 6.95
    with open(os.path.join(root, "logs", "positions_backbone_window.json")) as f:
        window = json.load(f)
    window["ntokens_rec2_4"] -= 1
    window["ntokens_rec1"] += 1
    with open(os.path.join(root, "logs", "positions_backbone_window.json"), "w") as f:
        json.dump(dict(window, loss=5.0), f)
    assert summarize.summarize(root)["problems"][0].startswith(
        "conditions scored different tokens per recurrence bucket")
    assert len(summarize.summarize(root)["problems"]) == 1
    window["ntokens_rec1"] -= 1
    with open(os.path.join(root, "logs", "positions_backbone_window.json"), "w") as f:
        json.dump(window, f)
    problems = summarize.summarize(root)["problems"]
    assert problems[0] == ("positions_backbone_window: recurrence buckets hold 999 tokens, "
                           "eval-lm scored 1000")
    assert len(problems) == 2 and summarize.main([root]) == 1


def test_recurrence_plot_draws_the_gains_by_bucket(tmp_path):
    pytest.importorskip("matplotlib")
    root = write_recurrence(write_run(str(tmp_path / "run")))
    assert summarize.main([root]) == 0
    with open(os.path.join(root, "recurrence_gain.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    import matplotlib.pyplot as plt

    r = summarize.summarize(root)
    fig = summarize.recurrence_plot(plt, r, str(tmp_path / "plot.png"))
    ax = fig.axes[0]
    over_c, over_b = ax.containers
    assert [b.get_height() for b in over_c] == pytest.approx([0, 0, 10, 20, 25, 100 * (1 - 6.8 / 6.9)])
    assert [b.get_height() for b in over_b] == pytest.approx([0, -25, 10, 20, 40, 100 * (1 - 6.8 / 6.95)])
    # the empty >16 bucket is left out; every label carries its token count
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        "first\n500 tok.", "same segment\n300 tok.", "1\n100 tok.", "2-4\n60 tok.",
        "5-16\n40 tok.", "all\n1.0k tok."]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "(d) over (c) memory off", "(d) over (b) sliding window"]
    assert [tuple(line.get_ydata()) for line in ax.get_lines()] == [(0, 0)]  # the zero line
    assert ax.yaxis.get_major_formatter().get_useOffset() is False
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# docs/RESULTS.md is generated from the committed logs


def results_md():
    return open(RESULTS_MD, encoding="utf-8").read()


@pytest.mark.parametrize("run", sorted(glob.glob(os.path.join(LOGS, "long_context_lm*"))))
def test_results_md_long_context_tables_come_from_the_logs(run, tmp_path):
    r = summarize.summarize(run)
    assert r["problems"] == []
    text = results_md()
    for line in summarize.markdown(r).splitlines():
        if line.startswith("|"):
            assert line in text, f"docs/RESULTS.md lacks this line of {run}'s table: {line}"


@pytest.mark.parametrize("log", sorted(glob.glob(os.path.join(LOGS, "recall_distance*", "*.jsonl"))))
def test_results_md_recall_table_comes_from_the_log(log):
    records = [json.loads(line) for line in open(log, encoding="utf-8") if line.strip()]
    text = results_md()
    for line in recall_distance.table(records).splitlines():
        if line.startswith("|"):
            assert line in text, f"docs/RESULTS.md lacks this line of {log}'s table: {line}"


@pytest.mark.parametrize("summary", sorted(glob.glob(os.path.join(LOGS, "icl*", "*", "summary.json"))))
def test_results_md_icl_tables_come_from_the_logs(summary, tmp_path, monkeypatch, capsys):
    """run_icl.py, given the command recorded in summary.json, rebuilds its table from the
    committed logs alone (every run's log has its accuracy line, so nothing is run)."""
    src = os.path.dirname(summary)
    with open(summary, encoding="utf-8") as f:
        argv = shlex.split(json.load(f)["command"])[1:]
    out = argv.index("--out") + 1
    dataset = argv[argv.index("--dataset") + 1]
    shutil.copytree(src, tmp_path / dataset)
    argv[out] = str(tmp_path)
    monkeypatch.setattr(run_icl, "tokenizer_args", lambda args: [])
    run_icl.main(argv)
    table = capsys.readouterr().out
    text = results_md()
    rows = [line for line in table.splitlines() if line.startswith("|")]
    with open(summary, encoding="utf-8") as f:
        recorded = json.load(f)
    conditions = [c for c in run_icl.CONDITIONS if c in recorded]
    assert len(rows) == 2 + len(conditions), table  # header, rule, a row per condition run
    for line in rows:
        assert line in text, f"docs/RESULTS.md lacks this line of {src}'s table: {line}"


def test_results_logs_are_committed():
    assert glob.glob(os.path.join(LOGS, "long_context_lm*", "logs", "eval_*.log"))
    assert glob.glob(os.path.join(LOGS, "recall_distance*", "*.jsonl"))


def test_plots_are_drawn_from_the_logs(tmp_path):
    pytest.importorskip("matplotlib")
    plot_results = load_example("plot_results.py")
    run = os.path.join(LOGS, "long_context_lm_cpu")  # the run with every step, suffix included
    log = sorted(glob.glob(os.path.join(LOGS, "recall_distance*", "*.jsonl")))[0]
    assert plot_results.main(["--long-context", run, "--recall", log, "--out", str(tmp_path)]) == 0
    names = sorted(os.listdir(tmp_path))
    assert names == ["long_context_lm.png", "long_context_lm_positions.png",
                     "long_context_lm_suffix.png", "long_context_lm_sweeps.png",
                     "recall_distance.png"]
    for name in names:
        with open(tmp_path / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plots_include_the_recurrence_gain_when_the_run_has_it(tmp_path):
    pytest.importorskip("matplotlib")
    plot_results = load_example("plot_results.py")
    root = write_recurrence(write_run(str(tmp_path / "run")))
    out = tmp_path / "plots"
    out.mkdir()
    assert plot_results.main(["--long-context", root, "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["long_context_lm.png", "long_context_lm_positions.png",
                                       "long_context_lm_recurrence.png", "long_context_lm_sweeps.png"]
    with open(out / "long_context_lm_recurrence.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("table", sorted(glob.glob(os.path.join(LOGS, "icl*", "*", "table.md"))))
def test_icl_table_total_is_the_sum_of_its_runs(table):
    """The total line adds the runs' own times (a table resumed over several calls once printed
    the last call's wall time, 884 s, under rows that sum to 2,214 s)."""
    with open(os.path.join(os.path.dirname(table), "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    conditions = [c for c in run_icl.CONDITIONS if c in summary]
    seconds = [t for c in conditions for t in summary[c]["seconds"]]
    text = open(table, encoding="utf-8").read()
    assert f"total {sum(seconds):.0f} s ({len(seconds)} runs)" in text
    rows = [int(line.rsplit("|", 2)[1].strip().split()[0])
            for line in text.splitlines() if line.startswith("| ") and line.endswith(" s |")]
    assert len(rows) == len(conditions) and abs(sum(rows) - sum(seconds)) <= 1.5


# ---------------------------------------------------------------------------------------------
# docs/BENCHMARKS.md: every table of figures is a benchmark run's table.md, copied


BENCHMARKS_MD = os.path.join(REPO, "docs", "BENCHMARKS.md")
NUMBER_CELL = re.compile(r"^\s*[-+]?[\d,]*\.?\d+\s*(ms|s|x|%)?(\s*\(.*\))?\s*$")


def markdown_tables(text):
    """(line index of the table's first row, its rows) for each table of a markdown text."""
    lines = text.splitlines()
    tables, i = [], 0
    while i < len(lines):
        if lines[i].startswith("|"):
            start = i
            while i < len(lines) and lines[i].startswith("|"):
                i += 1
            tables.append((start, lines[start:i]))
        i += 1
    return tables


def test_benchmarks_md_tables_come_from_their_logs():
    text = open(BENCHMARKS_MD, encoding="utf-8").read()
    lines = text.splitlines()
    checked = 0
    for start, rows in markdown_tables(text):
        cells = [c for row in rows[2:] for c in row.strip("|").split("|")]
        if not any(NUMBER_CELL.match(c) for c in cells):
            continue  # a table of words (the backends), not of measurements
        # the nearest `Log:` line above the table names the run it is copied from
        logs = re.findall(r"^Log: \[`[^`]+`\]\(results/logs/benchmarks/([^)]+)\)$",
                          "\n".join(lines[:start]), re.M)
        assert logs, f"docs/BENCHMARKS.md line {start + 1}: a table of figures without a `Log:` line"
        log = os.path.join(LOGS, "benchmarks", logs[-1])
        logged = open(os.path.join(log, "table.md"), encoding="utf-8").read().splitlines()
        for row in rows:
            assert row in logged, f"docs/BENCHMARKS.md line {start + 1}: not in {log}/table.md: {row}"
        for name in ("raw.json", "machine.json", "command.txt"):
            assert os.path.getsize(os.path.join(log, name)) > 0
        checked += 1
    assert checked >= 5


def test_benchmark_logs_hold_every_repeat_and_the_machine():
    for log in sorted(glob.glob(os.path.join(LOGS, "benchmarks", "*", "machine.json"))):
        machine = json.load(open(log, encoding="utf-8"))
        assert machine["cpu"] and machine["cpu_count"] >= 1
        assert len(machine["load_average_1_5_15_min"]) == 3 and len(machine["load_average_at_end"]) == 3
        raw = json.load(open(os.path.join(os.path.dirname(log), "raw.json"), encoding="utf-8"))
        assert raw
        for cell, v in raw.items():
            if isinstance(v, dict):  # memory_peak.py, forward_peak.py: resident memory (MiB)
                assert 0 < v["before_mib"] <= v["peak_mib"], (log, cell)
                assert v["step_mib"] == pytest.approx(v["peak_mib"] - v["before_mib"]), (log, cell)
                if "banks" in v:  # memory_peak.py
                    assert v["pooled_mib"] >= 0 and (v["banks"] > 0) == (v["pooled_mib"] > 0), \
                        (log, cell)
                else:  # forward_peak.py: the logits are part of the forward's peak
                    assert 0 < v["logits_mib"] <= v["step_mib"], (log, cell)
            else:  # timings: every repeat of the cell, in seconds
                assert isinstance(v, list) and v and min(v) > 0, (log, cell)


def test_results_md_smollm2_copy_tables_come_from_the_logs():
    """Each copy-probe table of the SmolLM2 section: its rows are copy_probe.py --table's rows for
    the results files its `Logs:` line names."""
    copy_probe = load_example(os.path.join("long_context_lm", "copy_probe.py"))
    text = results_md()
    tables = re.findall(r"^Logs: `copy_probe.py --table (.+?)`$", text, re.M)
    assert len(tables) >= 2, "the SmolLM2 section's copy-probe tables name their logs"
    for names in tables:
        named = []
        for name in names.split():
            with open(os.path.join(LOGS, "smollm2", name), encoding="utf-8") as f:
                named.append((os.path.splitext(os.path.basename(name))[0], json.load(f)))
        for line in copy_probe.table(named).splitlines():
            assert line in text, f"docs/RESULTS.md lacks this line of the table of {names}: {line}"
