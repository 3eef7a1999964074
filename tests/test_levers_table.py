"""docs/RESULTS.md's "Long-range levers" table is what levers_table.py prints from the committed
logs, and those logs' recurrence buckets and reach shares add up."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

LOGS = os.path.join(REPO, "docs", "results", "logs", "levers")
RUNS = ["paper", "zero_out", "paper_gate10", "zero_out_gate10", "zero_out_m1",
        "zero_out_csz2_k64", "zero_out_csz1", "zero_out_shift", "zero_out_csz1_shift"]


def present():
    return [r for r in RUNS if os.path.isfile(os.path.join(LOGS, r, "off.json"))]


def test_levers_table_in_results_md_comes_from_the_logs():
    runs = present()
    assert runs, f"no lever run under {LOGS}"
    out = subprocess.run([sys.executable, os.path.join(REPO, "examples", "long_context_lm",
                                                       "levers_table.py"), LOGS, *runs],
                         capture_output=True, text=True, check=True).stdout
    text = open(os.path.join(REPO, "docs", "RESULTS.md"), encoding="utf-8").read()
    for line in out.splitlines():
        if line.startswith("|"):
            assert line in text, f"docs/RESULTS.md lacks this line of the levers table: {line}"


@pytest.mark.parametrize("run", RUNS)
def test_lever_logs_add_up(run):
    if run not in present():
        pytest.skip(f"{run} not committed")
    on = json.load(open(os.path.join(LOGS, run, "on.json"), encoding="utf-8"))
    off = json.load(open(os.path.join(LOGS, run, "off.json"), encoding="utf-8"))
    backbone = json.load(open(os.path.join(LOGS, "backbone.json"), encoding="utf-8"))
    for values in (on, off, backbone):
        counts = {k: v for k, v in values.items() if k.startswith("ntokens_rec")}
        assert sum(counts.values()) == 77010 and len(counts) == 7
        mean = sum(values["loss_rec" + k[len("ntokens_rec"):]] * n for k, n in counts.items())
        assert mean / 77010 == pytest.approx(values["loss"], abs=1e-5)  # fp32 sums
    reach = [v for k, v in on.items() if k.startswith("mem_reach") and "_h" not in k]
    assert len(reach) == 5 and sum(reach) == pytest.approx(1, abs=1e-6)
