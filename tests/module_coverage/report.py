"""Per module of fairseq_longmem: imported or not, and how many of its functions ran, from the
files tests/module_coverage/sitecustomize.py wrote (see docs/DEVELOPING.md). Exits 1 if a module
was never imported or a module that defines functions had none run."""

import argparse
import ast
import collections
import glob
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                    "fairseq_longmem")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--logs", required=True, help="the MODULE_COVERAGE_OUT folder of the run")
    args = p.parse_args(argv)
    ran = collections.defaultdict(set)
    for path in glob.glob(os.path.join(args.logs, "*.txt")):
        with open(path) as f:
            for line in f:
                if "\t" in line:
                    source, name = line.rstrip("\n").split("\t")
                    ran[os.path.realpath(source)].add(name)
    missing = []
    for path in sorted(glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True)):
        with open(path) as f:
            tree = ast.parse(f.read())
        defined = {n.name for n in ast.walk(tree)
                   if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        names = ran.get(os.path.realpath(path), set())
        imported, run = "<module>" in names, len(names & defined)
        name = os.path.relpath(path, os.path.dirname(ROOT))
        print(f"{name:60s} {'imported' if imported else 'NOT IMPORTED'}, {run}/{len(defined)} "
              "functions run")
        if not imported or (defined and not run):
            missing.append(name)
    print("every module imported and exercised" if not missing else f"not exercised: {missing}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
