"""Two-process data-parallel LongMem training on CPU (gloo) through the real ``fairseq-train``.

Launch: one ``fairseq-train`` process per rank, each given fairseq's own rendezvous flags
(``--distributed-init-method tcp://127.0.0.1:PORT --distributed-rank R --distributed-world-size 2
--distributed-no-spawn``), ``--distributed-backend gloo`` and ``--ddp-backend legacy_ddp``.
fairseq 0.12's other launch paths need CUDA devices: with ``--distributed-world-size 2`` alone it
asserts "world size is 2 but have 0 available devices" (it spawns one process per GPU); under
``torchrun`` it computes ``rank % torch.cuda.device_count()`` and dies with ZeroDivisionError
(and without ``--distributed-world-size`` each torchrun worker silently trains alone); and its
default ``pytorch_ddp`` backend passes ``device_ids=[0]``, which torch's DDP refuses for a CPU
module. ``legacy_ddp`` is fairseq's own all-reduce of flattened gradients and works with gloo.

Each rank runs the test-only criterion ``longmem_rank_probe`` (tests/longmem_rank_probe), which
writes the rows of every batch the rank trained on and its final weights.
"""

import pytest
import torch

from conftest import longmem_train_argv
from distributed_launch import PROBE_DIR, STREAMS_PER_RANK, WORLD, expected_streams, launch


def test_shards_are_disjoint_and_equally_long(corpus):
    shards = [expected_streams(corpus, r, WORLD) for r in range(WORLD)]
    assert len(shards[0]) == len(shards[1]) > 0
    docs = [{d for rows in shard for d, _ in rows if d >= 0} for shard in shards]
    assert docs[0].isdisjoint(docs[1])
    assert docs[0] | docs[1] == set(range(len(corpus.docs["train"])))


# two processes; the task's sharding is checked in the quick loop by
# test_shards_are_disjoint_and_equally_long
@pytest.mark.slow
def test_two_process_data_parallel_training(corpus, backbone, tmp_path):
    save_dir, probe_dir = tmp_path / "ck", tmp_path / "probe"
    save_dir.mkdir()
    probe_dir.mkdir()
    logs = launch(longmem_train_argv(
        corpus.data_dir, backbone, save_dir, "--max-epoch", "1", "--no-epoch-checkpoints",
        batch_size=STREAMS_PER_RANK, criterion="longmem_rank_probe", user_dir=PROBE_DIR)[1:],
        str(save_dir), str(probe_dir))
    assert "training on 2 devices" in logs[0]

    probes = [torch.load(probe_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert [p["rank"] for p in probes] == [0, 1] and all(p["world"] == WORLD for p in probes)

    # each rank ran exactly the batches the task deals it, in order: disjoint streams, and the
    # same number of steps on both ranks (one batch per update, no dummy batches)
    for rank, probe in enumerate(probes):
        assert probe["train_rows"] == expected_streams(corpus, rank, WORLD), f"rank {rank}"
    assert len(probes[0]["train_rows"]) == len(probes[1]["train_rows"])
    docs = [{d for rows in p["train_rows"] for d, _ in rows if d >= 0} for p in probes]
    assert docs[0].isdisjoint(docs[1])
    assert docs[0] | docs[1] == set(range(len(corpus.docs["train"])))
    steps = len(probes[0]["train_rows"])
    assert f"num_updates {steps}" in logs[0].split("| train |")[-1]

    # after training: identical trainable weights on both ranks, equal to rank 0's checkpoint,
    # and a backbone bit-identical to the checkpoint it was loaded from
    ckpt = torch.load(save_dir / "checkpoint_last.pt", weights_only=False)["model"]
    frozen = torch.load(backbone, weights_only=False)["model"]
    states = [p["state"] for p in probes]
    assert states[0].keys() == states[1].keys() == ckpt.keys()
    side = [k for k in ckpt if not k.startswith("decoder.backbone.")]
    assert any(k.startswith("decoder.sidenet.") for k in side)
    for k in side:
        assert torch.equal(states[0][k], states[1][k]), k
        assert torch.equal(states[0][k], ckpt[k]), k
        initial = initial_value(k, states[0][k], frozen)
        assert not torch.equal(states[0][k], initial), f"{k} never trained"
    backbone_keys = [k for k in ckpt if k.startswith("decoder.backbone.")]
    assert len(backbone_keys) == len(frozen)
    for k in backbone_keys:
        for state in states + [ckpt]:
            assert torch.equal(state[k], frozen[k]), k


def initial_value(key, value, frozen):
    """What the SideNet tensor ``key`` starts as: side block j copies backbone block 2j+1 (r=2),
    the final LayerNorm copies the backbone's, the memory gate starts at 0."""
    if key.endswith(".attn.gate"):
        return torch.zeros_like(value)
    name = key[len("decoder.sidenet."):]
    if name.startswith("h."):
        j, rest = name[2:].split(".", 1)
        return frozen[f"decoder.backbone.h.{2 * int(j) + 1}.{rest}"]
    return frozen[f"decoder.backbone.{name}"]
