"""Fetch the LongMem authors' in-context-learning files (their repository's data/icl/original).

The five sets `--task longmem_icl` reads by name (sst2, sst5, mr, subj, mpqa) are published in
github.com/Victorwz/LongMem under data/icl/original/. This script downloads the train and
evaluation file of each from raw.githubusercontent.com into OUT/data/icl/original/ (the folder
to pass as --icl-data-dir), and checks each file (line count, and sha256 at the commit this
project used), so that an HTML error page or a truncated download is named instead of being read
as data. Needs network access; files already present and intact are kept.

    python examples/icl/get_authors_icl_data.py --out .        # -> ./data/icl/original
"""

import argparse
import hashlib
import os
import sys
import urllib.error
import urllib.request

REPO = "Victorwz/LongMem"
# the commit this project's ICL results were made with (the head of their main branch)
COMMIT = "b7f3c6b8db7471eb507971451f63f67e21c49ebf"
URL = "https://raw.githubusercontent.com/{repo}/{ref}/data/icl/original/{path}"
# path -> (line count, sha256) of the authors' file at COMMIT; another --ref checks the count only
FILES = {
    "sst2": {"SST-2/train.tsv": (6921, "0e2eb9cad237f8bc597742bdc136d3382e4b030018f9120b84d9ae9144a2e4ed"),
             "SST-2/dev.tsv": (873, "628b5f860a1584f172b9c7b0323315531ced8bee0bc142a2187d9c97db27946d")},
    "sst5": {"sst-5/stsa.fine.train": (8544, "9b52b5f686ed438d4d0274c385369251b3d579b578fddd340ba8a9bae2ca4bee"),
             "sst-5/stsa.fine.dev": (1101, "b2f76c62b960f9fda5c6d751edb125abab4f878eb94a8754239b7f4af647f4c3")},
    "mr": {"mr/train.csv": (8662, "c1e2cc34d7d271f274c0e8ef24241716cdfee4ca22ad6f741d7be2f1a845f63e"),
           "mr/test.csv": (2000, "11884f83ada1fbec5ece0190e06598e58551ea3f77e50b5e7fed57a1a175e94a")},
    "subj": {"subj/train.csv": (8000, "d281041f21d4d0336d9cd336a5490dd42ab7598ba06cbae93fdf5f962cab340e"),
             "subj/test.csv": (2000, "33ce3835e915977e590e6b27b5051402714c0031c7d2bb618c7beba65e121523")},
    "mpqa": {"mpqa/train.csv": (8606, "98007f9ad3d27accb4b7eda5c69feb0cf77a0913cf490ef0c23871b012abf016"),
             "mpqa/test.csv": (2000, "174c89d88b2775c92bcf9476e754463be57c6f4a4b9e8e5b1e3cc12ab95b4e73")},
}


def check(path, lines, sha256):
    """None if the file at path is the expected one, else what differs."""
    with open(path, "rb") as f:
        data = f.read()
    got = data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)
    if got != lines:
        return f"has {got} lines, expected {lines}"
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        return f"has {lines} lines but another sha256 than the authors' file at {COMMIT[:7]}"
    return None


def fetch(url, dest, lines, sha256):
    """Download url to dest (through a temporary name, so a failed download leaves nothing)."""
    tmp = dest + ".incomplete"
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            f.write(r.read())
    except (urllib.error.URLError, OSError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise SystemExit(f"error: cannot download {url}: {e} (needs network access; or copy the "
                         f"authors' data/icl/original folder by hand)")
    problem = check(tmp, lines, sha256)
    if problem:
        os.remove(tmp)
        raise SystemExit(f"error: {url} {problem}: not the authors' file (another --ref, or an "
                         f"error page?)")
    os.replace(tmp, dest)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=".", help="folder that receives data/icl/original/ (default: .)")
    p.add_argument("--sets", default=",".join(FILES), help=f"comma-separated, of {','.join(FILES)}")
    p.add_argument("--ref", default=COMMIT, help="branch or commit of the authors' repository "
                   "(default: the commit this project used; files are then checked by sha256)")
    args = p.parse_args(argv)
    sets = [s for s in args.sets.split(",") if s]
    unknown = [s for s in sets if s not in FILES]
    if unknown:
        p.error(f"--sets: unknown {unknown}; expected some of {list(FILES)}")
    root = os.path.join(args.out, "data", "icl", "original")
    for name in sets:
        for path, (lines, sha256) in FILES[name].items():
            sha256 = sha256 if args.ref == COMMIT else None
            dest = os.path.join(root, path)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            if os.path.isfile(dest) and check(dest, lines, sha256) is None:
                print(f"{dest}: present")
                continue
            fetch(URL.format(repo=REPO, ref=args.ref, path=path), dest, lines, sha256)
            print(f"{dest}: {lines} lines")
    print(f"--icl-data-dir {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
