"""Bad input through fairseq's real CLIs: each case is refused with one line that names the file
or option, the value and the fix, or runs on with a warning; nothing the user saved is changed.

Every case runs through its console script's own entry point (``fairseq-train``,
``fairseq-eval-lm``, ``fairseq-validate``, ``fairseq-generate``, ``fairseq-interactive``), all in one
interpreter (``run_cli_cases``) so that the ~40 cases pay fairseq's import once. The refusals are
one table, ``REFUSED``: each case with the parts its last line (the error the user reads) holds."""

import hashlib
import os
import re
import shutil
from types import SimpleNamespace

import pytest
import torch

from conftest import (
    LONGMEM_UPDATES,
    TOKENS_PER_SAMPLE,
    USER_DIR,
    as_case,
    corpus_text,
    longmem_train_argv,
    make_documents,
    run_cli_cases,
)

BATCH_SIZE = 4
FIRST_LEG_UPDATES = LONGMEM_UPDATES  # the session's LongMem run stopped mid-epoch here
HUGE_MEMORY = 2**40  # tokens per stream: far beyond any machine
# dict.txt lines a short dictionary keeps: 4 + 20 symbols, fewer than the corpus's ids need
SHORT_DICT_LINES = 20


def train(data, backbone, save_dir, *extra, batch_size=BATCH_SIZE, **kwargs):
    return as_case(longmem_train_argv(data, backbone, save_dir, *extra, batch_size=batch_size,
                                      **kwargs))


def evaluate(script, data, checkpoint, *extra, task="longmem_lm", batch_size=BATCH_SIZE,
             split="valid"):
    subset = "--valid-subset" if script == "fairseq-validate" else "--gen-subset"
    return (script, [
        data, "--user-dir", USER_DIR, "--task", task, "--path", checkpoint,
        "--tokens-per-sample", TOKENS_PER_SAMPLE, "--batch-size", batch_size, "--cpu",
        "--num-workers", "0", subset, split, *extra,
    ])


def copy_data(src, dst, splits=("valid",)):
    os.makedirs(dst)
    shutil.copy(os.path.join(src, "dict.txt"), dst)
    for split in splits:
        for ext in (".bin", ".idx"):
            shutil.copy(os.path.join(src, split + ext), dst)
    return dst


def without_fingerprint(src, dst):
    """A copy of a checkpoint as written before dictionary fingerprints existed."""
    state = torch.load(src, weights_only=False)
    state["cfg"]["model"].pop("dictionary_fingerprint", None)
    torch.save(state, dst)
    return dst


def snapshot(*roots):
    """path -> sha256 of every file under ``roots`` (files or folders)."""
    out = {}
    for root in roots:
        paths = [root] if os.path.isfile(root) else [
            os.path.join(d, f) for d, _, files in os.walk(root) for f in files]
        for path in paths:
            with open(path, "rb") as f:
                out[path] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def inputs(corpus, backbone, longmem_run, tmp_path_factory):
    """Damaged and mismatched inputs, each in its own folder; the session's LongMem checkpoint."""
    tmp = str(tmp_path_factory.mktemp("bad_input"))
    p = lambda *a: os.path.join(tmp, *a)  # noqa: E731
    ins = {"tmp": tmp, "longmem_ckpt": longmem_run.checkpoint}

    # damaged backbone files
    ins["empty_pt"] = p("empty.pt")
    open(ins["empty_pt"], "wb").close()
    ins["text_pt"] = p("notes.pt")
    with open(ins["text_pt"], "w") as f:
        f.write("not a checkpoint\n")
    ins["truncated_pt"] = p("truncated.pt")
    with open(backbone, "rb") as f, open(ins["truncated_pt"], "wb") as g:
        g.write(f.read()[: os.path.getsize(backbone) // 2])
    ins["missing_pt"] = p("no_such_backbone.pt")

    # damaged binarized splits; a data folder with a dictionary only; no data folder at all
    for name in ("empty_bin", "truncated_bin", "empty_idx", "truncated_idx"):
        copy_data(corpus.data_dir, p(name))
    open(p("empty_bin", "valid.bin"), "wb").close()
    truncated_bin = p("truncated_bin", "valid.bin")
    os.truncate(truncated_bin, os.path.getsize(truncated_bin) // 2)
    open(p("empty_idx", "valid.idx"), "wb").close()
    os.truncate(p("truncated_idx", "valid.idx"), 100)
    ins["dict_only"] = copy_data(corpus.data_dir, p("dict_only"), splits=())
    ins["no_data"] = p("no_such_data")

    # splits without documents: only empty lines (valid) and nothing at all (test)
    with open(p("blank.txt"), "w") as f:
        f.write("\n\n\n")
    open(p("nothing.txt"), "w").close()
    ins["no_docs"] = p("no_docs")

    # dictionaries: same symbols in another order; too short for the data's ids
    with open(os.path.join(corpus.data_dir, "dict.txt")) as f:
        lines = f.read().splitlines(keepends=True)
    copy_data(corpus.data_dir, p("reordered"), splits=("train", "valid"))
    with open(p("reordered", "dict.txt"), "w") as f:
        f.writelines([lines[1], lines[0]] + lines[2:])
    copy_data(corpus.data_dir, p("short_dict"))
    with open(p("short_dict", "dict.txt"), "w") as f:
        f.writelines(lines[:SHORT_DICT_LINES])
    ins["short_backbone"] = p("short_backbone", "checkpoint_last.pt")

    # checkpoints written before fingerprints
    ins["old_backbone"] = without_fingerprint(backbone, p("old_backbone.pt"))
    ins["old_longmem"] = without_fingerprint(ins["longmem_ckpt"], p("old_longmem.pt"))

    # other training data in the same stream layout (same dictionary, other documents)
    with open(p("other_train.txt"), "w") as f:
        f.write(corpus_text(make_documents(40, seed=7)))
    ins["other_data"] = p("other_data")
    for name in ("resume_other_data", "resume_other_data_reset"):
        os.makedirs(p(name))
        shutil.copy(ins["longmem_ckpt"], p(name))

    dict_txt = os.path.join(corpus.data_dir, "dict.txt")
    made = run_cli_cases({
        "no_docs": ("fairseq-preprocess", [
            "--only-source", "--srcdict", dict_txt, "--validpref", p("blank.txt"),
            "--testpref", p("nothing.txt"), "--destdir", ins["no_docs"], "--workers", "1"]),
        # a backbone trained with the short dictionary (the other words binarized as <unk>), so
        # that only the data's ids can tell that the data was binarized with another dictionary
        "short_dict_bin": ("fairseq-preprocess", [
            "--only-source", "--srcdict", p("short_dict", "dict.txt"), "--trainpref",
            os.path.join(corpus.text_dir, "train.txt"), "--destdir", p("short_dict_bin"),
            "--workers", "1"]),
        "short_backbone": ("fairseq-train", [
            p("short_dict_bin"), "--user-dir", USER_DIR, "--task", "language_modeling",
            "--arch", "gpt2_lm_tiny", "--tokens-per-sample", TOKENS_PER_SAMPLE, "--batch-size",
            "8", "--max-update", "1", "--optimizer", "adam", "--lr", "1e-3", "--cpu",
            "--num-workers", "0", "--disable-validation", "--no-epoch-checkpoints",
            "--save-dir", p("short_backbone")]),
        "other_data": ("fairseq-preprocess", [
            "--only-source", "--srcdict", dict_txt, "--trainpref", p("other_train.txt"),
            "--destdir", ins["other_data"], "--workers", "1"]),
        # a checkpoint at the end of an epoch: one stream per document makes a short epoch
        "epoch_end": train(corpus.data_dir, backbone, p("resume_at_epoch_end"), "--max-epoch", "1",
                           "--no-epoch-checkpoints", "--disable-validation",
                           batch_size=len(corpus.docs["train"])),
    })
    for name, case in made.items():
        assert not case.failed, f"{name}:\n{case.log[-3000:]}"
    for ext in (".bin", ".idx"):
        shutil.copy(os.path.join(corpus.data_dir, "valid" + ext), ins["other_data"])
    ins["epoch_end_log"] = made["epoch_end"].log
    return ins


def cases(corpus, backbone, ins):
    data, ck, tmp = corpus.data_dir, ins["longmem_ckpt"], ins["tmp"]
    save = lambda name: os.path.join(tmp, "save", name)  # noqa: E731
    t = lambda name, *extra, data=data, backbone=backbone, **kw: train(  # noqa: E731
        data, backbone, save(name), "--max-update", "1", *extra, **kw)
    return {
        # 1: missing and mismatched inputs
        "backbone_missing": t("backbone_missing", backbone=ins["missing_pt"]),
        "backbone_not_gpt2_lm": t("backbone_not_gpt2_lm", backbone=ck),
        "backbone_wrong_size": t("backbone_wrong_size", arch="longmem_gpt2_small"),
        "data_dir_missing": t("data_dir_missing", data=ins["no_data"]),
        "split_missing": t("split_missing", data=ins["dict_only"]),
        # 2: memory settings
        "memory_not_chunk_multiple": t("memory_not_chunk_multiple",
                                       memory=["--memory-size", "1022", "--chunk-size", "4"]),
        "retrieved_exceeds_memory": t("retrieved_exceeds_memory", memory=[
            "--memory-size", "16", "--chunk-size", "4", "--retrieved-tokens", "32"]),
        # 3: splits without documents
        "eval_lm_blank_split": evaluate("fairseq-eval-lm", ins["no_docs"], ck),
        "validate_blank_split": evaluate("fairseq-validate", ins["no_docs"], ck),
        "eval_lm_empty_split": evaluate("fairseq-eval-lm", ins["no_docs"], ck, split="test"),
        # 4: generation
        "generate": evaluate("fairseq-generate", data, ck),
        "generate_gpt2_lm": evaluate("fairseq-generate", data, backbone, "--prompt-tokens", "20"),
        "prompt_too_long": evaluate("fairseq-generate", data, ck, "--prompt-tokens", "100000"),
        "interactive": ("fairseq-interactive", [
            data, "--user-dir", USER_DIR, "--task", "longmem_lm", "--path", ck,
            "--batch-size", "1", "--cpu"]),
        # 5: damaged files
        "backbone_empty": t("backbone_empty", backbone=ins["empty_pt"]),
        "backbone_text": t("backbone_text", backbone=ins["text_pt"]),
        "backbone_truncated": t("backbone_truncated", backbone=ins["truncated_pt"]),
        "bin_empty": evaluate("fairseq-eval-lm", os.path.join(tmp, "empty_bin"), ck),
        "bin_truncated": evaluate("fairseq-validate", os.path.join(tmp, "truncated_bin"), ck),
        "idx_empty": evaluate("fairseq-validate", os.path.join(tmp, "empty_idx"), ck),
        "idx_truncated": evaluate("fairseq-eval-lm", os.path.join(tmp, "truncated_idx"), ck),
        # 6: dictionaries
        "reordered_dict_backbone": t("reordered_dict_backbone",
                                     data=os.path.join(tmp, "reordered")),
        "reordered_dict_eval_gpt2_lm": evaluate(
            "fairseq-eval-lm", os.path.join(tmp, "reordered"), backbone, task="language_modeling"),
        "reordered_dict_eval_longmem": evaluate(
            "fairseq-eval-lm", os.path.join(tmp, "reordered"), ck),
        "short_dict": t("short_dict", data=os.path.join(tmp, "short_dict"),
                        backbone=ins["short_backbone"]),
        "old_backbone": t("old_backbone", "--no-save", backbone=ins["old_backbone"]),
        "old_gpt2_lm_eval": evaluate("fairseq-eval-lm", data, ins["old_backbone"],
                                     task="language_modeling"),
        "old_longmem_eval": evaluate("fairseq-eval-lm", data, ins["old_longmem"]),
        # 7: options
        "tokens_per_sample_0": t("tokens_per_sample_0", "--tokens-per-sample", "0"),
        "batch_size_negative": t("batch_size_negative", "--batch-size", "-1"),
        "memory_layer_negative": t("memory_layer_negative", "--memory-layer", "-5"),
        "memory_too_large": t("memory_too_large", "--memory-size", HUGE_MEMORY),
        "fp16_cpu": t("fp16_cpu", "--fp16"),
        "bf16_cpu": t("bf16_cpu", "--bf16"),
        # 8: surprises
        "more_streams_than_documents": evaluate("fairseq-eval-lm", data, ck, batch_size=16),
        "resume_other_data": train(ins["other_data"], backbone,
                                   os.path.join(tmp, "resume_other_data"),
                                   "--max-update", FIRST_LEG_UPDATES + 2),
        "resume_other_data_reset": train(
            ins["other_data"], backbone, os.path.join(tmp, "resume_other_data_reset"),
            "--max-update", FIRST_LEG_UPDATES + 2, "--reset-dataloader", "--no-save"),
        "resume_other_data_at_epoch_end": train(
            ins["other_data"], backbone, os.path.join(tmp, "resume_at_epoch_end"), "--max-epoch",
            "2", "--no-save", "--disable-validation", batch_size=len(corpus.docs["train"])),
    }


@pytest.fixture(scope="module")
def logs(corpus, backbone, inputs):
    """name -> CaseLog of every case, and whether any file the user had was changed."""
    todo = cases(corpus, backbone, inputs)
    roots = (inputs["tmp"], corpus.data_dir, backbone, inputs["longmem_ckpt"])
    before = snapshot(*roots)
    out = run_cli_cases(todo, timeout=600)
    after = snapshot(*roots)
    changed = sorted(p for p in before if before[p] != after.get(p))
    added = sorted(set(after) - set(before))
    return out, changed, added


def refused(logs, name, *parts):
    """The case failed and its last line (the error the user reads) holds every part."""
    case = logs[0][name]
    assert case.failed, f"{name} did not fail:\n" + "\n".join(case.log.splitlines()[-15:])
    line = case.last_line()
    for part in parts:
        assert part in line, f"{name}: expected {part!r} in the last line:\n{line}"
    assert "num_updates" not in case.log  # refused before any training
    return line


def passed(logs, name):
    case = logs[0][name]
    assert not case.failed, f"{name} failed:\n" + "\n".join(case.log.splitlines()[-15:])
    return case.log


def test_nothing_the_user_saved_is_changed(logs):
    _, changed, added = logs
    assert changed == [] and added == []


def valid_items(corpus):
    """(items, data bytes) of the valid split's .idx/.bin: one item per line, plus one (a lone
    </s>) per boundary between documents; 2-byte ids."""
    items = sum(len(doc) for doc in corpus.docs["valid"]) + len(corpus.docs["valid"]) - 1
    return items, 2 * corpus.num_tokens("valid") + 2 * (len(corpus.docs["valid"]) - 1)


def memory_need(msz):
    """Bytes of a training and a validation memory of ``msz`` tokens per stream: 4 rows x 4
    heads x 32 dims x 4 bytes, per head keys and values of msz tokens, msz / csz chunk means, a
    4-token staging area (K and V); plus, per row, an 8-byte write time for each chunk."""
    return 2 * BATCH_SIZE * (4 * 32 * 4 * (2 * msz + msz // 4 + 8) + 8 * (msz // 4))


def short_dict_top_id(corpus):
    from fairseq.data import Dictionary

    full = Dictionary.load(os.path.join(corpus.data_dir, "dict.txt"))
    return max(full.index(w) for doc in corpus.docs["valid"] for line in doc for w in line.split())


# name -> the parts of the one line a refused case ends with, from the inputs ``x`` (ins,
# corpus, backbone); every refusal also trains nothing
REFUSED = {
    # 1: missing and mismatched inputs
    "backbone_missing": lambda x: [f"--backbone-path: no checkpoint at {x.ins['missing_pt']}"],
    "backbone_not_gpt2_lm": lambda x: [
        "is not a gpt2_lm checkpoint (model 'longmem_gpt2_tiny')"],
    "backbone_wrong_size": lambda x: [
        "is a gpt2_lm of embed_dim/num_layers/num_heads (128, 4, 4) but the arch expects "
        "(768, 12, 12)"],
    "data_dir_missing": lambda x: [
        "Dictionary not found: " + os.path.join(x.ins["no_data"], "dict.txt")],
    "split_missing": lambda x: ["Dataset not found: valid"],
    # 2: memory settings
    "memory_not_chunk_multiple": lambda x: [
        "--memory-size (1022) must be a positive multiple of --chunk-size (4)"],
    "retrieved_exceeds_memory": lambda x: ["--retrieved-tokens (32) exceeds --memory-size (16)"],
    # 3: splits without documents (eval-lm and validate alike)
    **{name: lambda x: [f"valid ({os.path.join(x.ins['no_docs'], 'valid')}.bin) holds no "
                        "document", "its 3 items are all empty lines",
                        "one empty line between documents"]
       for name in ("eval_lm_blank_split", "validate_blank_split")},
    "eval_lm_empty_split": lambda x: [f"test ({os.path.join(x.ins['no_docs'], 'test')}.bin) holds "
                                      "no document (it holds no item)"],
    # 4: generation (itself tested in tests/test_generation.py)
    "generate": lambda x: ["fairseq-generate --task longmem_lm continues prompts: pass "
                           "--prompt-tokens N"],
    "generate_gpt2_lm": lambda x: ["--task longmem_lm generates with a longmem_gpt2 checkpoint",
                                   "gpt2_lm", "--task language_modeling"],
    "prompt_too_long": lambda x: ["--prompt-tokens 100000 is larger than 12 of the 12 documents",
                                  "pass --prompt-tokens"],
    # 5: damaged files
    "backbone_empty": lambda x: [f"--backbone-path {x.ins['empty_pt']} is empty (0 bytes"],
    "backbone_text": lambda x: [f"--backbone-path {x.ins['text_pt']} is not a torch checkpoint",
                                "b'not '"],
    "backbone_truncated": lambda x: [
        f"--backbone-path {x.ins['truncated_pt']} ({os.path.getsize(x.backbone) // 2} bytes) "
        "cannot be read as a torch checkpoint, truncated or damaged"],
    "bin_empty": lambda x: [
        f"{x.split('empty_bin', '.bin')} is truncated: 0 bytes, but "
        f"{x.split('empty_bin', '.idx')} indexes {x.valid[1]} bytes ({x.valid[0]} items)"],
    "bin_truncated": lambda x: [
        f"{x.split('truncated_bin', '.bin')} is truncated: {x.valid[1] // 2} bytes, but "
        f"{x.split('truncated_bin', '.idx')} indexes {x.valid[1]} bytes ({x.valid[0]} items)"],
    "idx_empty": lambda x: [f"{x.split('empty_idx', '.idx')} is empty (0 bytes)"],
    "idx_truncated": lambda x: [
        f"{x.split('truncated_idx', '.idx')} is truncated: 100 bytes, but its header lists "
        f"{x.valid[0]} items, which take {26 + 12 * x.valid[0]} bytes"],
    # 6: dictionaries
    "reordered_dict_backbone": lambda x: [
        f"--backbone-path {x.backbone} was trained with a dictionary of fingerprint",
        f"but {x.reordered_dict} (32 symbols) has fingerprint", "fairseq-preprocess --srcdict"],
    "reordered_dict_eval_gpt2_lm": lambda x: [
        "the gpt2_lm checkpoint was trained with a dictionary of fingerprint",
        f"but {x.reordered_dict} (32 symbols)"],
    "reordered_dict_eval_longmem": lambda x: [
        "the longmem_gpt2 checkpoint was trained with a dictionary of fingerprint",
        f"but {x.reordered_dict} (32 symbols)"],
    "short_dict": lambda x: [
        f"{os.path.join(x.ins['tmp'], 'short_dict', 'valid')}.bin holds token id "
        f"{short_dict_top_id(x.corpus)} but "
        f"{os.path.join(x.ins['tmp'], 'short_dict', 'dict.txt')} has only "
        f"{4 + SHORT_DICT_LINES} symbols"],
    # 7: options
    "tokens_per_sample_0": lambda x: [
        "--tokens-per-sample must be a positive segment length", "got 0"],
    "batch_size_negative": lambda x: [
        "--batch-size must be a positive number of streams per GPU, got -1"],
    "memory_layer_negative": lambda x: [
        "--memory-layer -5 is not a layer of the 4-layer backbone: expected 0 to 3"],
    "memory_too_large": lambda x: [
        f"--memory-size {HUGE_MEMORY} needs {memory_need(HUGE_MEMORY) / 2**30:,.1f} GiB for a "
        "training and a validation memory", "GiB free on cpu", "lower --memory-size or --batch-size"],
    **{f"{flag}_cpu": (lambda flag: lambda x: [
        f"--{flag} training needs a CUDA GPU (--cpu): drop --{flag}"])(flag)
       for flag in ("fp16", "bf16")},
    # 8: surprises
    "resume_other_data": lambda x: [
        f"the checkpoint stopped mid-epoch in {os.path.join(x.corpus.data_dir, 'train')} "
        "(40 documents",
        f"this run's {os.path.join(x.ins['other_data'], 'train')} holds 40 documents",
        "--reset-dataloader"],
}


@pytest.fixture(scope="module")
def expected(inputs, corpus, backbone):
    """What the REFUSED table reads: the inputs and what follows from them."""
    return SimpleNamespace(
        ins=inputs, corpus=corpus, backbone=backbone, valid=valid_items(corpus),
        split=lambda name, ext: os.path.join(inputs["tmp"], name, "valid" + ext),
        reordered_dict=os.path.join(inputs["tmp"], "reordered", "dict.txt"))


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_in_one_line(logs, expected, name):
    refused(logs, name, *REFUSED[name](expected))


def test_every_case_is_checked(logs):
    checked = set(REFUSED) | {
        "interactive", "old_backbone", "old_gpt2_lm_eval", "old_longmem_eval",
        "more_streams_than_documents", "resume_other_data_reset",
        "resume_other_data_at_epoch_end"}
    assert checked == set(logs[0])


# ---------------------------------------------------------------------------------------------
# runs on


def test_generation_without_input_generates_nothing(logs):
    log = passed(logs, "interactive")  # an empty stdin: no prompt, nothing generated
    assert "H-" not in log


def test_fingerprint_is_sha256_of_the_symbols_in_order(backbone, corpus):
    with open(os.path.join(corpus.data_dir, "dict.txt")) as f:
        symbols = ["<s>", "<pad>", "</s>", "<unk>"] + [line.split()[0] for line in f]
    expected = hashlib.sha256("".join(s + "\n" for s in symbols).encode()).hexdigest()
    saved = torch.load(backbone, weights_only=False)["cfg"]["model"]
    assert saved["dictionary_fingerprint"] == expected


def test_checkpoint_without_fingerprint_loads_with_a_warning(logs, inputs, corpus):
    warning = "records no dictionary fingerprint (written by an older fairseq-longmem)"
    log = passed(logs, "old_backbone")
    assert f"--backbone-path {inputs['old_backbone']} {warning}" in log
    assert "num_updates 1" in log
    for name, model in (("old_gpt2_lm_eval", "gpt2_lm"), ("old_longmem_eval", "longmem_gpt2")):
        log = passed(logs, name)
        assert f"the {model} checkpoint {warning}" in log
        assert re.search(r"Loss \(base 2\): \d+\.\d+", log)
    assert f"Evaluated {corpus.num_tokens('valid')} tokens" in logs[0]["old_longmem_eval"].log


def test_more_streams_than_documents_warns_and_runs_on(logs, corpus):
    log = passed(logs, "more_streams_than_documents")
    assert ("valid has 12 documents for 16 streams (--batch-size 16 x 1 ranks): 4 streams get no "
            "document") in log
    assert f"Evaluated {corpus.num_tokens('valid')} tokens" in log


def test_resume_on_other_data_is_refused_unless_the_dataloader_is_reset(logs):
    line = logs[0]["resume_other_data"].last_line()  # the refusal's text: REFUSED
    sha = re.findall(r"sha256 ([0-9a-f]{12})", line)
    assert len(sha) == 2 and sha[0] != sha[1]
    log = passed(logs, "resume_other_data_reset")
    assert f"(epoch 1 @ {FIRST_LEG_UPDATES} updates)" in log and "done training" in log
    assert re.search(rf"num_updates {FIRST_LEG_UPDATES + 2}\b", log)


def test_resume_on_other_data_at_an_epoch_end_runs(logs, inputs):
    """A checkpoint saved at the end of an epoch resumes at the start of the next: any data may
    follow, so other documents are no reason to refuse."""
    updates = int(re.findall(r"num_updates (\d+)", inputs["epoch_end_log"])[-1])
    log = passed(logs, "resume_other_data_at_epoch_end")
    assert f"(epoch 2 @ {updates} updates)" in log and "done training" in log
    assert "epoch 002" in log and "epoch 001" not in log.split("Loaded checkpoint")[-1]
