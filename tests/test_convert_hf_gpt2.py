"""HF GPT-2 -> fairseq converter: logit parity with transformers through fairseq's own loader, and
one-line refusals of inputs the converter cannot convert."""

import hashlib
import json
import math
import os
import re
import subprocess
import sys
from argparse import Namespace

import pytest
import torch

from conftest import run_cli_cases
from fairseq_longmem.convert_hf_gpt2 import gpt2_dict_ids

CLI = [sys.executable, "-m", "fairseq_longmem.convert_hf_gpt2"]

# (vocab, n_embd, n_layer, n_head, n_positions, activation, file format, key layout)
CONFIGS = {
    "gpt2-safetensors": (1000, 64, 2, 4, 128, "gelu_new", "safetensors", "gpt2"),
    "distilgpt2-bin": (777, 96, 3, 6, 64, "gelu_pytorch_tanh", "bin", "distilgpt2"),
}


def run_cli(*args):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True)


def run_main(capsys, *args):
    """The CLI's main() in-process (a subprocess pays fairseq's ~6 s import each time)."""
    from fairseq_longmem.convert_hf_gpt2 import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out, err)


def run_main_captured(*args):
    """run_main for fixtures, which have no capsys."""
    import contextlib
    import io

    from fairseq_longmem.convert_hf_gpt2 import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


def error_lines(stderr: str):
    # fairseq.tasks.text_to_speech calls logging.basicConfig at import time and logs an INFO line
    # about tensorboardX; that is fairseq's import noise, not the converter's output.
    return [l for l in stderr.splitlines() if l.strip() and not l.startswith("INFO:fairseq")]


def make_hf_model(tmp_path, name):
    transformers = pytest.importorskip("transformers")
    vocab, dim, layers, heads, positions, act, fmt, layout = CONFIGS[name]
    torch.manual_seed(len(name))
    config = transformers.GPT2Config(
        vocab_size=vocab,
        n_embd=dim,
        n_layer=layers,
        n_head=heads,
        n_positions=positions,
        activation_function=act,
        bos_token_id=vocab - 1,
        eos_token_id=vocab - 1,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    # random init leaves LayerNorms at 1/0 and biases at 0; perturb them so the test sees them
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or ".ln_" in n or "ln_f" in n:
                p.add_(0.1 * torch.randn_like(p))
    hf_dir = tmp_path / f"hf-{name}"
    model.save_pretrained(hf_dir)
    if fmt == "bin":
        # transformers 5 always writes safetensors (safe_serialization=False is gone); the legacy
        # pytorch_model.bin is a torch.save'd state dict, so write that by hand
        from safetensors.torch import load_file

        sd = load_file(str(hf_dir / "model.safetensors"))
        os.remove(hf_dir / "model.safetensors")
        torch.save(sd, hf_dir / "pytorch_model.bin")
    if layout == "distilgpt2":
        # distilgpt2's file layout: no "transformer." prefix, no lm_head, with attention buffers
        path = hf_dir / "pytorch_model.bin"
        sd = torch.load(path, weights_only=True)
        sd = {k.removeprefix("transformer."): v for k, v in sd.items() if k != "lm_head.weight"}
        for i in range(layers):
            sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(positions, positions)).view(1, 1, positions, positions)
            sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        torch.save(sd, path)
    expected = "model.safetensors" if fmt == "safetensors" else "pytorch_model.bin"
    assert (hf_dir / expected).is_file()
    return model, hf_dir


def load_fairseq(out_dir):
    from fairseq import checkpoint_utils, utils

    from fairseq_longmem.user_dir import path as user_dir

    utils.import_user_module(Namespace(user_dir=user_dir()))
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(out_dir / "checkpoint.pt")], arg_overrides={"data": str(out_dir)}
    )
    return models[0].eval(), task


def to_fairseq(ids, vocab):
    """GPT-2 ids -> fairseq indices under the converter's mapping (eos = vocab - 1)."""
    return torch.where(ids == vocab - 1, torch.full_like(ids, 2), ids + 4)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> (HF model, converted OUT_DIR, CLI result), each config converted once by the CLI's
    main() (test_refuses_bert_config runs the CLI process itself)."""
    cache = {}

    def get(name):
        if name not in cache:
            tmp = tmp_path_factory.mktemp(name)
            hf_model, hf_dir = make_hf_model(tmp, name)
            res = run_main_captured(hf_dir, tmp / "out")
            assert res.returncode == 0, res.stderr
            cache[name] = (hf_model, tmp / "out", res)
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logit_parity(converted, name):
    hf_model, out_dir, res = converted(name)
    vocab, positions = CONFIGS[name][0], CONFIGS[name][4]
    assert "fairseq index = GPT-2 id + 4" in res.stdout

    # dict.txt: GPT-2 ids as strings, in id order, without <|endoftext|>
    lines = (out_dir / "dict.txt").read_text().splitlines()
    assert lines == [f"{i} 1" for i in range(vocab - 1)]
    assert torch.load(out_dir / "checkpoint.pt", weights_only=True)["cfg"]["model"]["_name"] == "gpt2_lm"

    model, task = load_fairseq(out_dir)
    d = task.source_dictionary
    assert len(d) == vocab - 1 + 4
    assert (d.bos(), d.pad(), d.eos(), d.unk()) == (0, 1, 2, 3)
    assert d.index("0") == 4 and d.index(str(vocab - 2)) == vocab + 2
    assert model.max_positions() == positions

    g = torch.Generator().manual_seed(0)
    for batch, length in [(3, 17), (2, positions - 1), (2, positions)]:
        ids = torch.randint(0, vocab, (batch, length), generator=g)
        ids[0, length // 2] = vocab - 1  # <|endoftext|> inside a sequence
        with torch.no_grad():
            ref = hf_model(ids).logits.float()
            ours, _ = model(to_fairseq(ids, vocab))
        assert ours.shape == (batch, length, vocab - 1 + 4)
        ordinary = ours[..., 4 : vocab + 3]  # fairseq 4 .. V+2 = GPT-2 0 .. V-2
        assert (ordinary - ref[..., : vocab - 1]).abs().max().item() <= 1e-4
        assert (ours[..., 2] - ref[..., vocab - 1]).abs().max().item() <= 1e-4
        assert torch.isneginf(ours[..., [0, 1, 3]]).all()

        # masked specials take no probability mass: full-vocab log-softmax matches HF's
        lp = torch.log_softmax(ours, dim=-1)
        ref_lp = torch.log_softmax(ref, dim=-1)
        assert (lp[..., 4 : vocab + 3] - ref_lp[..., : vocab - 1]).abs().max().item() <= 1e-4
        assert (lp[..., 2] - ref_lp[..., vocab - 1]).abs().max().item() <= 1e-4
        assert torch.allclose(lp.exp().sum(-1), torch.ones(batch, length), atol=1e-5)


def test_eval_lm_cli_scores_converted_checkpoint(converted, tmp_path):
    """fairseq-eval-lm --path on data binarized with the converter's dict.txt gives HF's loss."""
    hf_model, out_dir, _ = converted("gpt2-safetensors")
    vocab = CONFIGS["gpt2-safetensors"][0]
    g = torch.Generator().manual_seed(1)
    lines = [torch.randint(0, vocab - 1, (20,), generator=g).tolist() for _ in range(3)]
    (tmp_path / "test.txt").write_text("".join(" ".join(map(str, l)) + "\n" for l in lines))
    data = tmp_path / "bin"
    from fairseq_longmem.user_dir import path as user_dir

    logs = run_cli_cases({  # one interpreter: fairseq's import paid once
        "preprocess": ("fairseq-preprocess", [
            "--only-source", "--srcdict", out_dir / "dict.txt", "--testpref",
            tmp_path / "test.txt", "--destdir", data, "--workers", "1"]),
        "eval_lm": ("fairseq-eval-lm", [
            data, "--path", out_dir / "checkpoint.pt", "--user-dir", user_dir(), "--gen-subset",
            "test", "--cpu", "--tokens-per-sample", "63", "--sample-break-mode", "none",
            "--batch-size", "1", "--context-window", "0", "--num-workers", "0"]),
    })
    assert not any(case.failed for case in logs.values()), logs["eval_lm"].log[-2000:]
    # the stream is 3 x (20 tokens + </s>) = 63 tokens scored as one block; fairseq feeds </s>
    # before the first token, so every token is predicted: HF on [eos] + stream[:-1]
    stream = []
    for l in lines:
        stream += l + [vocab - 1]
    target = torch.tensor(stream)
    inp = torch.tensor([[vocab - 1] + stream[:-1]])
    with torch.no_grad():
        lp = torch.log_softmax(hf_model(inp).logits[0], -1)
    nll = -lp.gather(-1, target[:, None]).mean().item()
    loss = float(re.search(r"Loss \(base 2\): ([0-9.]+)", logs["eval_lm"].log).group(1))
    assert abs(loss - nll / math.log(2)) < 1e-3


def fingerprint_of(dict_txt) -> str:
    """sha256 of a dictionary's symbols in order, fairseq's four specials first."""
    symbols = ["<s>", "<pad>", "</s>", "<unk>"] + [l.split()[0] for l in dict_txt.read_text().splitlines()]
    return hashlib.sha256("".join(s + "\n" for s in symbols).encode()).hexdigest()


def test_converted_checkpoint_records_its_dictionary_fingerprint(converted):
    _, out_dir, _ = converted("gpt2-safetensors")
    cfg = torch.load(out_dir / "checkpoint.pt", weights_only=True)["cfg"]["model"]
    assert cfg["dictionary_fingerprint"] == fingerprint_of(out_dir / "dict.txt")


# two fairseq-preprocess processes more; the dictionary check is in the quick loop in
# test_bad_input (reordered_dict_eval_gpt2_lm)
@pytest.mark.slow
def test_eval_refuses_data_binarized_with_a_reordered_converted_dict(converted, tmp_path):
    """The same GPT-2 symbols in another order would silently score other tokens: fairseq-eval-lm
    refuses the data's dict.txt, naming it; with the converter's own dict.txt it runs."""
    from fairseq_longmem.user_dir import path as user_dir

    _, out_dir, _ = converted("gpt2-safetensors")
    lines = (out_dir / "dict.txt").read_text().splitlines(keepends=True)
    (tmp_path / "test.txt").write_text("5 6 7 8 9 10\n11 12 13\n")
    dicts = {"same": lines, "reordered": [lines[1], lines[0]] + lines[2:]}
    for name, dict_lines in dicts.items():
        (tmp_path / f"{name}.dict.txt").write_text("".join(dict_lines))
        subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "fairseq-preprocess"), "--only-source",
             "--srcdict", tmp_path / f"{name}.dict.txt", "--testpref", tmp_path / "test.txt",
             "--destdir", tmp_path / name, "--workers", "1"],
            check=True, capture_output=True,
        )
    logs = run_cli_cases({name: ("fairseq-eval-lm", [
        tmp_path / name, "--path", out_dir / "checkpoint.pt", "--user-dir", user_dir(),
        "--gen-subset", "test", "--cpu", "--tokens-per-sample", "16", "--batch-size", "1",
        "--num-workers", "0"]) for name in dicts})
    assert not logs["same"].failed and "Loss (base 2)" in logs["same"].log
    assert logs["reordered"].failed
    expected = (
        f"ValueError: the gpt2_lm checkpoint was trained with a dictionary of fingerprint "
        f"{fingerprint_of(out_dir / 'dict.txt')[:12]}, but {tmp_path / 'reordered' / 'dict.txt'} "
        f"({len(lines) + 4} symbols) has fingerprint "
        f"{fingerprint_of(tmp_path / 'reordered' / 'dict.txt')[:12]}: "
    )
    assert logs["reordered"].last_line().startswith(expected), logs["reordered"].last_line()


def write_config(d, **overrides):
    cfg = {"model_type": "gpt2", "vocab_size": 50, "n_embd": 8, "n_layer": 1, "n_head": 2, "n_positions": 16}
    cfg.update(overrides)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    return cfg


def small_state_dict(cfg, prefix="transformer."):
    from fairseq_longmem.convert_hf_gpt2 import expected_shapes

    return {prefix + k: torch.randn(s) for k, s in expected_shapes(cfg).items()}


def save_safetensors(sd, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


def assert_one_line_error(res, *needles):
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = error_lines(res.stderr)
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ")
    for n in needles:
        assert n in lines[0], lines[0]
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize(
    "text, needle",
    [
        ("[]", "config.json holds a JSON list, expected an object of model settings"),
        ('{"model_type": "gpt2", "n_head": 0}', "config.json: n_head=0 is not a positive integer"),
        ('{"model_type": "gpt2", "n_embd": "big"}', "config.json: n_embd='big' is not a positive integer"),
        ('{"model_type": "gpt2", "n_positions": null}', "config.json: n_positions=None is not a positive"),
        ('{"model_type": "gpt2", "resid_pdrop": "x"}', "config.json: resid_pdrop='x' is not a non-negative number"),
        ('{"model_type": "gpt2",', "cannot read"),
    ],
)
def test_refuses_malformed_config_json(capsys, tmp_path, text, needle):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(text)
    res = run_main(capsys, tmp_path / "hf", tmp_path / "out")
    assert_one_line_error(res, str(tmp_path / "hf" / "config.json"), needle)
    assert not (tmp_path / "out").exists()


def test_refuses_bert_config(tmp_path):
    # the CLI process itself (its exit status and stderr); the other refusals run main()
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    res = run_cli(tmp_path / "bert", tmp_path / "out")
    assert_one_line_error(res, "model_type='bert'", "GPT-2")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "override, needle",
    [
        ({"activation_function": "relu"}, "activation_function='relu'"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ({"n_inner": 12}, "n_inner=12"),
    ],
)
def test_refuses_unrepresentable_config(capsys, tmp_path, override, needle):
    write_config(tmp_path / "hf", **override)
    assert_one_line_error(run_main(capsys, tmp_path / "hf", tmp_path / "out"), needle)


def test_refuses_truncated_safetensors(capsys, tmp_path):
    cfg = write_config(tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    save_safetensors(small_state_dict(cfg), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_one_line_error(run_main(capsys, tmp_path / "hf", tmp_path / "out"), "model.safetensors",
                          "truncated")


def test_refuses_truncated_pytorch_bin(capsys, tmp_path):
    cfg = write_config(tmp_path / "hf")
    path = tmp_path / "hf" / "pytorch_model.bin"
    torch.save(small_state_dict(cfg), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_one_line_error(run_main(capsys, tmp_path / "hf", tmp_path / "out"), "pytorch_model.bin")


def test_refuses_misshaped_tensor(capsys, tmp_path):
    cfg = write_config(tmp_path / "hf")
    sd = small_state_dict(cfg)
    sd["transformer.h.0.mlp.c_fc.weight"] = torch.randn(8, 16)
    save_safetensors(sd, tmp_path / "hf" / "model.safetensors")
    assert_one_line_error(
        run_main(capsys, tmp_path / "hf", tmp_path / "out"), "h.0.mlp.c_fc.weight", "[8, 16]", "[8, 32]"
    )


def test_refuses_missing_tensor(capsys, tmp_path):
    cfg = write_config(tmp_path / "hf")
    sd = small_state_dict(cfg, prefix="")  # distilgpt2 layout
    del sd["h.0.attn.c_proj.bias"]
    save_safetensors(sd, tmp_path / "hf" / "model.safetensors")
    assert_one_line_error(run_main(capsys, tmp_path / "hf", tmp_path / "out"), "h.0.attn.c_proj.bias", "missing")


def test_existing_output_needs_force(capsys, tmp_path):
    cfg = write_config(tmp_path / "hf")
    save_safetensors(small_state_dict(cfg), tmp_path / "hf" / "model.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"precious bytes")
    assert_one_line_error(run_main(capsys, tmp_path / "hf", out), "checkpoint.pt", "--force")
    assert (out / "checkpoint.pt").read_bytes() == b"precious bytes"
    assert not (out / "dict.txt").exists()

    res = run_main(capsys, tmp_path / "hf", out, "--force")
    assert res.returncode == 0, res.stderr
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["model"]["decoder.backbone.wte.weight"].shape == (50 - 1 + 4, 8)
    assert ck["cfg"]["model"]["mask_special_logits"] is True


def test_dict_ids_skip_eos():
    assert gpt2_dict_ids(6) == [0, 1, 2, 3, 4]
    assert gpt2_dict_ids(6, eos_id=2) == [0, 1, 3, 4, 5]


# the converter's output in the quick loop: test_logit_parity and
# test_eval_lm_cli_scores_converted_checkpoint
@pytest.mark.slow
def test_converted_checkpoint_is_a_longmem_backbone(converted):
    """--backbone-path takes the converter's output: the frozen backbone holds exactly the
    converted weights, and the special-symbol masking travels into the LongMem model."""
    from fairseq import options, tasks, utils

    from fairseq_longmem.user_dir import path as user_dir

    name = "gpt2-safetensors"
    _, out_dir, _ = converted(name)
    d, layers, heads = CONFIGS[name][1], CONFIGS[name][2], CONFIGS[name][3]
    utils.import_user_module(Namespace(user_dir=user_dir()))
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [
        str(out_dir), "--user-dir", user_dir(), "--task", "longmem_lm", "--arch", "longmem_gpt2_tiny",
        "--embed-dim", str(d), "--num-layers", str(layers), "--num-heads", str(heads),
        "--memory-layer", "1", "--backbone-path", str(out_dir / "checkpoint.pt"),
        "--tokens-per-sample", "16", "--batch-size", "2", "--memory-size", "64",
        "--retrieved-tokens", "8", "--cpu",
    ])
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    cfg = convert_namespace_to_omegaconf(args)  # what fairseq-train does
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model).eval()
    saved = torch.load(out_dir / "checkpoint.pt", weights_only=True)["model"]
    for key, t in model.decoder.backbone.state_dict().items():
        assert torch.equal(t, saved["decoder.backbone." + key]), key
    assert model.decoder.cfg.mask_special_logits
    tokens = torch.randint(4, len(task.source_dictionary), (2, 16))
    with torch.no_grad():
        logits, _ = model(src_tokens=tokens, new_document=torch.tensor([True, True]))
    assert torch.isneginf(logits[..., [0, 1, 3]]).all() and torch.isfinite(logits[..., 4:]).all()
