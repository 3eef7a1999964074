"""``python -m fairseq_longmem.convert``: one converter for every family. A Hugging Face Llama
folder (tied and untied, rope_theta in either config layout) and a GPT-2 folder convert into
checkpoints whose logits through fairseq's own loader equal transformers'; a tiny GGUF converts
too; inputs it cannot convert are refused in one line."""

import json
import os

import pytest
import torch

from fairseq_longmem.convert import main

transformers = pytest.importorskip("transformers")


def load(out_dir):
    from fairseq import checkpoint_utils

    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [os.path.join(out_dir, "checkpoint.pt")], arg_overrides={"data": str(out_dir)})
    return models[0].eval(), task.target_dictionary


def convert(capsys, *args):
    capsys.readouterr()
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr()


def parity(hf, out_dir, vocab, eos):
    model, d = load(out_dir)
    ids = torch.randint(0, vocab, (2, 30), generator=torch.Generator().manual_seed(3))
    ids[ids == eos] = (eos + 1) % vocab
    with torch.no_grad():
        want = hf(ids).logits.log_softmax(-1)
        got = model(torch.tensor([[d.index(str(int(i))) for i in row] for row in ids]))[0]
    got = got.log_softmax(-1)
    order = torch.tensor([d.eos() if i == eos else d.index(str(i)) for i in range(vocab)])
    return float((got[..., order] - want).abs().max())


@pytest.mark.parametrize("tie, old_rope_layout", [(True, False), (False, True)])
def test_a_llama_folder_converts_with_equal_log_probs(tmp_path, capsys, tie, old_rope_layout):
    config = transformers.LlamaConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=48, rope_theta=300.0, tie_word_embeddings=tie,
        max_position_embeddings=64, eos_token_id=5)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    if old_rope_layout:  # transformers < 5 wrote rope_theta at the top level
        cfg = json.loads((src / "config.json").read_text())
        cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
        (src / "config.json").write_text(json.dumps(cfg))
    rc, out = convert(capsys, src, tmp_path / "out")
    assert rc == 0, out.err
    assert "llama_lm 2x32/4 heads (2 key-value)" in out.out
    assert "</s> (2) = end of text (id 5)" in out.out  # no <|endoftext|>: the config's eos
    assert parity(hf, tmp_path / "out", 60, eos=5) < 1e-5
    assert not (tmp_path / "out" / "tokenizer.json").exists()  # the folder had none
    lines = (tmp_path / "out" / "dict.txt").read_text().split("\n")
    assert lines[:6] == ["0 1", "1 1", "2 1", "3 1", "4 1", "6 1"]  # id 5 is fairseq's </s>
    # an existing conversion is kept unless --force
    rc, out = convert(capsys, src, tmp_path / "out")
    assert rc == 2 and "already exists; pass --force" in out.err


def test_a_gpt2_folder_converts_through_the_same_command(tmp_path, capsys):
    config = transformers.GPT2Config(vocab_size=70, n_embd=32, n_layer=2, n_head=4,
                                     n_positions=64, eos_token_id=69, bos_token_id=69)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    rc, out = convert(capsys, tmp_path / "hf", tmp_path / "out")
    assert rc == 0, out.err
    assert "gpt2_lm 2x32/4 heads" in out.out
    assert parity(hf, tmp_path / "out", 70, eos=69) < 1e-5


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "no such file or folder"),
    (lambda p: p.write_bytes(b"\x00" * 64), "is neither a GGUF file nor a Hugging Face model"),
    (lambda p: p.write_bytes(b"GGUF" + b"\x00" * 4), "GGUF"),
])
def test_what_it_cannot_convert_is_refused_in_one_line(tmp_path, capsys, make, message):
    src = tmp_path / "model.bin"
    make(src)
    rc, out = convert(capsys, src, tmp_path / "out")
    assert rc == 2
    assert out.err.startswith("error: ") and message in out.err and out.err.count("\n") == 1
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


def test_a_folder_of_another_family_is_refused(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "t5"}))
    rc, out = convert(capsys, tmp_path / "hf", tmp_path / "out")
    assert rc == 2 and "model_type='t5'; the families that convert are gpt2, llama" in out.err
