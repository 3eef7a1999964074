"""Bad input through fairseq's real CLIs: each case is refused with one line that names the file
or option, the value and the fix, or runs on with a warning; nothing the user saved is changed.

Every case runs through its console script's own entry point (``fairseq-train``,
``fairseq-eval-lm``, ``fairseq-validate``, ``fairseq-generate``, ``fairseq-interactive``), all in one
interpreter (``run_cli_cases``) so that the ~30 cases pay fairseq's import once."""

import hashlib
import os
import re
import shutil

import pytest
import torch

from conftest import (
    TOKENS_PER_SAMPLE,
    USER_DIR,
    corpus_text,
    make_documents,
    run_cli,
    run_cli_cases,
)

BATCH_SIZE = 4
MEMORY = ["--memory-size", "256", "--chunk-size", "4", "--retrieved-tokens", "16"]
FIRST_LEG_UPDATES = 4  # mid-epoch: the train split makes 30 batches of 4 streams
HUGE_MEMORY = 2**40  # tokens per stream: far beyond any machine
# dict.txt lines a short dictionary keeps: 4 + 20 symbols, fewer than the corpus's ids need
SHORT_DICT_LINES = 20


def train(data, backbone, save_dir, *extra, batch_size=BATCH_SIZE):
    return ("fairseq-train", [
        data, "--user-dir", USER_DIR, "--task", "longmem_lm", "--arch", "longmem_gpt2_tiny",
        "--criterion", "longmem_cross_entropy", "--backbone-path", backbone,
        "--tokens-per-sample", TOKENS_PER_SAMPLE, "--batch-size", batch_size, *MEMORY,
        "--optimizer", "adam", "--lr", "1e-3", "--cpu", "--seed", "1", "--num-workers", "0",
        "--save-dir", save_dir, *extra,
    ])


def evaluate(script, data, checkpoint, task="longmem_lm", batch_size=BATCH_SIZE, split="valid"):
    subset = "--valid-subset" if script == "fairseq-validate" else "--gen-subset"
    return (script, [
        data, "--user-dir", USER_DIR, "--task", task, "--path", checkpoint,
        "--tokens-per-sample", TOKENS_PER_SAMPLE, "--batch-size", batch_size, "--cpu",
        "--num-workers", "0", subset, split,
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
def inputs(corpus, backbone, tmp_path_factory):
    """Damaged and mismatched inputs, each in its own folder, plus a LongMem checkpoint."""
    tmp = str(tmp_path_factory.mktemp("bad_input"))
    p = lambda *a: os.path.join(tmp, *a)  # noqa: E731
    ins = {"tmp": tmp}

    ins["longmem"] = p("longmem")  # first leg: stops mid-epoch, checkpoint_last.pt
    script, argv = train(corpus.data_dir, backbone, ins["longmem"], "--max-update",
                         FIRST_LEG_UPDATES, "--no-epoch-checkpoints", "--disable-validation")
    run_cli([script] + argv, timeout=180)
    ins["longmem_ckpt"] = os.path.join(ins["longmem"], "checkpoint_last.pt")

    # damaged backbone files
    ins["empty_pt"] = p("empty.pt")
    open(ins["empty_pt"], "wb").close()
    ins["text_pt"] = p("notes.pt")
    with open(ins["text_pt"], "w") as f:
        f.write("not a checkpoint\n")
    ins["truncated_pt"] = p("truncated.pt")
    with open(backbone, "rb") as f, open(ins["truncated_pt"], "wb") as g:
        g.write(f.read()[: os.path.getsize(backbone) // 2])

    # damaged binarized splits
    for name in ("empty_bin", "truncated_bin", "empty_idx", "truncated_idx"):
        copy_data(corpus.data_dir, p(name))
    open(p("empty_bin", "valid.bin"), "wb").close()
    truncated_bin = p("truncated_bin", "valid.bin")
    os.truncate(truncated_bin, os.path.getsize(truncated_bin) // 2)
    open(p("empty_idx", "valid.idx"), "wb").close()
    os.truncate(p("truncated_idx", "valid.idx"), 100)

    # splits without documents: only empty lines (valid) and nothing at all (test)
    with open(p("blank.txt"), "w") as f:
        f.write("\n\n\n")
    open(p("nothing.txt"), "w").close()
    ins["no_docs"] = p("no_docs")
    run_cli(["fairseq-preprocess", "--only-source", "--srcdict",
             os.path.join(corpus.data_dir, "dict.txt"), "--validpref", p("blank.txt"),
             "--testpref", p("nothing.txt"), "--destdir", ins["no_docs"], "--workers", "1"])

    # dictionaries: same symbols in another order; too short for the data's ids
    with open(os.path.join(corpus.data_dir, "dict.txt")) as f:
        lines = f.read().splitlines(keepends=True)
    copy_data(corpus.data_dir, p("reordered"), splits=("train", "valid"))
    with open(p("reordered", "dict.txt"), "w") as f:
        f.writelines([lines[1], lines[0]] + lines[2:])
    copy_data(corpus.data_dir, p("short_dict"))
    with open(p("short_dict", "dict.txt"), "w") as f:
        f.writelines(lines[:SHORT_DICT_LINES])
    # a backbone trained with that short dictionary (the other words binarized as <unk>), so that
    # only the data's ids can tell that the data was binarized with another dictionary
    run_cli(["fairseq-preprocess", "--only-source", "--srcdict", p("short_dict", "dict.txt"),
             "--trainpref", os.path.join(corpus.text_dir, "train.txt"), "--destdir",
             p("short_dict_bin"), "--workers", "1"])
    run_cli(["fairseq-train", p("short_dict_bin"), "--user-dir", USER_DIR, "--task",
             "language_modeling", "--arch", "gpt2_lm_tiny", "--tokens-per-sample",
             TOKENS_PER_SAMPLE, "--batch-size", "8", "--max-update", "1", "--optimizer", "adam",
             "--lr", "1e-3", "--cpu", "--num-workers", "0", "--disable-validation",
             "--no-epoch-checkpoints", "--save-dir", p("short_backbone")], timeout=180)
    ins["short_backbone"] = p("short_backbone", "checkpoint_last.pt")

    # checkpoints written before fingerprints
    ins["old_backbone"] = without_fingerprint(backbone, p("old_backbone.pt"))
    ins["old_longmem"] = without_fingerprint(ins["longmem_ckpt"], p("old_longmem.pt"))

    # other training data in the same stream layout (same dictionary, other documents)
    with open(p("other_train.txt"), "w") as f:
        f.write(corpus_text(make_documents(40, seed=7)))
    ins["other_data"] = p("other_data")
    run_cli(["fairseq-preprocess", "--only-source", "--srcdict",
             os.path.join(corpus.data_dir, "dict.txt"), "--trainpref", p("other_train.txt"),
             "--destdir", ins["other_data"], "--workers", "1"])
    for ext in (".bin", ".idx"):
        shutil.copy(os.path.join(corpus.data_dir, "valid" + ext), ins["other_data"])
    for name in ("resume_other_data", "resume_other_data_reset"):
        os.makedirs(p(name))
        shutil.copy(ins["longmem_ckpt"], p(name))
    # a checkpoint at the end of an epoch: one stream per document makes a short epoch
    script, argv = train(corpus.data_dir, backbone, p("resume_at_epoch_end"), "--max-epoch", "1",
                         "--no-epoch-checkpoints", "--disable-validation",
                         batch_size=len(corpus.docs["train"]))
    ins["epoch_end_log"] = run_cli([script] + argv, timeout=180)
    return ins


def cases(corpus, backbone, ins):
    data, ck, tmp = corpus.data_dir, ins["longmem_ckpt"], ins["tmp"]
    save = lambda name: os.path.join(tmp, "save", name)  # noqa: E731
    t = lambda name, *extra, data=data, backbone=backbone: train(  # noqa: E731
        data, backbone, save(name), "--max-update", "1", *extra)
    return {
        # 3: splits without documents
        "eval_lm_blank_split": evaluate("fairseq-eval-lm", ins["no_docs"], ck),
        "validate_blank_split": evaluate("fairseq-validate", ins["no_docs"], ck),
        "eval_lm_empty_split": evaluate("fairseq-eval-lm", ins["no_docs"], ck, split="test"),
        # 4: generation
        "generate": evaluate("fairseq-generate", data, ck),
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
                                   os.path.join(tmp, "resume_other_data"), "--max-update", "6"),
        "resume_other_data_reset": train(
            ins["other_data"], backbone, os.path.join(tmp, "resume_other_data_reset"),
            "--max-update", "6", "--reset-dataloader", "--no-save"),
        "resume_other_data_at_epoch_end": train(
            ins["other_data"], backbone, os.path.join(tmp, "resume_at_epoch_end"), "--max-epoch",
            "2", "--no-save", "--disable-validation", batch_size=len(corpus.docs["train"])),
    }


@pytest.fixture(scope="module")
def logs(corpus, backbone, inputs):
    """name -> CaseLog of every case, and whether any file the user had was changed."""
    todo = cases(corpus, backbone, inputs)
    before = snapshot(inputs["tmp"], corpus.data_dir, backbone)
    out = run_cli_cases(todo, timeout=600)
    after = snapshot(inputs["tmp"], corpus.data_dir, backbone)
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


# ---------------------------------------------------------------------------------------------
# 3. a split without documents


def test_split_of_empty_lines_is_refused_by_eval_lm_and_validate(logs, inputs):
    split = os.path.join(inputs["no_docs"], "valid")
    for name in ("eval_lm_blank_split", "validate_blank_split"):
        refused(logs, name, f"valid ({split}.bin) holds no document",
                "its 3 items are all empty lines", "one empty line between documents")
    assert "Perplexity" not in logs[0]["eval_lm_blank_split"].log


def test_empty_split_is_refused_before_fairseq_maps_it(logs, inputs):
    split = os.path.join(inputs["no_docs"], "test")
    refused(logs, "eval_lm_empty_split", f"test ({split}.bin) holds no document (it holds no item)")


# ---------------------------------------------------------------------------------------------
# 4. generation


def test_generation_without_prompts_is_refused_with_what_to_pass(logs):
    # generation itself is tested in tests/test_generation.py
    refused(logs, "generate", "fairseq-generate --task longmem_lm continues prompts: pass "
            "--prompt-tokens N")
    log = passed(logs, "interactive")  # an empty stdin: no prompt, nothing generated
    assert "H-" not in log


# ---------------------------------------------------------------------------------------------
# 5. damaged files


def test_damaged_backbone_file_is_named(logs, inputs, backbone):
    refused(logs, "backbone_empty", f"--backbone-path {inputs['empty_pt']} is empty (0 bytes")
    refused(logs, "backbone_text", f"--backbone-path {inputs['text_pt']} is not a torch checkpoint",
            "b'not '")
    size = os.path.getsize(backbone) // 2
    refused(logs, "backbone_truncated", f"--backbone-path {inputs['truncated_pt']} ({size} bytes) "
            "cannot be read as a torch checkpoint, truncated or damaged")


def test_damaged_split_files_are_named_before_fairseq_maps_them(logs, inputs, corpus):
    d = lambda name, ext: os.path.join(inputs["tmp"], name, "valid" + ext)  # noqa: E731
    # one item per line, plus one (a lone </s>) per boundary between documents; 2-byte ids
    items = sum(len(doc) for doc in corpus.docs["valid"]) + len(corpus.docs["valid"]) - 1
    data_bytes = 2 * corpus.num_tokens("valid") + 2 * (len(corpus.docs["valid"]) - 1)
    refused(logs, "bin_empty", f"{d('empty_bin', '.bin')} is truncated: 0 bytes, but "
            f"{d('empty_bin', '.idx')} indexes {data_bytes} bytes ({items} items)")
    refused(logs, "bin_truncated", f"{d('truncated_bin', '.bin')} is truncated: {data_bytes // 2} "
            f"bytes, but {d('truncated_bin', '.idx')} indexes {data_bytes} bytes ({items} items)")
    refused(logs, "idx_empty", f"{d('empty_idx', '.idx')} is empty (0 bytes)")
    refused(logs, "idx_truncated", f"{d('truncated_idx', '.idx')} is truncated: 100 bytes, but its "
            f"header lists {items} items, which take {26 + 12 * items} bytes")


# ---------------------------------------------------------------------------------------------
# 6. dictionaries


def test_dictionary_in_another_order_is_refused(logs, inputs, backbone):
    dict_path = os.path.join(inputs["tmp"], "reordered", "dict.txt")
    refused(logs, "reordered_dict_backbone", f"--backbone-path {backbone} was trained with a "
            f"dictionary of fingerprint", f"but {dict_path} (32 symbols) has fingerprint",
            "fairseq-preprocess --srcdict")
    refused(logs, "reordered_dict_eval_gpt2_lm", "the gpt2_lm checkpoint was trained with a "
            "dictionary of fingerprint", f"but {dict_path} (32 symbols)")
    refused(logs, "reordered_dict_eval_longmem", "the longmem_gpt2 checkpoint was trained with a "
            "dictionary of fingerprint", f"but {dict_path} (32 symbols)")


def test_fingerprint_is_sha256_of_the_symbols_in_order(backbone, corpus):
    with open(os.path.join(corpus.data_dir, "dict.txt")) as f:
        symbols = ["<s>", "<pad>", "</s>", "<unk>"] + [line.split()[0] for line in f]
    expected = hashlib.sha256("".join(s + "\n" for s in symbols).encode()).hexdigest()
    saved = torch.load(backbone, weights_only=False)["cfg"]["model"]
    assert saved["dictionary_fingerprint"] == expected


def test_dictionary_shorter_than_the_data_is_refused(logs, inputs, corpus):
    d = inputs["tmp"]
    from fairseq.data import Dictionary

    full = Dictionary.load(os.path.join(corpus.data_dir, "dict.txt"))
    top = max(full.index(w) for doc in corpus.docs["valid"] for line in doc for w in line.split())
    refused(logs, "short_dict", f"{os.path.join(d, 'short_dict', 'valid')}.bin holds token id "
            f"{top} but {os.path.join(d, 'short_dict', 'dict.txt')} has only "
            f"{4 + SHORT_DICT_LINES} symbols")


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


# ---------------------------------------------------------------------------------------------
# 7. options


def test_option_values_out_of_range_are_refused(logs):
    refused(logs, "tokens_per_sample_0", "--tokens-per-sample must be a positive segment length",
            "got 0")
    refused(logs, "batch_size_negative", "--batch-size must be a positive number of streams per "
            "GPU, got -1")
    refused(logs, "memory_layer_negative", "--memory-layer -5 is not a layer of the 4-layer "
            "backbone: expected 0 to 3")


def test_memory_that_cannot_fit_is_refused_before_allocating(logs):
    # two memories (training, validation) x 4 rows x 4 heads x 32 dims x 4 bytes, per head:
    # keys and values of msz tokens, msz / csz chunk means, a 4-token staging area (K and V);
    # plus, per row, an 8-byte write time for each of the msz / csz chunks
    need = 2 * BATCH_SIZE * (4 * 32 * 4 * (2 * HUGE_MEMORY + HUGE_MEMORY // 4 + 8)
                             + 8 * (HUGE_MEMORY // 4))
    refused(logs, "memory_too_large", f"--memory-size {HUGE_MEMORY} needs {need / 2**30:,.1f} GiB "
            "for a training and a validation memory", "GiB free on cpu",
            "lower --memory-size or --batch-size")


@pytest.mark.parametrize("flag", ["fp16", "bf16"])
def test_half_precision_training_on_cpu_is_refused(logs, flag):
    refused(logs, f"{flag}_cpu", f"--{flag} training needs a CUDA GPU (--cpu): drop --{flag}")


# ---------------------------------------------------------------------------------------------
# 8. surprises


def test_more_streams_than_documents_warns_and_runs_on(logs, corpus):
    log = passed(logs, "more_streams_than_documents")
    assert ("valid has 12 documents for 16 streams (--batch-size 16 x 1 ranks): 4 streams get no "
            "document") in log
    assert f"Evaluated {corpus.num_tokens('valid')} tokens" in log


def test_resume_on_other_data_is_refused_unless_the_dataloader_is_reset(logs, inputs, corpus):
    line = refused(logs, "resume_other_data", "the checkpoint stopped mid-epoch in "
                   f"{os.path.join(corpus.data_dir, 'train')} (40 documents",
                   f"this run's {os.path.join(inputs['other_data'], 'train')} holds 40 documents",
                   "--reset-dataloader")
    sha = re.findall(r"sha256 ([0-9a-f]{12})", line)
    assert len(sha) == 2 and sha[0] != sha[1]
    log = passed(logs, "resume_other_data_reset")
    assert f"(epoch 1 @ {FIRST_LEG_UPDATES} updates)" in log and "done training" in log
    assert re.search(r"num_updates 6\b", log)


def test_resume_on_other_data_at_an_epoch_end_runs(logs, inputs):
    """A checkpoint saved at the end of an epoch resumes at the start of the next: any data may
    follow, so other documents are no reason to refuse."""
    updates = int(re.findall(r"num_updates (\d+)", inputs["epoch_end_log"])[-1])
    log = passed(logs, "resume_other_data_at_epoch_end")
    assert f"(epoch 2 @ {updates} updates)" in log and "done training" in log
    assert "epoch 002" in log and "epoch 001" not in log.split("Loaded checkpoint")[-1]
