"""Which functions of fairseq_longmem run: put this folder first on PYTHONPATH and set
MODULE_COVERAGE_OUT to a folder; every Python process started so (pytest and the fairseq CLIs it
starts) writes there, at exit, the (file, function) pairs of fairseq_longmem that it called.
tests/module_coverage/report.py sums them per module. A check run by hand (docs/DEVELOPING.md),
not a test: tracing calls makes the run about twice as slow."""

import atexit
import os
import sys
import threading

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                    "fairseq_longmem") + os.sep
OUT = os.environ.get("MODULE_COVERAGE_OUT")

if OUT:
    seen = set()

    def trace(frame, event, arg):
        # only call events reach a global trace function; returning None skips line tracing
        if frame.f_code.co_filename.startswith(ROOT):
            seen.add((frame.f_code.co_filename, frame.f_code.co_name))
        return None

    sys.settrace(trace)
    threading.settrace(trace)

    @atexit.register
    def write():
        with open(os.path.join(OUT, f"{os.getpid()}.txt"), "w") as f:
            f.write("".join(f"{path}\t{name}\n" for path, name in sorted(seen)))
