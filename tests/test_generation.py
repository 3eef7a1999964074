"""Text generation with long-term memory: incremental decoding against the full forward, the
segment and beam rules, and fairseq-generate / fairseq-interactive on ``--task longmem_lm``."""

import math

import pytest
import torch

from fairseq_longmem.modules.decoding_state import SharedPromptMemory
from test_longmem_model import DICT, T, make_model, random_tokens, stream

SEGMENTS = 5  # 4 boundaries; the 64-token memory is full after 4 segments, so FIFO is crossed


def incremental_logits(model, tokens, state=None):
    """(B, n, V) logits of ``tokens`` fed one at a time through the incremental state."""
    dec = model.decoder
    if state is None:
        state = dec.start_decoding(tokens.size(0), dec.backbone.wte.weight, segment_len=T)
    return torch.cat([dec.advance(tokens[:, i:i + 1], state) for i in range(tokens.size(1))],
                     dim=1), state


def test_token_by_token_log_probs_equal_the_full_forward_across_segments():
    model = make_model()
    tokens = random_tokens(3, SEGMENTS * T, seed=5)
    full = stream(model, tokens).log_softmax(-1)
    step, _ = incremental_logits(model, tokens)
    assert (step.log_softmax(-1) - full).abs().max() < 1e-5
    # the memory was read: memory off gives other numbers
    off = stream(make_model(disable_memory=True), tokens).log_softmax(-1)
    assert (off[:, T:] - full[:, T:]).abs().max() > 1e-3


def test_prefill_memory_is_bit_identical_to_the_evaluation_memory():
    model = make_model()
    tokens = random_tokens(2, 3 * T + 5, seed=6)
    stream(model, tokens[:, :3 * T])  # eval: full segments write their memory
    evaluated = model.decoder.stream_memory("eval")
    dec = model.decoder
    state = dec.start_decoding(2, dec.backbone.wte.weight, segment_len=T)
    dec.prefill(tokens, state)
    assert state.pos == 5
    for name in ("_keys", "_values", "_summaries"):
        assert torch.equal(getattr(state.memory, name), getattr(evaluated, name)), name
    assert state.memory.fill().tolist() == evaluated.fill().tolist() == [48, 48]


def test_prefill_then_steps_equal_token_by_token():
    model = make_model()
    tokens = random_tokens(2, 4 * T + 3, seed=7)
    dec = model.decoder
    state = dec.start_decoding(2, dec.backbone.wte.weight, segment_len=T)
    last = dec.prefill(tokens[:, :2 * T + 7], state)
    rest, _ = incremental_logits(model, tokens[:, 2 * T + 7:], state)
    step, _ = incremental_logits(model, tokens)
    assert (last.log_softmax(-1) - step[:, 2 * T + 6].log_softmax(-1)).abs().max() < 1e-5
    assert (rest.log_softmax(-1) - step[:, 2 * T + 7:].log_softmax(-1)).abs().max() < 1e-5


def test_per_token_state_does_not_grow_with_the_generated_length():
    model = make_model()
    dec = model.decoder
    tokens = random_tokens(2, 8 * T, seed=8)
    state = dec.start_decoding(2, dec.backbone.wte.weight, segment_len=T)
    sizes = []
    for i in range(tokens.size(1)):
        dec.advance(tokens[:, i:i + 1], state)
        if i % T == 3:
            sizes.append([tuple(t.shape) for t in state.tensors()])
    assert len(sizes) == 8 and all(s == sizes[0] for s in sizes)
    assert state.memory.fill().tolist() == [64, 64]  # full: FIFO from here on


def hypotheses_run(model, prompts, beam, steps, share, seed):
    """Prefill ``prompts`` (R, n), expand to ``beam`` hypotheses each, then at every step
    reorder the hypotheses at random (within each prompt's group, as beam search does) and feed
    each a random token. Returns the per-step logits (R*beam, V), each final hypothesis's history
    and lineage (the row that held its ancestor at every step) and the state."""
    dec = model.decoder
    R = prompts.size(0)
    state = dec.start_decoding(R, dec.backbone.wte.weight, segment_len=T)
    dec.prefill(prompts, state)
    state.expand(beam, lambda rows: dec.new_memory(rows, dec.cfg.memory_size,
                                                   dec.backbone.wte.weight), share)
    g = torch.Generator().manual_seed(seed)
    histories = [prompts[n // beam].tolist() for n in range(R * beam)]
    outs, orders = [], []
    for _ in range(steps):
        within = torch.randint(0, beam, (R, beam), generator=g)
        order = (torch.arange(R)[:, None] * beam + within).view(-1)
        state.reorder(order)
        orders.append(order)
        histories = [list(histories[o]) for o in order.tolist()]
        tok = torch.randint(DICT.nspecial, len(DICT), (R * beam, 1), generator=g)
        outs.append(dec.advance(tok, state)[:, 0])
        for n in range(R * beam):
            histories[n].append(int(tok[n]))
    lineage = [torch.arange(R * beam)]
    for order in reversed(orders[1:]):
        lineage.insert(0, order[lineage[0]])
    return outs, histories, lineage, state


@pytest.mark.parametrize("share", [True, False])
def test_every_beam_reads_its_own_history_across_segment_boundaries(share):
    model = make_model(memory_size=256)  # prompt + generated fit: sharing is exact
    prompts = random_tokens(2, 2 * T + 9, seed=9)
    steps = 2 * T  # crosses two boundaries: each beam writes segments of its own
    outs, histories, lineage, state = hypotheses_run(model, prompts, 3, steps, share, seed=10)
    assert isinstance(state.memory, SharedPromptMemory) == share
    if share:
        assert state.memory.prompt.num_rows == 2 and state.memory.generated.num_rows == 6
        assert state.memory.generated.fill().tolist() == [32] * 6  # two generated segments
    for n, history in enumerate(histories):
        alone, _ = incremental_logits(model, torch.tensor([history]))
        got = torch.stack([o[rows[n]] for o, rows in zip(outs, lineage)])  # (steps, V)
        want = alone[0, -steps:]
        assert (got.log_softmax(-1) - want.log_softmax(-1)).abs().max() < 1e-5, n
    # beams do hold different histories, and so read different memories
    assert len({tuple(h) for h in histories[:3]}) == 3
