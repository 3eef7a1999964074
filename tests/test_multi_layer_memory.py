"""LongMem with several memory layers (--read-layers), a SideNet beside the top blocks only
(--sidenet-from), without the cross-network residual (--sidenet-residual none) and reading in one
softmax (--memory-read joint): the SideNet that starts as the training-free read."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from fairseq_longmem.memory.bank import ChunkedMemoryBank
from fairseq_longmem.memory.layered import LayeredMemory
from fairseq_longmem.models.backbone_lm import BackboneLMDecoder
from fairseq_longmem.models.training_free import FreeReadConfig, TrainingFreeDecoder
from fairseq_longmem.modules.decoding_state import SharedPromptMemory
from fairseq_longmem.tasks.generation import load_prompt_memory, save_prompt_memory
from tiny_longmem import DICT, LAYERS, T, make_backbone, make_model, random_tokens, stream

FAMILIES = ("gpt2", "llama")
# the SideNet is a trainable copy of blocks 1-3, each reading the memory of its own block
TOP_COPY = dict(reduction_factor=1, sidenet_from=1, read_layers="1-3", sidenet_residual="none",
                memory_read="joint", sidenet_copy="first", sidenet_init="paper")


def top_copy(family, perturb=False, **overrides):
    model = make_model(family=family, **dict(TOP_COPY, **overrides))
    if not perturb:  # make_model perturbs the SideNet: copy the blocks again
        side = model.decoder.sidenet
        with torch.no_grad():
            side.init_from_backbone(model.decoder.backbone)
            for reader in side.memory_attentions:
                reader.gate.zero_()
    return model


def free_read(family, layers=(1, 2, 3)):
    cfg = FreeReadConfig(layers=layers, memory_size=64, chunk_size=4, retrieved_tokens=8,
                         max_target_positions=T)
    return TrainingFreeDecoder(DICT, make_backbone(0, family), False, cfg).eval()


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_the_top_copy_sidenet_starts_as_the_backbone_and_reads_as_the_training_free_read(family):
    model = top_copy(family)
    dec = model.decoder
    assert len(dec.sidenet.h) == LAYERS - 1 and dec.read_layers == (1, 2, 3)
    tokens = random_tokens(2, 4 * T, seed=1)
    # no memory yet: exactly the backbone
    first, _ = model(src_tokens=tokens[:, :T], new_document=torch.tensor([True, True]))
    ref, _ = BackboneLMDecoder(DICT, make_backbone(0, family), False).eval()(tokens[:, :T])
    assert torch.equal(first, ref)
    # the same memory (the frozen blocks' keys and values of three segments): the same logits
    # as the frozen backbone's blocks 1-3 reading it themselves
    memory = dec.new_memory(2, 64, dec.backbone.output_weight)
    assert isinstance(memory, LayeredMemory) and memory.layers == (1, 2, 3)
    for s in range(3):
        memory.add(*dec.memory_keys_values(tokens[:, s * T:(s + 1) * T]))
    x = tokens[:, 3 * T:]
    got, extra = model(src_tokens=x, memory=memory, write_memory=False)
    want, _ = free_read(family)(x, memory=memory, write_memory=False)
    assert (got - want).abs().max() < 1e-5
    assert (got - ref).abs().max() > 1e-2  # and the memory changed them
    assert 0 < float(extra["memory_stats"]["memory_share"]) < 1


@torch.no_grad()
def test_each_memory_layer_holds_its_own_frozen_blocks_keys_and_values():
    model = top_copy("llama")
    dec = model.decoder
    tokens = random_tokens(2, 2 * T, seed=2)
    stream(model, tokens)
    memory = dec.stream_memory("eval")
    assert memory.fill().tolist() == [2 * T, 2 * T]
    for s in range(2):
        _, kvs = dec.backbone(tokens[:, s * T:(s + 1) * T], kv_layer=(1, 2, 3))
        for n, layer in enumerate((1, 2, 3)):
            bank = memory.layer(layer)
            keys = bank._keys[:, :, s * T // 4:(s + 1) * T // 4].flatten(2, 3)  # (B, Hkv, T, hd)
            assert torch.equal(keys, kvs[0][n].to(keys.dtype)), (s, layer)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_later_segments_never_change_earlier_logits_and_rows_never_read_each_other(family):
    tokens = random_tokens(3, 3 * T, seed=3)
    base = stream(top_copy(family, perturb=True), tokens)
    changed = tokens.clone()
    changed[:, 2 * T:] = random_tokens(3, T, seed=30)
    out = stream(top_copy(family, perturb=True), changed)
    assert torch.equal(out[:, :2 * T], base[:, :2 * T])
    others = tokens.clone()
    others[1:] = random_tokens(2, 3 * T, seed=31)
    out = stream(top_copy(family, perturb=True), others)
    torch.testing.assert_close(out[0], base[0], rtol=0, atol=1e-5)
    assert not torch.allclose(out[1:], base[1:])
    # a new document in row 0 at segment 2 reads nothing of its first two segments
    fresh = stream(top_copy(family, perturb=True), tokens, new_document_at={(0, 2)})
    alone = stream(top_copy(family, perturb=True), tokens[:1, 2 * T:])
    torch.testing.assert_close(fresh[0, 2 * T:], alone[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("search_every", [1, 3])
@torch.no_grad()
def test_token_by_token_equals_the_full_forward_and_beams_share_every_layers_prompt_memory(
        family, search_every):
    """With one search per layer the beams share each layer's prompt memory; with one search for
    the three layers (--search-every 3, tests/test_shared_search.py) a shared prompt has no bank
    slots to gather by, so each beam continues a copy of it: the same scores either way."""
    from fairseq_longmem.tasks.generation import PromptedEnsemble

    model = top_copy(family, perturb=True, memory_size=256, search_every=search_every)
    dec = model.decoder
    tokens = random_tokens(2, 3 * T + 5, seed=4)
    full = stream(model, tokens[:, :3 * T]).log_softmax(-1)
    state = dec.start_decoding(2, dec.backbone.output_weight, segment_len=T)
    step = torch.cat([dec.advance(tokens[:, i:i + 1], state) for i in range(3 * T)], 1)
    assert (step.log_softmax(-1) - full).abs().max() < 1e-4
    # two beams per prompt, each continuing with tokens of its own across a segment boundary:
    # each scores as the prompt followed by its own tokens, alone
    state = dec.start_decoding(2, dec.backbone.output_weight, segment_len=T)
    dec.prefill(tokens[:, :2 * T + 9], state)
    generator = SimpleNamespace(beam=2, decoder=dec, max_len=4, segment_len=T)
    share = PromptedEnsemble.shares_prompt_memory(generator, state)
    assert share == (search_every == 1)
    state.expand(2, lambda rows: dec.new_memory(rows, 256, dec.backbone.output_weight), share)
    assert isinstance(state.memory, LayeredMemory)
    assert all(isinstance(state.memory.layer(i), SharedPromptMemory) == share for i in (1, 2, 3))
    cont = random_tokens(4, T, seed=40)
    beams = torch.cat([dec.advance(cont[:, i:i + 1], state) for i in range(T)], 1)
    for n in range(4):
        history = torch.cat([tokens[n // 2, :2 * T + 9], cont[n]])[None]
        alone = dec.start_decoding(1, dec.backbone.output_weight, segment_len=T)
        want = torch.cat([dec.advance(history[:, i:i + 1], alone)
                          for i in range(history.size(1))], 1)[0, -T:]
        assert (beams[n].log_softmax(-1) - want.log_softmax(-1)).abs().max() < 1e-4, n


@pytest.mark.parametrize("search_every", [1, 3])  # 3: one search for the three layers
def test_training_keeps_the_backbone_bit_identical_and_reaches_every_reader(search_every):
    model = top_copy("llama", search_every=search_every).train()
    dec = model.decoder
    frozen = {k: v.clone() for k, v in dec.backbone.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(not p.requires_grad for p in dec.backbone.parameters())
    opt = torch.optim.Adam(params, lr=3e-3)
    tokens = random_tokens(2, 4 * T, seed=5)
    losses = []
    for epoch in range(6):
        total = 0.0
        for s in range(4):
            flags = torch.tensor([s == 0, s == 0])
            src = tokens[:, s * T:(s + 1) * T]
            logits, _ = model(src_tokens=src[:, :-1], new_document=flags)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), src[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            if epoch == 0 and s == 1:  # memory read: every reader's gate has a gradient
                for reader in dec.sidenet.memory_attentions:
                    assert reader.gate.grad is not None and reader.gate.grad.abs().sum() > 0
            opt.step()
            total += float(loss.detach())
        losses.append(total)
        dec.reset_memory()
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.9 * losses[0], losses
    for k, v in dec.backbone.state_dict().items():
        assert torch.equal(v, frozen[k]), k


@torch.no_grad()
def test_a_joint_read_gate_weighs_the_memory_tokens():
    model = top_copy("llama")
    dec = model.decoder
    tokens = random_tokens(2, 2 * T, seed=6)
    memory = dec.new_memory(2, 64, dec.backbone.output_weight)
    memory.add(*dec.memory_keys_values(tokens[:, :T]))
    shares = []
    for logit in (-4.0, 0.0, 4.0):
        for reader in dec.sidenet.memory_attentions:
            reader.gate.fill_(logit)
        _, extra = model(src_tokens=tokens[:, T:], memory=memory, write_memory=False)
        shares.append(float(extra["memory_stats"]["memory_share"]))
    assert shares[0] < shares[1] < shares[2], shares
    assert abs(float(extra["memory_stats"]["gate"]) - float(torch.sigmoid(torch.tensor(4.0)))) < 1e-6


@torch.no_grad()
def test_where_reads_reach_is_summed_over_the_memory_layers():
    from tiny_longmem import HEADS
    model = top_copy("llama", memory_reach_buckets="1,2")
    tokens = random_tokens(2, 3 * T, seed=9)
    stream(model, tokens[:, :2 * T])
    _, extra = model(src_tokens=tokens[:, 2 * T:], new_document=torch.tensor([False, False]))
    reach = extra["memory_stats"]["reach"]
    # 3 layers x 2 rows x HEADS query heads x T queries, each retrieving K / csz = 2 chunks of
    # the 8 in memory: 4 written 1 segment back, 4 written 2 back (buckets 1, 2, 3+)
    assert float(reach["chunks"].sum()) == 3 * 2 * HEADS * T * 2
    assert reach["stored"].tolist() == [3 * 2 * HEADS * T * 0.5] * 2 + [0.0]
    assert 0 < float(reach["mass"].sum()) < float(reach["chunks"].sum())


@torch.no_grad()
def test_read_delta_with_several_memory_layers_starts_as_the_backbone():
    model = make_model(family="llama", read_layers="1,3", sidenet_init="read-delta",
                       reduction_factor=1)
    side = model.decoder.sidenet
    side.init_from_backbone(model.decoder.backbone, zero_out=True, keep_read=True)
    tokens = random_tokens(2, 2 * T, seed=7)
    out = stream(model, tokens)
    hiddens, _ = model.decoder.backbone(tokens[:, :T])
    assert (out[:, :T] - model.decoder.backbone.logits(hiddens[-1])).abs().max() < 1e-4
    assert [type(a).__name__ for a in side.memory_attentions] == ["JointLlamaAttention"] * 2
    assert all(a.delta for a in side.memory_attentions)


@pytest.mark.parametrize("overrides, message", [
    (dict(sidenet_from=4), "--sidenet-from 4 is not a layer of the 4-layer backbone"),
    (dict(sidenet_from=2, read_layers="1-3"), "--sidenet-from 2: the SideNet must stand beside "
     "its memory layers (1-3)"),
    (dict(read_layers="1-4"), "--read-layers '1-4': layer 4 is not a block of the 4-layer"),
    (dict(read_layers="2,3", reduction_factor=2), "memory layers [2, 3] fall beside the same "
     "side block"),
    (dict(sidenet_from=1, reduction_factor=2, read_layers="1"), "--reduction-factor (2) must be "
     ">= 1 and divide the 3 backbone layers the SideNet stands beside (1 to 3)"),
    (dict(read_layers="1,3", reduction_factor=1, memory_read="joint", sidenet_init="read-delta"),
     "does not combine with --memory-read joint"),
    (dict(memory_read="mixed"), "--memory-read 'mixed': expected one of gated, joint"),
    (dict(sidenet_residual="skip"), "--sidenet-residual 'skip': expected one of cross, none"),
])
def test_bad_multi_layer_configurations_are_refused_in_one_line(overrides, message):
    with pytest.raises(ValueError) as e:
        make_model(family="llama", **overrides)
    assert message in str(e.value)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_a_multi_layer_prompt_memory_file_continues_as_if_its_text_preceded_the_prompt(
        family, tmp_path):
    model = top_copy(family, perturb=True)
    dec = model.decoder
    template = dec.backbone.output_weight
    eos = torch.full((1, 1), DICT.eos())
    text, prompt = random_tokens(1, 2 * T - 1, seed=8), random_tokens(1, T // 2, seed=9)
    # the text and the prompt as one prompt: "</s> text </s> prompt" (two whole segments first)
    one = dec.start_decoding(1, template, segment_len=T)
    want = dec.prefill(torch.cat([eos, text, eos, prompt], dim=1), one)
    # the text's memory saved (state of two rows: row 1 holds it), then read before the prompt
    state = dec.start_decoding(2, template, segment_len=T)
    dec.prefill(torch.cat([eos, text], dim=1).repeat(2, 1), state)
    before = [t.clone() for t in state.memory.tensors()]
    path = str(tmp_path / "m.safetensors")
    save_prompt_memory(path, dec, state, text, row=1)
    assert state.memory.num_rows == 2 and all(  # the decoding state is left as it was
        torch.equal(a, b) for a, b in zip(before, state.memory.tensors()))
    loaded = load_prompt_memory(path, dec, T, template)
    assert isinstance(loaded, LayeredMemory) and loaded.layers == (1, 2, 3)
    assert loaded.fill().tolist() == [2 * T]
    for i in loaded.layers:  # each layer's bank holds its own block's keys
        assert not torch.equal(loaded.layer(i)._keys, loaded.layer(1 + i % 3)._keys)
    got = dec.prefill(torch.cat([eos, prompt], dim=1),
                      dec.start_decoding(1, template, memory=loaded, segment_len=T))
    assert (got - want).abs().max() < 1e-4
    alone = dec.prefill(torch.cat([eos, prompt], dim=1),
                        dec.start_decoding(1, template, segment_len=T))
    assert (alone - want).abs().max() > 1e-2  # the memory is what made them equal
    with pytest.raises(FileExistsError):  # never overwritten
        save_prompt_memory(path, dec, state, text, row=1)


@torch.no_grad()
def test_a_layered_memory_file_is_refused_by_other_layers_and_a_one_layer_memory(tmp_path):
    opts = dict(num_rows=1, num_heads=2, head_dim=8, chunk_size=4, memory_size=32)
    memory = LayeredMemory((1, 2, 3), **opts)
    g = torch.Generator().manual_seed(0)
    memory.add(torch.randn(3, 1, 2, 10, 8, generator=g), torch.randn(3, 1, 2, 10, 8, generator=g))
    path = tmp_path / "m.safetensors"
    memory.save(path)
    again = LayeredMemory((1, 2, 3), **opts)
    again.load(path)
    for i in (1, 2, 3):
        assert all(torch.equal(a, b) for a, b in zip(memory.layer(i).tensors(),
                                                     again.layer(i).tensors()))
    assert again.staged().tolist() == [2] and again.fill().tolist() == [8]
    other = LayeredMemory((1, 2), **opts)
    with pytest.raises(ValueError, match=r"memory layers: expected a memory of 2 reading "
                       r"layer\(s\) \[1, 2\], found a memory of 3 reading layer\(s\) \[1, 2, 3\]"):
        other.load(path)
    assert other.fill().tolist() == [0]
    with pytest.raises(ValueError, match="expected a memory of one layer, found a memory of 3"):
        ChunkedMemoryBank(**opts).load(path)
    one = ChunkedMemoryBank(**opts)
    one.save(tmp_path / "one.safetensors")
    with pytest.raises(ValueError, match="expected a memory of 3 reading layer.* found a "
                       "memory of one layer"):
        again.load(tmp_path / "one.safetensors")
    # a damaged last layer: refused before any layer is written
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {n: f.get_tensor(n) for n in f.keys()}
    tensors["layer3.row0.keys"][0, 0, 0, 0] += 1
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    fresh = LayeredMemory((1, 2, 3), **opts)
    with pytest.raises(ValueError, match=r"tensor layer3.row0.keys checksum.*corrupt data"):
        fresh.load(tmp_path / "bad.safetensors")
    assert [fresh.layer(i).fill().tolist() for i in (1, 2, 3)] == [[0], [0], [0]]


# ------------------------------------------------------------------------------ command line


@pytest.fixture(scope="module")
def top_copy_checkpoint(corpus, backbone, tmp_path_factory):
    """A LongMem whose SideNet reads in blocks 2-3 (two memories), trained for 8 updates by the
    real fairseq-train over the session's tiny backbone."""
    from conftest import TOP_COPY_OPTIONS, train_longmem

    return train_longmem(corpus, backbone, tmp_path_factory.mktemp("top_copy"), *TOP_COPY_OPTIONS)


@pytest.mark.slow  # five fairseq-eval-lm runs (and the module's fairseq-train run)
def test_fairseq_train_and_eval_lm_run_the_top_copy_sidenet(corpus, top_copy_checkpoint, tmp_path):
    from conftest import run_cli
    from test_cli_longmem import eval_lm_argv, eval_lm_result

    checkpoint = top_copy_checkpoint
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    cfg = state["cfg"]["model"]
    assert (cfg["read_layers"], cfg["sidenet_from"], cfg["memory_layer"]) == ("2-3", 2, 2)
    side = sorted({k.split(".")[3] for k in state["model"] if k.startswith("decoder.sidenet.h.")})
    assert side == ["0", "1"]  # two side blocks, beside backbone blocks 2 and 3
    assert {k for k in state["model"] if k.endswith("attn.gate")} == {
        "decoder.sidenet.h.0.attn.gate", "decoder.sidenet.h.1.attn.gate"}
    on = run_cli(["fairseq-eval-lm", *eval_lm_argv(corpus, checkpoint)])
    off = run_cli(["fairseq-eval-lm", *eval_lm_argv(
        corpus, checkpoint, "--model-overrides", "{'disable_memory': True}")])
    # one search for both memory layers (--search-every), chosen at evaluation time
    shared = run_cli(["fairseq-eval-lm", *eval_lm_argv(
        corpus, checkpoint, "--model-overrides", "{'search_every': 2}")])
    (tokens, loss_on), (_, loss_off) = eval_lm_result(on), eval_lm_result(off)
    assert tokens == corpus.num_tokens("valid") and math.isfinite(loss_on)
    assert loss_on != loss_off
    tokens_shared, loss_shared = eval_lm_result(shared)
    assert tokens_shared == tokens and math.isfinite(loss_shared)
    # (this tiny model's memory moves the loss by 0.002 bits: sharing the search moves it by
    # less than the 4 printed digits; tests/test_shared_search.py shows the reads differ)
    said = ("memory layers 2-3: one memory search per 2 of them (--search-every 2); searches per "
            "forward pass: 1 instead of 2")
    assert said in shared and said not in on
    # a checkpoint from before --search-every existed (no key for it in cfg.model) takes the
    # override too: fairseq alone overrides only the keys a checkpoint has, and would drop it
    del state["cfg"]["model"]["search_every"]
    older = tmp_path / "before_search_every.pt"
    torch.save(state, older)
    log = run_cli(["fairseq-eval-lm", *eval_lm_argv(
        corpus, str(older), "--model-overrides", "{'search_every': 2}")])
    assert eval_lm_result(log) == (tokens, loss_shared) and said in log
    assert eval_lm_result(run_cli(["fairseq-eval-lm", *eval_lm_argv(corpus, str(older))])) == (
        tokens, loss_on)


@pytest.mark.slow  # seven fairseq-interactive runs (and the module's fairseq-train run)
def test_fairseq_interactive_saves_and_reads_a_layered_memory_file(
        corpus, top_copy_checkpoint, longmem_run, tmp_path):
    """fairseq-interactive --save-memory / --memory-file with the SideNet of two memories: the
    file holds both layers' banks, a prompt read with it is continued as if the saved prompt's
    text preceded it (the same 12 greedy tokens, per-token scores within 2e-4), and a file of
    the other kind (one memory / two memories) is refused in one line by either model."""
    from safetensors import safe_open

    from conftest import TOKENS_PER_SAMPLE, USER_DIR, run_cli_cases
    from fairseq_longmem.memory.file_format import HEADER_KEY
    from test_generation import lines_of, write_prompt_files

    write_prompt_files(tmp_path)
    layered, one = tmp_path / "layered.safetensors", tmp_path / "one.safetensors"

    def interactive(checkpoint, prompt, *extra):
        return ("fairseq-interactive", [
            corpus.data_dir, "--user-dir", USER_DIR, "--task", "longmem_lm", "--path",
            checkpoint, "--tokens-per-sample", TOKENS_PER_SAMPLE, "--batch-size", "1", "--cpu",
            "--beam", "1", "--max-len-b", "12", "--input", tmp_path / f"{prompt}.txt", *extra])

    top, single = top_copy_checkpoint, longmem_run.checkpoint
    logs = run_cli_cases({
        "save": interactive(top, "a", "--save-memory", layered),
        "from_memory": interactive(top, "b", "--memory-file", layered),
        "one_prompt": interactive(top, "ab"),
        "alone": interactive(top, "b"),
        "save_one": interactive(single, "a", "--save-memory", one),
        "one_reads_layered": interactive(single, "b", "--memory-file", layered),
        "layered_reads_one": interactive(top, "b", "--memory-file", one),
    }, timeout=900)
    for name in ("save", "from_memory", "one_prompt", "alone", "save_one"):
        assert not logs[name].failed, f"{name}:\n{logs[name].log[-3000:]}"
    with safe_open(str(layered), framework="pt") as f:  # 64 tokens in chunks of 4, 4 heads
        assert json.loads(f.metadata()[HEADER_KEY])["layers"] == [2, 3]
        assert {tuple(f.get_tensor(f"layer{i}.row0.keys").shape) for i in (2, 3)} == {
            (4, 16, 4, 32)}
        assert not torch.equal(f.get_tensor("layer2.row0.keys"), f.get_tensor("layer3.row0.keys"))

    def hypothesis(name):
        text = lines_of(logs[name].log, "H")[0].split("\t")[1]
        scores = [float(x) for x in lines_of(logs[name].log, "P")[0].split()]
        return text, scores

    (got, p_got), (want, p_want) = hypothesis("from_memory"), hypothesis("one_prompt")
    assert got == want and len(got.split()) == 12
    assert max(abs(x - y) for x, y in zip(p_got, p_want)) < 2e-4
    _, p_alone = hypothesis("alone")  # the file is what made them equal
    assert max(abs(x - y) for x, y in zip(p_alone, p_want)) > 1e-2
    for name, line in (("one_reads_layered", "memory_layer (file '2-3', this model 3)"),
                       ("layered_reads_one", "memory_layer (file 3, this model '2-3')")):
        case = logs[name]
        assert case.failed, case.log[-2000:]
        assert "was written by another model or setting" in case.last_line(), case.last_line()
        assert line in case.last_line(), case.last_line()
