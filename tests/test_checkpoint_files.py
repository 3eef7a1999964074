"""Checkpoints survive kills: fairseq-train SIGKILLed at random moments around its saves and
resumed with the identical command ends with the weights of an uninterrupted run; a damaged
checkpoint_last.pt is moved aside and training resumes from the newest intact checkpoint, in one
process or two data-parallel ones; a run resumed at --max-update trains nothing.

``--disable-memory`` makes a resumed run bit-identical to an uninterrupted one: fairseq reseeds
every step with seed + num_updates and checkpoints restore the optimizer and the data position
(the memory itself is not in checkpoints, so with memory on, rows in flight would restart empty).
"""

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import BIN_DIR, longmem_train_argv, run_cli
from distributed_launch import PROBE_DIR, STREAMS_PER_RANK, WORLD, expected_streams, launch

# a kill loop, a resumed run and a two-process run; the checkpoint writer and reader run in the
# quick loop in every training of conftest.session_models and test_bad_input
pytestmark = pytest.mark.slow

MAX_UPDATE = 8
KILL_SEED = 20240611
KILL_WINDOW_S = 0.15  # a save of this tiny model takes about 0.06 s, a step about 0.04 s
# every run compared here uses one thread, whatever OMP_NUM_THREADS the suite runs under: torch's
# CPU reductions are split by thread, so runs with other thread counts differ in the last bits
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def train_args(corpus, backbone, save_dir, max_update=MAX_UPDATE):
    return longmem_train_argv(
        corpus.data_dir, backbone, save_dir, "--disable-memory", "--max-update", max_update,
        "--save-interval-updates", "1", "--keep-interval-updates", "3", "--no-epoch-checkpoints",
        "--disable-validation", "--log-format", "json", "--log-interval", "1")


def trained_updates(log):
    """num_updates of every train_inner record in a log, in order."""
    out = []
    for line in log.splitlines():
        head, sep, body = line.partition("| train_inner | ")
        if sep:
            out.append(int(json.loads(body)["num_updates"]))
    return out


def loaded_from(log):
    """(file, updates) of fairseq's 'Loaded checkpoint' line, or None on a fresh start."""
    m = re.search(r"Loaded checkpoint (\S+) \(epoch \d+ @ (\d+) updates\)", log)
    return (m.group(1), int(m.group(2))) if m else None


def final_state(save_dir):
    return torch.load(os.path.join(save_dir, "checkpoint_last.pt"), weights_only=True)


def assert_same_training_state(a, b):
    assert a["optimizer_history"][-1]["num_updates"] == b["optimizer_history"][-1]["num_updates"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    opt_a, opt_b = a["last_optimizer_state"]["state"], b["last_optimizer_state"]["state"]
    assert opt_a.keys() == opt_b.keys()
    for p in opt_a:
        for k, v in opt_a[p].items():  # Adam's moments (tensors) and step (an int)
            w = opt_b[p][k]
            assert torch.equal(v, w) if torch.is_tensor(v) else v == w, (p, k)


@pytest.fixture(scope="module")
def uninterrupted(corpus, backbone, tmp_path_factory):
    save_dir = str(tmp_path_factory.mktemp("uninterrupted"))
    log = run_cli(train_args(corpus, backbone, save_dir), env=ONE_THREAD)
    assert trained_updates(log) == list(range(1, MAX_UPDATE + 1))
    return final_state(save_dir)


def kill_after(proc, delay, save_dir):
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)


def kill_while_writing_last(proc, delay, save_dir):
    """SIGKILL as soon as anything named checkpoint_last.pt* changes in ``save_dir``: fairseq's
    own copy rewrites checkpoint_last.pt in place, a safe writer writes a file beside it."""
    def files():
        out = {}
        for entry in os.scandir(save_dir):
            if entry.name.startswith("checkpoint_last.pt"):
                with contextlib.suppress(FileNotFoundError):
                    st = entry.stat()
                    out[entry.name] = (st.st_size, st.st_mtime_ns)
        return out

    before = files()
    while proc.poll() is None:
        if files() != before:
            proc.send_signal(signal.SIGKILL)
            return
        time.sleep(0.0005)


def run_with_kills(args, save_dir, seed, scratch, max_legs=30):
    """Run ``args`` again and again, each time SIGKILLing it at a random moment (seeded) once its
    1st to 4th checkpoint save has started, until one run exits by itself; returns [(rc, log)].
    Half the kills come a random 0-0.15 s after the save starts, half while checkpoint_last.pt
    is being written (the write a kill used to truncate); none later than the next save's start,
    so that a leg never runs past 4 saves whatever the machine's speed."""
    rng = random.Random(seed)
    exe = shutil.which(args[0], path=BIN_DIR)
    env = dict(os.environ, PYTHONUNBUFFERED="1", **ONE_THREAD)
    legs = []
    while len(legs) < max_legs:
        saves_left = rng.randint(1, 4)
        killer = rng.choice([kill_after, kill_while_writing_last])
        delay = rng.uniform(0, KILL_WINDOW_S)
        proc = subprocess.Popen([exe] + [str(a) for a in args[1:]], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env, cwd=scratch)
        thread, lines = None, []
        for line in proc.stdout:
            lines.append(line)
            if "Saving checkpoint to" not in line:
                continue
            if thread is not None and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)  # the armed kill has not come yet
            saves_left -= 1
            if saves_left == 0:
                thread = threading.Thread(target=killer, args=(proc, delay, save_dir))
                thread.start()
        rc = proc.wait(timeout=300)
        if thread is not None:
            thread.join()
        legs.append((rc, "".join(lines)))
        if rc != -signal.SIGKILL:
            return legs
    raise AssertionError(f"the run did not finish in {max_legs} legs")


def test_sigkill_at_random_moments_loses_no_run_and_no_batch(
        corpus, backbone, uninterrupted, tmp_path):
    save_dir, scratch = tmp_path / "ck", tmp_path / "cwd"
    scratch.mkdir()
    legs = run_with_kills(train_args(corpus, backbone, save_dir), save_dir, KILL_SEED, scratch)
    tail = "\n".join(legs[-1][1].splitlines()[-20:])
    # no run lost: every leg either was killed by us or finished cleanly
    assert legs[-1][0] == 0, f"leg {len(legs)} failed:\n{tail}"
    assert len(legs) >= 2  # every leg is killed within 5 saves: the first one never finishes
    mid_save, prev = 0, None
    for i, (rc, log) in enumerate(legs):
        assert "Traceback" not in log, f"leg {i}:\n{log[-3000:]}"
        start = loaded_from(log)
        resumed_at = start[1] if start else 0
        updates = trained_updates(log)
        saved = [int(u) for u in re.findall(r"Saved checkpoint \S+ \(epoch \d+ @ (\d+) up", log)]
        if prev is not None:
            # every save the killed leg completed is kept, and nothing it did not train is
            prev_saved, prev_trained = prev
            assert prev_saved <= resumed_at <= prev_trained, (i, prev, resumed_at)
        # and the leg goes on from exactly there: no batch replayed or skipped
        assert updates == list(range(resumed_at + 1, resumed_at + 1 + len(updates))), (i, updates)
        prev = (saved[-1] if saved else resumed_at, updates[-1] if updates else resumed_at)
        mid_save += rc != 0 and log.count("Saving checkpoint to") > len(saved)
    print(f"{len(legs)} legs, {len(legs) - 1} kills, {mid_save} inside a save")
    # the final weights and optimizer state are bit-identical to the uninterrupted run's
    assert_same_training_state(final_state(save_dir), uninterrupted)
    assert not [n for n in os.listdir(save_dir) if n.endswith((".incomplete", ".damaged"))]


def truncate(path, keep_fraction=0.5):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep_fraction)])
    return data[: int(len(data) * keep_fraction)]


def zero_middle(path):
    data = bytearray(open(path, "rb").read())
    mid = len(data) // 2
    data[mid:mid + 4096] = bytes(4096)
    with open(path, "wb") as f:
        f.write(data)
    return bytes(data)


def test_damaged_last_checkpoint_resumes_from_newest_intact(corpus, backbone, uninterrupted,
                                                            tmp_path):
    save_dir = str(tmp_path / "ck")
    run_cli(train_args(corpus, backbone, save_dir, max_update=6), env=ONE_THREAD)
    assert sorted(os.listdir(save_dir)) == [
        "checkpoint_1_4.pt", "checkpoint_1_5.pt", "checkpoint_1_6.pt", "checkpoint_last.pt"]
    last = os.path.join(save_dir, "checkpoint_last.pt")
    newest = os.path.join(save_dir, "checkpoint_1_6.pt")
    truncated = truncate(last)
    corrupt = zero_middle(newest)  # zeros inside a tensor: torch.load reads it without complaint

    # resumed at --max-update: nothing is trained, but checkpoint_last.pt is intact again
    log = run_cli(train_args(corpus, backbone, save_dir, max_update=5), env=ONE_THREAD)
    fallback = os.path.join(save_dir, "checkpoint_1_5.pt")
    line = next(l for l in log.splitlines() if "resuming from" in l)
    assert (f"checkpoint {last} is truncated" in line and f"moved it to {last}.damaged" in line
            and f"resuming from {fallback}, the newest intact checkpoint in --save-dir (copied "
            "to checkpoint_last.pt)" in line), line
    assert f"checkpoint {newest} is corrupt (CRC mismatch" in log  # skipped, and moved aside
    assert loaded_from(log) == (fallback, 5)
    assert "the checkpoint is at update 5 and --max-update is 5: nothing left to train" in log
    assert trained_updates(log) == []
    assert open(last, "rb").read() == open(fallback, "rb").read()
    # the identical command goes on from there
    log = run_cli(train_args(corpus, backbone, save_dir), env=ONE_THREAD)
    assert loaded_from(log) == (last, 5) and "is damaged" not in log
    assert trained_updates(log) == [6, 7, 8]
    assert_same_training_state(final_state(save_dir), uninterrupted)
    # nothing the user had is lost: the damaged files are kept, byte for byte
    assert open(last + ".damaged", "rb").read() == truncated
    assert open(newest + ".damaged", "rb").read() == corrupt


def test_no_intact_checkpoint_is_a_one_line_error(corpus, backbone, tmp_path):
    """With nothing intact to resume from, and for a damaged --restore-file outside --save-dir,
    the run stops with one line and leaves the files as they were."""
    save_dir = tmp_path / "ck"
    save_dir.mkdir()
    last = save_dir / "checkpoint_last.pt"
    last.write_bytes(b"PK\x03\x04" + bytes(100))
    elsewhere = tmp_path / "elsewhere.pt"
    elsewhere.write_bytes(b"")
    runs = [train_args(corpus, backbone, save_dir),
            train_args(corpus, backbone, tmp_path / "ck2") + ["--restore-file", elsewhere]]
    with ThreadPoolExecutor(2) as pool:
        logs = list(pool.map(lambda args: run_cli(args, check=False), runs))
    assert (f"CheckpointResumeError: checkpoint {last} is truncated (104 bytes, its zip directory "
            f"is missing) and no other checkpoint in --save-dir {save_dir} is intact; nothing was "
            "moved") in logs[0]
    assert (f"CheckpointResumeError: checkpoint {elsewhere} is empty (0 bytes); it is left as it "
            "is") in logs[1]
    for log in logs:
        assert "num_updates" not in log
    assert sorted(os.listdir(save_dir)) == ["checkpoint_last.pt"]
    assert last.read_bytes() == b"PK\x03\x04" + bytes(100) and elsewhere.read_bytes() == b""


def test_ranks_resume_together_from_the_intact_checkpoint(corpus, backbone, tmp_path):
    """Two data-parallel processes: rank 0 finds checkpoint_last.pt damaged, falls back, and tells
    rank 1, so both go on from the same update with the batches that follow it."""
    save_dir, probe_dir = tmp_path / "ck", tmp_path / "probe"
    save_dir.mkdir()
    probe_dir.mkdir()
    args = longmem_train_argv(
        corpus.data_dir, backbone, save_dir, "--save-interval-updates", "1",
        "--no-epoch-checkpoints", "--log-format", "json", "--log-interval", "1",
        batch_size=STREAMS_PER_RANK, criterion="longmem_rank_probe", user_dir=PROBE_DIR)[1:]
    launch(args + ["--max-update", "3", "--disable-validation"], str(save_dir), str(probe_dir))
    last = save_dir / "checkpoint_last.pt"
    truncate(last)
    # validation (which makes the probe write each rank's batches and weights) only at the end
    logs = launch(args + ["--max-update", "5", "--validate-after-updates", "5"],
                  str(save_dir), str(probe_dir))
    fallback = save_dir / "checkpoint_1_3.pt"
    assert (f"moved it to {last}.damaged and resuming from {fallback}" in logs[0])
    assert loaded_from(logs[0]) == (str(fallback), 3) and trained_updates(logs[0]) == [4, 5]
    probes = [torch.load(probe_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for rank, probe in enumerate(probes):  # batches 4 and 5 of each rank's own streams
        assert probe["train_rows"] == expected_streams(corpus, rank, WORLD)[3:5], rank
    for k in probes[0]["state"]:
        assert torch.equal(probes[0]["state"][k], probes[1]["state"][k]), k
