"""``--sidenet-init zero-out``: the SideNet starts equal to its backbone (every side block adds
nothing, the cross-network residual telescopes to the backbone's last hidden state), and the
first step's gradients reach the zeroed output projections. ``read-delta``: the same, except that
the memory block adds what the memory changes in its copied attention, g * (A_mem - A_local)."""

import pytest
import torch
import torch.nn.functional as F
from fairseq.data import Dictionary

from fairseq_longmem.families.gpt2.model import LongMemGPT2Config, LongMemGPT2Model
from fairseq_longmem.families.gpt2.modules import GPT2Backbone, GPT2Dims
from fairseq_longmem.modules.sidenet import SideNet

D, LAYERS, HEADS, T = 64, 4, 4, 16
DICT = Dictionary()
for i in range(40):
    DICT.add_symbol(f"w{i}")


def make_model(init, **overrides):
    torch.manual_seed(0)
    dims = GPT2Dims(vocab_size=len(DICT), embed_dim=D, num_layers=LAYERS, num_heads=HEADS,
                    max_positions=64, dropout=0.0, attention_dropout=0.0)
    options = dict(embed_dim=D, num_layers=LAYERS, num_heads=HEADS, max_positions=64,
                   memory_layer=3, memory_size=64, chunk_size=4, retrieved_tokens=8,
                   search_backend="torch", dropout=0.0, max_target_positions=T,
                   sidenet_init=init)
    options.update(overrides)
    return LongMemGPT2Model.from_backbone(LongMemGPT2Config(**options), DICT, GPT2Backbone(dims))


def tokens(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(DICT.nspecial, len(DICT), (2, T), generator=g)


def telescoped(backbone, src, r=2):
    """ln_f(h_0 + (h_2 - h_0) + (h_4 - h_2) + ...): the SideNet's output when its blocks add
    exactly zero, in the SideNet's own order of float additions."""
    hiddens, _ = backbone(src)
    s = hiddens[0]
    for i in range(1, LAYERS // r + 1):
        s = s + (hiddens[r * i] - hiddens[r * (i - 1)])
    return backbone.logits(s)


@torch.no_grad()
def test_zero_out_starts_equal_to_the_backbone_with_memory_off_and_on():
    on = make_model("zero-out").eval()
    off = make_model("zero-out", disable_memory=True).eval()
    backbone = on.decoder.backbone
    for seg in range(3):  # segment 0 reads an empty memory, 1 and 2 a filled one
        src = tokens(seg)
        flags = torch.tensor([seg == 0, seg == 0])
        logits_on, extra = on(src_tokens=src, new_document=flags)
        logits_off, _ = off(src_tokens=src, new_document=flags)
        assert float(extra["memory_stats"]["fill"]) == 16 * seg
        # bit for bit the telescoped residual sum, with memory off and on (the memory block's
        # output projection is zero too, so a filled memory changes nothing either)
        reference = telescoped(backbone, src)
        assert torch.equal(logits_on, reference) and torch.equal(logits_off, reference)
        # and the backbone's own logits up to the rounding of h_0 + (h_2 - h_0) + ... vs h_L
        hiddens, _ = backbone(src)
        own = backbone.logits(hiddens[-1])
        assert (logits_on - own).abs().max() < 1e-5


@torch.no_grad()
def test_paper_init_does_not_start_equal_to_the_backbone():
    model = make_model("paper").eval()
    src = tokens(0)
    logits, _ = model(src_tokens=src, new_document=torch.tensor([True, True]))
    hiddens, _ = model.decoder.backbone(src)
    assert (logits - model.decoder.backbone.logits(hiddens[-1])).abs().max() > 1e-2
    block = model.decoder.sidenet.h[0]
    assert torch.equal(block.mlp.c_proj.weight, model.decoder.backbone.h[1].mlp.c_proj.weight)


def test_zero_out_gradients_reach_the_output_projections_at_the_first_step():
    model = make_model("zero-out").train()
    src = tokens(0)
    flags = torch.tensor([True, True])
    with torch.no_grad():
        model(src_tokens=src, new_document=flags)  # fill the memory: the read path is live
    logits, _ = model(src_tokens=tokens(1), new_document=torch.tensor([False, False]))
    F.cross_entropy(logits.flatten(0, 1), tokens(2).flatten()).backward()
    for j, block in enumerate(model.decoder.sidenet.h):
        for proj in (block.attn.c_proj, block.mlp.c_proj):
            assert proj.weight.grad.abs().sum() > 0 and proj.bias.grad.abs().sum() > 0, j
        # behind a zero projection nothing else moves at the first step; from the second on it
        # does, once the projections are no longer zero
        assert block.mlp.c_fc.weight.grad.abs().sum() == 0
        assert block.attn.c_attn.weight.grad.abs().sum() == 0
    assert model.decoder.sidenet.memory_attention.gate.grad.abs().sum() == 0


@torch.no_grad()
def test_read_delta_equals_the_backbone_until_the_memory_holds_something():
    on = make_model("read-delta").eval()
    off = make_model("read-delta", disable_memory=True).eval()
    backbone, side = on.decoder.backbone, on.decoder.sidenet
    for j, block in enumerate(side.h):
        attn_proj, mlp_proj = block.output_projections()
        assert not mlp_proj.weight.any() and not mlp_proj.bias.any() and not attn_proj.bias.any()
        if j == side.side_memory_layer:  # memory layer 3, r 2, copy last: backbone block 3
            assert torch.equal(attn_proj.weight, backbone.h[3].attn.c_proj.weight)
        else:
            assert not attn_proj.weight.any(), j
    for seg in range(3):
        src = tokens(seg)
        flags = torch.tensor([seg == 0, seg == 0])
        logits_on, _ = on(src_tokens=src, new_document=flags)
        logits_off, _ = off(src_tokens=src, new_document=flags)
        reference = telescoped(backbone, src)
        assert torch.equal(logits_off, reference)
        if seg == 0:  # an empty memory: nothing read, the backbone exactly
            assert torch.equal(logits_on, reference)
        else:
            assert (logits_on - reference).abs().max() > 1e-3


@torch.no_grad()
def test_read_delta_adds_the_joint_attention_minus_the_local_one():
    model = make_model("read-delta", gate_init=0.7).eval()
    model(src_tokens=tokens(0), new_document=torch.tensor([True, True]))  # fill the memory
    dec = model.decoder
    attn = dec.sidenet.memory_attention
    x = torch.randn(2, T, D)
    captured = {}  # the memory the block reads in the model's own forward

    def keep(module, args, kwargs, out):
        captured.setdefault("memory", kwargs.get("memory"))
    handle = attn.register_forward_hook(keep, with_kwargs=True)
    model(src_tokens=tokens(1), new_document=torch.tensor([False, False]))
    handle.remove()
    memory = captured["memory"]
    assert memory is not None
    delta, _ = attn(x, memory=memory, retrieved_tokens=8)
    attn.delta = False
    joint, _ = attn(x, memory=memory, retrieved_tokens=8)
    local, _ = attn(x)
    attn.delta = True
    torch.testing.assert_close(delta, joint - local, rtol=0, atol=1e-5)
    # the paper's mix with the same gate: joint - local = g * (A_mem - A_local), through o
    assert delta.abs().max() > 1e-3
    off, _ = attn(x)
    assert not off.any()  # memory off: the delta block's attention adds nothing


def test_read_delta_gradients_reach_the_memory_read_at_the_first_step():
    model = make_model("read-delta").train()
    with torch.no_grad():
        model(src_tokens=tokens(0), new_document=torch.tensor([True, True]))
    logits, _ = model(src_tokens=tokens(1), new_document=torch.tensor([False, False]))
    F.cross_entropy(logits.flatten(0, 1), tokens(2).flatten()).backward()
    side = model.decoder.sidenet
    attn = side.memory_attention
    # unlike zero-out, the read's queries and the gate learn from the first step
    assert attn.c_attn.weight.grad.abs().sum() > 0 and attn.gate.grad.abs().sum() > 0
    other = side.h[0] if side.side_memory_layer else side.h[1]
    assert other.attn.c_attn.weight.grad.abs().sum() == 0

    # memory off: the read-delta block adds nothing, yet every parameter of it is in the graph
    # (data-parallel training fails on a parameter without a gradient)
    off = make_model("read-delta", disable_memory=True).train()
    logits, _ = off(src_tokens=tokens(1), new_document=torch.tensor([True, True]))
    F.cross_entropy(logits.flatten(0, 1), tokens(2).flatten()).backward()
    block = off.decoder.sidenet.h[off.decoder.sidenet.side_memory_layer]
    assert all(p.grad is not None for n, p in block.named_parameters() if p.requires_grad), [
        n for n, p in block.named_parameters() if p.requires_grad and p.grad is None]


def test_sidenet_init_rejects_an_unknown_choice():
    backbone = GPT2Backbone(GPT2Dims(vocab_size=40, embed_dim=D, num_layers=LAYERS,
                                     num_heads=HEADS, max_positions=64))
    with pytest.raises(ValueError, match=r"--sidenet-init 'zero': expected one of paper, zero-out, read-delta"):
        SideNet(backbone, 2, 3, 0.0, 0.0, init="zero")


def test_gate_init_and_gate_lr_scale():
    model = make_model("paper", gate_init=1.5, gate_lr_scale=10.0).train()
    attn = model.decoder.sidenet.memory_attention
    assert torch.sigmoid(attn.gate * attn.gate_scale).tolist() == pytest.approx(
        [torch.sigmoid(torch.tensor(1.5)).item()] * HEADS)
    with torch.no_grad():
        model(src_tokens=tokens(0), new_document=torch.tensor([True, True]))
    logits, _ = model(src_tokens=tokens(1), new_document=torch.tensor([False, False]))
    F.cross_entropy(logits.flatten(0, 1), tokens(2).flatten()).backward()
    before = (attn.gate * attn.gate_scale).detach().clone()
    torch.optim.Adam([attn.gate], lr=1e-3).step()
    # Adam's first step moves the parameter by lr (times the sign of its gradient): the logit
    # moves ten times that
    moved = (attn.gate * attn.gate_scale).detach() - before
    assert moved.abs().tolist() == pytest.approx([1e-2] * HEADS, rel=1e-3)
    with pytest.raises(ValueError, match="--gate-lr-scale must be > 0, got 0"):
        make_model("paper", gate_lr_scale=0.0)
