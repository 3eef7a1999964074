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
