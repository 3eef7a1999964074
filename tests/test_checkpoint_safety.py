"""No code runs from a checkpoint: files crafted to make fairseq evaluate their config (a model
that ``eval``s a config string, a criterion that does, an interpolation that resolves on access,
an argparse-era ``args``) are refused in one line by fairseq-eval-lm, fairseq-validate,
fairseq-generate, fairseq-train --restore-file and --backbone-path, and leave no marker file; the
same files with FAIRSEQ_LONGMEM_TRUST_CHECKPOINTS=1 do create it, so the payloads are real.

Each crafted file is a real gpt2_lm checkpoint (the session's backbone) with one field changed.
Our own checkpoints load without the opt-in throughout the other tests (the backbone, LongMem
checkpoints in test_cli_longmem and the kill test's resumes, the converter's output in
test_convert_hf_gpt2); here they are also vetted directly.
"""

import argparse
import copy
import json
import re

import pytest
import torch

from conftest import TOKENS_PER_SAMPLE, USER_DIR, longmem_train_argv, run_cli
from fairseq_longmem.checkpoint import guard as checkpoint_guard
from fairseq_longmem.checkpoint.guard import UnsafeCheckpointError, vet

TRUST = {"FAIRSEQ_LONGMEM_TRUST_CHECKPOINTS": "1"}


def payload(marker):
    """Python that creates ``marker`` and evaluates to a valid value for the field it sits in."""
    return f'__import__("pathlib").Path("{marker}").touch() or [(1, 4)]'


def crafted_states(base, marker, data_dir):
    """kind -> (checkpoint state, what the refusal says it found)."""
    transformer_lm = {  # fairseq's TransformerLanguageModel evals character_filters
        "_name": "transformer_lm", "character_embeddings": True, "character_filters": "",
        "decoder_layers": 1, "decoder_embed_dim": 8, "decoder_ffn_embed_dim": 8,
        "decoder_attention_heads": 1,
    }
    model = copy.deepcopy(base)
    model["cfg"]["model"] = dict(transformer_lm, character_filters=payload(marker))
    # fairseq-validate builds the checkpoint's own criterion; ctc evals wer_args
    criterion = copy.deepcopy(base)
    criterion["cfg"]["criterion"] = {
        "_name": "ctc",
        "wer_args": f'(__import__("pathlib").Path("{marker}").touch(), 0, 0, 0, 0)[1:]',
    }
    # the code is not even in the file: OmegaConf resolves the interpolation when it is read
    interpolation = copy.deepcopy(base)
    interpolation["cfg"]["model"] = dict(
        transformer_lm, character_filters="${oc.env:LONGMEM_TEST_PAYLOAD}")
    argparse_era = copy.deepcopy(base)
    argparse_era["cfg"] = None
    argparse_era["args"] = argparse.Namespace(
        task="language_modeling", arch="transformer_lm", data=data_dir,
        tokens_per_sample=TOKENS_PER_SAMPLE, criterion="cross_entropy", optimizer="adam",
        lr_scheduler="fixed",
        **{k: v for k, v in transformer_lm.items() if k != "_name"},
    )
    argparse_era["args"].character_filters = payload(marker)
    return {
        "model": (model, "names model 'transformer_lm', expected one of ['gpt2_lm', "
                         "'llama_lm', 'longmem_gpt2', 'longmem_llama'] (other models may evaluate strings from the file)"),
        "criterion": (criterion, "names criterion 'ctc', expected one of ['cross_entropy', "
                                 "'longmem_cross_entropy']"),
        "interpolation": (interpolation, "has an interpolation in cfg.model.character_filters "
                                         "('${oc.env:LONGMEM_TEST_PAYLOAD}')"),
        "argparse": (argparse_era, "is an argparse-era checkpoint (state['args'] is set)"),
    }


# fairseq's console scripts are ``sys.exit(fairseq_cli.<name>.cli_main())``: this runs those entry
# points once per case in one interpreter (fairseq's import time paid once), prints each case's
# traceback as the CLI would, then whether the marker exists, and removes it
DRIVER = r"""
import importlib, json, os, sys, traceback
cases, marker = json.loads(sys.argv[1]), sys.argv[2]
for name, cli, argv in cases:
    print(f"=== case {name} ===", flush=True)
    sys.argv = [cli] + argv
    try:
        importlib.import_module(f"fairseq_cli.{cli}").cli_main()
    except BaseException:
        traceback.print_exc(file=sys.stdout)
    print(f"=== marker {os.path.exists(marker)} ===", flush=True)
    if os.path.exists(marker):
        os.remove(marker)
"""


def cli_argv(cli, path, corpus, backbone, save_dir):
    data = [corpus.data_dir, "--user-dir", USER_DIR, "--cpu", "--batch-size", "2"]
    lm = ["--task", "language_modeling", "--tokens-per-sample", TOKENS_PER_SAMPLE]
    train = ["--optimizer", "adam", "--lr", "1e-3", "--max-update", "1", "--num-workers", "0",
             "--no-save", "--save-dir", save_dir]
    argv = {
        "eval_lm": data + lm + ["--path", path],
        "validate": data + lm + ["--path", path],
        "generate": data + lm + ["--path", path],
        "train": data + lm + ["--arch", "gpt2_lm_tiny", "--restore-file", path] + train,
        "backbone": longmem_train_argv(corpus.data_dir, path, save_dir, "--max-update", "1",
                                       "--no-save", batch_size=2)[1:],
    }[cli]
    return [str(a) for a in argv]


def run_cases(cases, marker, env):
    """name -> (log of that case, whether it left the marker)."""
    log = run_cli(["python", "-c", DRIVER, json.dumps(cases), marker], env=env, timeout=300)
    found = re.findall(r"^=== case (\S+) ===$(.*?)^=== marker (True|False) ===$", log, re.M | re.S)
    assert [f[0] for f in found] == [c[0] for c in cases], log[-3000:]
    return {name: (body, left == "True") for name, body, left in found}


CLIS = ["eval_lm", "validate", "generate", "train"]
KINDS = ["model", "criterion", "interpolation", "argparse"]


@pytest.fixture(scope="module")
def crafted(corpus, backbone, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crafted")
    marker = str(tmp / "marker")
    base = torch.load(backbone, weights_only=True)
    env = {"LONGMEM_TEST_PAYLOAD": payload(marker)}
    files = {}
    for kind, (state, found) in crafted_states(base, marker, corpus.data_dir).items():
        files[kind] = (str(tmp / f"{kind}.pt"), found)
        torch.save(state, files[kind][0])
    return files, marker, env, str(tmp)


@pytest.fixture(scope="module")
def refused(crafted, corpus, backbone):
    files, marker, env, tmp = crafted
    cases = [(f"{kind}-{cli}", "train" if cli == "backbone" else cli,
              cli_argv(cli, files[kind][0], corpus, backbone, f"{tmp}/save-{kind}-{cli}"))
             for kind in KINDS for cli in CLIS + (["backbone"] if kind == "model" else [])]
    return run_cases(cases, marker, env)


@pytest.mark.parametrize("cli", CLIS)
@pytest.mark.parametrize("kind", KINDS)
def test_crafted_checkpoint_is_refused_in_one_line(refused, crafted, kind, cli):
    files, *_ = crafted
    path, found = files[kind]
    log, left_marker = refused[f"{kind}-{cli}"]
    assert not left_marker, f"{kind} payload ran through {cli}"
    line = next((l for l in log.splitlines() if "UnsafeCheckpointError:" in l), "")
    assert line.startswith(f"fairseq_longmem.checkpoint.guard.UnsafeCheckpointError: "
                           f"checkpoint {path} {found}"), log[-2000:]
    assert line.endswith("if you trust it, set FAIRSEQ_LONGMEM_TRUST_CHECKPOINTS=1 and retry")
    assert "num_updates" not in log and "Loaded checkpoint" not in log


def test_crafted_backbone_is_refused(refused, crafted):
    files, *_ = crafted
    log, left_marker = refused["model-backbone"]
    assert not left_marker
    assert f"UnsafeCheckpointError: checkpoint {files['model'][0]} {files['model'][1]}" in log


# the positive control, in a second interpreter; the guard itself is checked in the quick loop by
# test_crafted_checkpoint_is_refused_in_one_line
@pytest.mark.slow
def test_payloads_run_with_the_opt_in(crafted, corpus, backbone):
    """The positive control: trusted, the same files do run their code (so the tests above
    would fail without the guard)."""
    files, marker, env, tmp = crafted
    cases = [(kind, cli, cli_argv(cli, files[kind][0], corpus, backbone, f"{tmp}/trusted-{kind}"))
             for kind, cli in [("model", "eval_lm"), ("criterion", "validate"),
                               ("interpolation", "generate"), ("argparse", "eval_lm")]]
    ran = run_cases(cases, marker, dict(env, **TRUST))
    assert {kind: left for kind, (_, left) in ran.items()} == dict.fromkeys(KINDS, True)


# ---------------------------------------------------------------------------------------------
# the rules, in process


@pytest.fixture(scope="module")
def ours(backbone):
    return torch.load(backbone, weights_only=True)


def test_our_checkpoints_pass(ours, tmp_path):
    from fairseq_longmem.convert_hf_gpt2 import build_cfg, normalized_config

    assert vet(ours, "backbone") is ours
    config = normalized_config({"n_embd": 16, "n_layer": 2, "n_head": 2, "vocab_size": 40})
    fingerprint = "0" * 64  # a dict.txt's sha256, which the converter records
    converted = dict(ours, cfg=build_cfg(config, str(tmp_path), fingerprint), extra_state={})
    assert vet(converted, "converted") is converted


@pytest.mark.parametrize("change, message", [
    (lambda s: s["cfg"]["task"].update(_name="translation"),
     "names task 'translation', expected one of ['language_modeling', 'longmem_icl', "
     "'longmem_lm', 'longmem_suffix']"),
    (lambda s: s["cfg"]["task"].update(task="multilingual_translation"),
     "names task 'multilingual_translation'"),  # fairseq's legacy key outranks _name
    (lambda s: s["cfg"]["model"].update(_name="fconv_lm"), "names model 'fconv_lm'"),
    (lambda s: s["cfg"]["model"].update(_name=None, arch="fconv_lm"), "names model 'fconv_lm'"),
    (lambda s: s["cfg"]["model"].update(_name=None), "has no cfg.model._name"),
    (lambda s: s["cfg"]["task"].update(_name=["language_modeling"]),
     "names task ['language_modeling']"),
    (lambda s: s["cfg"]["common"].update({"a\nb": "${x}"}),
     "has an interpolation in cfg.common.a\\nb"),  # a key from the file cannot break the line
    (lambda s: s["cfg"]["model"].update(embed_dim=[128]),
     "has cfg.model.embed_dim of type list, expected plain values"),
    (lambda s: s["cfg"]["common"].update(user_dir=argparse.Namespace()),
     "has cfg.common.user_dir of type Namespace, expected plain values"),
    (lambda s: s["cfg"]["task"].update(data="/data/${oc.env:HOME}"),
     "has an interpolation in cfg.task.data"),
    (lambda s: s["extra_state"]["metrics"]["train"].append((0, "x", "OrderedDict", {})),
     "has a meter of class 'OrderedDict' in extra_state.metrics['train'], expected one of "
     "fairseq's meters (AverageMeter, "),
])
def test_rule(ours, change, message):
    state = copy.deepcopy(ours)
    change(state)
    with pytest.raises(UnsafeCheckpointError) as e:
        vet(state, "ck.pt")
    assert str(e.value).startswith(f"checkpoint ck.pt {message}"), str(e.value)
    assert "\n" not in str(e.value)


def test_plugin_tasks_join_the_allow_list(ours, monkeypatch):
    monkeypatch.setitem(checkpoint_guard.LOADABLE, "task", set(checkpoint_guard.LOADABLE["task"]))
    state = copy.deepcopy(ours)
    state["cfg"]["task"]["_name"] = "longmem_new_task"
    with pytest.raises(UnsafeCheckpointError):
        vet(state, "ck.pt")
    checkpoint_guard.allow("task", "longmem_new_task")
    assert vet(state, "ck.pt") is state


def test_a_checkpoint_from_before_an_option_gets_its_default_so_overrides_reach_it():
    """fairseq's --model-overrides replaces only keys a checkpoint has: the loader adds the
    plugin models' newer options at their defaults (the behaviour from before they existed)."""
    from fairseq.models import MODEL_DATACLASS_REGISTRY

    from fairseq_longmem.fairseq_patches.torch_load import add_new_model_options

    state = {"cfg": {"model": {"_name": "longmem_llama", "read_layers": "15-29"}}}
    model = add_new_model_options(state)["cfg"]["model"]
    assert model["read_layers"] == "15-29"  # what the file holds stays
    assert (model["search_every"], model["memory_read"], model["disable_memory"]) == (1, "gated",
                                                                                      False)
    assert not any("${" in str(v) for v in model.values())
    assert "dictionary_fingerprint" not in model  # absent: older than fingerprints (a warning)
    defaults = MODEL_DATACLASS_REGISTRY["longmem_llama"]()
    assert model["memory_size"] == defaults.memory_size
    foreign = {"cfg": {"model": {"_name": "transformer_lm"}}}
    assert add_new_model_options(copy.deepcopy(foreign)) == foreign  # not ours: untouched
    arch = add_new_model_options({"cfg": {"model": {"_name": "gpt2_lm_tiny"}}})["cfg"]["model"]
    assert "mask_special_logits" in arch  # an arch name stands for its model
