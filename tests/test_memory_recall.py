"""LongMem learns to read its memory: key-value recall across segments (a few minutes on 2 cores).

Each document holds four key-value facts in its first segment, two filler segments, then asks for
the four values in its last segment: the answer is three segments back, beyond the local window,
so only the memory can supply it. A fact is one token ``c_{i,j}`` (key i, value j); an ask is the
key token ``k_i`` followed by the value token ``v_j``. The backbone's token embeddings are
compositional (``c_{i,j} = (k_i + v_j) / sqrt 2``), standing in for what pretraining gives a real
LM, and its layers are first trained to do the same lookup *within* a segment, as a pretrained LM
does in context. LongMem with memory must then extend that lookup across segments; the same model
with memory off, trained for the same steps, can only guess (1 in 8).

Memory layer 0 with reduction factor 1: the backbone learns its lookup in layer 0 (measured), and
with r = 1 the SideNet layer that reads memory starts as a copy of that layer, so its queries start
matched to the keys in memory (docs/DESIGN.md, section 1, step 3).
"""


import pytest
import torch

from conftest import load_example

recall_task = load_example("recall_task.py")  # shared with examples/recall_distance.py

pytestmark = pytest.mark.slow  # trains a LongMem model in-process for about 100 s

SEGS = 4  # facts in segment 0, asked in segment 3: three segments back

# The backbone trains in rounds of EPOCHS x STEPS (learning rate decaying to 0 in each) until its
# in-segment lookup reaches LOOKUP_TARGET, at most BACKBONE_ROUNDS rounds. Where floating-point
# kernels differ (CPU instruction sets), one round reached 0.92 on one machine and 1.00 on
# another; LongMem cannot recall across segments better than the backbone looks up within one.
# On one CI machine seed 0's backbone stalled at 0.879 after 3 rounds (here: 1.000 after 1): a
# backbone below LOOKUP_FLOOR is trained again from the next seed in SEEDS.
EPOCHS, STEPS, BACKBONE_ROUNDS, LOOKUP_TARGET, LOOKUP_FLOOR, SEEDS = 70, 32, 3, 0.98, 0.9, (0, 1)


@pytest.fixture(scope="module", autouse=True)
def deterministic():
    """One thread (a reduction's order, hence its rounding, depends on the thread count) and
    deterministic kernels, whatever OMP_NUM_THREADS says: the same figures on every run."""
    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(strict)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vocab():
    return recall_task.Vocab()


@pytest.fixture(scope="module")
def backbone(vocab):
    """(pretrained backbone, in-segment lookup, rounds trained, seeds tried)."""
    for tried, seed in enumerate(SEEDS, start=1):
        bb, lookup, rounds = recall_task.train_backbone(vocab, EPOCHS, STEPS, BACKBONE_ROUNDS,
                                                        LOOKUP_TARGET, seed=seed)
        if lookup >= LOOKUP_FLOOR:
            break
    return bb, lookup, rounds, tried


def train_and_score(v, bb, disable_memory):
    model = recall_task.longmem(v, bb, memory_size=256, disable_memory=disable_memory)
    # decaying to 0 ends training at a settled point: at a constant rate the final recall swung
    # from 0.92 to 0.99 with the thread count (1 or 2) or the training documents; decayed, 0.97-0.99
    recall_task.train_longmem(v, model, epochs=8, docs=256, distances=(SEGS - 1,), decay=True)
    (share, total), = recall_task.score(v, model, (SEGS - 1,), 128).values()
    assert total == 128 * recall_task.FACTS
    return share


def test_memory_is_read_for_recall_beyond_the_local_window(vocab, backbone):
    bb, local_lookup, rounds, tried = backbone
    assert local_lookup >= LOOKUP_FLOOR, (
        f"backbone's in-segment lookup only {local_lookup:.3f} after {rounds} rounds "
        f"(seeds tried: {tried})")
    with_memory = train_and_score(vocab, bb, disable_memory=False)
    without_memory = train_and_score(vocab, bb, disable_memory=True)
    chance = 1 / recall_task.NV
    print(f"recall 3 segments back: memory {with_memory:.3f}, memory off {without_memory:.3f}, "
          f"chance {chance:.3f}; backbone in-segment lookup {local_lookup:.3f} after {rounds} "
          f"round(s) of {EPOCHS * STEPS} steps")
    assert with_memory >= 0.9
    assert without_memory <= chance + 0.1
