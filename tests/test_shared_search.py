"""One memory search shared by a group of memory layers (--search-every): the lowest layer of a
group searches with its queries, the group's other layers read the chunks it chose from their own
memories."""

import pytest
import torch

from fairseq_longmem.memory.bank import ChunkedMemoryBank
from fairseq_longmem.memory.layered import LayeredMemory
from fairseq_longmem.models.training_free import FreeReadConfig, TrainingFreeDecoder
from fairseq_longmem.modules.decoding_state import SharedPromptMemory
from tiny_longmem import DICT, T, make_backbone, make_model, random_tokens, stream

FAMILIES = ("gpt2", "llama")
# a SideNet of trainable copies of blocks 1-3, each reading the memory of its own block
TOP_COPY = dict(reduction_factor=1, sidenet_from=1, read_layers="1-3", sidenet_residual="none",
                memory_read="joint", sidenet_copy="first", sidenet_init="paper")


def top_copy(family, **overrides):
    return make_model(family=family, **dict(TOP_COPY, **overrides))


class SearchLog:
    """Every bank search and gather during a forward: (bank, chunk slots)."""

    def __init__(self, monkeypatch):
        self.searched, self.gathered, self.range_checked = [], [], []
        search, gather = ChunkedMemoryBank.search, ChunkedMemoryBank.gather
        log = self

        def logged_search(bank, queries, k):
            found = search(bank, queries, k)
            log.searched.append((bank, found.chunk_index))
            return found

        def logged_gather(bank, slots, check_range=True):
            log.gathered.append((bank, slots))
            log.range_checked.append(check_range)
            return gather(bank, slots, check_range)

        monkeypatch.setattr(ChunkedMemoryBank, "search", logged_search)
        monkeypatch.setattr(ChunkedMemoryBank, "gather", logged_gather)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("every, groups", [(1, [[1], [2], [3]]), (2, [[1, 2], [3]]),
                                           (3, [[1, 2, 3]]), (8, [[1, 2, 3]])])
@torch.no_grad()
def test_each_group_searches_once_and_its_layers_read_the_chunks_it_chose(
        family, every, groups, monkeypatch):
    model = top_copy(family, search_every=every)
    dec = model.decoder
    tokens = random_tokens(2, 4 * T, seed=1)
    stream(model, tokens[:, :3 * T])
    memory = dec.stream_memory("eval")
    log = SearchLog(monkeypatch)
    model(src_tokens=tokens[:, 3 * T:], new_document=torch.tensor([False, False]))
    bank_layer = {id(memory.layer(i)): i for i in memory.layers}
    assert [bank_layer[id(b)] for b, _ in log.searched] == [g[0] for g in groups]
    assert [bank_layer[id(b)] for b, _ in log.gathered] == [i for g in groups for i in g[1:]]
    leader_slots = {g[0]: slots for (_, slots), g in zip(log.searched, groups)}
    for bank, slots in log.gathered:
        layer = bank_layer[id(bank)]
        leader = next(g[0] for g in groups if layer in g)
        assert slots is leader_slots[leader]  # the very chunks the group's search chose
    # a bank as large as its leader's takes the leader's slots without a range check (host sync)
    assert log.range_checked == [False] * len(log.gathered)
    # 3 segments of 16 tokens = 12 chunks in memory, 2 retrieved per query: a real choice
    assert memory.fill().tolist() == [4 * T, 4 * T]
    assert all(int(s.max()) >= 2 for _, s in log.searched)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_with_every_chunk_retrieved_a_shared_search_reads_what_each_layer_finds_itself(family):
    """A search that retrieves every stored chunk finds the same set whoever asks (only the order
    differs, which a softmax ignores): a shared search then reads exactly what each layer's own
    search reads, so each layer reads its own keys and values at the chosen positions. With 2
    of 12 chunks retrieved, the shared search reads other chunks and the logits differ."""
    tokens = random_tokens(2, 4 * T, seed=2)
    full = dict(memory_size=48, retrieved_tokens=48)  # 3 segments, all retrieved
    own = stream(top_copy(family, **full), tokens)
    shared = stream(top_copy(family, search_every=3, **full), tokens)
    assert (own - shared).abs().max() < 1e-5
    few = dict(memory_size=48, retrieved_tokens=8)
    own = stream(top_copy(family, **few), tokens)
    shared = stream(top_copy(family, search_every=3, **few), tokens)
    assert torch.equal(own[:, :T], shared[:, :T])  # the first segment reads no memory
    assert (own[:, T:] - shared[:, T:]).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_a_shared_search_keeps_causality_and_row_isolation(family):
    tokens = random_tokens(3, 3 * T, seed=3)
    base = stream(top_copy(family, search_every=3), tokens)
    changed = tokens.clone()
    changed[:, 2 * T:] = random_tokens(3, T, seed=30)
    assert torch.equal(stream(top_copy(family, search_every=3), changed)[:, :2 * T],
                       base[:, :2 * T])
    others = tokens.clone()
    others[1:] = random_tokens(2, 3 * T, seed=31)
    out = stream(top_copy(family, search_every=3), others)
    torch.testing.assert_close(out[0], base[0], rtol=0, atol=1e-5)
    fresh = stream(top_copy(family, search_every=3), tokens, new_document_at={(0, 2)})
    alone = stream(top_copy(family, search_every=3), tokens[:1, 2 * T:])
    torch.testing.assert_close(fresh[0, 2 * T:], alone[0], rtol=0, atol=1e-5)


@torch.no_grad()
def test_a_layered_memory_of_shared_prompts_says_why_it_cannot_serve_a_shared_search():
    """Beams of one prompt share its memory (SharedPromptMemory) only when each layer searches
    itself; generation copies the prompt's memory per beam otherwise
    (tests/test_multi_layer_memory.py, decoding); a shared search on shared prompts is refused."""
    opts = dict(num_heads=2, head_dim=8, chunk_size=4, memory_size=32, dtype=torch.float32,
                device="cpu")
    prompts = LayeredMemory((1, 2, 3), num_rows=1, **opts)
    prompts.add(torch.randn(3, 1, 2, 16, 8), torch.randn(3, 1, 2, 16, 8))
    beams = LayeredMemory((1, 2, 3), num_rows=2, **opts)
    shared = LayeredMemory.from_banks({
        i: SharedPromptMemory(prompts.layer(i), 2, beams.layer(i)) for i in (1, 2, 3)})
    views = shared.shared_search(3)
    q = torch.randn(2, 2, 1, 8)
    assert views[1].search(q, 8).keys.shape == (2, 2, 1, 8, 8)
    with pytest.raises(ValueError, match="reads banks that can gather chunks by slot; "
                       "SharedPromptMemory cannot"):
        views[2].search(q, 8)


def test_a_layer_that_reads_before_its_group_searched_is_an_error():
    opts = dict(num_rows=1, num_heads=2, head_dim=8, chunk_size=4, memory_size=32,
                dtype=torch.float32, device="cpu")
    memory = LayeredMemory((1, 2, 3), **opts)
    memory.add(torch.randn(3, 1, 2, 16, 8), torch.randn(3, 1, 2, 16, 8))
    views = memory.shared_search(3)
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(RuntimeError, match="layer 2 reads before layer 1 searched"):
        views[2].search(q, 8)
    found = views[1].search(q, 8)
    with pytest.raises(RuntimeError, match=r"layer 3 asks with queries \(1, 2, 4, 8\) and k=8"):
        views[3].search(q[:, :, :4], 8)
    again = views[3].search(q, 8)
    assert torch.equal(again.chunk_index, found.chunk_index)
    assert torch.equal(again.keys, memory.layer(3).gather(found.chunk_index).keys)
    assert not torch.equal(again.keys, found.keys)  # layer 3's keys, not layer 1's
    with pytest.raises(ValueError, match=r"gather: expected slots of shape \(1, 2, T, chunks\)"):
        memory.layer(1).gather(found.chunk_index[0])
    with pytest.raises(ValueError, match=r"gather: slots must lie in \[-1, 8\)"):
        memory.layer(1).gather(found.chunk_index + 8)
    with pytest.raises(ValueError, match="--search-every must be an integer >= 1, got 0"):
        memory.shared_search(0)


def test_a_follower_smaller_than_its_leader_still_checks_the_slots_it_is_given():
    from fairseq_longmem.memory.layered import _SearchGroupLayer, _SharedSearch
    opts = dict(num_rows=1, num_heads=2, head_dim=8, chunk_size=4, dtype=torch.float32,
                device="cpu")
    big = ChunkedMemoryBank(memory_size=64, **opts)
    small = ChunkedMemoryBank(memory_size=32, **opts)
    big.add(torch.randn(1, 2, 64, 8), torch.randn(1, 2, 64, 8))
    small.add(torch.randn(1, 2, 32, 8), torch.randn(1, 2, 32, 8))
    search = _SharedSearch([1, 2])
    leader, follower = _SearchGroupLayer(big, search, 1), _SearchGroupLayer(small, search, 2)
    q = torch.randn(1, 2, 3, 8)
    found = leader.search(q, 64)  # every one of the leader's 16 chunks: slots up to 15
    assert int(found.chunk_index.max()) == 15
    with pytest.raises(ValueError, match=r"gather: slots must lie in \[-1, 8\)"):
        follower.search(q, 64)


@pytest.mark.parametrize("value", [0, -1, 2.5])
def test_a_bad_search_every_is_refused_in_one_line(value):
    with pytest.raises(ValueError, match=f"--search-every {value}: expected an integer >= 1"):
        top_copy("llama", search_every=value)


def free_read(family, search_every=1, memory_size=48, retrieved_tokens=8):
    """The training-free read by the frozen blocks 1-3 (--training-free-memory)."""
    cfg = FreeReadConfig(layers=(1, 2, 3), memory_size=memory_size, chunk_size=4,
                         retrieved_tokens=retrieved_tokens, max_target_positions=T,
                         search_every=search_every)
    return TrainingFreeDecoder(DICT, make_backbone(0, family), False, cfg).eval()


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_the_training_free_read_shares_a_search_the_same_way(family, monkeypatch):
    """--free-search-every: one search for blocks 1-3, whose other blocks read its chunks from
    their own memories; with every chunk retrieved the same logits as each block's own search."""
    tokens = random_tokens(2, 4 * T, seed=6)

    def read(dec):
        memory = dec.new_memory(2, dec.cfg.memory_size, dec.backbone.output_weight)
        for s in range(3):
            memory.add(*dec.memory_keys_values(tokens[:, s * T:(s + 1) * T]))
        out, _ = dec(tokens[:, 3 * T:], memory=memory, write_memory=False)
        return out, memory

    own, _ = read(free_read(family))
    every_chunk = dict(memory_size=48, retrieved_tokens=48)
    assert (read(free_read(family, 3, **every_chunk))[0]
            - read(free_read(family, 1, **every_chunk))[0]).abs().max() < 1e-5
    log = SearchLog(monkeypatch)
    shared, memory = read(free_read(family, 3))
    assert [b for b, _ in log.searched] == [memory.layer(1)]
    assert [b for b, _ in log.gathered] == [memory.layer(2), memory.layer(3)]
    assert all(slots is log.searched[0][1] for _, slots in log.gathered)
    assert (shared - own).abs().max() > 1e-3
    with pytest.raises(ValueError, match="--free-search-every 0: expected an integer >= 1"):
        free_read(family, 0)
