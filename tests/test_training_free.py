"""The training-free memory read, condition (e) (fairseq_longmem.models.training_free): the frozen
backbone's own layers read a memory of their own keys and values. Exactness against attention over
both segments where positions play no part, the backbone's output where the memory is empty,
causality, row isolation, and the command line (fairseq-eval-lm --training-free-memory)."""

import math

import pytest
import torch

from conftest import USER_DIR, run_cli
from fairseq_longmem.families.base import causal_attention
from fairseq_longmem.models.backbone_lm import BackboneLMDecoder
from fairseq_longmem.models.training_free import (
    FreeReadConfig,
    TrainingFreeDecoder,
)
from fairseq_longmem.models.common import format_layers, parse_layers
from tiny_longmem import DICT, LAYERS, T, make_backbone, random_tokens

FAMILIES = ("gpt2", "llama")


def free_decoder(family, layers=(1, 3), memory_size=64, retrieved=8, backbone=None, **extra):
    backbone = backbone if backbone is not None else make_backbone(0, family)
    cfg = FreeReadConfig(layers=layers, memory_size=memory_size, chunk_size=4,
                         retrieved_tokens=retrieved, max_target_positions=T, **extra)
    return TrainingFreeDecoder(DICT, backbone, False, cfg).eval()


def stream(dec, tokens, new_document_at=()):
    B, n = tokens.shape[0], tokens.shape[1] // T
    out = []
    for s in range(n):
        flags = torch.tensor([s == 0 or (b, s) in new_document_at for b in range(B)])
        logits, _ = dec(tokens[:, s * T:(s + 1) * T], new_document=flags)
        out.append(logits)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_an_empty_memory_gives_the_backbone_exactly_and_a_full_one_changes_later_segments(family):
    tokens = random_tokens(2, 3 * T, seed=1)
    out = stream(free_decoder(family), tokens)
    ref = BackboneLMDecoder(DICT, make_backbone(0, family), False).eval()
    for s in range(3):
        expected, _ = ref(tokens[:, s * T:(s + 1) * T])
        diff = (out[:, s * T:(s + 1) * T] - expected).abs().max()
        assert (diff == 0) if s == 0 else (diff > 1e-3), (s, float(diff))


@torch.no_grad()
def test_reading_everything_at_every_layer_equals_attention_over_both_segments():
    """GPT-2 with its learned positions zeroed (so that positions play no part): every layer
    reading a memory that holds exactly the previous segment, all of it retrieved (K = msz = T),
    is attention over the previous segment and the current one in one softmax; a cached
    forward computes exactly that."""
    backbone = make_backbone(0, "gpt2")
    backbone.wpe.weight.data.zero_()
    ref = make_backbone(0, "gpt2")
    ref.wpe.weight.data.zero_()
    dec = free_decoder("gpt2", layers=tuple(range(LAYERS)), memory_size=T, retrieved=T,
                       backbone=backbone)
    tokens = random_tokens(2, 2 * T, seed=2)
    out = stream(dec, tokens)
    caches = ref.new_caches(2, 2 * T, ref.wpe.weight)
    ref(tokens[:, :T], caches=caches)  # segment 0 alone fills every layer's cache
    hiddens, _ = ref(tokens[:, T:], caches=caches)
    expected = ref.logits(hiddens[-1])
    torch.testing.assert_close(out[:, T:], expected, rtol=0, atol=2e-5)


@torch.no_grad()
def test_rotary_read_places_every_retrieved_token_at_the_memory_distance():
    """Llama, one reading layer, one segment of memory read whole: the layer's output on the
    second segment equals a hand-computed softmax over [memory keys rotated at -D relative to the
    query; local keys at their positions]."""
    backbone = make_backbone(0, "llama")
    D = 40
    dec = free_decoder("llama", layers=(0,), memory_size=T, retrieved=T, backbone=backbone,
                       memory_distance=D)
    attn = dec.backbone.blocks[0].attn
    tokens = random_tokens(1, 2 * T, seed=3)
    dec(tokens[:, :T], new_document=torch.tensor([True]))
    x1 = dec.backbone.blocks[0].input_layernorm(dec.backbone.embed(tokens[:, T:]))
    got, _ = attn(x1, memory=dec.stream_memory("eval").layer(0), retrieved_tokens=T)

    from fairseq_longmem.families.llama.modules import rotate
    from fairseq_longmem.families.base import expand_kv
    x0 = dec.backbone.blocks[0].input_layernorm(dec.backbone.embed(tokens[:, :T]))
    _, mk, mv = attn.project_qkv(x0)
    q, k, v = attn.project_qkv(x1)
    g = attn.num_heads // attn.num_kv_heads
    pos = torch.arange(T)
    qr = rotate(q, pos, attn.theta)
    # every memory key at position p - D for the query at p: <R(p) q, R(p - D) k> = <R(D) q, k>
    mem_scores = torch.matmul(rotate(q, torch.tensor([D]), attn.theta), expand_kv(mk, g).transpose(-1, -2))
    loc_scores = torch.matmul(qr, expand_kv(rotate(k, pos, attn.theta), g).transpose(-1, -2))
    loc_scores = loc_scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    probs = torch.softmax(torch.cat([mem_scores, loc_scores], -1) / math.sqrt(attn.head_dim), -1)
    out = probs[..., :T] @ expand_kv(mv, g) + probs[..., T:] @ expand_kv(v, g)
    torch.testing.assert_close(got, attn.merge_heads(out), rtol=0, atol=2e-5)
    # and a local read alone is the family's own causal attention
    plain = attn.merge_heads(causal_attention(*attn.positioned(q, k, v), 0.0))
    torch.testing.assert_close(attn(x1)[0], plain, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_causal_rows_apart_and_a_new_document_starts_from_an_empty_memory(family):
    tokens = random_tokens(3, 3 * T, seed=4)
    base = stream(free_decoder(family), tokens)
    later = tokens.clone()
    later[:, 2 * T:] = random_tokens(3, T, seed=40)
    assert torch.equal(stream(free_decoder(family), later)[:, :2 * T], base[:, :2 * T])
    others = tokens.clone()
    others[1:] = random_tokens(2, 3 * T, seed=41)
    out = stream(free_decoder(family), others)
    torch.testing.assert_close(out[0], base[0], rtol=0, atol=1e-5)
    # row 2 starts a new document at segment 2: it reads nothing of segments 0 and 1
    out = stream(free_decoder(family), tokens, new_document_at={(2, 2)})
    alone = stream(free_decoder(family), tokens[2:, 2 * T:])
    # (its batch reads memory, so its row takes the joint path with nothing found: equal up to
    # the rounding of a softmax computed by hand instead of by SDPA)
    torch.testing.assert_close(out[2, 2 * T:], alone[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[:2], base[:2], rtol=0, atol=0)


def test_read_layers_and_memory_options_are_checked_in_one_line():
    assert parse_layers("15-29", 30, "--free-read-layers") == tuple(range(15, 30))
    assert parse_layers("8,12, 16", 30, "--free-read-layers") == (8, 12, 16)
    assert parse_layers("", 30, "--free-read-layers") == tuple(range(15, 30))
    assert format_layers(parse_layers("2,4-6,9", 30, "--free-read-layers")) == "2,4-6,9"
    for spec, message in [("3-40", "layer 30 is not a block of the 30-layer backbone"),
                          ("late", "expected 0-based layers"), ("9-2", "expected 0-based")]:
        with pytest.raises(ValueError, match=message):
            parse_layers(spec, 30, "--free-read-layers")
    with pytest.raises(ValueError, match=r"--free-retrieved-tokens \(6\) must be a positive "
                                         r"multiple of --free-chunk-size \(4\)"):
        free_decoder("llama", retrieved=6)


# ------------------------------------------------------------------------------ command line


def test_eval_lm_reads_a_backbone_checkpoint_with_its_own_memory(corpus, backbone, longmem_run):
    from test_cli_longmem import eval_lm_argv, eval_lm_result

    free = ["--training-free-memory", "--free-read-layers", "2-3", "--free-memory-size", "256",
            "--free-retrieved-tokens", "16"]
    log = run_cli(["fairseq-eval-lm", *eval_lm_argv(corpus, backbone, *free)])
    tokens, loss = eval_lm_result(log)
    assert tokens == corpus.num_tokens("valid") and math.isfinite(loss)
    # (this 10-update backbone's attention is too flat for the read to move the printed loss:
    # that the read changes the scores is tested above, on the decoder)
    assert ("training-free memory: blocks 2-3 of the 4-layer backbone read their own memories "
            "(256 tokens per stream each, chunks of 4, 16 tokens retrieved") in log
    log = run_cli(["fairseq-eval-lm", *eval_lm_argv(corpus, backbone, *free,
                                                     "--free-search-every", "2")])
    assert eval_lm_result(log)[0] == tokens and math.isfinite(eval_lm_result(log)[1])
    assert "16 tokens retrieved per query and head; one memory search per 2 of them)" in log

    log = run_cli(["fairseq-eval-lm", *eval_lm_argv(corpus, longmem_run.checkpoint, *free)],
                  check=False)
    assert "--training-free-memory reads a backbone checkpoint (gpt2_lm, llama_lm)" in log
    log = run_cli(["fairseq-eval-lm", *eval_lm_argv(corpus, backbone, "--training-free-memory",
                                                     "--free-read-layers", "2-9")], check=False)
    assert "--free-read-layers '2-9': layer 4 is not a block of the 4-layer backbone" in log
    log = run_cli(["fairseq-train", corpus.data_dir, "--user-dir", USER_DIR, "--task",
                   "longmem_lm", "--arch", "gpt2_lm_tiny", "--batch-size", "2", "--cpu",
                   "--training-free-memory", "--max-update", "1", "--optimizer", "adam",
                   "--lr", "1e-3"], check=False)
    assert "--training-free-memory evaluates a backbone checkpoint" in log
