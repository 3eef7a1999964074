"""The LongMem model in-process: frozen backbone, SideNet initialisation, causality, isolation
of rows and documents, write-after-read, and configuration errors."""

import copy

import pytest
import torch

from fairseq_longmem.families.gpt2.model import LongMemGPT2Config, LongMemGPT2Model
from tiny_longmem import D, DICT, HEADS, LAYERS, T, make_backbone, make_model, random_tokens, stream

def expected_trainable(d, layers, heads, r=2):
    block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    return (layers // r) * block + 2 * d + heads  # side blocks, final LayerNorm, gates


def test_only_sidenet_and_gates_train_and_backbone_stays_bit_identical():
    model = make_model().train()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith("decoder.sidenet.") for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == expected_trainable(D, LAYERS, HEADS)
    assert "decoder.sidenet.h.1.attn.gate" in trainable

    backbone_before = copy.deepcopy(model.decoder.backbone.state_dict())
    side_before = copy.deepcopy(model.decoder.sidenet.state_dict())
    opt = torch.optim.Adam(trainable.values(), lr=1e-2, weight_decay=0.01)
    tokens = random_tokens(2, 3 * T, seed=3)
    for s in range(3):
        src = tokens[:, s * T:(s + 1) * T]
        logits, _ = model(src_tokens=src, new_document=torch.tensor([s == 0] * 2))
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), src[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, t in model.decoder.backbone.state_dict().items():
        assert torch.equal(t, backbone_before[name]), name
    assert not model.decoder.backbone.training, "the frozen backbone must stay in eval mode"
    changed = [n for n, t in model.decoder.sidenet.state_dict().items() if not torch.equal(t, side_before[n])]
    assert len(changed) == len(side_before)
    assert model.decoder.sidenet.memory_attention.gate.grad is not None


def test_sidenet_is_initialised_from_odd_backbone_layers():
    model = LongMemGPT2Model.from_backbone(
        LongMemGPT2Config(embed_dim=D, num_layers=LAYERS, num_heads=HEADS, memory_layer=3,
                          memory_size=64, chunk_size=4, retrieved_tokens=8),
        DICT, make_backbone())
    dec = model.decoder
    for j, block in enumerate(dec.sidenet.h):
        source = dec.backbone.h[2 * j + 1].state_dict()
        for name, t in source.items():
            assert torch.equal(block.state_dict()[name], t), (j, name)
    assert torch.equal(dec.sidenet.memory_attention.gate, torch.zeros(HEADS))
    assert dec.sidenet.side_memory_layer == 1
    assert torch.equal(dec.sidenet.ln_f.weight, dec.backbone.ln_f.weight)


def test_empty_memory_gives_exactly_the_memory_off_output():
    on, off = make_model(), make_model(disable_memory=True)
    tokens = random_tokens(3, T, seed=1)
    assert torch.equal(stream(on, tokens), stream(off, tokens))


def test_memory_is_read_from_the_second_segment_on():
    on, off = make_model(), make_model(disable_memory=True)
    tokens = random_tokens(2, 2 * T, seed=2)
    a, b = stream(on, tokens), stream(off, tokens)
    assert torch.equal(a[:, :T], b[:, :T])
    assert (a[:, T:] - b[:, T:]).abs().max() > 1e-3


def test_later_segments_never_change_earlier_logits():
    tokens = random_tokens(2, 4 * T, seed=4)
    base = stream(make_model(), tokens)
    for t in range(3):
        changed = tokens.clone()
        changed[:, (t + 1) * T:] = random_tokens(2, (3 - t) * T, seed=40 + t)
        out = stream(make_model(), changed)
        assert torch.equal(out[:, :(t + 1) * T], base[:, :(t + 1) * T]), t
        assert not torch.equal(out[:, (t + 1) * T:], base[:, (t + 1) * T:])
    # and within a segment: a token never influences earlier positions
    changed = tokens.clone()
    changed[:, 2 * T + 5] = (changed[:, 2 * T + 5] - DICT.nspecial + 1) % (len(DICT) - DICT.nspecial) + DICT.nspecial
    out = stream(make_model(), changed)
    assert torch.equal(out[:, :2 * T + 5], base[:, :2 * T + 5])


def test_a_row_never_reads_another_rows_memory():
    tokens = random_tokens(4, 3 * T, seed=5)
    base = stream(make_model(), tokens)
    others = tokens.clone()
    others[1:] = random_tokens(3, 3 * T, seed=50)
    out = stream(make_model(), others)
    torch.testing.assert_close(out[0], base[0], rtol=0, atol=1e-5)
    assert not torch.allclose(out[1:], base[1:])
    # the same document alone in a batch of one
    alone = stream(make_model(), tokens[:1])
    torch.testing.assert_close(alone[0], base[0], rtol=0, atol=1e-5)


def test_a_new_document_starts_with_an_empty_memory():
    tokens = random_tokens(2, 3 * T, seed=6)
    # row 0 starts a new document at segment 2; row 1 continues
    out = stream(make_model(), tokens, new_document_at={(0, 2)})
    fresh = stream(make_model(), tokens[:, 2 * T:])
    torch.testing.assert_close(out[0, 2 * T:], fresh[0], rtol=0, atol=1e-5)
    assert not torch.allclose(out[1, 2 * T:], fresh[1], atol=1e-3)


def test_memory_statistics_come_in_the_extra_of_the_call_that_read():
    model = make_model()
    tokens = random_tokens(2, 2 * T, seed=11)
    gate = float(torch.sigmoid(model.decoder.sidenet.memory_attention.gate).mean())
    with torch.no_grad():
        _, first = model(src_tokens=tokens[:, :T], new_document=torch.tensor([True, True]))
        _, second = model(src_tokens=tokens[:, T:], new_document=torch.tensor([False, True]))
    first, second = first["memory_stats"], second["memory_stats"]
    assert float(first["fill"]) == 0.0 and float(first["memory_share"]) == 0.0  # nothing to read
    assert float(first["gate"]) == pytest.approx(gate) and float(second["gate"]) == pytest.approx(gate)
    # row 0 continues its document (T tokens in memory), row 1 starts one (cleared): every query
    # of row 0 reads memory and none of row 1's, so the share is half the mean gate
    assert float(second["fill"]) == T / 2
    assert float(second["memory_share"]) == pytest.approx(gate / 2)


def test_training_and_evaluation_memories_never_mix():
    model = make_model()
    tokens = random_tokens(2, 2 * T, seed=7)
    model.train()
    with torch.no_grad():
        for s in range(2):
            model(src_tokens=tokens[:, s * T:(s + 1) * T], new_document=torch.tensor([s == 0] * 2))
    model.eval()
    evaluation = torch.tensor([False, False])  # no reset flag: only the eval memory is read
    with torch.no_grad():
        logits, extra = model(src_tokens=tokens[:, :T], new_document=evaluation)
    assert float(extra["memory_stats"]["fill"]) == 0.0
    assert model.decoder.stream_memory("train").fill().tolist() == [2 * T, 2 * T]


def test_reset_memory_forgets_both_modes():
    model = make_model()
    tokens = random_tokens(2, 2 * T, seed=12)
    flags = torch.tensor([True, True])
    with torch.no_grad():
        model.train()
        model(src_tokens=tokens[:, :T], new_document=flags)
        model.eval()
        model(src_tokens=tokens[:, :T], new_document=flags)
        assert [model.decoder.stream_memory(m).fill().tolist() for m in ("train", "eval")] == [
            [T, T], [T, T]]
        model.decoder.reset_memory()
        assert [model.decoder.stream_memory(m) for m in ("train", "eval")] == [None, None]
        # the next segment, not flagged as a new document, reads nothing: as a fresh model does
        after, extra = model(src_tokens=tokens[:, T:], new_document=~flags)
        fresh, _ = make_model()(src_tokens=tokens[:, T:], new_document=~flags)
    assert float(extra["memory_stats"]["fill"]) == 0.0
    assert torch.equal(after, fresh)
    with pytest.raises(ValueError, match="mode 'valid', expected one of"):
        model.decoder.stream_memory("valid")


def test_padding_never_enters_memory():
    model = make_model()
    src = random_tokens(2, T, seed=8)
    src[1, 10:] = DICT.pad()
    with torch.no_grad():
        model(src_tokens=src, src_lengths=torch.tensor([T, 10]), new_document=torch.tensor([True, True]))
    bank = model.decoder.stream_memory("eval")
    assert bank.fill().tolist() == [T, 8]  # 10 tokens: two full chunks, two staged
    assert bank.staged().tolist() == [0, 2]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(chunk_size=0), "--chunk-size must be > 0"),
        (dict(memory_size=66), "multiple of --chunk-size"),
        (dict(retrieved_tokens=6), "--retrieved-tokens (6) must be a positive multiple"),
        (dict(retrieved_tokens=128), "exceeds --memory-size"),
        (dict(memory_layer=4), "--memory-layer 4 is not a layer of the 4-layer backbone: "
                               "expected 0 to 3"),
        (dict(memory_layer=-5), "--memory-layer -5 is not a layer of the 4-layer backbone: "
                                "expected 0 to 3"),
        (dict(reduction_factor=3), "--reduction-factor (3)"),
        (dict(max_target_positions=65), "--tokens-per-sample (65) exceeds the backbone's 64 "
                                        "positions"),
    ],
)
def test_bad_configuration_is_refused_clearly(overrides, message):
    with pytest.raises(ValueError) as e:
        make_model(**overrides)
    assert message in str(e.value)


def test_segments_longer_than_the_backbones_positions_are_refused_clearly():
    model = make_model()
    template = next(model.parameters())
    with pytest.raises(ValueError, match=r"--tokens-per-sample \(65\) exceeds the backbone's 64"):
        model.decoder.start_decoding(2, template, segment_len=65)
    with pytest.raises(ValueError, match="segment of 65 tokens is longer than the model's 64"):
        model.decoder.backbone(random_tokens(1, 65, seed=0))


def test_a_changed_batch_size_resets_the_memory():
    model = make_model()
    tokens = random_tokens(3, 2 * T, seed=9)
    with torch.no_grad():
        model(src_tokens=tokens[:2, :T], new_document=torch.tensor([True, True]))
        _, extra = model(src_tokens=tokens[:, T:], new_document=torch.tensor([False] * 3))
    assert float(extra["memory_stats"]["fill"]) == 0.0  # read an empty memory, not rows 0-1's
    assert model.decoder.stream_memory("eval").fill().tolist() == [T, T, T]


def test_memory_off_freezes_the_unused_gate():
    model = make_model(disable_memory=True)
    assert not model.decoder.sidenet.memory_attention.gate.requires_grad
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected_trainable(D, LAYERS, HEADS) - HEADS
    _, extra = model(src_tokens=random_tokens(1, T, seed=10), new_document=torch.tensor([True]))
    assert "memory_stats" not in extra
    assert [model.decoder.stream_memory(m) for m in ("train", "eval")] == [None, None]
