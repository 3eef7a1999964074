"""Fetch the LongMem authors' in-context-learning files (their repository's data/icl/original).

The five sets `--task longmem_icl` reads by name (sst2, sst5, mr, subj, mpqa) are published in
github.com/Victorwz/LongMem under data/icl/original/. This script downloads the train and
evaluation file of each from raw.githubusercontent.com into OUT/data/icl/original/ (the folder
to pass as --icl-data-dir), and checks each file's line count where it is known, so that an HTML
error page or a truncated download is named instead of being read as data. Needs network access;
files already present with the expected line count are kept.

    python examples/icl/get_authors_icl_data.py --out .        # -> ./data/icl/original
"""

import argparse
import os
import sys
import urllib.error
import urllib.request

REPO = "Victorwz/LongMem"
URL = "https://raw.githubusercontent.com/{repo}/{ref}/data/icl/original/{path}"
# path -> line count of the authors' file (None: not checked); the counts were taken from a copy
# of the authors' folder (SST-2 has a header line)
FILES = {
    "sst2": {"SST-2/train.tsv": 6921, "SST-2/dev.tsv": 873},
    "sst5": {"sst-5/stsa.fine.train": 8544, "sst-5/stsa.fine.dev": 1101},
    "mr": {"mr/train.csv": 8662, "mr/test.csv": 2000},
    "subj": {"subj/train.csv": 8000, "subj/test.csv": 2000},
    "mpqa": {"mpqa/train.csv": None, "mpqa/test.csv": None},
}


def count_lines(path):
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def fetch(url, dest, expected):
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
    lines = count_lines(tmp)
    if expected is not None and lines != expected:
        os.remove(tmp)
        raise SystemExit(f"error: {url} has {lines} lines, expected {expected}: not the authors' "
                         f"file (another --ref, or an error page?)")
    os.replace(tmp, dest)
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=".", help="folder that receives data/icl/original/ (default: .)")
    p.add_argument("--sets", default=",".join(FILES), help=f"comma-separated, of {','.join(FILES)}")
    p.add_argument("--ref", default="main", help="branch or commit of the authors' repository")
    args = p.parse_args(argv)
    sets = [s for s in args.sets.split(",") if s]
    unknown = [s for s in sets if s not in FILES]
    if unknown:
        p.error(f"--sets: unknown {unknown}; expected some of {list(FILES)}")
    root = os.path.join(args.out, "data", "icl", "original")
    for name in sets:
        for path, expected in FILES[name].items():
            dest = os.path.join(root, path)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            if os.path.isfile(dest) and (expected is None or count_lines(dest) == expected):
                print(f"{dest}: present")
                continue
            lines = fetch(URL.format(repo=REPO, ref=args.ref, path=path), dest, expected)
            print(f"{dest}: {lines} lines")
    print(f"--icl-data-dir {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
