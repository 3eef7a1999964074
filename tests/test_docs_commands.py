"""Every command in README.md and the docs runs as written: the fenced bash blocks are parsed, every
script or module they name must exist, every --option given to a fairseq CLI must be accepted by
that CLI's parser with the plugin loaded (fairseq's own options.get_*_parser and
parse_args_and_arch, which add the task's, model's and criterion's options), every --option given
to one of our scripts must be one its argparse parser defines, and a command that reads data or a
checkpoint no earlier command of the same page makes is marked `# needs: ...` in its block."""

import contextlib
import glob
import io
import os
import re
import shlex
import sys
from functools import lru_cache

import pytest

from conftest import REPO, USER_DIR

DOCS = sorted(
    [os.path.join(REPO, "README.md")]
    + glob.glob(os.path.join(REPO, "docs", "*.md"))
    + glob.glob(os.path.join(REPO, "examples", "**", "README.md"), recursive=True)
)
# tokens that name a file of the repository (checked to exist)
REPO_PREFIXES = ("examples/", "tests/", "docs/", "fairseq_longmem/", "user_dir_configs/", ".ci/")
REPO_FILES = ("install.sh", "setup.py")
FAIRSEQ_PARSERS = {
    "fairseq-train": "get_training_parser",
    "fairseq-eval-lm": "get_eval_lm_parser",
    "fairseq-validate": "get_validation_parser",
    "fairseq-generate": "get_generation_parser",
    "fairseq-interactive": "get_interactive_generation_parser",
    "fairseq-preprocess": "get_preprocessing_parser",
}
# options whose value is a file or folder the command reads (the `# needs:` rule)
INPUT_OPTIONS = ("--path", "--backbone-path", "--restore-file", "--icl-data-dir", "--suffix-data",
                 "--corpus", "--dict-dir", "--data-dir", "--input-dir", "--srcdict")
# options whose value is what the command writes
OUTPUT_OPTIONS = ("--out", "--save-dir", "--destdir")
SEPARATORS = {"&&", "||", ";", "|", "&"}


def blocks(path):
    """(first line number, text) of each fenced bash block of a markdown file."""
    text = open(path, encoding="utf-8").read()
    for m in re.finditer(r"^```(?:bash|sh|shell)\n(.*?)^```", text, re.S | re.M):
        yield text[: m.start()].count("\n") + 2, m.group(1)


def commands(block):
    """The block's commands, each a list of words, in order ($(...) first, then its line)."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        for inner in re.findall(r"\$\(([^()]*)\)", line):
            out.extend(commands(inner))
        line = re.sub(r"\$\(([^()]*)\)", "SUBSTITUTED", line)
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split, lex.commenters = True, "#"
        words = []
        # not `for word in lex`: iteration stops at an empty word ('')
        while (word := lex.get_token()) is not None:
            if word in SEPARATORS or (word and set(word) <= set("&|;")):
                out.append(words)
                words = []
            else:
                words.append(word)
        out.append(words)
    result = []
    for words in out:
        while words and re.match(r"^[A-Za-z_]\w*=", words[0]):  # VAR=value prefixes
            words = words[1:]
        if words and not words[0].startswith("-"):  # a fragment of options is not a command
            result.append(words)
    return result


def all_commands():
    for doc in DOCS:
        for line, block in blocks(doc):
            for words in commands(block):
                yield doc, line, block, words


def case_id(case):
    doc, line, _, words = case
    return f"{os.path.relpath(doc, REPO)}:{line}:{words[0]}"


CASES = list(all_commands())


def script_of(words):
    """The repository file a command runs (a script or `python -m` module), or None."""
    prog = words[0]
    if prog in ("python", "python3") and len(words) > 1:
        if words[1] == "-m":
            module = words[2]
            if not module.startswith("fairseq_longmem"):
                return None
            base = os.path.join(REPO, *module.split("."))
            return base + ".py" if not os.path.isdir(base) else os.path.join(base, "__main__.py")
        return os.path.join(REPO, words[1])
    if prog in ("bash", "sh", "source", ".") and len(words) > 1 and words[1].startswith(REPO_PREFIXES):
        return os.path.join(REPO, words[1])
    return None


@lru_cache(maxsize=None)
def script_options(path):
    """The option strings an argparse script defines, read from its add_argument calls."""
    source = open(path, encoding="utf-8").read()
    found = set()
    for call in re.findall(r"add_argument\(\s*((?:[\"'][^\"']*[\"']\s*(?:,\s*|\)))+)", source):
        found.update(o for o in re.findall(r"[\"']([^\"']*)[\"']", call) if o.startswith("-"))
    return found | {"-h", "--help"}


def given_options(words):
    """The --options of a command, up to a `--` that passes the rest on."""
    opts = []
    for w in words[1:]:
        if w == "--":
            break
        if w.startswith("--"):
            opts.append(w.split("=", 1)[0])
    return opts


def test_the_docs_have_commands():
    progs = {words[0] for _, _, _, words in CASES}
    assert {"fairseq-train", "fairseq-eval-lm", "fairseq-generate", "python", "bash"} <= progs
    assert len(CASES) >= 30


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_every_file_a_command_names_exists(case):
    doc, line, _, words = case
    script = script_of(words)
    if script is not None:
        assert os.path.isfile(script), f"{doc}:{line}: `{' '.join(words)}` runs {script}, which is missing"
    for w in words:
        w = w.split("=", 1)[-1]
        if w.startswith(REPO_PREFIXES) or w in REPO_FILES:
            path = os.path.join(REPO, w.split("{")[0])  # a brace pattern: its fixed part
            assert os.path.exists(path) or glob.glob(path + "*"), \
                f"{doc}:{line}: `{' '.join(words)}` names {w}, which is not in the repository"


SCRIPT_CASES = [c for c in CASES if (s := script_of(c[3])) and s.endswith(".py")]


@pytest.mark.parametrize("case", SCRIPT_CASES, ids=case_id)
def test_every_option_given_to_our_scripts_is_defined(case):
    doc, line, _, words = case
    script = script_of(words)
    known = script_options(script)
    unknown = [o for o in given_options(words) if o not in known]
    assert not unknown, f"{doc}:{line}: {os.path.relpath(script, REPO)} has no option {unknown}"


@lru_cache(maxsize=None)
def fairseq_options():
    """fairseq's options module, with every task and model of the plugin registered: what
    `--user-dir` does in a fresh process (fairseq scans the plugin's tasks/ and models/ folders
    only when it imports the package itself, and another test may have imported it already)."""
    from fairseq import options
    from fairseq.models import import_models
    from fairseq.tasks import import_tasks

    for sub, scan in (("tasks", import_tasks), ("models", import_models)):
        folder = os.path.join(USER_DIR, sub)
        if os.path.isdir(folder):
            scan(folder, f"fairseq_longmem.{sub}")
    return options


def parse_fairseq(prog, args):
    """Parse args as `prog` would, with the plugin loaded; returns argparse's error or None."""
    options = fairseq_options()
    parser = getattr(options, FAIRSEQ_PARSERS[prog])()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            if prog == "fairseq-preprocess":
                parser.parse_args(args)
            else:
                options.parse_args_and_arch(parser, input_args=args)
    except SystemExit:
        return err.getvalue().strip().splitlines()[-1]
    return None


FAIRSEQ_CASES = [c for c in CASES if c[3][0] in FAIRSEQ_PARSERS]


@pytest.mark.parametrize("case", FAIRSEQ_CASES, ids=case_id)
def test_every_option_given_to_fairseq_is_accepted(case):
    doc, line, _, words = case
    args = [USER_DIR if w in ("$UD", "${UD}") else w for w in words[1:]]
    error = parse_fairseq(words[0], args)
    assert error is None, f"{doc}:{line}: `{' '.join(words)}`: {error}"


def test_the_options_check_refuses_a_wrong_option():
    args = ["data", "--user-dir", USER_DIR, "--task", "longmem_lm", "--arch", "longmem_gpt2_tiny",
            "--memory-search", "auto"]
    assert "unrecognized arguments: --memory-search auto" in parse_fairseq("fairseq-train", args)
    assert parse_fairseq("fairseq-train", args[:-2] + ["--search-backend", "matmul"]) is None
    assert "invalid choice" in parse_fairseq("fairseq-train", args[:-2] + ["--search-backend", "x"])


def produced(words):
    """What a command writes: its --out/--save-dir/--destdir values, fairseq-train's default
    save folder, the converter's output folder, and where the ICL fetcher puts its files."""
    out = [words[i + 1] for i, w in enumerate(words[:-1]) if w in OUTPUT_OPTIONS]
    if words[0] == "fairseq-train" and "--save-dir" not in words:
        out.append("checkpoints")
    if words[:3] == ["python", "-m", "fairseq_longmem.convert_hf_gpt2"] and len(words) > 4:
        out.append(words[4])
    script = script_of(words) or ""
    if script.endswith("get_authors_icl_data.py"):
        out = [os.path.join(o, "data", "icl", "original") for o in out or ["."]]
    return [os.path.normpath(o) for o in out]


def inputs(words):
    """The files or folders a command reads: a fairseq CLI's data folder, input options."""
    found = []
    if words[0] in FAIRSEQ_PARSERS and len(words) > 1 and not words[1].startswith("-"):
        found.append(words[1])
    found += [words[i + 1] for i, w in enumerate(words[:-1]) if w in INPUT_OPTIONS]
    if words[:3] == ["python", "-m", "fairseq_longmem.convert_hf_gpt2"] and len(words) > 3:
        found.append(words[3])
    return [f for f in found if not f.startswith(("$", "~", "/tmp"))]


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: os.path.relpath(d, REPO))
def test_commands_that_need_data_the_repository_lacks_say_so(doc):
    made, problems = [], []
    for line, block in blocks(doc):
        for words in commands(block):
            for path in inputs(words):
                norm = os.path.normpath(path)
                ok = (os.path.exists(os.path.join(REPO, path))
                      or any(norm == m or norm.startswith(m + os.sep) for m in made)
                      or "# needs:" in block)
                if not ok:
                    problems.append(f"line {line}: `{words[0]} ... {path}`")
            made += produced(words)
    assert not problems, (f"{os.path.relpath(doc, REPO)}: these commands read what no earlier "
                          f"command of the page makes; mark the block `# needs: ...`: {problems}")


def test_the_needs_rule_sees_an_unmarked_input():
    made = produced(["python", "examples/build_book_corpus.py", "--out", "data/books"])
    assert made == ["data/books"]
    assert inputs(["fairseq-eval-lm", "data/other/bin", "--path", "ck/a.pt"]) == ["data/other/bin", "ck/a.pt"]
    assert produced(["python", "examples/icl/get_authors_icl_data.py", "--out", "."]) == \
        [os.path.normpath("data/icl/original")]
    assert commands("UD=$(python -m fairseq_longmem.user_dir)\nA=1 bash x.sh && echo 'a # b' '' \\\n"
                    "  c # d\n") == [["python", "-m", "fairseq_longmem.user_dir"], ["bash", "x.sh"],
                                      ["echo", "a # b", "", "c"]]


# -------------------------------------------------------------------------------------------
# examples/icl/get_authors_icl_data.py, offline: file:// URLs stand for the authors' repository


def load_fetcher():
    import importlib.util

    path = os.path.join(REPO, "examples", "icl", "get_authors_icl_data.py")
    spec = importlib.util.spec_from_file_location("get_authors_icl_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_icl_fetcher_writes_the_authors_layout_and_checks_the_files(tmp_path, monkeypatch, capsys):
    import hashlib

    fetcher = load_fetcher()
    assert sorted(fetcher.FILES) == ["mpqa", "mr", "sst2", "sst5", "subj"]
    remote = tmp_path / "remote" / "mr"
    remote.mkdir(parents=True)
    files = {}
    for name, rows in (("train.csv", 8662), ("test.csv", 2000)):
        data = "".join(f"{i % 2},sentence {i}\n" for i in range(rows)).encode()
        (remote / name).write_bytes(data)
        files[f"mr/{name}"] = (rows, hashlib.sha256(data).hexdigest())
    monkeypatch.setattr(fetcher, "FILES", {"mr": files})
    monkeypatch.setattr(fetcher, "URL", "file://" + str(remote.parent) + "/{path}")
    assert fetcher.main(["--out", str(tmp_path / "u"), "--sets", "mr"]) == 0
    got = tmp_path / "u" / "data" / "icl" / "original" / "mr"
    assert sorted(os.listdir(got)) == ["test.csv", "train.csv"]
    assert (got / "test.csv").read_bytes() == (remote / "test.csv").read_bytes()
    assert "test.csv: 2000 lines" in capsys.readouterr().out
    # a second call keeps the intact files
    assert fetcher.main(["--out", str(tmp_path / "u"), "--sets", "mr"]) == 0
    assert capsys.readouterr().out.count(": present") == 2
    # an error page (wrong length) and a file of the right length but other bytes are refused,
    # and leave nothing behind
    (remote / "test.csv").write_text("<html>404</html>\n")
    with pytest.raises(SystemExit, match=r"has 1 lines, expected 2000"):
        fetcher.main(["--out", str(tmp_path / "v"), "--sets", "mr"])
    (remote / "test.csv").write_text("0,x\n" * 2000)
    with pytest.raises(SystemExit, match=r"another sha256"):
        fetcher.main(["--out", str(tmp_path / "v"), "--sets", "mr"])
    assert not (tmp_path / "v" / "data" / "icl" / "original" / "mr" / "test.csv").exists()
    # another --ref: the line count is what is checked
    assert fetcher.main(["--out", str(tmp_path / "v"), "--sets", "mr", "--ref", "main"]) == 0
    with pytest.raises(SystemExit):
        fetcher.main(["--sets", "nope"])
