"""The Llama family: logits equal to Hugging Face's LlamaForCausalLM (grouped and full attention,
tied and untied, two rotary bases), incremental decoding equal to the full forward, and LongMem
over it keeping every promise it keeps over GPT-2 (frozen backbone, causality, row isolation,
zero-out start, memory read from the second segment, generation equal to the full forward)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from fairseq_longmem.families.llama.hf import HFConfigError, backbone_state, dims_from_hf
from fairseq_longmem.families.llama.modules import LlamaBackbone
from fairseq_longmem.modules.sidenet import SideNet
from tiny_longmem import HEADS, KV_HEADS, T, make_backbone, make_model, random_tokens, stream

transformers = pytest.importorskip("transformers")


def hf_llama(kv_heads, tie, theta, seed=0, vocab=50):
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=kv_heads, intermediate_size=96, rope_theta=theta,
        tie_word_embeddings=tie, max_position_embeddings=128, rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # weights of a trained model's scale, norms away from 1
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight")
                    else 0.15 * torch.randn_like(p))
    return config.to_dict(), model


def ours_from(config, model, vocab=50):
    dims = dims_from_hf(config, vocab)
    rest, by_token = backbone_state(model.state_dict(), dims, vocab)
    backbone = LlamaBackbone(dims).eval()
    backbone.load_state_dict({**rest, **by_token})
    return backbone


@pytest.mark.parametrize("kv_heads, tie, theta", [(2, False, 10000.0), (4, True, 500.0),
                                                  (1, True, 100000.0)])
@torch.no_grad()
def test_logits_equal_transformers_llama(kv_heads, tie, theta):
    config, model = hf_llama(kv_heads, tie, theta)
    backbone = ours_from(config, model)
    tokens = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(1))
    reference = model(tokens).logits
    hiddens, _ = backbone(tokens)
    ours = backbone.logits(hiddens[-1])
    assert reference.abs().max() > 1.0  # logits of a visible size
    assert (ours - reference).abs().max() < 1e-5


@torch.no_grad()
def test_incremental_decoding_equals_the_full_forward():
    config, model = hf_llama(2, False, 10000.0)
    backbone = ours_from(config, model)
    tokens = torch.randint(0, 50, (2, 24), generator=torch.Generator().manual_seed(2))
    hiddens, _ = backbone(tokens)
    full = backbone.logits(hiddens[-1])
    caches = backbone.new_caches(2, 24, backbone.output_weight)
    steps = []
    for start, n in ((0, 5), (5, 1), (6, 10), (16, 8)):  # a prompt, then steps of 1 and more
        h, _ = backbone(tokens[:, start:start + n], caches=caches)
        steps.append(backbone.logits(h[-1]))
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5
    # caches hold key-value heads only, unrotated: what the memory stores
    assert caches[0].k.shape == (2, 2, 24, 16)
    _, (k, v) = backbone(tokens, kv_layer=0, stop_at_kv_layer=True)
    torch.testing.assert_close(caches[0].k, k, rtol=0, atol=1e-5)  # fed in pieces: rounding
    torch.testing.assert_close(caches[0].v, v, rtol=0, atol=1e-5)


@pytest.mark.parametrize("change, message", [
    (dict(model_type="gpt2"), "model_type='gpt2' is not a Llama-family model"),
    (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    (dict(attention_bias=True), "attention_bias=true is not supported"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5}),
     "rope type 'llama3' is not supported"),
    (dict(num_key_value_heads=3), "num_heads (4) must be a multiple of num_kv_heads (3)"),
])
def test_configs_it_cannot_compute_are_refused_in_one_line(change, message):
    config, _ = hf_llama(2, True, 500.0)
    with pytest.raises(HFConfigError) as e:
        dims_from_hf({**config, **change}, 50)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_rope_theta_is_read_from_both_config_layouts():
    config, _ = hf_llama(2, True, 500.0)
    old = {k: v for k, v in config.items() if k != "rope_parameters"}
    assert dims_from_hf({**old, "rope_theta": 123.0}, 50).rope_theta == 123.0
    assert dims_from_hf(config, 50).rope_theta == 500.0


# ------------------------------------------------------------------------ LongMem over Llama


def test_memory_holds_key_value_heads_and_every_query_head_reads_them():
    model = make_model(family="llama")
    tokens = random_tokens(2, 2 * T, seed=3)
    stream(model, tokens)
    bank = model.decoder.stream_memory("eval")
    assert (bank.num_heads, bank.head_dim) == (KV_HEADS, 64 // HEADS)
    assert bank.fill().tolist() == [2 * T, 2 * T]
    assert model.decoder.sidenet.memory_attention.gate.shape == (HEADS,)


def test_frozen_llama_backbone_stays_bit_identical_and_the_sidenet_learns():
    model = make_model(family="llama").train()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("decoder.sidenet.") for n in trainable)
    assert "decoder.sidenet.h.1.self_attn.gate" in trainable
    before = copy.deepcopy(model.decoder.backbone.state_dict())
    opt = torch.optim.Adam(trainable.values(), lr=1e-2)
    tokens = random_tokens(2, 4 * T, seed=4)
    losses = []
    for step in range(8):
        s = step % 4
        src = tokens[:, s * T:(s + 1) * T]
        logits, _ = model(src_tokens=src, new_document=torch.tensor([s == 0] * 2))
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), src[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    for name, t in model.decoder.backbone.state_dict().items():
        assert torch.equal(t, before[name]), name
    assert sum(losses[4:]) < sum(losses[:4])  # the same four segments, seen a second time


def test_llama_sidenet_copies_its_backbone_blocks():
    dec = make_model(family="llama").decoder
    backbone = make_backbone(0, "llama")  # make_model perturbs its SideNet: a fresh one here
    side = SideNet(backbone, 2, 3, 0.0, 0.0)
    for j, block in enumerate(side.h):
        for name, t in backbone.layers[2 * j + 1].state_dict().items():
            assert torch.equal(block.state_dict()[name], t), (j, name)
    assert torch.equal(side.ln_f.weight, backbone.norm.weight)
    assert type(dec.sidenet.memory_attention).__name__ == "JointLlamaAttention"


@torch.no_grad()
def test_first_copy_with_zero_out_asks_the_memory_with_the_backbone_layers_own_keys():
    """--sidenet-copy first --sidenet-init zero-out: side block j copies backbone block r*j and,
    at the start, is fed exactly that block's input h_{rj}; so with memory layer m = r*j the
    memory block's keys (and queries) equal those of backbone layer m, which fill the memory."""
    backbone = make_backbone(0, "llama")
    for j, block in enumerate(SideNet(backbone, 2, 2, 0.0, 0.0, copy_from="first").h):
        for name, t in backbone.layers[2 * j].state_dict().items():
            assert torch.equal(block.state_dict()[name], t), (j, name)
    side = SideNet(backbone, 2, 2, 0.0, 0.0, init="zero-out", copy_from="first")
    assert side.side_memory_layer == 1
    tokens = random_tokens(2, T, seed=8)
    hiddens, (k, v) = backbone(tokens, kv_layer=2)
    caches = side.new_caches(2, T, k)
    side(hiddens, caches=caches)
    torch.testing.assert_close(caches[1].k[:, :, :T], k, rtol=0, atol=1e-5)
    torch.testing.assert_close(caches[1].v[:, :, :T], v, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="--sidenet-copy 'middle': expected one of last, first"):
        SideNet(backbone, 2, 2, 0.0, 0.0, copy_from="middle")


@torch.no_grad()
def test_empty_memory_gives_the_memory_off_output_and_later_segments_read_it():
    on, off = make_model(family="llama"), make_model(family="llama", disable_memory=True)
    tokens = random_tokens(2, 3 * T, seed=5)
    a, b = stream(on, tokens), stream(off, tokens)
    assert torch.equal(a[:, :T], b[:, :T])
    assert (a[:, T:] - b[:, T:]).abs().max() > 1e-3


@torch.no_grad()
def test_llama_later_segments_never_change_earlier_logits_and_rows_stay_apart():
    tokens = random_tokens(3, 3 * T, seed=6)
    base = stream(make_model(family="llama"), tokens)
    changed = tokens.clone()
    changed[:, 2 * T:] = random_tokens(3, T, seed=60)
    out = stream(make_model(family="llama"), changed)
    assert torch.equal(out[:, :2 * T], base[:, :2 * T])
    others = tokens.clone()
    others[1:] = random_tokens(2, 3 * T, seed=61)
    out = stream(make_model(family="llama"), others)
    torch.testing.assert_close(out[0], base[0], rtol=0, atol=1e-5)
    assert not torch.allclose(out[1:], base[1:])


@torch.no_grad()
def test_zero_out_starts_equal_to_the_llama_backbone():
    model = make_model(family="llama", sidenet_init="zero-out")
    backbone = model.decoder.backbone
    with torch.no_grad():  # make_model perturbs the SideNet: zero-out's start again
        model.decoder.sidenet.init_from_backbone(backbone, zero_out=True)
    tokens = random_tokens(2, 3 * T, seed=7)
    out = stream(model, tokens)
    for s in range(3):
        src = tokens[:, s * T:(s + 1) * T]
        hiddens, _ = backbone(src)
        ref = backbone.logits(hiddens[-1])
        assert (out[:, s * T:(s + 1) * T] - ref).abs().max() < 1e-4


@torch.no_grad()
def test_llama_token_by_token_equals_the_full_forward_across_segments():
    model = make_model(family="llama")
    tokens = random_tokens(2, 4 * T, seed=8)
    full = stream(model, tokens).log_softmax(-1)
    dec = model.decoder
    state = dec.start_decoding(2, dec.backbone.output_weight, segment_len=T)
    step = torch.cat([dec.advance(tokens[:, i:i + 1], state) for i in range(tokens.size(1))], 1)
    assert (step.log_softmax(-1) - full).abs().max() < 1e-4
    off = stream(make_model(family="llama", disable_memory=True), tokens).log_softmax(-1)
    assert (off[:, T:] - full[:, T:]).abs().max() > 1e-3


def test_rotary_tables_are_shared_grown_and_equal_the_direct_angles():
    from fairseq_longmem.families.llama import modules as llama_modules

    theta, hd = 12345.0, 8
    x = torch.randn(2, 3, 4, hd)
    positions = torch.tensor([0, 7, 1500, 5000])  # past the first table's 1,024 rows: it grows
    inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    direct = x * angles.cos() + torch.cat([-x2, x1], dim=-1) * angles.sin()
    torch.testing.assert_close(llama_modules.rotate(x, positions, theta), direct,
                               rtol=0, atol=1e-5)
    cos, _ = llama_modules.rotary_tables(theta, hd, 10, x.device)
    assert cos.shape == (8192, hd)  # grown to a power of two >= 5001, and kept for shorter calls
    assert llama_modules.rotary_tables(theta, hd, 10, x.device)[0] is cos


def test_mlp_in_place_without_autograd_equals_the_graph_path_and_keeps_gradients():
    """Without autograd the MLP computes SiLU(gate) * up in place: bit-identical to the
    out-of-place path, which is kept wherever a gradient is needed (the SideNet's blocks)."""
    from fairseq_longmem.families.llama.modules import LlamaMLP

    mlp = LlamaMLP(make_backbone(family="llama").dims)
    x = torch.randn(2, 5, mlp.gate_proj.in_features)
    with torch.no_grad():
        in_place = mlp(x)
    graph = mlp(x)
    assert graph.requires_grad and torch.equal(in_place, graph)
    expected = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    assert torch.equal(graph, expected)
    graph.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mlp.parameters())
    # a frozen MLP fed a tensor that needs a gradient (a frozen block under a trained one) keeps
    # the graph too, so the gradient reaches its input
    mlp.requires_grad_(False)
    x.requires_grad_(True)
    mlp(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@torch.no_grad()
def test_a_forward_keeps_only_the_hidden_states_its_caller_reads(family):
    backbone = make_backbone(0, family).eval()
    tokens = random_tokens(2, T, seed=3)
    every, kv = backbone(tokens, kv_layer=1)
    L = len(backbone.blocks)
    some, kv_some = backbone(tokens, kv_layer=1, keep=(1, L))
    assert len(some) == L + 1 and [i for i, h in enumerate(some) if h is not None] == [1, L]
    assert torch.equal(some[1], every[1]) and torch.equal(some[L], every[L])
    assert torch.equal(kv_some[0], kv[0]) and torch.equal(kv_some[1], kv[1])
    # the SideNet asks for what it reads: its input, and every r-th state with the residual
    side = make_model(family=family).decoder.sidenet
    assert side.residual == "cross" and side.hiddens_read() == tuple(
        side.start + side.r * j for j in range(len(side.h) + 1))
    assert side.hiddens_read()[-1] == L
    top = make_model(family=family, reduction_factor=1, sidenet_from=1, read_layers="1-3",
                     sidenet_residual="none", memory_read="joint").decoder.sidenet
    assert top.hiddens_read() == (1,)
