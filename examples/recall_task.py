"""The synthetic key-value recall task shared by examples/recall_distance.py and
tests/test_memory_recall.py: its vocabulary, documents, batches, scoring and the backbone that
first learns the lookup within a segment.

A document states FACTS key-value facts in its first segment and asks for them ``distance``
segments later. A fact is one token ``c_{i,j}`` (key i, value j); an ask is the key token ``k_i``
followed by the value token ``v_j``; recall is the share of asked values predicted exactly. The
backbone's token embeddings are compositional (``c_{i,j} = (k_i + v_j) / sqrt 2``), standing in for
what pretraining gives a real LM. Every random draw goes through the ``random.Random`` and torch
seeds given here, in a fixed order, so a run's figures are reproducible on the same machine.
"""

import random

import torch
from fairseq.data import Dictionary

from fairseq_longmem.families.gpt2.model import LongMemGPT2Config, LongMemGPT2Model
from fairseq_longmem.families.gpt2.modules import GPT2Backbone, GPT2Dims
from fairseq_longmem.tasks.document_stream import DocumentStreamDataset

NK, NV, NF, T, FACTS, ROWS = 8, 8, 32, 32, 4, 8
D, LAYERS, HEADS = 128, 4, 4


class Vocab:
    """Keys ``k_i``, values ``v_j``, fact tokens ``c_{i,j}`` and filler in a fairseq Dictionary."""

    def __init__(self):
        self.dict = Dictionary()
        self.keys = [self.dict.add_symbol(f"k{i}") for i in range(NK)]
        self.values = [self.dict.add_symbol(f"v{j}") for j in range(NV)]
        self.fact = {(i, j): self.dict.add_symbol(f"c{i}_{j}") for i in range(NK) for j in range(NV)}
        self.filler = [self.dict.add_symbol(f"f{i}") for i in range(NF)]


def make_document(v: Vocab, rng, distance):
    """Facts in segment 0, asked in segment ``distance``; ``distance=0``: facts in the first half
    of a single segment and asked in its second half (the backbone's in-context lookup). Each
    fact is asked once per ask segment, so an answer is never in the local window."""
    keys, values = rng.sample(range(NK), FACTS), [rng.randrange(NV) for _ in range(FACTS)]
    first = [rng.choice(v.filler) for _ in range(T)]
    for i, j, p in zip(keys, values, rng.sample(range(T // 2) if distance == 0 else range(T), FACTS)):
        first[p] = v.fact[(i, j)]
    ask_segment = first if distance == 0 else [rng.choice(v.filler) for _ in range(T)]
    slots = range(T // 2, T - 1, 2) if distance == 0 else range(0, T - 1, 2)
    for p, n in zip(rng.sample(slots, FACTS), rng.sample(range(FACTS), FACTS)):
        ask_segment[p], ask_segment[p + 1] = v.keys[keys[n]], v.values[values[n]]
    if distance == 0:
        return torch.tensor(first, dtype=torch.int32)
    middle = [rng.choice(v.filler) for _ in range(T * (distance - 1))]
    return torch.tensor(first + middle + ask_segment, dtype=torch.int32)


def batches(v: Vocab, distances, n_docs, seed):
    """``n_docs`` documents, distances taken in turn from ``distances``, streamed in ROWS rows."""
    rng = random.Random(seed)
    docs = [make_document(v, rng, distances[k % len(distances)]) for k in range(n_docs)]
    ds = DocumentStreamDataset(docs, v.dict.pad(), v.dict.eos(), T, ROWS, 0, 1)
    return [ds.collater([ds[t]]) for t in range(len(ds))]


def answers(v: Vocab, sample):
    """Where the target is an asked value: the input is a key and the target a value token."""
    src, tgt = sample["net_input"]["src_tokens"], sample["target"]
    is_key = (src >= v.keys[0]) & (src <= v.keys[-1])
    return is_key & (tgt >= v.values[0]) & (tgt <= v.values[-1])


def recall(v: Vocab, logits_of, samples):
    """Share of asked values predicted right, and how many were asked; ``logits_of(sample)``."""
    hit = total = 0
    with torch.no_grad():
        for s in samples:
            m = answers(v, s)
            hit += (logits_of(s).argmax(-1)[m] == s["target"][m]).sum().item()
            total += m.sum().item()
    return hit / max(total, 1), total


def xent(v: Vocab, logits, target):
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), target.flatten(), ignore_index=v.dict.pad())


def dims(v: Vocab) -> GPT2Dims:
    return GPT2Dims(vocab_size=len(v.dict), embed_dim=D, num_layers=LAYERS, num_heads=HEADS,
                    max_positions=T, dropout=0.0, attention_dropout=0.0)


def train_backbone(v: Vocab, epochs, steps, rounds=1, target=1.0, seed=0):
    """A backbone with compositional, frozen token embeddings, trained on in-segment lookups in
    rounds of ``epochs`` x ``steps`` (learning rate decaying to 0 in each; later rounds continue
    at a lower rate on fresh documents) until its lookup reaches ``target``, at most ``rounds``
    rounds; ``seed`` draws its initial weights. Returns (backbone, in-segment lookup, rounds
    trained)."""
    torch.manual_seed(seed)
    bb = GPT2Backbone(dims(v))
    with torch.no_grad():
        k, val = 0.3 * torch.randn(NK, D), 0.3 * torch.randn(NV, D)
        bb.wte.weight.normal_(0, 0.3)  # about GPT-2's embedding norm
        for i in range(NK):
            bb.wte.weight[v.keys[i]] = k[i]
        for j in range(NV):
            bb.wte.weight[v.values[j]] = val[j]
        for (i, j), t in v.fact.items():
            bb.wte.weight[t] = (k[i] + val[j]) / 2 ** 0.5
    bb.wte.weight.requires_grad_(False)
    logits_of = lambda s: bb.logits(bb(s["net_input"]["src_tokens"])[0][-1])  # noqa: E731
    for done in range(1, rounds + 1):
        opt = torch.optim.Adam([p for p in bb.parameters() if p.requires_grad],
                               lr=3e-3 if done == 1 else 1e-3)
        decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / (epochs * steps))
        for epoch in range(epochs):
            for s in batches(v, (0,), steps * ROWS, 500 + 1000 * (done - 1) + epoch):
                loss = xent(v, logits_of(s), s["target"])
                opt.zero_grad()
                loss.backward()
                opt.step()
                decay.step()
        lookup, _ = recall(v, logits_of, batches(v, (0,), 64, 7))
        if lookup >= target:
            break
    return bb, lookup, done


def longmem(v: Vocab, bb, memory_size, disable_memory):
    """LongMem over a copy of ``bb``: memory layer 0 with r = 1 (its SideNet layer starts as a
    copy of the layer where the backbone does its lookup, so queries start matched to the keys
    in memory), csz 2, K 16."""
    cfg = LongMemGPT2Config(
        embed_dim=D, num_layers=LAYERS, num_heads=HEADS, max_positions=T, memory_layer=0,
        reduction_factor=1, memory_size=memory_size, chunk_size=2, retrieved_tokens=16,
        search_backend="torch", disable_memory=disable_memory, dropout=0.0, max_target_positions=T)
    backbone = GPT2Backbone(dims(v))
    backbone.load_state_dict(bb.state_dict())
    torch.manual_seed(0)
    return LongMemGPT2Model.from_backbone(cfg, v.dict, backbone)


def train_longmem(v: Vocab, model, epochs, docs, distances, decay=False):
    """``epochs`` epochs of ``docs`` documents (seeds 1000 + epoch) at Adam lr 3e-3, decaying
    linearly to 0 over the run if ``decay``; leaves the model in eval mode."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    epoch_batches = [batches(v, distances, docs, 1000 + epoch) for epoch in range(epochs)]
    steps = epochs * len(epoch_batches[0])
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, (lambda step: 1 - step / steps) if decay else (lambda step: 1.0))
    model.train()
    for samples in epoch_batches:
        for s in samples:
            logits, _ = model(**s["net_input"])
            loss = xent(v, logits, s["target"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
    model.eval()


def score(v: Vocab, model, distances, eval_docs):
    """Recall per distance, each on its own documents (seed 7 + d: the same for every model)."""
    model.decoder.reset_memory()
    return {d: recall(v, lambda s: model(**s["net_input"])[0], batches(v, (d,), eval_docs, 7 + d))
            for d in distances}
