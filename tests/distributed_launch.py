"""Launching a two-process ``fairseq-train`` on CPU (gloo) with the test-only criterion
``longmem_rank_probe`` (tests/test_distributed.py says why this launch path), and the rows each
rank should train on (tests/test_distributed.py, tests/test_checkpoint_files.py)."""

import os
import socket
import subprocess
import time

from conftest import BIN_DIR, REPO, stream_dataset

PROBE_DIR = os.path.join(REPO, "tests", "longmem_rank_probe")
STREAMS_PER_RANK = 2
WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expected_streams(corpus, rank, world):
    """Rows of every batch of ``rank``, as the task builds them in-process: [[(doc, seg)]]."""
    ds = stream_dataset(corpus, "train", STREAMS_PER_RANK, rank, world)
    batches = [ds[t][1] for t in range(len(ds))]
    return [[(r[3], r[4]) for r in rows] for rows in batches]


def launch(args, save_dir, probe_dir, timeout=150):
    """Start one fairseq-train per rank and wait for both; returns their logs."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs, logs = [], []
    for rank in range(WORLD):
        log = open(os.path.join(save_dir, f"rank{rank}.log"), "w+")
        cmd = [os.path.join(BIN_DIR, "fairseq-train")] + [str(a) for a in args] + [
            "--distributed-world-size", str(WORLD), "--distributed-rank", str(rank),
            "--distributed-init-method", f"tcp://127.0.0.1:{port}", "--distributed-no-spawn",
            "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp",
            "--probe-dir", probe_dir,
        ]
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                      cwd=save_dir))
        logs.append(log)
    # if one rank dies the other blocks in gloo: stop waiting on the first failure
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.poll() for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    out = []
    for log in logs:
        log.seek(0)
        out.append(log.read())
        log.close()
    for rank, (p, text) in enumerate(zip(procs, out)):
        assert p.returncode == 0, f"rank {rank} exited with {p.returncode}:\n" + "\n".join(
            text.splitlines()[-40:]
        )
    return out
