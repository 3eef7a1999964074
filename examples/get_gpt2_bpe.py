"""Fetch GPT-2's BPE files (encoder.json, vocab.bpe) from PyPI and write the GPT-2 dict.txt.

The files ship inside the ``openai-whisper==20230124`` sdist (``whisper/assets/gpt2/vocab.json`` is
encoder.json, ``merges.txt`` is vocab.bpe); no model hub is contacted. Usage::

    python examples/get_gpt2_bpe.py [--dest ~/.cache/fairseq_longmem/gpt2_bpe]

prints the two paths for fairseq's own GPT-2 BPE, which accepts local files::

    --bpe gpt2 --gpt2-encoder-json DEST/encoder.json --gpt2-vocab-bpe DEST/vocab.bpe

and ``DEST/dict.txt`` (GPT-2 ids ``0 .. 50255``, the converter's mapping: fairseq index = id + 4,
``</s>`` = ``<|endoftext|>``) for ``fairseq-preprocess --only-source --srcdict DEST/dict.txt``.
Running it again when the files are present and valid downloads nothing. Exit status 3 means the
registry could not be reached.
"""

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile

SDIST = "openai-whisper==20230124"
MEMBERS = {"whisper/assets/gpt2/vocab.json": "encoder.json", "whisper/assets/gpt2/merges.txt": "vocab.bpe"}
GPT2_VOCAB = 50257
DEFAULT_DEST = os.path.join(os.path.expanduser("~"), ".cache", "fairseq_longmem", "gpt2_bpe")
EXIT_REGISTRY = 3


class BpeError(RuntimeError):
    pass


def check_files(dest: str) -> None:
    """Raise BpeError unless dest holds a 50257-entry encoder.json and a vocab.bpe with its header."""
    enc, bpe = os.path.join(dest, "encoder.json"), os.path.join(dest, "vocab.bpe")
    try:
        with open(enc, encoding="utf-8") as f:
            n = len(json.load(f))
        with open(bpe, encoding="utf-8") as f:
            first = f.readline()
    except (OSError, ValueError) as e:
        raise BpeError(f"{dest}: {e}") from None
    if n != GPT2_VOCAB:
        raise BpeError(f"{enc} has {n} entries, expected {GPT2_VOCAB}")
    if not first.startswith("#version"):
        raise BpeError(f"{bpe} does not start with the '#version' header")


def pip_download(tmp: str, sdist: str = SDIST) -> str:
    """Download an sdist into tmp and return its path (no install, no dependencies)."""
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", sdist, "-d", tmp]
    # pip prepares the sdist's metadata, and whisper's setup.py imports pkg_resources, which
    # setuptools >= 81 no longer ships: pin the build environment's setuptools below that.
    constraint = os.path.join(tmp, "build-constraints.txt")
    with open(constraint, "w") as f:
        f.write("setuptools<81\n")
    res = subprocess.run(base + ["--build-constraint", constraint], capture_output=True, text=True)
    if res.returncode != 0 and "no such option" in res.stderr:
        # pip < 25.3 has no --build-constraint but applies PIP_CONSTRAINT to build environments
        env = dict(os.environ, PIP_CONSTRAINT=constraint)
        res = subprocess.run(base, capture_output=True, text=True, env=env)
    sdists = [f for f in os.listdir(tmp) if f.endswith(".tar.gz")]
    if res.returncode != 0 or not sdists:
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConnectionError(f"pip download {sdist} failed (is PyPI reachable?): {tail}")
    return os.path.join(tmp, sdists[0])


def extract(sdist: str, dest: str) -> None:
    os.makedirs(dest, exist_ok=True)
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            # members are "openai-whisper-20230124/whisper/assets/..."
            inner = member.name.split("/", 1)[-1]
            if inner in MEMBERS:
                data = tar.extractfile(member).read()
                target = os.path.join(dest, MEMBERS[inner])
                with open(target + ".tmp", "wb") as f:
                    f.write(data)
                os.replace(target + ".tmp", target)


def fetch(dest: str = DEFAULT_DEST) -> dict:
    """Make sure dest holds valid encoder.json, vocab.bpe and dict.txt; return their paths."""
    paths = {name: os.path.join(dest, name) for name in ("encoder.json", "vocab.bpe", "dict.txt")}
    try:
        check_files(dest)
    except BpeError:
        with tempfile.TemporaryDirectory() as tmp:
            extract(pip_download(tmp), dest)
        check_files(dest)
    if not os.path.isfile(paths["dict.txt"]):
        from fairseq_longmem.convert_hf_gpt2 import write_gpt2_dict

        write_gpt2_dict(paths["dict.txt"], GPT2_VOCAB)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", default=DEFAULT_DEST, help="cache folder (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        paths = fetch(os.path.abspath(os.path.expanduser(args.dest)))
    except ConnectionError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_REGISTRY
    except BpeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name in ("encoder.json", "vocab.bpe", "dict.txt"):
        print(paths[name])
    return 0


if __name__ == "__main__":
    sys.exit(main())
