"""What a benchmark run leaves behind with --log-dir: its table as printed (table.md), every timing
of every repeat (raw.json), the machine and its load (machine.json) and the command (command.txt),
so that each figure of docs/BENCHMARKS.md sits beside the log and the command that made it."""

import json
import os
import platform
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cpu_model():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info():
    """The machine, its software and its load when the run starts (and, from close(), ends)."""
    import torch

    info = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15_min": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import faiss

        info["faiss"] = faiss.__version__
    except ImportError:
        info["faiss"] = None
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
            cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["git_commit"] = None
    return info


class RunLog:
    """Prints the table as before; with a folder, also keeps it, the raw timings and the machine."""

    def __init__(self, log_dir=None):
        self.log_dir = log_dir
        self.lines, self.raw = [], {}
        self.machine = machine_info() if log_dir else None

    def print(self, line=""):
        print(line, flush=True)
        self.lines.append(line)

    def times(self, key, seconds):
        """Every repeat of one cell, in seconds (the table shows their minimum or median)."""
        self.raw[key] = [round(s, 6) for s in seconds]

    def close(self):
        if not self.log_dir:
            return
        os.makedirs(self.log_dir, exist_ok=True)
        self.machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        files = {
            "table.md": "\n".join(self.lines) + "\n",
            "raw.json": json.dumps(self.raw, indent=1) + "\n",
            "machine.json": json.dumps(self.machine, indent=1) + "\n",
            "command.txt": shlex.join(["python", os.path.relpath(os.path.abspath(sys.argv[0]), REPO)]
                                      + sys.argv[1:]) + "\n",
        }
        for name, text in files.items():
            with open(os.path.join(self.log_dir, name), "w", encoding="utf-8") as f:
                f.write(text)
