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

import random

import pytest
import torch
from fairseq.data import Dictionary

from fairseq_longmem.models.longmem_gpt2 import LongMemGPT2Config, LongMemGPT2Model
from fairseq_longmem.modules.gpt2 import GPT2Backbone, GPT2Dims
from fairseq_longmem.tasks.longmem_lm import DocumentStreamDataset

pytestmark = pytest.mark.slow  # trains a LongMem model in-process for about 100 s

NK, NV, NF, T, SEGS, FACTS = 8, 8, 32, 32, 4, 4
D, LAYERS, HEADS = 128, 4, 4

DICT = Dictionary()
KEYS = [DICT.add_symbol(f"k{i}") for i in range(NK)]
VALUES = [DICT.add_symbol(f"v{j}") for j in range(NV)]
FACT = {(i, j): DICT.add_symbol(f"c{i}_{j}") for i in range(NK) for j in range(NV)}
FILLER = [DICT.add_symbol(f"f{i}") for i in range(NF)]


def ask(segment, rng, keys, values, positions):
    # each fact at most once per segment, so an answer is never in the local window
    for p, n in zip(positions, rng.sample(range(FACTS), len(positions))):
        segment[p], segment[p + 1] = KEYS[keys[n]], VALUES[values[n]]


def make_document(rng, local):
    keys, values = rng.sample(range(NK), FACTS), [rng.randrange(NV) for _ in range(FACTS)]
    first = [rng.choice(FILLER) for _ in range(T)]
    slots = rng.sample(range(T // 2) if local else range(T), FACTS)
    for i, j, p in zip(keys, values, slots):
        first[p] = FACT[(i, j)]
    if local:  # backbone pretraining: facts and asks in one segment
        ask(first, rng, keys, values, rng.sample(range(T // 2, T - 1, 2), FACTS))
        return torch.tensor(first, dtype=torch.int32)
    doc = first + [rng.choice(FILLER) for _ in range(T * (SEGS - 2))]
    last = [rng.choice(FILLER) for _ in range(T)]
    ask(last, rng, keys, values, rng.sample(range(0, T - 1, 2), FACTS))
    return torch.tensor(doc + last, dtype=torch.int32)


def batches(n_docs, seed, local=False, rows=8):
    rng = random.Random(seed)
    docs = [make_document(rng, local) for _ in range(n_docs)]
    ds = DocumentStreamDataset(docs, DICT.pad(), DICT.eos(), T, rows, 0, 1)
    return [ds.collater([ds[t]]) for t in range(len(ds))]


def answers(sample):
    src, tgt = sample["net_input"]["src_tokens"], sample["target"]
    is_key = (src >= KEYS[0]) & (src <= KEYS[-1])
    return is_key & (tgt >= VALUES[0]) & (tgt <= VALUES[-1])


def recall(logits_of, samples):
    """Share of asked values predicted right, and how many were asked; ``logits_of(sample)``."""
    hit = total = 0
    with torch.no_grad():
        for s in samples:
            m = answers(s)
            hit += (logits_of(s).argmax(-1)[m] == s["target"][m]).sum().item()
            total += m.sum().item()
    return hit / total, total


def xent(logits, target):
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), target.flatten(), ignore_index=DICT.pad())


def dims():
    return GPT2Dims(vocab_size=len(DICT), embed_dim=D, num_layers=LAYERS, num_heads=HEADS,
                    max_positions=T, dropout=0.0, attention_dropout=0.0)


# The backbone trains in rounds of EPOCHS x STEPS (learning rate decaying to 0 in each) until its
# in-segment lookup reaches LOOKUP_TARGET, at most BACKBONE_ROUNDS rounds. Where floating-point
# kernels differ (CPU instruction sets), one round reached 0.92 on one machine and 1.00 on
# another; LongMem cannot recall across segments better than the backbone looks up within one.
EPOCHS, STEPS, BACKBONE_ROUNDS, LOOKUP_TARGET = 70, 32, 3, 0.98


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


def backbone_lookup(bb):
    return recall(lambda s: bb.output_layer(bb(s["net_input"]["src_tokens"])[0][-1]),
                  batches(64, 7, local=True))[0]


@pytest.fixture(scope="module")
def backbone_state():
    """(state dict, in-segment lookup, rounds trained) of the pretrained backbone."""
    torch.manual_seed(0)
    bb = GPT2Backbone(dims())
    with torch.no_grad():
        k, v = 0.3 * torch.randn(NK, D), 0.3 * torch.randn(NV, D)
        bb.wte.weight.normal_(0, 0.3)  # about GPT-2's embedding norm
        for i in range(NK):
            bb.wte.weight[KEYS[i]] = k[i]
        for j in range(NV):
            bb.wte.weight[VALUES[j]] = v[j]
        for (i, j), t in FACT.items():
            bb.wte.weight[t] = (k[i] + v[j]) / 2 ** 0.5
    bb.wte.weight.requires_grad_(False)
    for rounds in range(1, BACKBONE_ROUNDS + 1):
        # later rounds continue from the last at a lower rate, on fresh documents
        opt = torch.optim.Adam([p for p in bb.parameters() if p.requires_grad],
                               lr=3e-3 if rounds == 1 else 1e-3)
        decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / (EPOCHS * STEPS))
        for epoch in range(EPOCHS):
            for s in batches(STEPS * 8, 500 + 1000 * (rounds - 1) + epoch, local=True):
                hiddens, _ = bb(s["net_input"]["src_tokens"])
                loss = xent(bb.output_layer(hiddens[-1]), s["target"])
                opt.zero_grad()
                loss.backward()
                opt.step()
                decay.step()
        lookup = backbone_lookup(bb)
        if lookup >= LOOKUP_TARGET:
            break
    return bb.state_dict(), lookup, rounds


def train_and_score(state, disable_memory):
    cfg = LongMemGPT2Config(
        embed_dim=D, num_layers=LAYERS, num_heads=HEADS, max_positions=T, memory_layer=0,
        reduction_factor=1, memory_size=256, chunk_size=2, retrieved_tokens=16,
        search_backend="torch", disable_memory=disable_memory, dropout=0.0, max_target_positions=T)
    bb = GPT2Backbone(dims())
    bb.load_state_dict(state)
    torch.manual_seed(0)
    model = LongMemGPT2Model.from_backbone(cfg, DICT, bb)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    # decaying to 0 ends training at a settled point: at a constant rate the final recall swung
    # from 0.92 to 0.99 with the thread count (1 or 2) or the training documents; decayed, 0.97-0.99
    epochs, steps = 8, 256 * SEGS // 8
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / (epochs * steps))
    model.train()
    for epoch in range(epochs):
        for s in batches(256, 1000 + epoch):
            logits, _ = model(**s["net_input"])
            loss = xent(logits, s["target"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            decay.step()
    model.eval()
    share, total = recall(lambda s: model(**s["net_input"])[0], batches(128, 7))
    assert total == 128 * FACTS
    return share


def test_memory_is_read_for_recall_beyond_the_local_window(backbone_state):
    state, local_lookup, rounds = backbone_state
    assert local_lookup >= 0.9, (
        f"backbone's in-segment lookup only {local_lookup:.3f} after {rounds} rounds")
    with_memory = train_and_score(state, disable_memory=False)
    without_memory = train_and_score(state, disable_memory=True)
    print(f"recall 3 segments back: memory {with_memory:.3f}, memory off {without_memory:.3f}, "
          f"chance {1 / NV:.3f}; backbone in-segment lookup {local_lookup:.3f} after {rounds} "
          f"round(s) of {EPOCHS * STEPS} steps")
    assert with_memory >= 0.9
    assert without_memory <= 1 / NV + 0.1
